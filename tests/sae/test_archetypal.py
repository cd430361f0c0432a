"""The archetypal SAE: atoms within δ of the convex hull of data points while training, a real
`traitscope train --sae archetypal` run that saves a plain dictionary, and resume."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shard_fixtures import LAYER, make_shards
from traitscope.cli import main
from traitscope.sae import SAEConfig, build_sae, load_sae

D_MODEL, D_SAE, N_ANCHORS, DELTA = 32, 64, 48, 0.05


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Tokens that are sparse mixtures (3 of 64 unit atoms, coefficients 0.5–2) plus an offset."""
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((64, D_MODEL))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    n = 200 * 16
    idx = np.argsort(rng.random((n, 64)), axis=1)[:, :3]
    acts = (rng.uniform(0.5, 2.0, (n, 3, 1)) * atoms[idx]).sum(1) + 1.0 + 0.01 * rng.standard_normal((n, D_MODEL))
    return make_shards(tmp_path_factory.mktemp("shards"), acts.reshape(200, 16, D_MODEL), images_per_shard=50)


def train_argv(shards, out: Path, *extra: str) -> list[str]:
    return ["train", "--shards", str(shards.dpath), "--layer", str(LAYER), "--sae", "archetypal", "--k", "3",
            "--d-sae", str(D_SAE), "--n-anchors", str(N_ANCHORS), "--delta", str(DELTA), "--tokens", "30k",
            "--batch-size", "512", "--checkpoint-every", "10k", "--dead-tokens", "5k", "--val-tokens", "2k",
            "--threads", "1", "--quiet", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def whole_run(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole")
    assert main(train_argv(shards, out)) == 0
    (dpath,) = out.iterdir()
    return dpath


def trained_form(dpath: Path):
    """The SAE as training left it (from its checkpoint: logits, Λ and the anchors) and its input scale."""
    tensors = load_file(str(dpath / "checkpoint" / "state.safetensors"))
    sae = build_sae(load_sae(dpath).cfg)
    sae.training_form_()
    sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    return sae.eval(), json.loads((dpath / "checkpoint" / "state.json").read_text())["input_scale"]


def test_atoms_stay_within_delta_of_the_anchors_hull_at_every_step():
    """Every step: W_dec = w·C + Λ with w row-stochastic and ‖Λ_i‖ ≤ δ, Λ pushed to its bound."""
    torch.manual_seed(0)
    sae = build_sae(SAEConfig("archetypal", 16, 40, k=4, n_anchors=24, delta=DELTA))
    sae.training_form_()
    x = torch.randn(1000, 16) + 2
    sae.init_b_dec_(x.mean(0))
    sae.init_from_data_(x)
    anchors = sae.hull.anchors_nd
    assert anchors.mean(0).norm() < 0.1 * x.mean(0).norm()  # centroids of x − b_dec, not of x
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(30):
        out = sae(x[torch.randint(0, 1000, (128,))], dead_s=torch.zeros(40, dtype=torch.bool))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sae.normalize_decoder_()
        with torch.no_grad():
            w = sae.logits_sn.softmax(1)
            assert (w >= 0).all() and torch.allclose(w.sum(1), torch.ones(40))
            assert (sae.relax_sd.norm(dim=1) <= DELTA * (1 + 1e-5)).all()
            assert torch.allclose(sae.W_dec, w @ anchors + sae.relax_sd, atol=1e-6)
    assert sae.relax_sd.norm(dim=1).max() > DELTA * 0.99  # the bound is what held it


def test_a_trained_archetypal_run_saves_a_plain_dictionary_with_its_reconstructions(shards, whole_run):
    config = load_sae(whole_run).cfg.to_dict()
    assert config["variant"] == "archetypal" and config["n_anchors"] == N_ANCHORS and config["delta"] == DELTA
    saved = load_file(str(whole_run / "sae.safetensors"))
    assert set(saved) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    trained, scale = trained_form(whole_run)
    with torch.no_grad():  # the training form kept its constraint to the end, and is what was saved
        assert (trained.relax_sd.norm(dim=1) <= DELTA * (1 + 1e-5)).all()
        assert torch.allclose(trained.logits_sn.softmax(1).sum(1), torch.ones(D_SAE))
        assert torch.allclose(saved["W_dec"], trained.W_dec, atol=1e-6)
    sae = load_sae(whole_run)
    x_raw = torch.from_numpy(shards.acts(LAYER, "patches")[:1024].astype(np.float32))
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x_raw))
        x_hat_trained = trained.decode(trained.encode(x_raw * scale)) / scale
        assert torch.allclose(x_hat, x_hat_trained, atol=1e-4)
        nmse = float(((x_raw - x_hat) ** 2).sum() / ((x_raw - x_raw.mean(0)) ** 2).sum())
    assert nmse < 0.5  # it learnt something


def test_a_stopped_archetypal_run_resumes_to_the_same_weights(shards, whole_run, tmp_path):
    """The anchors, logits, Λ and their Adam moments come back from the checkpoint."""
    assert main(train_argv(shards, tmp_path, "--stop-after", "15k")) == 0
    (dpath,) = tmp_path.iterdir()
    assert not (dpath / "metrics.json").exists()
    assert main(train_argv(shards, tmp_path)) == 0
    a, b = load_file(str(whole_run / "sae.safetensors")), load_file(str(dpath / "sae.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_more_anchors_than_start_up_tokens_is_one_clear_error(shards, tmp_path, capsys):
    assert main(train_argv(shards, tmp_path, "--n-anchors", "999999")) == 2
    err = capsys.readouterr().err
    assert "n_anchors=999999" in err and "--n-anchors" in err and len(err.strip().splitlines()) == 1
