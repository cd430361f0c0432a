"""SAEs from saev, SAELens and sparsify, in and out.

Each foreign folder is written here in the library's documented layout (a saev dump: JSON header line
then `torch.save` of the state dict; SAELens: cfg.json + sae_weights.safetensors; sparsify: cfg.json +
sae.safetensors), with random weights, and the imported SAE's codes and reconstructions are compared
with the foreign library's formula written out independently below. Exports are read back exactly.
`benchmarks/check_interop.py` runs the real libraries side by side.
"""

import argparse
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from shard_fixtures import LAYER, make_shards
from traitscope.cli import main
from traitscope.errors import TraitscopeError
from traitscope.interop import read_foreign_sae
from traitscope.interop.saelens import write_saelens
from traitscope.interop.sparsify import write_sparsify
from traitscope.sae import SAEConfig, build_sae, load_sae

D, S, K = 16, 48, 6


def weights(seed=0, d=D, s=S):
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d, s, generator=g) / d ** 0.5, "b_enc": torch.randn(s, generator=g) * 0.2,
            "W_dec": torch.randn(s, d, generator=g) / d ** 0.5, "b_dec": torch.randn(d, generator=g) * 0.3}


def inputs(n=64, seed=1, d=D):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.2


def topk_keep(pre, k):
    """Keep each row's k largest values, zero the rest."""
    idx = pre.topk(k, dim=1).indices
    return torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx))


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --- saev ---

def saev_dump(fpath, header, state):
    with open(fpath, "wb") as f:
        f.write((json.dumps(header) + "\n").encode())
        torch.save(state, f)
    return fpath


def saev_header(activation, schema=5):
    return {"schema": schema, "cfg": {"d_model": D, "d_sae": S, "activation": activation,
                                      "normalize_w_dec": True}, "commit": "abc", "lib": "1.2"}


@pytest.mark.parametrize("schema", [5, 2])
def test_saev_batchtopk_and_topk_match_saev_formula(tmp_path, schema):
    w = weights()
    x = inputs()
    thr = 0.4
    ckpt = tmp_path / "run" / "checkpoint"
    ckpt.mkdir(parents=True)
    act = {"cls": "BatchTopK", "params": {"key": "batch-top-k", "top_k": K, "momentum": 0.1}}
    saev_dump(ckpt / "sae.pt", saev_header(act, schema), w | {"activation.threshold": torch.tensor(thr)})
    (ckpt / "config.json").write_text(json.dumps({"train_data": {"layer": -2, "tokens": "content",
                                                                 "shards": "/x/saev/shards/0123abcd"}}))
    foreign = read_foreign_sae(f"saev:{tmp_path / 'run'}")  # the run folder finds checkpoint/sae.pt
    h = x @ w["W_enc"] + w["b_enc"]  # saev >= schema 2: no b_dec subtracted
    expected = torch.where(h > thr, h, torch.zeros_like(h))
    close(foreign.sae.encode(x), expected)
    close(foreign.sae.decode(foreign.sae.encode(x)), expected @ w["W_dec"] + w["b_dec"])
    assert (foreign.sae.cfg.variant, foreign.sae.params.k, foreign.layer, foreign.token_kind) == ("batchtopk", K, -2, "patches")

    act = {"cls": "TopK", "params": {"key": "top-k", "top_k": K}}
    saev_dump(tmp_path / "topk.pt", saev_header(act, schema), w)
    sae = read_foreign_sae(f"saev:{tmp_path / 'topk.pt'}").sae
    expected = topk_keep(h, K)
    assert (expected > 0).sum(1).min() == K  # the case where saev's TopK and ReLU(TopK) agree
    close(sae.encode(x), expected)


def test_saev_schema1_and_legacy_subtract_b_dec(tmp_path):
    w = weights(3)
    x = inputs()
    header = {"schema": 1, "cls": "SparseAutoencoderConfig",
              "cfg": {"d_vit": D, "exp_factor": S // D, "activation": {"cls": "Relu", "params": {}}}}
    legacy = {"d_vit": D, "exp_factor": S // D, "sparsity_coeff": 4e-4, "ghost_grads": False, "seed": 0}
    for name, hdr in (("s1.pt", header), ("legacy.pt", legacy)):
        sae = read_foreign_sae(f"saev:{saev_dump(tmp_path / name, hdr, w)}").sae
        expected = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
        assert sae.cfg.variant == "relu"
        close(sae.encode(x), expected)


def test_saev_bad_files_one_line_each(tmp_path):
    w = weights()
    good = saev_dump(tmp_path / "good.pt", saev_header({"cls": "Relu", "params": {}}), w)
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    saev_dump(tmp_path / "future.pt", saev_header({"cls": "Relu", "params": {}}, schema=9), w)

    with open(tmp_path / "pickle.pt", "wb") as f:
        f.write((json.dumps(saev_header({"cls": "Relu", "params": {}})) + "\n").encode())
        torch.save({"W_enc": w["W_enc"], "extra": argparse.Namespace(a=1)}, f)  # needs pickle
    (tmp_path / "noheader.pt").write_bytes(b"\x80\x02garbage")
    for name, words in (("trunc.pt", "truncated"), ("future.pt", "schema 9"), ("pickle.pt", "needs pickle"),
                        ("noheader.pt", "not a saev checkpoint")):
        with pytest.raises(TraitscopeError, match=words):
            read_foreign_sae(f"saev:{tmp_path / name}")


# --- SAELens ---

def saelens_folder(dpath, cfg, tensors):
    dpath.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dpath / "sae_weights.safetensors"))
    (dpath / "cfg.json").write_text(json.dumps(cfg))
    return dpath


def test_saelens_architectures_match_saelens_formula(tmp_path):
    w = weights(5)
    x = inputs()
    base = {"d_in": D, "d_sae": S, "dtype": "float32", "device": "cpu", "normalize_activations": "none",
            "metadata": {"model_name": "dinov2", "hook_name": "blocks.9.hook_resid_post", "sae_lens_version": "6.5.0"}}
    # standard, with apply_b_dec_to_input False
    sae = read_foreign_sae(f"saelens:{saelens_folder(tmp_path / 'std', base | {'architecture': 'standard', 'apply_b_dec_to_input': False}, w)}")
    close(sae.sae.encode(x), (x @ w["W_enc"] + w["b_enc"]).relu())
    assert sae.layer == 9 and sae.model == "dinov2"
    # topk with rescale_acts_by_decoder_norm
    cfg = base | {"architecture": "topk", "k": K, "apply_b_dec_to_input": True, "rescale_acts_by_decoder_norm": True}
    sae = read_foreign_sae(f"saelens:{saelens_folder(tmp_path / 'topk', cfg, w)}").sae
    norms = w["W_dec"].norm(dim=1)
    codes = topk_keep(((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norms, K).relu()
    close(sae.encode(x), codes)
    close(sae.decode(sae.encode(x)), (codes / norms) @ w["W_dec"] + w["b_dec"])
    # jumprelu, per-latent threshold
    thr = torch.rand(S) * 0.5
    sae = read_foreign_sae(f"saelens:{saelens_folder(tmp_path / 'jr', base | {'architecture': 'jumprelu'}, w | {'threshold': thr})}").sae
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    close(sae.encode(x), pre.relu() * (pre > thr))


def test_saelens_refuses_what_it_cannot_map(tmp_path):
    w = weights()
    cfg = {"architecture": "standard", "d_in": D, "d_sae": S, "normalize_activations": "layer_norm"}
    with pytest.raises(TraitscopeError, match="layer_norm"):
        read_foreign_sae(f"saelens:{saelens_folder(tmp_path / 'ln', cfg, w)}")
    cfg = {"architecture": "gated", "d_in": D, "d_sae": S}
    with pytest.raises(TraitscopeError, match="gated"):
        read_foreign_sae(f"saelens:{saelens_folder(tmp_path / 'g', cfg, w)}")
    d = saelens_folder(tmp_path / "t", {"architecture": "standard", "d_in": D, "d_sae": S}, w)
    data = (d / "sae_weights.safetensors").read_bytes()
    (d / "sae_weights.safetensors").write_bytes(data[:-100])
    with pytest.raises(TraitscopeError, match="truncated"):
        read_foreign_sae(f"saelens:{d}")


# --- sparsify ---

def test_sparsify_matches_sparsify_formula(tmp_path):
    w = weights(7)
    x = inputs()
    d = tmp_path / "sp" / "layers.9"
    d.mkdir(parents=True)
    save_file({"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"],
               "b_dec": w["b_dec"]}, str(d / "sae.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 3, "normalize_decoder": True,
                                            "num_latents": S, "k": K, "multi_topk": False, "skip_connection": False,
                                            "transcode": False, "d_in": D}))
    sae = read_foreign_sae(f"sparsify:{d}").sae
    pre = torch.nn.functional.linear(x - w["b_dec"], w["W_enc"].T, w["b_enc"]).relu()
    close(sae.encode(x), topk_keep(pre, K))
    with pytest.raises(TraitscopeError, match="several hookpoints"):
        read_foreign_sae(f"sparsify:{tmp_path / 'sp'}")


# --- export: ours -> theirs -> ours ---

def trained_like(variant, seed=0):
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(variant, D, S, k=K if variant in ("topk", "batchtopk", "matryoshka", "archetypal") else None))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.normal_(std=0.5)
        sae.b_dec.normal_(std=0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.7)
    return sae.eval()


@pytest.mark.parametrize("variant,fmt", [("topk", "saelens"), ("relu", "saelens"), ("batchtopk", "saelens"),
                                         ("matryoshka", "saelens"), ("jumprelu", "saelens"), ("topk", "sparsify"),
                                         ("archetypal", "saelens"), ("archetypal", "sparsify")])
def test_export_round_trip_is_exact(tmp_path, variant, fmt):
    sae = trained_like(variant)
    out = tmp_path / fmt
    (write_saelens(sae, out, {"model_name": "toy"}) if fmt == "saelens" else write_sparsify(sae, out))
    back = read_foreign_sae(f"{fmt}:{out}").sae
    x = inputs()
    assert torch.equal(back.encode(x), sae.encode(x))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name)), name


def test_sparsify_export_refuses_non_topk(tmp_path):
    with pytest.raises(TraitscopeError, match="TopK only"):
        write_sparsify(trained_like("relu"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# --- the import command ---

def test_import_command_writes_a_run_that_inference_uses(tmp_path, capsys):
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(20, 6, D)).astype(np.float32)
    shards = make_shards(tmp_path / "shards", acts)
    w = weights()
    act = {"cls": "BatchTopK", "params": {"key": "batch-top-k", "top_k": K}}
    ckpt = saev_dump(tmp_path / "sae.pt", saev_header(act), w | {"activation.threshold": torch.tensor(0.3)})
    run = tmp_path / "runs" / "fish-saev"
    assert main(["import", f"saev:{ckpt}", "--shards", str(shards.dpath), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "held-out: nmse" in out and "wrote" in out
    config = json.loads((run / "config.json").read_text())
    assert config["shards"]["layer"] == LAYER and config["train"]["imported"]["format"] == "saev"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["l0"] > 0 and metrics["n_tokens"] == 2 * 6  # 10% of 20 images held out, 6 patches each
    sae = load_sae(run)
    x = torch.from_numpy(acts.reshape(-1, D).astype(np.float16).astype(np.float32))
    h = x @ w["W_enc"] + w["b_enc"]
    close(sae.encode(x), torch.where(h > 0.3, h, torch.zeros_like(h)))
    assert main(["inference", "--run", str(run), "--shards", str(shards.dpath)]) == 0
    assert main(["pareto", "--runs", str(tmp_path / "runs")]) == 0


def test_import_refuses_width_mismatch_and_writes_nothing(tmp_path, capsys):
    shards = make_shards(tmp_path / "shards", np.random.default_rng(0).normal(size=(10, 4, D + 2)))
    ckpt = saev_dump(tmp_path / "sae.pt", saev_header({"cls": "Relu", "params": {}}), weights())
    run = tmp_path / "run"
    assert main(["import", f"saev:{ckpt}", "--shards", str(shards.dpath), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "width 16" in err and "width 18" in err and len(err.strip().splitlines()) == 1
    assert not run.exists() and not (tmp_path / "run.partial").exists()
    assert main(["import", f"foo:{ckpt}", "--shards", str(shards.dpath), "--out", str(run)]) == 2


def test_export_command_round_trips_through_import(tmp_path, capsys):
    acts = np.random.default_rng(1).normal(size=(20, 6, D)).astype(np.float32)
    shards = make_shards(tmp_path / "shards", acts)
    sae = trained_like("topk")
    sae.save(tmp_path / "runs" / "mine", {"shards": {"hash": shards.hash, "path": str(shards.dpath), "layer": LAYER,
                                                     "token_kind": "patches", "model": "toy"}})
    for fmt in ("saelens", "sparsify"):
        out = tmp_path / "out" / fmt
        assert main(["export", str(tmp_path / "runs" / "mine"), "--to", fmt, str(out)]) == 0
        back = tmp_path / "runs" / f"back-{fmt}"
        assert main(["import", f"{fmt}:{out}", "--shards", str(shards.dpath), "--out", str(back)]) == 0
        config = json.loads((back / "config.json").read_text())
        assert (config["shards"]["layer"], config["shards"]["token_kind"]) == (LAYER, "patches")
        x = inputs()
        assert torch.equal(load_sae(back).encode(x), sae.encode(x))
    assert main(["export", str(tmp_path / "runs" / "mine"), "--to", "saelens", str(tmp_path / "out" / "saelens")]) == 2
    relu = trained_like("relu")
    relu.save(tmp_path / "runs" / "relu")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "runs" / "relu"), "--to", "sparsify", str(tmp_path / "out" / "r")]) == 2
    assert "TopK only" in capsys.readouterr().err
    assert not (tmp_path / "out" / "r").exists() and not (tmp_path / "out" / "r.partial").exists()


# --- saev shards, read in place ---

def saev_shards(dpath, n_examples=30, layers=(6, 10), n_patches=16, d=D, cls=True, per_shard=8, seed=0,
                labels=True):
    """A saev shard folder as saev's protocol 2.1 lays it out: (examples, layers, [CLS] + patches, d)
    float32 per file, the last file padded to the full shard size as saev's writer leaves it."""
    dpath.mkdir(parents=True)
    t = n_patches + int(cls)
    meta = {"family": "dinov2", "ckpt": "dinov2_vits14_reg", "layers": list(layers),
            "content_tokens_per_example": n_patches, "cls_token": cls, "d_model": d, "n_examples": n_examples,
            "max_tokens_per_shard": per_shard * t * len(layers), "data": "b64-pickle-never-read",
            "dataset": str(dpath / "nowhere"), "pixel_agg": "majority", "dtype": "float32", "protocol": "2.1"}
    (dpath / "metadata.json").write_text(json.dumps(meta))
    acts = np.random.default_rng(seed).normal(size=(n_examples, len(layers), t, d)).astype(np.float32)
    shards = []
    for s, start in enumerate(range(0, n_examples, per_shard)):
        block = np.zeros((per_shard, len(layers), t, d), np.float32)
        part = acts[start:start + per_shard]
        block[:len(part)] = part
        block.tofile(dpath / f"acts{s:06d}.bin")
        shards.append({"name": f"acts{s:06d}.bin", "n_examples": len(part)})
    (dpath / "shards.json").write_text(json.dumps(shards))
    classes = np.random.default_rng(seed + 1).integers(0, 3, size=(n_examples, n_patches)).astype(np.uint8)
    if labels:
        classes.tofile(dpath / "labels.bin")
    return dpath, acts, classes


def test_saev_shards_read_in_place(tmp_path):
    from traitscope.shards.saev import SaevShards
    from traitscope.shards import Shards

    dpath, acts, classes = saev_shards(tmp_path / "saev" / "shards" / "abc123")
    shards = Shards(dpath)
    assert isinstance(shards, SaevShards) and shards.n_images == 30 and shards.layers == [6, 10]
    assert shards.token_kinds == ["patches", "cls"] and shards.grid(10) == (4, 4) and shards.d_model(6) == D
    patches, cls = shards.acts(10, "patches"), shards.acts(10, "cls")
    assert patches.shape == (30 * 16, D) and cls.shape == (30, D)
    np.testing.assert_array_equal(patches[:], acts[:, 1, 1:].reshape(-1, D))
    np.testing.assert_array_equal(cls[:], acts[:, 1, 0])
    rows = np.array([0, 17, 130, 479, 200])
    np.testing.assert_array_equal(patches[rows], acts[:, 1, 1:].reshape(-1, D)[rows])
    labels = shards.patch_labels()
    assert shards.patch_label_names == ["class_0", "class_1", "class_2"]
    np.testing.assert_array_equal(labels[:].argmax(1), classes.reshape(-1))
    assert labels[:].sum(1).max() == 1
    with pytest.raises(TraitscopeError, match="the image files are unknown"):
        shards.image_fpath(0)
    with pytest.raises(TraitscopeError, match="layer 3"):
        shards.acts(3)


def test_saev_shards_bad_input(tmp_path):
    from traitscope.shards import Shards

    dpath, _, _ = saev_shards(tmp_path / "a")
    data = (dpath / "acts000001.bin").read_bytes()
    (dpath / "acts000001.bin").write_bytes(data[:1000])
    with pytest.raises(TraitscopeError, match="truncated"):
        Shards(dpath)
    dpath, _, _ = saev_shards(tmp_path / "b")
    meta = json.loads((dpath / "metadata.json").read_text())
    (dpath / "metadata.json").write_text(json.dumps(meta | {"protocol": "3.0"}))
    with pytest.raises(TraitscopeError, match="protocol '3.0'"):
        Shards(dpath)


def test_train_import_inference_align_on_saev_shards(tmp_path, capsys):
    dpath, acts, _ = saev_shards(tmp_path / "shards" / "abc123", n_examples=40, layers=(10,))
    runs = tmp_path / "runs"
    assert main(["train", "--shards", str(dpath), "--layer", "10", "--sae", "topk", "--k", "3", "--d-sae", "32",
                 "--tokens", "4000", "--batch-size", "256", "--out", str(runs / "trained"), "--quiet"]) == 0
    ckpt = saev_dump(tmp_path / "sae.pt", saev_header({"cls": "Relu", "params": {}}), weights())
    assert main(["import", f"saev:{ckpt}", "--shards", str(dpath), "--out", str(runs / "imported")]) == 0
    run = runs / "imported"
    assert main(["align", "--run", str(run), "--shards", str(dpath), "--quiet", "--fit-tokens", "500"]) == 0
    assert "class_1" in capsys.readouterr().out
    inf = next((run / "inference").iterdir())
    assert (inf / "alignment.csv").is_file() and (inf / "top_patch_acts.npy").is_file()
    assert main(["pareto", "--runs", str(runs)]) == 0
    assert "2 runs" in capsys.readouterr().out


# --- the Hugging Face hub: a local hub cache, laid out as huggingface_hub lays it out, read offline ---

def hub_cache(hf_home, repo_id, files):
    """models--owner--name/{blobs/<sha256>, refs/main, snapshots/<commit>/<path> -> ../../blobs/<sha256>}."""
    import hashlib
    import os

    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repr(sorted(files)).encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for rel, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs").mkdir(exist_ok=True)
        (repo / "blobs" / digest).write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(repo / "blobs" / digest, link.parent), link)
    return repo


def run_offline(hf_home, *commands):
    """Run traitscope commands in a fresh process with HF_HUB_OFFLINE=1 and HF_HOME set (huggingface_hub
    reads both when it is imported); returns [(exit code, stdout + stderr)]."""
    import os
    import subprocess
    import sys

    script = ("import contextlib, io, json, sys\nfrom traitscope.cli import main\nout = []\n"
              "for argv in json.loads(sys.argv[1]):\n    buf = io.StringIO()\n"
              "    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):\n        code = main(argv)\n"
              "    out.append([code, buf.getvalue()])\nprint(json.dumps(out))\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), HF_TOKEN="")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(list(commands))], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_push_card_and_pull_from_a_local_hub_cache(tmp_path):
    from huggingface_hub import scan_cache_dir

    from traitscope.interop.hub import stage_push

    acts = np.random.default_rng(2).normal(size=(20, 6, D)).astype(np.float32)
    shards = make_shards(tmp_path / "shards", acts)
    sae = trained_like("batchtopk")
    run = tmp_path / "runs" / "mine"
    sae.save(run, {"shards": {"hash": shards.hash, "path": str(shards.dpath), "layer": LAYER, "token_kind": "patches",
                              "model": "toy", "weights_sha256": shards.model["weights_sha256"]},
                   "train": {"n_train_tokens": 12345}})
    (run / "metrics.json").write_text(json.dumps({"nmse": 0.25, "l0": 16.0, "dead_frac": 0.01}))
    staged = tmp_path / "staged"
    staged.mkdir()
    stage_push(run, "lab/fish-sae", staged)
    card = (staged / "README.md").read_text()
    for words in ("library_name: traitscope", "`toy`", f"| layer | {LAYER} |", "| nmse | 0.25 |", "12345",
                  f"shards `{shards.hash}`", "d_sae 48, k 6"):
        assert words in card, words

    hf_home = tmp_path / "hf"
    files = {str(p.relative_to(staged)): p.read_bytes() for p in staged.rglob("*") if p.is_file()}
    hub_cache(hf_home, "lab/fish-sae", files)
    assert [r.repo_id for r in scan_cache_dir(hf_home / "hub").repos] == ["lab/fish-sae"]  # a valid cache

    results = run_offline(
        hf_home,
        ["pull", "hf:lab/fish-sae"],
        ["pull", "hf:lab/fish-sae", "--out", str(tmp_path / "runs" / "pulled"), "--shards", str(shards.dpath)],
        ["pull", "hf:lab/fish-sae/saelens", "--out", str(tmp_path / "runs" / "lens"), "--shards", str(shards.dpath)],
        ["pull", "hf:lab/missing", "--out", str(tmp_path / "runs" / "nothing")],
        ["push", str(run), "hf:lab/fish-sae"],
    )
    assert results[0][0] == 0 and "traitscope SAE in" in results[0][1]
    assert results[1][0] == 0 and results[2][0] == 0, results
    x = inputs()
    for name in ("pulled", "lens"):
        back = load_sae(tmp_path / "runs" / name)
        torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=0, atol=0)
    assert json.loads((tmp_path / "runs" / "pulled" / "config.json").read_text())["pulled_from"]["spec"] == "hf:lab/fish-sae"
    code, text = results[3]
    assert code == 2 and "cannot be reached" in text and len(text.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "nothing").exists()
    code, text = results[4]
    assert code == 2 and "nothing was uploaded" in text and len(text.strip().splitlines()) == 1


# --- folders written by the peers' own code (benchmarks/check_interop.py --write-fixtures) ---

FIXTURES = __import__("pathlib").Path(__file__).parent / "data"


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*") if p.is_dir()) if FIXTURES.is_dir() else [])
def test_folders_written_by_the_peers_import_exactly(name):
    """Each fixture holds what SAELens, sparsify or saev wrote with its own code, with the codes and
    reconstructions that library computed on `x`; the import must give the same."""
    dpath = FIXTURES / name
    expected = load_file(str(dpath / "expected.safetensors"))
    if name.endswith("-shards"):  # saev's ShardWriter output, and what saev's Dataset read back from it
        from traitscope.shards import Shards

        shards = Shards(dpath / "shards")
        layer = shards.layers[0]
        np.testing.assert_array_equal(shards.acts(layer, "patches")[:], expected["patches"].numpy())
        np.testing.assert_array_equal(shards.acts(layer, "cls")[:], expected["cls"].numpy())
        assert shards.images[0]["path"] is None  # the photos are not in the fixture: unknown, not guessed
        return
    fmt = name.split("-")[0]
    target = dpath / "sae" if (dpath / "sae").is_dir() else next(dpath.glob("*.pt"))
    sae = read_foreign_sae(f"{fmt}:{target}").sae
    with torch.no_grad():
        codes = sae.encode(expected["x"])
        close(codes, expected["codes"])
        close(sae.decode(codes), expected["recon"])


def test_saev_shards_in_the_app_with_their_image_folder(tmp_path):
    """saev's ImageFolder order gives each row its photo; saev's DINOv2 transform (256 x 256, centre 224)
    places the heatmap: the same pixels as torchvision's Resize((256, 256)) + CenterCrop(224)."""
    from PIL import Image
    from torchvision.transforms import v2

    from traitscope.app.data import Dataset
    from traitscope.viz import overlay_heatmap

    photos = tmp_path / "photos"
    for c, n in (("cod", 12), ("eel", 10), ("pike", 8)):
        (photos / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40 + i, 30), (8 * i, 100, 0)).save(photos / c / f"{i:02d}.png")
    dpath, _, _ = saev_shards(tmp_path / "shards" / "abc")
    meta = json.loads((dpath / "metadata.json").read_text())
    (dpath / "metadata.json").write_text(json.dumps(meta | {"dataset": str(photos)}))
    dataset = Dataset(dpath)
    assert dataset.images[12]["path"] == "eel/00.png" and dataset.images[12]["label"] == "eel"
    image = dataset.open_image(29)
    assert image.size == (47, 30)
    reference = v2.CenterCrop(224)(v2.Resize((256, 256))(image))
    assert np.array_equal(np.asarray(dataset.preprocess.crop_image(image)), np.asarray(reference))
    drawn = overlay_heatmap(image, np.random.default_rng(0).random((4, 4)), dataset.preprocess)
    assert drawn.size[0] > 0
    (dpath / "metadata.json").write_text(json.dumps(meta | {"family": "clip"}))
    with pytest.raises(TraitscopeError, match="do not record it"):
        Dataset(dpath)


def photo_tree(dpath, counts=(("cod", 12), ("eel", 10), ("pike", 8))):
    """A class-per-folder tree of PNGs, as saev's image-folder data set reads one."""
    from PIL import Image

    for c, n in counts:
        (dpath / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (60 + i, 40), (8 * i, 100, 200)).save(dpath / c / f"{i:02d}.png")
    return dpath


def test_saev_shards_without_their_images_need_images_root(tmp_path, monkeypatch, capsys):
    """Shards whose metadata names no usable image folder: the app says what is unknown and what to give,
    shows the numbers without pictures; `--images-root` names the tree; an imported run says so."""
    import html
    import re

    from streamlit.testing.v1 import AppTest

    from locations import APP_MAIN
    from traitscope.app.data import Dataset
    from traitscope.shards import Shards

    # saev 0.1.0's own shards (the fixture): the folder it read is gone, so the files are unknown
    fixture = Shards(FIXTURES / "saev-0.1.0-shards" / "shards")
    assert "the image files are unknown" in fixture.images_unknown() and "traitscope app --images-root DIR" in fixture.images_unknown()
    with pytest.raises(TraitscopeError, match="--images-root DIR"):
        fixture.image_fpath(0)
    fixture.use_images_root(photo_tree(tmp_path / "five", (("cod", 3), ("eel", 2))))
    assert fixture.images_unknown() is None and fixture.image_fpath(3).name == "00.png"
    with pytest.raises(TraitscopeError, match="0 images in class folders, but the saev shards"):
        Dataset(FIXTURES / "saev-0.1.0-shards" / "shards", tmp_path / "five" / "cod")  # not the tree itself

    dpath, _, _ = saev_shards(tmp_path / "shards" / "abc", layers=(10,))
    photos = photo_tree(tmp_path / "photos")
    runs = tmp_path / "runs"
    ckpt = saev_dump(tmp_path / "sae.pt", saev_header({"cls": "Relu", "params": {}}), weights())
    assert main(["import", f"saev:{ckpt}", "--shards", str(dpath), "--out", str(runs / "fish-saev")]) == 0
    assert "note: " + str(dpath) + ": the image files are unknown" in capsys.readouterr().out
    assert main(["inference", "--run", str(runs / "fish-saev"), "--shards", str(dpath)]) == 0
    assert main(["app", "--runs", str(runs), "--shards", str(dpath), "--images-root", "a", "b"]) == 2
    assert "give one per shards folder" in capsys.readouterr().err

    def app(*extra, page="Feature"):
        monkeypatch.setenv("TRAITSCOPE_APP_ARGS", json.dumps(["--runs", str(runs), "--shards", str(dpath),
                                                              "--cache", str(tmp_path / "cache"), *extra]))
        at = AppTest.from_file(str(APP_MAIN), default_timeout=120)
        at.query_params.update({"page": page, "run": "fish-saev", "feature": "2"})
        at.run()
        assert not at.exception and not at.error, [e.value for e in at.exception or at.error]
        return at

    at = app()
    (warning,) = at.warning
    assert "image files are unknown" in warning.value and "--images-root DIR" in warning.value
    grid = "".join(m.value for m in at.markdown if "ts-grid" in m.value)
    assert grid.count(">image file unknown<") == 16 and "image row " in grid  # numbers without pictures
    assert "<img" not in grid
    title = at.caption[0].value
    assert "imported from saev" in title and "held out on this dataset" in title
    assert "training data" not in "".join(c.value for c in at.caption)
    plots = app(page="Run plots")  # the Pareto plot says where an imported SAE's metrics.json was held out
    assert "the shards it was imported onto" in plots.get("vega_lite_chart")[0].proto.spec + "".join(
        str(d) for d in plots.get("vega_lite_chart")[0].proto.datasets)

    import streamlit as st

    st.cache_data.clear()  # a server's tiles are cached for its own --images-root; this is a second server
    at = app("--images-root", str(photos))
    assert not at.warning
    grid = "".join(m.value for m in at.markdown if "ts-grid" in m.value)
    assert grid.count("<img") == 16 and "image file unknown" not in grid
    assert {html.unescape(t).split("/")[0] for t in re.findall(r'<img [^>]*title="([^"]*)"', grid)} <= {"cod", "eel", "pike"}


def test_import_checks_recorded_backbone_weights(tmp_path, capsys):
    """An exported SAE says which backbone weights it read; importing it onto other weights is refused."""
    acts = np.random.default_rng(3).normal(size=(20, 6, D)).astype(np.float32)
    ours_shards = make_shards(tmp_path / "a", acts)
    other = make_shards(tmp_path / "b", acts, weights="cd" * 32)
    trained_like("topk").save(tmp_path / "run", {"shards": {"hash": ours_shards.hash, "layer": LAYER,
                                                            "model": "toy", "weights_sha256": "ab" * 32}})
    assert main(["export", str(tmp_path / "run"), "--to", "saelens", str(tmp_path / "lens")]) == 0
    assert main(["import", f"saelens:{tmp_path / 'lens'}", "--shards", str(ours_shards.dpath),
                 "--out", str(tmp_path / "ok")]) == 0
    assert "same backbone weights" in capsys.readouterr().out
    assert main(["import", f"saelens:{tmp_path / 'lens'}", "--shards", str(other.dpath),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "weights sha256 abababababab" in capsys.readouterr().err and not (tmp_path / "bad").exists()
