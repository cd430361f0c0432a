"""Reliability from the outside: the `traitscope` command run as a user runs it (a subprocess), on
hostile image folders, damaged artefacts, bad values, random kills and a second writer.

Every run's stderr is checked for a Python traceback, and the figures are printed at the end:
N hostile inputs -> N skipped and listed; K random kills -> K identical resumptions; M damaged
artefacts -> M one-line errors naming the file; 0 tracebacks.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from traitscope.shards.store import Shards, write_arrays
from locations import APP_MAIN

FIGURES = {"hostile": [0, 0], "kills": [0, 0], "damaged": [0, 0], "bad values": [0, 0], "runs": 0, "tracebacks": 0}
"""name -> [cases, cases handled as promised]; 'runs' and 'tracebacks' count every command run."""

GRID = (4, 4)
LAYER = 2


@pytest.fixture(scope="module", autouse=True)
def figures(summary):
    yield
    if FIGURES["runs"]:
        summary.extend(figure_lines())


def figure_lines() -> list[str]:
    lines = ["", "reliability figures:"]
    labels = {"hostile": ("hostile inputs", "skipped and listed"), "kills": ("random kills", "identical resumptions"),
              "damaged": ("damaged artefacts", "one-line errors naming the file"),
              "bad values": ("bad command-line values", "one-line errors, exit 2")}
    for key, (what, promise) in labels.items():
        n, ok = FIGURES[key]
        if n:
            lines.append(f"  {n} {what} -> {ok} {promise}")
    lines.append(f"  {FIGURES['tracebacks']} tracebacks in {FIGURES['runs']} commands")
    return lines


def cli(*args, check_rc: int | None = None, timeout: float = 300, env: dict | None = None):
    """Run `traitscope ARGS` in a subprocess; returns the CompletedProcess. No traceback is allowed
    unless --debug was asked for."""
    argv = [sys.executable, "-m", "traitscope.cli", *map(str, args)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    FIGURES["runs"] += 1
    if "Traceback" in proc.stderr and "--debug" not in args and not (env or {}).get("TRAITSCOPE_DEBUG"):
        FIGURES["tracebacks"] += 1
        raise AssertionError(f"traceback from traitscope {' '.join(map(str, args))}:\n{proc.stderr}")
    if check_rc is not None:
        assert proc.returncode == check_rc, (args, proc.returncode, proc.stderr[-2000:])
    return proc


def one_line_error(proc, *needles: str) -> str:
    """The single error line of a failed command (exit 2), which must contain every needle."""
    lines = [ln for ln in proc.stderr.splitlines() if ": error: " in ln]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-2000:])
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def small_shards(root: Path, n_images: int = 60, d_model: int = 32, images_per_shard: int = 16, seed: int = 0) -> Shards:
    """A real shard folder of sparse tokens (a few unit atoms each), written with write_arrays."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((64, d_model))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    n_patches = GRID[0] * GRID[1]

    def tokens(n: int) -> np.ndarray:
        idx = np.argsort(rng.random((n, len(atoms))), axis=1)[:, :3]
        return (rng.uniform(0.5, 2.0, (n, 3))[:, :, None] * atoms[idx]).sum(1) + 1.0

    header = {"model": {"name": "sparse-test", "family": "test", "description": "sparse dictionary model",
                        "d_model": d_model, "n_layers": 4, "patch_size": 14, "weights_sha256": "ab" * 32},
              "layers": [LAYER], "token_kinds": ["patches", "cls"], "d_model": {str(LAYER): d_model},
              "grid": {str(LAYER): list(GRID)}, "layout": {"n_cls": 1, "n_registers": 0}, "preprocess": {},
              "dtype": "float32", "images_root": str(root), "patch_labels": [], "image_labels": []}
    listing = [{"index": i, "path": f"img{i:05d}.png", "width": 32, "height": 32, "label": None, "row": i,
                "skipped": None} for i in range(n_images)]
    arrays = {f"L{LAYER}/patches": tokens(n_images * n_patches).reshape(n_images, n_patches, d_model).astype(np.float32),
              f"L{LAYER}/cls": tokens(n_images).astype(np.float32)}
    return write_arrays(root, header, listing, arrays, images_per_shard=images_per_shard)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Shards:
    return small_shards(tmp_path_factory.mktemp("shards"))


def train_args(shards: Shards, out: Path, *extra) -> list:
    return ["train", "--shards", shards.dpath, "--k", "4", "--d-sae", "64", "--batch-size", "256", "--out", out,
            "--quiet", "--threads", "1", *extra]


# --- one writer per folder; one line for what is left ---

def test_a_second_writer_of_a_run_folder_is_refused_and_the_first_resumes_after_a_kill(shards, tmp_path):
    argv = [sys.executable, "-m", "traitscope.cli", *map(str, train_args(shards, tmp_path / "runs", "--tokens", "50M",
                                                                            "--checkpoint-every", "20k"))]
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((tmp_path / "runs").glob("*/checkpoint/state.json")):
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.05)
        second = cli(*train_args(shards, tmp_path / "runs", "--tokens", "50M", "--checkpoint-every", "20k"))
        one_line_error(second, "another `traitscope train` run is writing", str(tmp_path / "runs"))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    (run_dpath,) = (tmp_path / "runs").iterdir()
    steps = [json.loads(ln)["step"] for ln in (run_dpath / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "the second writer wrote into the first one's log"


def test_an_unexpected_failure_is_one_line_and_debug_shows_the_traceback(shards, tmp_path):
    out_fpath = tmp_path / "a-file"
    out_fpath.write_text("not a folder")
    proc = cli(*train_args(shards, out_fpath, "--tokens", "10k"))
    one_line_error(proc, str(out_fpath))
    debug = cli(*train_args(shards, out_fpath, "--tokens", "10k"), "--debug")
    assert "Traceback" in debug.stderr and debug.returncode == 2
    env_debug = cli(*train_args(shards, out_fpath, "--tokens", "10k"), env={"TRAITSCOPE_DEBUG": "1"})
    assert "Traceback" in env_debug.stderr


# --- hostile image folders ---

def hostile_folder(dpath: Path) -> dict[str, str]:
    """Three real photos, a link to one, and files that must each be skipped; returns
    hostile name -> a word its skip reason must hold."""
    from PIL import Image

    dpath.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (60 + 10 * i, 80, 3), dtype=np.uint8)).save(dpath / f"photo{i}.jpg")
    os.symlink("photo0.jpg", dpath / "link-to-photo.jpg")
    os.symlink(dpath, dpath / "loop-folder")  # a link to a folder is not followed: no endless walk
    hostile = {"dangling.jpg": "dangling", "loop-a.png": "loop", "loop-b.png": "loop", "fifo.jpg": "FIFO",
               "zero.jpg": "device", "empty.png": "empty", "truncated.jpg": "truncated",
               "text.png": "not an image", "bomb.png": "megapixels"}
    os.symlink("nowhere.jpg", dpath / "dangling.jpg")
    os.symlink("loop-b.png", dpath / "loop-a.png")
    os.symlink("loop-a.png", dpath / "loop-b.png")
    os.mkfifo(dpath / "fifo.jpg")
    os.symlink("/dev/zero", dpath / "zero.jpg")
    (dpath / "empty.png").write_bytes(b"")
    (dpath / "truncated.jpg").write_bytes((dpath / "photo1.jpg").read_bytes()[:400])
    (dpath / "text.png").write_text("just text")
    Image.new("1", (10_000, 9_000)).save(dpath / "bomb.png")  # 90 megapixels in a few kB
    return hostile


def test_a_hostile_folder_is_read_to_the_end_with_every_bad_file_skipped_and_listed(tmp_path):
    hostile = hostile_folder(tmp_path / "photos")
    proc = cli("shards", "--images", tmp_path / "photos", "--model", "random-dinov2", "--out", tmp_path / "shards",
               "--batch-size", "4", timeout=180, check_rc=0)
    shards = Shards(proc.stdout.strip().splitlines()[-1])
    listing = {rec["path"]: rec for rec in shards.listing()}
    FIGURES["hostile"][0] += len(hostile)
    for name, word in hostile.items():
        reason = listing[name]["skipped"]
        assert reason and word in reason, (name, reason)
        assert f"{name}: {reason}" in proc.stderr  # listed on the terminal too
        FIGURES["hostile"][1] += 1
    assert shards.n_images == 4 and listing["link-to-photo.jpg"]["row"] is not None


# --- a small real pipeline: photos -> shards -> a trained SAE -> inference ---

def photo_folder(dpath: Path, n: int = 12) -> Path:
    from PIL import Image

    dpath.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        yy, xx = np.mgrid[0:90, 0:120]
        base = np.stack([xx * 2, yy * 2, (xx + yy + 20 * i) % 255], axis=-1)
        pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(dpath / f"photo{i:02d}.jpg")
    return dpath


SHARDS_ARGS = ["--model", "random-dinov2", "--images-per-shard", "4", "--batch-size", "4", "--workers", "1"]
TRAIN_ARGS = ["--k", "4", "--d-sae", "128", "--batch-size", "128", "--tokens", "24k", "--checkpoint-every", "2k",
              "--log-every", "4", "--quiet", "--threads", "1"]


class Pipeline:
    """The reference run of each stage, and how long each command took (kills are timed against it)."""

    def __init__(self, root: Path):
        self.root = root
        self.photos = photo_folder(root / "photos")
        self.seconds = {}
        t0 = time.perf_counter()
        proc = cli(*self.shards_args(root / "shards"), check_rc=0)
        self.seconds["shards"] = time.perf_counter() - t0
        self.shards = Path(proc.stdout.strip().splitlines()[-1])
        t0 = time.perf_counter()
        cli(*self.train_args(root / "runs"), check_rc=0)
        self.seconds["train"] = time.perf_counter() - t0
        (self.run,) = (root / "runs").iterdir()
        t0 = time.perf_counter()
        cli(*self.inference_args(self.run), check_rc=0)
        self.seconds["inference"] = time.perf_counter() - t0
        (self.inference,) = (self.run / "inference").iterdir()

    def shards_args(self, out: Path) -> list:
        return ["shards", "--images", self.photos, "--out", out, *SHARDS_ARGS]

    def train_args(self, out: Path) -> list:
        return ["train", "--shards", getattr(self, "shards", None), "--out", out, *TRAIN_ARGS]

    def inference_args(self, run: Path) -> list:
        return ["inference", "--run", run, "--shards", self.shards, "--quiet", "--no-metrics", "--device", "cpu"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Pipeline:
    return Pipeline(tmp_path_factory.mktemp("pipeline"))


def digests(dpath: Path, pattern: str = "**/*") -> dict[str, str]:
    import hashlib

    return {p.relative_to(dpath).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(dpath.glob(pattern)) if p.is_file() and not p.name.startswith(".")}


def copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


def damaged_error(proc, fpath: Path, *needles: str) -> None:
    """A damaged artefact: one error line, exit 2, naming the file."""
    FIGURES["damaged"][0] += 1
    one_line_error(proc, str(fpath), *needles)
    FIGURES["damaged"][1] += 1


def flip_byte(fpath: Path, offset: int) -> None:
    data = bytearray(fpath.read_bytes())
    data[offset] ^= 0x5A
    fpath.write_bytes(bytes(data))


def test_a_bit_flip_in_a_shard_is_found_and_a_rerun_recomputes_only_that_shard(pipeline, tmp_path):
    out = tmp_path / "shards"
    shards = copy(pipeline.shards, out / pipeline.shards.name)
    before = digests(shards)
    bad = shards / "L2" / "patches-00001.npy"
    flip_byte(bad, bad.stat().st_size // 2)
    damaged_error(cli("shards", "--verify", shards), bad, "sha256", "rerun `traitscope shards`")
    untouched = {p: p.stat().st_mtime_ns for p in shards.rglob("*-0000[02].npy")}
    proc = cli("shards", "--images", pipeline.photos, "--out", out, *SHARDS_ARGS, check_rc=0)
    assert str(bad) in proc.stderr and "recomputing 1 damaged shard" in proc.stderr
    assert digests(shards) == before
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # only the damaged shard was redone


@pytest.mark.parametrize("damage", ["truncated", "deleted", "header", "manifest", "index"])
def test_a_damaged_shard_folder_is_one_line_naming_the_file(pipeline, tmp_path, damage):
    shards = copy(pipeline.shards, tmp_path / "shards")
    fpath = {"truncated": shards / "L2" / "patches-00002.npy", "deleted": shards / "L2" / "patches-00000.npy",
             "header": shards / "L2" / "patches-00001.npy", "manifest": shards / "manifest.json",
             "index": shards / "images.jsonl"}[damage]
    if damage == "truncated":
        fpath.write_bytes(fpath.read_bytes()[:-100])
    elif damage == "deleted":
        fpath.unlink()
    elif damage == "header":
        data = bytearray(fpath.read_bytes())
        data[10:40] = b"{'descr': '<f4', 'shape': (9}"
        fpath.write_bytes(bytes(data))
    else:
        fpath.write_text(fpath.read_text()[:-40])
    command = ("inference", "--run", pipeline.run, "--shards", shards, "--quiet", "--no-metrics", "--device", "cpu")
    if damage in ("truncated", "manifest"):
        command = ("train", "--shards", shards, "--out", tmp_path / "runs", *TRAIN_ARGS)
    elif damage == "index":
        command = ("shards", "--verify", shards)
    damaged_error(cli(*command), fpath, "damaged" if damage != "deleted" else "missing", "rerun `traitscope shards`")


@pytest.mark.parametrize("damage", ["config", "truncated", "reshaped"])
def test_a_damaged_run_folder_is_one_line_naming_the_file(pipeline, tmp_path, damage):
    run = copy(pipeline.run, tmp_path / "run")
    fpath = run / ("config.json" if damage == "config" else "sae.safetensors")
    if damage == "config":
        fpath.write_text("{\"sae\": {")
    elif damage == "truncated":
        fpath.write_bytes(fpath.read_bytes()[:-1000])
    else:  # another SAE's weights under this config
        import torch
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(fpath))
        save_file({k: torch.cat([v, v], dim=-1) if v.ndim == 2 else v for k, v in tensors.items()}, str(fpath))
    proc = cli("inference", "--run", run, "--shards", pipeline.shards, "--quiet", "--no-metrics", "--device", "cpu")
    damaged_error(proc, fpath, "damaged")


def test_a_damaged_checkpoint_falls_back_to_the_previous_one_and_ends_identical(pipeline, tmp_path):
    args = ("train", "--shards", pipeline.shards, "--out", tmp_path / "runs", *TRAIN_ARGS)
    cli(*args, "--stop-after", "12k", check_rc=0)
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "checkpoint.old" / "state.json").is_file(), "the previous checkpoint is kept"
    newest = run / "checkpoint" / "state.safetensors"
    newest.write_bytes(newest.read_bytes()[:-500])
    proc = cli(*args, check_rc=0)
    assert str(newest) in proc.stderr and "resuming from the previous checkpoint" in proc.stderr
    assert digests(run, "sae.safetensors") == digests(pipeline.run, "sae.safetensors")
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))

    # both checkpoints damaged: one line that says how to start over
    cli(*args, "--restart", "--stop-after", "12k", check_rc=0)
    for name in ("checkpoint", "checkpoint.old"):
        (run / name / "state.json").write_text("{")
    damaged_error(cli(*args), run / "checkpoint" / "state.json", "--restart")


def test_non_finite_activations_stop_inference_with_one_line_and_nothing_written(pipeline, tmp_path):
    shards = copy(pipeline.shards, tmp_path / "shards")
    run = copy(pipeline.run, tmp_path / "run")
    fpath = shards / "L2" / "patches-00001.npy"
    arr = np.load(fpath, mmap_mode="r+")
    arr[2, 5, 7] = np.nan  # same size and header: only the numbers are wrong
    arr.flush()
    del arr
    import shutil

    shutil.rmtree(run / "inference")
    proc = cli("inference", "--run", run, "--shards", shards, "--quiet", "--no-metrics", "--device", "cpu")
    damaged_error(proc, shards, "NaN/Inf", "image row 6, patch 5")
    assert not any((run / "inference").glob("*/manifest.json"))


# --- bad values on the command line ---

def test_every_bad_value_is_one_line_and_exit_2(pipeline, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    S, R = pipeline.shards, pipeline.run
    inference = ["inference", "--run", R, "--shards", S, "--quiet"]
    train = ["train", "--shards", S, "--out", tmp_path / "runs", "--tokens", "1k"]
    cases = [
        (["train", "--shards", S, "--out", a_file], "is a file"),
        (["train", "--shards", S, "--out", a_file / "sub"], "which is a file"),
        (["shards", "--images", pipeline.photos, "--out", a_file], "is a file"),
        ([*inference, "--fit-tokens", "0"], "--fit-tokens"),
        ([*inference, "--pca-k", "-1"], "--pca-k"),
        ([*inference, "--kmeans-clusters", "-5"], "--kmeans-clusters"),
        ([*inference, "--device", "tpu"], "--device"),
        ([*train, "--val-frac", "0"], "--val-frac"),
        ([*train, "--threads", "-2"], "--threads"),
        (["train", "--shards", a_file, "--out", tmp_path / "runs"], str(a_file)),
        (["grids", "--shards", S, "--out", tmp_path / "g", "--cell", "0"], "--cell"),
        (["finetune", "--images", pipeline.photos, "--out", tmp_path / "ft", "--epochs", "-1"], "--epochs"),
    ]
    for argv, needle in cases:
        FIGURES["bad values"][0] += 1
        one_line_error(cli(*argv), needle)
        FIGURES["bad values"][1] += 1


# --- the app ---

def test_the_app_lists_unusable_runs_shows_damage_in_one_line_and_views_linked_images(pipeline, tmp_path,
                                                                                       monkeypatch):
    from streamlit.testing.v1 import AppTest

    links = tmp_path / "links"  # a data set whose images are links into another folder
    links.mkdir()
    for fpath in sorted(pipeline.photos.iterdir()):
        (links / fpath.name).symlink_to(fpath)
    proc = cli("shards", "--images", links, "--out", tmp_path / "shards", *SHARDS_ARGS, check_rc=0)
    shards = Path(proc.stdout.strip().splitlines()[-1])
    runs = tmp_path / "runs"
    good = copy(pipeline.run, runs / "good")
    cli("inference", "--run", good, "--shards", shards, "--quiet", "--no-metrics", "--device", "cpu", check_rc=0)
    broken = copy(good, runs / "broken")
    top_rows = broken / "inference" / shards.name / "top_rows.npy"
    top_rows.write_bytes(top_rows.read_bytes()[:-64])
    (copy(pipeline.run, runs / "bad-config") / "config.json").write_text('{"sae": ')

    args = ["--runs", str(runs), "--shards", str(shards), "--ratings", str(tmp_path / "ratings"),
            "--cache", str(tmp_path / "cache")]
    monkeypatch.setenv("TRAITSCOPE_APP_ARGS", json.dumps(args))
    at = AppTest.from_file(str(APP_MAIN),
                           default_timeout=120)
    at.query_params["run"] = "good"
    at.query_params["page"] = "Feature"
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    captions = " ".join(c.value for c in at.sidebar.caption)
    assert "bad-config" in captions and "config.json is damaged" in captions  # listed, with the reason
    page = " ".join(m.value for m in at.markdown)
    assert "refusing" not in page and "outside" not in page
    from traitscope.app.data import Dataset

    assert Dataset(shards).open_image(0).size == (120, 90)  # linked images are shown

    at = AppTest.from_file(str(APP_MAIN),
                           default_timeout=120)
    at.query_params["run"] = "broken"
    at.query_params["page"] = "Feature"
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert len(at.error) == 1 and str(top_rows) in at.error[0].value, [e.value for e in at.error]
    FIGURES["damaged"][0] += 2
    FIGURES["damaged"][1] += 2

    # a busy port is found before any address is printed
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = cli("app", "--runs", runs, "--shards", shards, "--port", port, "--no-browser")
    one_line_error(proc, f"--port {port}", "not free")
    assert "open http" not in proc.stdout
    assert "run bad-config cannot be used" in proc.stderr


# --- random kills ---

KILLS_PER_STAGE = int(os.environ.get("TRAITSCOPE_KILLS_PER_STAGE", "2"))


def kill_at(args: list, delay_s: float) -> bool:
    """Start `traitscope ARGS`, SIGKILL it after delay_s; True when it was still running then."""
    proc = subprocess.Popen([sys.executable, "-m", "traitscope.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay_s)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


@pytest.mark.parametrize("stage", ["shards", "train", "inference"])
def test_random_kills_resume_to_identical_results(pipeline, tmp_path, stage):
    import random

    seed = int(os.environ.get("TRAITSCOPE_KILL_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    for i in range(KILLS_PER_STAGE):
        # a moment within the reference command's run time, start-up included
        delay_s = rng.uniform(0.3, 0.95) * pipeline.seconds[stage]
        if stage == "shards":
            args, result, reference = pipeline.shards_args(tmp_path / f"s{i}"), tmp_path / f"s{i}", pipeline.shards.parent
        elif stage == "train":
            args, result, reference = pipeline.train_args(tmp_path / f"r{i}"), tmp_path / f"r{i}", pipeline.run.parent
        else:
            run = copy(pipeline.run, tmp_path / f"i{i}" / pipeline.run.name)
            import shutil

            shutil.rmtree(run / "inference")
            args, result, reference = pipeline.inference_args(run), run / "inference", pipeline.run / "inference"
        if not kill_at(args, delay_s):
            continue  # it finished first: not a kill
        FIGURES["kills"][0] += 1
        cli(*args, check_rc=0)
        wanted = {k: v for k, v in digests(reference).items() if not k.endswith((".png", "metrics.jsonl"))}
        if stage == "train":  # what a run is used by: its SAE and config (a checkpoint holds RNG and timing state)
            wanted = {k: v for k, v in wanted.items() if k.endswith(("/sae.safetensors", "/config.json"))}
        if stage == "inference":  # its manifest names the run's folder, which is a copy here
            wanted = {k: v for k, v in wanted.items() if k.endswith(".npy")}
        got = {k: v for k, v in digests(result).items() if k in wanted}
        assert got == wanted, f"{stage} killed after {delay_s:.1f} s (seed {seed}) did not resume to the same files"
        for log in result.glob("*/metrics.jsonl"):
            steps = [json.loads(ln)["step"] for ln in log.read_text().splitlines()]
            assert steps == sorted(set(steps))
        FIGURES["kills"][1] += 1
