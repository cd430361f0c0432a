"""Scale-out through torch.distributed: real `torchrun` jobs of 2 CPU processes (gloo) on 127.0.0.1.

What a user relies on: a job of several processes writes the same shard folder, byte for byte, as one
process; an error on one rank stops every rank with one clear line (no hang); data-parallel training
matches one process on the same global batches (weights, loss parts, L0, dead-latent counters), its
checkpoints resume on another number of processes, and a sweep spreads whole SAEs over the ranks.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from traitscope.cli import main

MODEL = "random-dinov2"
slow = pytest.mark.slow  # starts torchrun jobs of 2 processes (about 15 s each on 2 cores)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], n_procs: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node n_procs <args>` on this machine only (loopback rendezvous, free port)."""
    # the venv's bin first on PATH, as for a user whose venv is active (`--no-python traitscope`)
    env = dict(os.environ, OMP_NUM_THREADS="1", TRAITSCOPE_DIST_TIMEOUT_MIN="2", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(n_procs),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _digests(dpath: Path) -> dict[str, str]:
    return {p.relative_to(dpath).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(dpath.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Twelve small photos of different sizes, and one file that is not an image (skipped)."""
    dpath = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(12):
        w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(dpath / f"img{i:02d}.{'png' if i % 5 == 0 else 'jpg'}")
    (dpath / "img05b.jpg").write_text("not an image\n")  # lands in a shard of the second rank
    return dpath


def _shards_args(photos: Path, out: Path) -> list[str]:
    return ["shards", "--images", str(photos), "--model", MODEL, "--layers=-2,-1", "--images-per-shard", "2",
            "--batch-size", "2", "--device", "cpu", "--workers", "1", "--out", str(out)]


@slow
def test_two_ranks_write_the_bytes_of_one_process(photos, tmp_path, capsys):
    # the reference: one process, in this one
    assert main(_shards_args(photos, tmp_path / "one")) == 0
    (single,) = (tmp_path / "one").iterdir()
    capsys.readouterr()

    # two processes, 7 shards of 2 images dealt round-robin (rank 0: 0, 2, 4, 6; rank 1: 1, 3, 5).
    # With --strict the unreadable file (listed 7th, so in shard 3) fails rank 1: every rank must stop
    # with one line, not wait for it, and the shards finished so far are kept.
    out = tmp_path / "two"
    job = torchrun(["-m", "traitscope.cli", *_shards_args(photos, out), "--strict"])
    assert job.returncode != 0
    # (another rank's progress bar may share the line an error starts on)
    errors = [part.splitlines()[0] for part in job.stderr.split("traitscope shards: error: ")[1:]]
    assert any("img05b.jpg" in ln and "--strict" in ln for ln in errors), job.stderr[-3000:]
    assert any(ln.startswith("rank 1 failed: ") for ln in errors), job.stderr[-3000:]
    (double,) = out.iterdir()
    assert double.name == single.name  # the same content-addressed folder
    assert not (double / "manifest.json").exists() and not list(double.rglob("*.tmp"))
    assert {f"{s:05d}.json" for s in (0, 2, 4, 6)} <= {p.name for p in (double / "progress").iterdir()}

    # rerun without --strict (the console script this time): the job resumes and ends with the bytes of
    # the one-process run, every shard file, progress record, the index and the manifest
    job = torchrun(["--no-python", "traitscope", *_shards_args(photos, out)])
    assert job.returncode == 0, job.stderr[-3000:]
    lines = job.stdout.strip().splitlines()
    assert lines[-1] == str(double) and lines.count(str(double)) == 1  # rank 0 alone prints
    assert any(line.startswith(f"resuming {double}") for line in lines)
    assert _digests(double) == _digests(single)
    assert not (double / ".lock").exists()


def test_a_stage_under_torchrun_outside_a_session_refuses(photos, tmp_path, monkeypatch):
    """Without joining the job, every process would write the whole folder: refused with one line."""
    from traitscope.backbones import load_backbone
    from traitscope.errors import TraitscopeError
    from traitscope.images import open_source
    from traitscope.shards.build import build_shards

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(TraitscopeError, match="not inside traitscope.dist.session"):
        build_shards(open_source(str(photos)), load_backbone(MODEL), [-1], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is present")
def test_asking_for_a_missing_gpu_gives_one_line(photos, tmp_path, capsys):
    assert main(["shards", "--images", str(photos), "--model", MODEL, "--device", "cuda",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["traitscope shards: error: --device cuda: no CUDA GPU is available to torch here; "
                   "use --device cpu"]


# --- training ---

def _toy_shards(root: Path) -> Path:
    """60 images x 16 patches of 16-wide float16 tokens: sums of 3 of 48 unit atoms, plus an offset."""
    from traitscope.shards.store import write_arrays

    rng = np.random.default_rng(0)
    d, n_atoms, n_images, n_patches = 16, 48, 60, 16
    atoms = rng.standard_normal((n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    idx = np.argsort(rng.random((n_images * n_patches, n_atoms)), axis=1)[:, :3]
    tokens = (rng.uniform(0.5, 2, idx.shape)[:, :, None] * atoms[idx]).sum(1) + 1.0
    header = {"model": {"name": "toy", "family": "test", "d_model": d, "n_layers": 4, "patch_size": 14,
                        "weights_sha256": "ab" * 32},
              "layers": [2], "token_kinds": ["patches"], "d_model": {"2": d}, "grid": {"2": [4, 4]},
              "layout": {"n_cls": 1, "n_registers": 0}, "preprocess": {}, "dtype": "float16",
              "images_root": str(root), "patch_labels": [], "image_labels": []}
    listing = [{"index": i, "path": f"{i}.png", "width": 8, "height": 8, "label": None, "row": i, "skipped": None}
               for i in range(n_images)]
    arrays = {"L2/patches": tokens.reshape(n_images, n_patches, d).astype(np.float16)}
    return write_arrays(root, header, listing, arrays, images_per_shard=16).dpath


def _train_args(shards_dpath: Path, out: Path) -> list[str]:
    """TopK, BatchTopK (a batch-level selection), ReLU and JumpReLU (token-mean losses; JumpReLU's
    thresholds are parameters) in one pass of 100 steps."""
    return ["train", "--shards", str(shards_dpath), "--sae", "topk,batchtopk,relu,jumprelu", "--k", "4", "--d-sae", "64",
            "--tokens", "12800", "--batch-size", "128", "--lr-warmup", "5", "--dead-tokens", "1500",
            "--log-every", "10", "--checkpoint-every", "6400", "--val-tokens", "256", "--quiet", "--device", "cpu",
            "--threads", "1", "--out", str(out)]


def _runs(out: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(out.iterdir())}


def _metrics(run_dpath: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dpath / "metrics.jsonl").read_text().splitlines()]


def _assert_same_training(run_a: Path, run_b: Path, rtol: float) -> None:
    a, b = load_file(str(run_a / "sae.safetensors")), load_file(str(run_b / "sae.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        scale = float(a[key].abs().max().clamp_min(1e-12))
        assert float((a[key] - b[key]).abs().max()) <= rtol * scale, (run_a.name, key)
    lines_a, lines_b = _metrics(run_a), _metrics(run_b)
    assert [r["step"] for r in lines_a] == [r["step"] for r in lines_b] == list(range(10, 101, 10))
    for ra, rb in zip(lines_a, lines_b):
        assert ra.keys() == rb.keys()
        for key in ra.keys() - {"tokens_per_s"}:  # the loss parts, L0, dead and dense fractions, lr
            assert ra[key] == pytest.approx(rb[key], rel=rtol, abs=1e-6), (run_a.name, ra["step"], key)
    ckpt_a = load_file(str(run_a / "checkpoint" / "state.safetensors"))
    ckpt_b = load_file(str(run_b / "checkpoint" / "state.safetensors"))
    assert torch.equal(ckpt_a["since_fired"], ckpt_b["since_fired"])  # dead-latent tracking, exactly


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("train")
    shards_dpath = _toy_shards(root / "shards")
    assert main(_train_args(shards_dpath, root / "one")) == 0
    runs = _runs(root / "one")
    assert len(runs) == 4 and any(_metrics(r)[-1].get("auxk") for r in runs.values())  # dead latents arose
    return shards_dpath, runs


@slow
def test_two_ranks_train_like_one_and_resume_on_one(one_process_runs, tmp_path):
    shards_dpath, one = one_process_runs
    # data parallel: each rank steps on half of every batch of 128; stopped (with checkpoints) after 40 steps
    out = tmp_path / "two"
    job = torchrun(["-m", "traitscope.cli", *_train_args(shards_dpath, out), "--stop-after", "5000"])
    assert job.returncode == 0, job.stderr[-3000:]
    assert "on 2 processes, each a share of every batch" in job.stdout
    assert job.stdout.count("stopped with a checkpoint") == 4  # rank 0 alone prints
    for run in _runs(out).values():
        assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 40
    # ...and finished by one process from the 2-rank checkpoints (global state: weights, Adam, loader)
    assert main(_train_args(shards_dpath, out)) == 0
    two = _runs(out)
    assert two.keys() == one.keys()
    for name in one:
        _assert_same_training(one[name], two[name], rtol=1e-5)


@slow
def test_a_sweep_spreads_whole_saes_over_ranks(one_process_runs, tmp_path):
    shards_dpath, one = one_process_runs
    out = tmp_path / "sweep"
    job = torchrun(["--no-python", "traitscope", *_train_args(shards_dpath, out), "--dist-mode", "sweep"])
    assert job.returncode == 0, job.stderr[-3000:]
    owners = [line for line in job.stdout.splitlines() if "(new, rank" in line]
    assert [line.split("rank ", 1)[1].split(")")[0] for line in owners] == ["0", "1", "0", "1"]  # SAE i on rank i mod 2
    assert sum("trained: NMSE" in line for line in job.stdout.splitlines()) == 4  # each by its owner
    sweep = _runs(out)
    for name in one:  # one SAE per process sees the very batches of the one-process pass
        _assert_same_training(one[name], sweep[name], rtol=1e-6)
