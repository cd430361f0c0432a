"""`traitscope train` on real shard folders (written with write_arrays): learning on a sparse
dictionary model, the run folder, split by image, the loader, resume, bad input and impossible sweeps."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from traitscope.cli import main
from traitscope.errors import TraitscopeError
from traitscope.sae import SAEConfig, build_sae, load_sae
from traitscope.shards.store import Shards, write_arrays
from traitscope.train import RunSettings, TrainConfig, train
from traitscope.train.config import expand_grid, identity_hash, parse_count, run_identity
from traitscope.train.loader import LoaderState, ShuffledLoader, TokenSplit, contiguous_rows

LAYER = 2
GRID = (4, 4)


def sparse_dictionary_shards(root: Path, n_images: int = 400, d_model: int = 32, n_atoms: int = 64, k_true: int = 3,
                             seed: int = 0, offset: float = 1.0, images_per_shard: int = 64,
                             model: str = "synthetic-sparse", dtype=np.float32, tag_images: bool = False) -> Shards:
    """Shards whose tokens are x = Σ of k_true unit atoms (coefficients 0.5–2) + small noise + offset.

    With `tag_images`, column 0 of every token holds its image row (to trace the loader's rows).
    """
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_atoms, d_model))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)

    def tokens(n: int) -> np.ndarray:
        idx = np.argsort(rng.random((n, n_atoms)), axis=1)[:, :k_true]
        coef = rng.uniform(0.5, 2.0, (n, k_true))
        return (coef[:, :, None] * atoms[idx]).sum(1) + 0.01 * rng.standard_normal((n, d_model)) + offset

    n_patches = GRID[0] * GRID[1]
    patches = tokens(n_images * n_patches).reshape(n_images, n_patches, d_model)
    cls = tokens(n_images)
    if tag_images:
        patches[:, :, 0] = np.arange(n_images)[:, None]
        cls[:, 0] = np.arange(n_images)
    header = {"model": {"name": model, "family": "test", "description": "sparse dictionary model",
                        "d_model": d_model, "n_layers": 4, "patch_size": 14, "weights_sha256": "ab" * 32},
              "layers": [LAYER], "token_kinds": ["patches", "cls"], "d_model": {str(LAYER): d_model},
              "grid": {str(LAYER): list(GRID)}, "layout": {"n_cls": 1, "n_registers": 0}, "preprocess": {},
              "dtype": np.dtype(dtype).name, "images_root": str(root), "patch_labels": [], "image_labels": []}
    listing = [{"index": i, "path": f"img{i:05d}.png", "width": 32, "height": 32, "label": None, "row": i,
                "skipped": None} for i in range(n_images)]
    arrays = {f"L{LAYER}/patches": patches.astype(dtype), f"L{LAYER}/cls": cls.astype(dtype)}
    return write_arrays(root, header, listing, arrays, images_per_shard=images_per_shard)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Shards:
    return sparse_dictionary_shards(tmp_path_factory.mktemp("shards"))


def cfg_for(shards: Shards, out: Path, **kw) -> TrainConfig:
    base = dict(shards=str(shards.dpath), layer=LAYER, tokens=200_000, batch_size=512, out=str(out), quiet=True,
                log_every=10, checkpoint_every=50_000, val_tokens=4096, threads=1)
    return TrainConfig(**(base | kw))


def read_json(fpath: Path) -> dict:
    return json.loads(Path(fpath).read_text())


# --- learning ---

def test_topk_family_learns_the_dictionary_and_sparser_is_worse(shards, tmp_path):
    """NMSE falls well below 1 on held-out images; k = 1 (too sparse for 3 atoms a token) is
    measurably worse than k = 4."""
    settings = [RunSettings(variant=v, k=k, d_sae=128, dead_tokens=20_000)
                for v, k in [("topk", 4), ("topk", 1), ("batchtopk", 4), ("matryoshka", 4)]]
    results = train(cfg_for(shards, tmp_path, tokens=200_000), settings, echo=lambda *a: None)
    assert all(r.status == "trained" for r in results)
    good, bad = results[0].metrics, results[1].metrics
    assert good["nmse"] < 0.2, good
    assert bad["nmse"] > good["nmse"] + 0.1, (good, bad)
    assert abs(good["l0"] - 4) < 0.01 and abs(bad["l0"] - 1) < 0.01
    for r in results[2:]:
        assert r.metrics["nmse"] < 0.35, (r.dpath, r.metrics)
        assert 2.5 < r.metrics["l0"] < 6, (r.dpath, r.metrics)  # JumpReLU at inference keeps L0 near k


def test_dead_latents_in_training_are_counted_in_a_run_shorter_than_the_dead_window(shards, tmp_path):
    """With dead_tokens beyond the budget, a latent is dead in training when it was silent for the last
    pass over the data (or the whole run, if shorter): the same count as with a window of exactly the
    budget, and some of 512 latents with k = 1 are."""
    settings = [RunSettings(variant="topk", k=1, d_sae=512, dead_tokens=d) for d in (10_000_000, 20_480)]
    long_window, budget_window = train(cfg_for(shards, tmp_path, tokens=20_480), settings, echo=lambda *a: None)
    assert 0 < long_window.metrics["dead_frac_train"] == budget_window.metrics["dead_frac_train"]


def test_the_cli_suggests_half_the_rate_or_fewer_latents_when_many_latents_died(shards, tmp_path, capsys):
    """512 latents with k = 1 leave many silent: the run's line is followed by a note naming half its rate
    and fewer latents."""
    argv = ["train", "--shards", str(shards.dpath), "--layer", str(LAYER), "--k", "1", "--d-sae", "512",
            "--tokens", "20k", "--batch-size", "512", "--out", str(tmp_path / "runs"), "--quiet", "--threads", "1"]
    assert main(argv) == 0
    (dpath,) = (tmp_path / "runs").iterdir()
    dead, lr = read_json(dpath / "metrics.json")["dead_frac_train"], read_json(dpath / "config.json")["train"]["lr"]
    assert dead >= 0.05
    out = capsys.readouterr().out
    assert f"{dead:.0%} of its latents stopped firing in training; half the learning rate (--lr {lr / 2:.2g})" in out
    assert "fewer latents than the SAE has" in out


def test_relu_l1_learns_and_l1_trades_sparsity(shards, tmp_path):
    settings = [RunSettings(variant="relu", l1_coeff=l1, d_sae=128, lr=2e-3) for l1 in (0.3, 3.0)]
    weak, strong = train(cfg_for(shards, tmp_path, tokens=300_000), settings, echo=lambda *a: None)
    assert weak.metrics["nmse"] < 0.5, weak.metrics
    assert strong.metrics["l0"] < weak.metrics["l0"], (weak.metrics, strong.metrics)


def test_jumprelu_learns_its_thresholds_from_the_cli_and_l0_coeff_trades_sparsity(shards, tmp_path):
    """`--variant jumprelu` with a grid of its own --l0-coeff: held-out NMSE well below 1, the larger
    penalty sparser, and per-latent thresholds learnt and saved."""
    out = tmp_path / "runs"
    argv = ["train", "--shards", str(shards.dpath), "--layer", str(LAYER), "--variant", "jumprelu",
            "--l0-coeff", "0.001,0.01", "--d-sae", "128", "--tokens", "200k", "--batch-size", "512", "--out",
            str(out), "--quiet", "--val-tokens", "4k", "--threads", "1"]
    assert main(argv) == 0
    (weak_dpath,), (strong_dpath,) = (list(out.glob(f"jumprelu-l0_{c}-128-*")) for c in ("0.001", "0.01"))
    weak, strong = read_json(weak_dpath / "metrics.json"), read_json(strong_dpath / "metrics.json")
    assert weak["nmse"] < 0.3 and strong["l0"] < 0.7 * weak["l0"], (weak, strong)
    assert read_json(weak_dpath / "config.json")["sae"]["l0_coeff"] == 0.001
    sae = load_sae(weak_dpath)
    assert sae.threshold.shape == (128,) and float(sae.threshold.detach().std()) > 0


# --- the command line and the run folder ---

def test_cli_trains_a_grid_in_one_pass_and_prints_each_run_folder(shards, tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["train", "--shards", str(shards.dpath), "--layer", str(LAYER), "--sae", "topk", "--k", "2,4",
            "--d-sae", "64", "--tokens", "40k", "--batch-size", "256", "--out", str(out), "--quiet",
            "--checkpoint-every", "20k", "--val-tokens", "2k", "--threads", "1", "--dead-tokens", "40k"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "AuxK stays off in 2 SAE(s)" in printed  # the dead-latent window is not shorter than the budget
    run_dpaths = sorted(out.iterdir())
    assert len(run_dpaths) == 2
    for dpath in run_dpaths:
        assert str(dpath) in printed
        for name in ("config.json", "sae.safetensors", "metrics.jsonl", "metrics.json", "curves.png"):
            assert (dpath / name).is_file(), name
        config = read_json(dpath / "config.json")
        assert f"{dpath}  (new)  lr {config['train']['lr']:.2g}" in printed  # the rate each run trains at
        assert config["sae"]["variant"] == "topk" and config["sae"]["d_model"] == 32
        assert {"hash", "path", "layer", "token_kind", "model", "weights_sha256"} <= set(config["shards"])
        assert config["shards"]["hash"] == shards.hash and config["shards"]["layer"] == LAYER
        assert config["shards"]["model"] == "synthetic-sparse"
        metrics = read_json(dpath / "metrics.json")
        assert {"nmse", "l0", "dead_frac", "dense_frac", "explained_variance", "n_tokens"} <= set(metrics)
        lines = [json.loads(ln) for ln in (dpath / "metrics.jsonl").read_text().splitlines()]
        assert {"step", "tokens", "loss", "nmse", "l0", "dead_frac", "dense_frac", "tokens_per_s"} <= set(lines[-1])
        assert (dpath / "curves.png").read_bytes()[:4] == b"\x89PNG"
        assert (dpath / "checkpoint").is_dir() and not (dpath / "checkpoint.old").exists()  # one copy kept
    # a rerun finds the finished runs
    assert main(argv) == 0
    assert printed.count("new") == 2 and capsys.readouterr().out.count("already trained") >= 2


def test_saved_sae_takes_raw_activations(shards, tmp_path):
    """load_sae(run) reproduces the trained SAE's codes on raw activations (the input scale is folded
    into the weights), and metrics.json is what it gives on the validation images."""
    cfg = cfg_for(shards, tmp_path, tokens=60_000)
    (result,) = train(cfg, [RunSettings(variant="batchtopk", k=4, d_sae=64)], echo=lambda *a: None)
    run = result.dpath
    sae = load_sae(run)
    state = read_json(run / "checkpoint" / "state.json")
    scale = state["input_scale"]
    assert abs(scale - 1) > 0.05  # the scaling did something to undo
    trained = build_sae(SAEConfig(**read_json(run / "config.json")["sae"]))
    tensors = load_file(str(run / "checkpoint" / "state.safetensors"))
    trained.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    trained.eval()
    split = TokenSplit(shards, LAYER, "patches", cfg.val_frac, cfg.seed)
    x_raw = next(split.val_batches(1024, 1024))
    with torch.no_grad():
        codes = sae.encode(x_raw)
        assert torch.allclose(codes, trained.encode(x_raw * scale) / scale, atol=1e-5, rtol=1e-4)
        assert torch.allclose(sae.decode(codes), trained.decode(trained.encode(x_raw * scale)) / scale, atol=1e-4)
    # metrics.json reproduces from the saved SAE and the validation images named in the config
    val_rows = read_json(run / "config.json")["train"]["val_rows"]
    assert val_rows == split.val_rows.tolist()
    acts = shards.acts(LAYER, "patches")
    n_p = acts.rows_per_item
    order = split.val_order
    rows = np.concatenate([np.arange(i * n_p, (i + 1) * n_p) for i in order])[:cfg.val_tokens]
    x = torch.from_numpy(acts[rows].astype(np.float32))
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))
    nmse = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert nmse == pytest.approx(read_json(run / "metrics.json")["nmse"], rel=1e-4)


@pytest.mark.parametrize("token_kind", ["cls", "all"])
def test_other_token_kinds(shards, tmp_path, token_kind):
    cfg = cfg_for(shards, tmp_path, token_kind=token_kind, tokens=20_000, batch_size=128)
    (result,) = train(cfg, [RunSettings(variant="topk", k=2, d_sae=32)], echo=lambda *a: None)
    assert result.status == "trained" and result.metrics["nmse"] < 1
    config = read_json(result.dpath / "config.json")
    assert config["shards"]["token_kind"] == token_kind
    n_tokens_per_image = {"cls": 1, "all": 17}[token_kind]
    assert config["train"]["n_train_tokens"] == n_tokens_per_image * (400 - len(config["train"]["val_rows"]))


# --- split and loader ---

@pytest.fixture(scope="module")
def tagged(tmp_path_factory) -> Shards:
    return sparse_dictionary_shards(tmp_path_factory.mktemp("tagged"), n_images=96, images_per_shard=10,
                                    model="tagged", tag_images=True)


@pytest.mark.parametrize("token_kind,val_split", [("patches", "random"), ("all", "random"), ("patches", "contiguous")])
def test_no_token_of_a_validation_image_is_trained_on(tagged, token_kind, val_split):
    split = TokenSplit(tagged, LAYER, token_kind, val_frac=0.2, seed=3, val_split=val_split)
    assert len(split.val_rows) == round(0.2 * 96)
    if val_split == "contiguous":  # 5 runs of neighbouring images, spread over the data set
        runs = np.split(split.val_rows, np.flatnonzero(np.diff(split.val_rows) > 1) + 1)
        assert [len(r) for r in runs] == [4, 4, 4, 4, 3] and runs[0][0] > 0 and runs[-1][-1] < 95
    per_image = 17 if token_kind == "all" else 16
    with ShuffledLoader(split, 100, seed=3, chunk_rows=24, buffer_mb=1) as loader:
        rows = torch.cat([next(loader) for _ in range(-(-split.n_train_tokens // 100))])[:split.n_train_tokens]
    images = rows[:, 0].long().numpy()
    assert not np.isin(images, split.val_rows).any()
    # one epoch visits every training token exactly once, in shuffled order
    counts = np.bincount(images, minlength=96)
    assert (counts[split.val_rows] == 0).all()
    assert (np.delete(counts, split.val_rows) == per_image).all()
    assert not np.all(np.diff(images) >= 0)


def test_contiguous_rows_are_exact_runs_of_neighbours():
    for n_images in range(2, 60):
        for n_val in range(1, n_images):
            rows = contiguous_rows(n_images, n_val)
            assert len(np.unique(rows)) == n_val and 0 <= rows.min() and rows.max() < n_images
            assert (np.diff(rows) > 1).sum() < 5  # at most 5 runs
    rows = contiguous_rows(367, 73)  # CamVid's 367 frames, 20% held out: 5 runs of 14-15 frames, evenly spread
    assert np.flatnonzero(np.diff(rows) > 1).tolist() == [14, 29, 44, 58] and rows[0] == 49 and rows[-1] == 317


def test_loader_is_deterministic_and_resumes_from_its_state(tagged):
    split = TokenSplit(tagged, LAYER, "patches", val_frac=0.1, seed=0)

    def take(n: int, state=None, seed=0, readers=2):
        with ShuffledLoader(split, 64, seed=seed, chunk_rows=40, buffer_mb=1, state=state, readers=readers) as loader:
            return [next(loader) for _ in range(n)], loader.state

    first, _ = take(60)
    for readers in (1, 3):  # the stream does not depend on how many threads read it
        again, _ = take(60, readers=readers)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    head, state = take(23)
    tail, _ = take(37, state=state)
    assert all(torch.equal(a, b) for a, b in zip(first, head + tail))
    other, _ = take(5, seed=1)
    assert not torch.equal(other[0], first[0])


def test_batches_as_stored_are_the_float32_batches_before_the_cast(tagged):
    """On a GPU `train` ships batches in the shards' dtype and casts there: the same numbers."""
    split = TokenSplit(tagged, LAYER, "patches", val_frac=0.1, seed=0)
    with ShuffledLoader(split, 64, seed=0, chunk_rows=40, buffer_mb=1) as plain, \
            ShuffledLoader(split, 64, seed=0, chunk_rows=40, buffer_mb=1, as_stored=True, rows=slice(8, 40)) as stored:
        for _ in range(30):
            want, got = next(plain), next(stored)
            assert got.dtype == torch.from_numpy(np.empty(0, split.dtype)).dtype
            assert torch.equal(got.float(), want[8:40])


def test_loader_names_the_row_holding_a_nan(tmp_path):
    shards = sparse_dictionary_shards(tmp_path / "nan", n_images=40, images_per_shard=10)
    bad_fpath = shards.dpath / f"L{LAYER}" / "patches-00002.npy"
    arr = np.load(bad_fpath)
    arr[3, 5, 7] = np.nan  # image row 23, patch 5: row 3 * 16 + 5 = 53 of that file
    np.save(bad_fpath, arr)
    split = TokenSplit(Shards(shards.dpath), LAYER, "patches", val_frac=0.0, seed=0)
    with pytest.raises(TraitscopeError, match=r"patches-00002.npy row 53 \(image row 23, patch 5\)"):
        with ShuffledLoader(split, 64, seed=0, chunk_rows=32, buffer_mb=1) as loader:
            for _ in range(20):
                next(loader)


def test_cli_reports_nan_activations_as_one_error(tmp_path, capsys):
    shards = sparse_dictionary_shards(tmp_path / "nan", n_images=40, images_per_shard=10)
    bad_fpath = shards.dpath / f"L{LAYER}" / "patches-00001.npy"
    arr = np.load(bad_fpath)
    arr[:, 0, 0] = np.inf  # every image of the shard, so a training image is hit whichever are held out
    np.save(bad_fpath, arr)
    code = main(["train", "--shards", str(shards.dpath), "--k", "2", "--d-sae", "32", "--tokens", "20k",
                 "--batch-size", "128", "--out", str(tmp_path / "runs"), "--quiet", "--val-frac", "0.05", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "NaN/Inf in activations" in err and re.search(r"patches-00001\.npy row \d+ \(image row 1\d, patch 0\)", err)


# --- resume ---

ALL_VARIANTS = [RunSettings(variant="topk", k=3, d_sae=64, dead_tokens=3_000),
                RunSettings(variant="batchtopk", k=3, d_sae=64, dead_tokens=3_000),
                RunSettings(variant="matryoshka", k=3, d_sae=64, prefixes=[8, 32, 64], dead_tokens=3_000),
                RunSettings(variant="relu", l1_coeff=1.0, d_sae=64),
                RunSettings(variant="jumprelu", l0_coeff=1e-3, d_sae=64)]


def weights(run_dpath: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dpath / "sae.safetensors"))


def test_resumed_run_ends_with_the_same_weights(shards, tmp_path):
    """Stopped with a checkpoint after 15k tokens and rerun, every variant ends bitwise equal to an
    uninterrupted run (AuxK, the BatchTopK threshold, Adam and the loader position all carry over)."""
    whole = train(cfg_for(shards, tmp_path / "a", tokens=40_000, checkpoint_every=10_000), ALL_VARIANTS,
                  echo=lambda *a: None)
    stopped = train(cfg_for(shards, tmp_path / "b", tokens=40_000, checkpoint_every=10_000, stop_after=15_000),
                    ALL_VARIANTS, echo=lambda *a: None)
    assert all(r.status == "stopped" for r in stopped)
    state = read_json(stopped[0].dpath / "checkpoint" / "state.json")
    assert state["step"] == -(-15_000 // 512)
    for r in stopped:  # what a kill in the middle of writing a log line leaves
        with open(r.dpath / "metrics.jsonl", "a") as f:
            f.write('{"step": 99, "tok')
    resumed = train(cfg_for(shards, tmp_path / "b", tokens=40_000, checkpoint_every=10_000), ALL_VARIANTS,
                    echo=lambda *a: None)
    for a, b in zip(whole, resumed):
        assert b.status == "trained"
        wa, wb = weights(a.dpath), weights(b.dpath)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), (a.dpath.name, key)
        assert a.metrics == b.metrics


def test_a_run_killed_before_its_first_checkpoint_starts_its_log_afresh(shards, tmp_path):
    """No checkpoint means the rerun starts at step 0: the lines the killed process logged go."""
    cfg = cfg_for(shards, tmp_path / "r", tokens=20_000, log_every=4)
    (first,) = train(cfg, [RunSettings(variant="topk", k=3, d_sae=64)], echo=lambda *a: None)
    for name in ("checkpoint", "checkpoint.old"):
        shutil.rmtree(first.dpath / name, ignore_errors=True)
    (first.dpath / "metrics.json").unlink()  # what a kill before the first checkpoint leaves
    (again,) = train(cfg, [RunSettings(variant="topk", k=3, d_sae=64)], echo=lambda *a: None)
    steps = [json.loads(line)["step"] for line in (again.dpath / "metrics.jsonl").read_text().splitlines()]
    assert steps and steps == sorted(set(steps))


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_weights(shards, tmp_path):
    """A `traitscope train` process killed with SIGKILL after a checkpoint continues from it when the
    command is rerun, and ends with the weights of an uninterrupted run."""
    argv = [sys.executable, "-m", "traitscope.cli", "train", "--shards", str(shards.dpath), "--sae", "topk",
            "--k", "3", "--d-sae", "64", "--tokens", "150k", "--batch-size", "256", "--checkpoint-every", "5k",
            "--out", str(tmp_path / "killed"), "--quiet", "--threads", "1"]
    proc = subprocess.Popen(argv, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    state_fpath = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "killed").glob("*/checkpoint/state.json"))
        if found and read_json(found[0])["step"] >= 40:
            state_fpath = found[0]
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state_fpath is not None, "no checkpoint appeared"
    run_dpath = state_fpath.parent.parent
    assert not (run_dpath / "metrics.json").exists(), "the run finished before it could be killed"
    rerun = subprocess.run(argv, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    cfg = TrainConfig(shards=str(shards.dpath), tokens=150_000, batch_size=256, out=str(tmp_path / "whole"),
                      quiet=True, threads=1)
    (whole,) = train(cfg, [RunSettings(variant="topk", k=3, d_sae=64)], echo=lambda *a: None)
    assert whole.dpath.name == run_dpath.name  # same settings, same content-addressed folder
    wa, wb = weights(whole.dpath), weights(run_dpath)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_loss_that_turns_nan_stops_the_run_and_keeps_the_last_good_checkpoint(shards, tmp_path, capsys):
    out = tmp_path / "runs"
    code = main(["train", "--shards", str(shards.dpath), "--sae", "topk", "--k", "3", "--d-sae", "64",
                 "--lr", "1e30,1e-3", "--lr-warmup", "0", "--tokens", "20k", "--batch-size", "256",
                 "--checkpoint-every", "256", "--out", str(out), "--quiet", "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 1
    runs = {read_json(d / "config.json")["train"]["lr"]: d for d in out.iterdir()}
    blown, fine = runs[1e30], runs[1e-3]
    assert "failed: the loss became" in captured.err and str(blown) in captured.err
    assert not (blown / "metrics.json").exists() and (fine / "metrics.json").is_file()
    state = read_json(blown / "checkpoint" / "state.json")
    failed_at = int(captured.err.split("at step ")[1].split()[0].rstrip(";"))
    assert state["step"] == failed_at - 1
    assert all(torch.isfinite(v).all() for v in weights(blown).values())


# --- refusals before training starts ---

def cli_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_impossible_sweeps_are_refused_before_training(shards, tmp_path, capsys):
    out = tmp_path / "runs"
    base = ["train", "--shards", str(shards.dpath), "--out", str(out), "--quiet", "--tokens", "10k"]
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps([{"sae": "topk", "k": 4, "layer": 2}, {"sae": "topk", "k": 8, "layer": -1}]))
    err = cli_error(base + ["--sweep", str(sweep)], capsys)
    assert "cannot share one pass" in err and "layer" in err
    sweep.write_text(json.dumps([{"sae": "topk", "k": 4}, {"sae": "topk", "k": 8, "batch_size": 128}]))
    assert "batch_size" in cli_error(base + ["--sweep", str(sweep)], capsys)
    sweep.write_text(json.dumps([{"sae": "topk", "k": 4, "d_sae": 2}]))
    assert "between 1 and d_sae=2" in cli_error(base + ["--sweep", str(sweep)], capsys)
    sweep.write_text(json.dumps([{"sae": "topk", "kk": 4}]))
    assert "unknown setting 'kk'" in cli_error(base + ["--sweep", str(sweep)], capsys)
    assert "--k applies to" in cli_error(base + ["--sae", "relu", "--k", "4"], capsys)
    assert "not both" in cli_error(base + ["--k", "4", "--d-sae", "100", "--expansion", "2"], capsys)
    assert "relu SAEs have no parameter k" in cli_error(base + ["--sweep", str(_write(tmp_path, [{"sae": "relu", "k": 3}]))],
                                                        capsys)
    assert "--prefixes applies to matryoshka" in cli_error(base + ["--variant", "topk", "--prefixes", "8,16"], capsys)
    assert "unknown SAE variant 'gated'" in cli_error(base + ["--sae", "gated", "--k", "4"], capsys)
    assert "identical" in cli_error(base + ["--sae", "topk,topk", "--k", "4"], capsys)
    assert "--token-kind cls" in cli_error(base[:-2] + ["--tokens", "cls"], capsys)
    assert not out.exists() or not any(out.iterdir())


def _write(tmp_path: Path, entries: list[dict]) -> Path:
    fpath = tmp_path / "entries.json"
    fpath.write_text(json.dumps(entries))
    return fpath


def test_a_toml_sweep_file_runs(shards, tmp_path, capsys):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('tokens = "10k"\nbatch_size = 128\n\n[[run]]\nsae = "topk"\nk = 2\nd_sae = 32\n\n'
                     '[[run]]\nsae = "relu"\nl1 = 1.0\nd_sae = 32\n')
    assert main(["train", "--shards", str(shards.dpath), "--sweep", str(sweep), "--out", str(tmp_path / "r"),
                 "--quiet", "--val-tokens", "1k", "--threads", "1"]) == 0
    names = sorted(p.name.split("-")[0] for p in (tmp_path / "r").iterdir())
    assert names == ["relu", "topk"]


def test_resuming_into_a_run_folder_of_other_shards_is_refused(shards, tmp_path, capsys):
    other = sparse_dictionary_shards(tmp_path / "other", n_images=40, d_model=48, model="other-model")
    out = tmp_path / "runs"
    common = ["--k", "2", "--d-sae", "32", "--tokens", "4k", "--batch-size", "128", "--out", str(out),
              "--name", "mine", "--quiet", "--threads", "1"]
    assert main(["train", "--shards", str(shards.dpath), *common]) == 0
    err = cli_error(["train", "--shards", str(other.dpath), *common], capsys)
    assert "mine was trained on shards" in err and "d_model 32" in err and "d_model 48" in err


def test_counts_accept_suffixes_and_exponents():
    assert parse_count("50M") == 50_000_000
    assert parse_count("1e6") == 1_000_000
    assert parse_count("2.5k") == 2_500
    assert parse_count("4096") == 4096
    with pytest.raises(TraitscopeError):
        parse_count("lots")


def test_loader_state_is_plain_data():
    assert LoaderState(1, 2, 3)._asdict() == {"epoch": 1, "block": 2, "offset": 3}


@pytest.mark.parametrize("backend, module", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_optional_loggers_are_asked_for_and_explain_a_missing_package(shards, tmp_path, capsys, backend, module):
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    err = cli_error(["train", "--shards", str(shards.dpath), "--k", "2", "--d-sae", "32", "--tokens", "2k",
                     "--batch-size", "128", "--out", str(tmp_path), "--quiet", "--threads", "1",
                     "--log-to", backend], capsys)
    assert f"--log-to {backend} needs the {module} package" in err
    assert not any(tmp_path.iterdir())  # refused before any run folder was made


def test_run_identities_and_names_are_those_of_runs_made_before():
    """Existing run folders keep their names (and resume): the hashes below were computed by the
    code before variants owned their parameters, when the TopK family's defaults were lr
    2e-4 / sqrt(d_sae / 16384), dead_tokens 10M, auxk_alpha 1/32 and a plain ReLU in AuxK (auxk_leak 0),
    and Matryoshka's default prefixes started at d_sae/16 (prefix_levels 5), in batches of 4096 (the
    default batch then; a run at another batch size is another run)."""
    cfg = TrainConfig(shards="x", tokens=1_000_000, batch_size=4096)
    cases = {"topk-k32-768-abce9e9991": RunSettings(variant="topk", lr=2e-4 / math.sqrt(768 / 2 ** 14),
                                                    dead_tokens=10_000_000, auxk_alpha=1 / 32, auxk_leak=0),
             "relu-l1_3-128-0a8d02d873": RunSettings(variant="relu", l1_coeff=3, d_sae=128, lr=2e-3,
                                                     dead_tokens=10_000_000),
             "matryoshka-k3-64-12b516a89b": RunSettings(variant="matryoshka", k=3, d_sae=64, prefixes=[8, 32, 64],
                                                        dead_tokens=3000, lr=2e-4 / math.sqrt(64 / 2 ** 14),
                                                        auxk_alpha=1 / 32, auxk_leak=0),
             "matryoshka-k3-64-4e2383b9c6": RunSettings(variant="matryoshka", k=3, d_sae=64, prefix_levels=5,
                                                        dead_tokens=3000, lr=2e-4 / math.sqrt(64 / 2 ** 14),
                                                        auxk_alpha=1 / 32, auxk_leak=0),
             "batchtopk-k4-96-7acf37d728": RunSettings(variant="batchtopk", k=4, expansion=2, k_aux=16, auxk_alpha=0.1,
                                                       lr=2e-4 / math.sqrt(96 / 2 ** 14), dead_tokens=10_000_000,
                                                       auxk_leak=0)}
    for name, settings in cases.items():
        s = settings.resolved(48)
        assert f"{s.label()}-{identity_hash(run_identity(cfg, s, 'abc', 3))}" == name
    # prefix_levels only chooses the default prefixes: given prefixes, any value leaves the identity alone
    s = RunSettings(variant="matryoshka", k=3, d_sae=64, prefixes=[8, 32, 64], prefix_levels=7, dead_tokens=3000,
                    lr=2e-4 / math.sqrt(64 / 2 ** 14), auxk_alpha=1 / 32, auxk_leak=0).resolved(48)
    assert f"{s.label()}-{identity_hash(run_identity(cfg, s, 'abc', 3))}" == "matryoshka-k3-64-12b516a89b"


def test_a_variant_parameter_applies_to_the_variants_that_have_it():
    runs = expand_grid({"k_aux": 64}, {"variant": ["topk", "relu"], "k": [16, 32], "l1_coeff": [1.0]})
    assert runs == [{"variant": "topk", "k_aux": 64, "k": 16}, {"variant": "topk", "k_aux": 64, "k": 32},
                    {"variant": "relu", "l1_coeff": 1.0}]


def test_the_default_learning_rate_scales_with_the_square_root_of_the_batch():
    at_4096 = RunSettings(k=8, d_sae=4096).resolved(64).lr
    assert at_4096 == pytest.approx(2e-3 / math.sqrt(4096 / 2 ** 14))
    assert RunSettings(k=8, d_sae=4096).resolved(64, batch_size=1024).lr == pytest.approx(at_4096 / 2)
    assert RunSettings(k=8, d_sae=4096, lr=1e-3).resolved(64, batch_size=1024).lr == 1e-3  # given: kept
