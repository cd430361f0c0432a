"""Scale-out through torch.distributed: real `torchrun` jobs of 2 CPU processes (gloo) on 127.0.0.1.

What a user relies on: a job of several processes writes the same shard folder, byte for byte, as one
process; an error on one rank stops every rank with one clear line (no hang).
"""

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from traitscope.cli import main

MODEL = "random-dinov2"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], n_procs: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node n_procs <args>` on this machine only (loopback rendezvous, free port)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TRAITSCOPE_DIST_TIMEOUT_MIN="2", PYTHONUNBUFFERED="1")
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
    errors = [ln for ln in job.stderr.splitlines() if ln.startswith("traitscope shards: error: ")]
    assert any("img05b.jpg" in ln and "--strict" in ln for ln in errors), job.stderr[-3000:]
    assert any(ln.startswith("traitscope shards: error: rank 1 failed: ") for ln in errors), job.stderr[-3000:]
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
