"""`traitscope shards`: what a user relies on when turning a folder of images into activation shards.

Real components throughout: the seeded random-init DINOv2 (no download), real image files on disk,
and real processes that are killed part-way.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from traitscope.backbones import Preprocess, load_backbone
from traitscope.cli import main
from traitscope.errors import TraitscopeError
from traitscope.images.folder import FolderSource
from traitscope.images.source import load_image
from traitscope.shards import Shards
from traitscope.shards.build import FP16_MAX, _normalize, build_shards

MODEL = "random-dinov2"  # 4 blocks, 64 wide, 16x16 patches at 224


def _photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth colour gradient with noise: something a JPEG encoder treats like a photo."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(MODEL)


@pytest.fixture
def photos(tmp_path) -> Path:
    """Seven JPEGs and PNGs of different sizes and orientations, one in a subfolder."""
    dpath = tmp_path / "photos"
    (dpath / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = [(240, 180), (180, 240), (300, 200), (224, 224), (260, 190), (200, 310), (250, 250)]
    for i, (w, h) in enumerate(sizes):
        fpath = dpath / ("sub" if i == 3 else "") / f"fish{i}.{'png' if i == 5 else 'jpg'}"
        _photo(rng, w, h).save(fpath)
    return dpath


def _file_digests(dpath: Path) -> dict[str, str]:
    return {p.relative_to(dpath).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(dpath.rglob("*")) if p.is_file()}


def _direct(backbone, shards: Shards, row: int, layer: int):
    """The backbone's own forward pass on one stored image, with nothing of the shard pipeline."""
    pixels_chw = backbone.preprocess(load_image(shards.image_fpath(row)))
    acts = backbone.record(pixels_chw[None], [layer])[layer]
    return acts.patches_bpd[0].float().numpy(), acts.cls_bd[0].float().numpy()


def test_manifest_says_what_made_the_folder(photos, tmp_path, backbone, capsys):
    shards = build_shards(FolderSource(photos), backbone, [-2], tmp_path / "out", batch_size=3,
                          images_per_shard=4, verbose=False)
    m = shards.manifest
    assert shards.dpath.parent == tmp_path / "out" and shards.dpath.name == m["hash"]
    assert m["format"] == "traitscope-shards/1"
    assert m["model"]["name"] == MODEL and m["model"]["weights_sha256"] == backbone.weights_sha256()
    assert m["layers"] == [2] and m["token_kinds"] == ["patches", "cls"]
    assert m["d_model"] == {"2": 64} and m["grid"] == {"2": [16, 16]}
    assert m["layout"] == {"n_cls": 1, "n_registers": 0}
    assert Preprocess.from_dict(m["preprocess"]) == backbone.preprocess
    assert m["dtype"] == "float16" and m["n_clamped"] == {}
    assert m["images_root"] == str(photos.resolve())
    assert (m["n_listed"], m["n_images"], m["n_skipped"]) == (7, 7, 0)
    assert [(s["index"], s["first_listed"], s["n_listed"], s["n_images"]) for s in m["shards"]] == [
        (0, 0, 4, 4), (1, 4, 3, 3)]
    assert set(m["shards"][0]["files"]) == {"L2/patches-00000.npy", "L2/cls-00000.npy"}
    shards.verify()  # every file matches its checksum
    acts = shards.acts(-2)
    assert acts.shape == (7 * 256, 64) and acts.dtype == np.float16
    assert shards.acts(2, "cls").shape == (7, 64)
    assert not list(shards.dpath.rglob("*.tmp")) and not (shards.dpath / ".lock").exists()
    assert capsys.readouterr().out == ""  # verbose=False prints nothing


def test_rows_map_back_to_images_and_match_a_direct_forward(photos, tmp_path, backbone):
    for dtype, tol in (("float32", 1e-4), ("float16", 2e-2)):
        shards = build_shards(FolderSource(photos), backbone, [-2, 1], tmp_path / dtype, dtype=dtype,
                              batch_size=4, images_per_shard=3, verbose=False)
        images = shards.images
        listing = [json.loads(line) for line in (shards.dpath / "images.jsonl").read_text().splitlines()]
        assert [e["path"] for e in listing] == sorted(p.relative_to(photos).as_posix()
                                                       for p in photos.rglob("*.*"))
        assert [e["row"] for e in listing] == list(range(7))
        for e in listing:
            assert (e["width"], e["height"]) == Image.open(photos / e["path"]).size
        n_patches = shards.n_patches(-2)
        for layer in (2, 1):
            patches, cls = shards.acts(layer), shards.acts(layer, "cls")
            for row in (0, 4, 6):  # rows in the first and last shards
                want_patches, want_cls = _direct(backbone, shards, row, layer)
                got = patches[row * n_patches:(row + 1) * n_patches].astype(np.float32)
                scale = np.abs(want_patches).max()
                np.testing.assert_allclose(got, want_patches, atol=tol * scale, rtol=tol)
                np.testing.assert_allclose(cls[row].astype(np.float32), want_cls, atol=tol * scale, rtol=tol)
                # flattened row r is image r // n_patches, patch r % n_patches
                r = row * n_patches + 37
                assert images[r // n_patches]["path"] == listing[row]["path"]
                np.testing.assert_allclose(patches[r].astype(np.float32), want_patches[r % n_patches],
                                           atol=tol * scale, rtol=tol)


def test_pixels_are_exactly_the_backbones_preprocessing(photos, backbone):
    """Decoding threads ship uint8 crops and the normalisation happens where the model runs: the
    model must still get exactly what `backbone.preprocess(image)` gives."""
    images = [load_image(p) for p in sorted(photos.rglob("*.*"))]
    want = torch.stack([backbone.preprocess(im) for im in images])
    crops = torch.from_numpy(np.stack([np.asarray(backbone.preprocess.crop_image(im)) for im in images]))
    got = _normalize(crops, backbone.preprocess)
    assert got.is_contiguous() and torch.equal(got, want)


def test_worker_processes_and_threads_write_the_same_bytes_and_draft_is_recorded(photos, tmp_path, backbone):
    _photo(np.random.default_rng(1), 1400, 900).save(photos / "large.jpg", quality=90)
    digests = {}
    for workers in ("processes", "threads"):
        shards = build_shards(FolderSource(photos), backbone, [-2], tmp_path / workers, images_per_shard=4,
                              n_workers=2, decode_workers=workers, verbose=False)
        digests[workers] = _file_digests(shards.dpath)
        assert shards.manifest["decode"] == "full"
    assert digests["processes"] == digests["threads"]

    drafted = build_shards(FolderSource(photos), backbone, [-2], tmp_path / "processes", images_per_shard=4,
                           n_workers=2, decode="draft", verbose=False)
    assert drafted.manifest["decode"] == "draft" and drafted.dpath != shards.dpath  # another folder
    large = next(i for i, e in enumerate(drafted.images) if e["path"] == "large.jpg")
    assert (drafted.images[large]["width"], drafted.images[large]["height"]) == (1400, 900)
    full_acts, draft_acts = shards.acts(-2, "cls"), drafted.acts(-2, "cls")
    assert np.array_equal(np.delete(full_acts, large, 0), np.delete(draft_acts, large, 0))  # only the large JPEG
    assert not np.array_equal(full_acts[large], draft_acts[large])
    np.testing.assert_allclose(draft_acts[large], full_acts[large], atol=0.05 * np.abs(full_acts[large]).max())


def test_jpegs_decoded_where_the_model_runs_give_nearly_the_same_activations(photos, tmp_path, backbone):
    """decode='device' (nvJPEG on a GPU; torchvision's CPU decoder here, the same code): JPEGs are decoded
    in batches by the loader and resized by torch, the PNG by the workers; an EXIF-turned photo too."""
    exif = Image.Exif()
    exif[0x0112] = 6
    _photo(np.random.default_rng(2), 900, 600).save(photos / "turned.jpg", exif=exif.tobytes(), quality=90)
    full = build_shards(FolderSource(photos), backbone, [-2], tmp_path / "out", images_per_shard=4, n_workers=2,
                        verbose=False)
    device = build_shards(FolderSource(photos), backbone, [-2], tmp_path / "out", images_per_shard=4, n_workers=2,
                          decode="device", verbose=False)
    assert device.manifest["decode"] == "device" and device.dpath != full.dpath
    assert [(e["width"], e["height"]) for e in device.images] == [(e["width"], e["height"]) for e in full.images]
    a, b = (np.asarray(s.acts(-2, "cls"), dtype=np.float32) for s in (full, device))
    np.testing.assert_allclose(b, a, atol=0.05 * np.abs(a).max())
    png = next(i for i, e in enumerate(full.images) if e["path"].endswith(".png"))
    assert np.array_equal(a[png], b[png])  # not a JPEG: decoded by the workers as before


def test_rerun_finds_the_complete_folder(photos, tmp_path, backbone, capsys):
    first = build_shards(FolderSource(photos), backbone, [-2], tmp_path / "out", images_per_shard=4)
    before = {p: p.stat().st_mtime_ns for p in first.dpath.rglob("*")}
    capsys.readouterr()
    again = build_shards(FolderSource(photos), backbone, [-2], tmp_path / "out", images_per_shard=4)
    assert again.dpath == first.dpath
    assert "already complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in first.dpath.rglob("*")} == before
    # Anything that changes a stored byte names another folder.
    other = build_shards(FolderSource(photos), backbone, [-1], tmp_path / "out", images_per_shard=4, verbose=False)
    cls_only = build_shards(FolderSource(photos), backbone, [-2], tmp_path / "out", token_kinds=["cls"],
                            images_per_shard=4, verbose=False)
    assert len({first.dpath, other.dpath, cls_only.dpath}) == 3
    assert cls_only.token_kinds == ["cls"] and not list(cls_only.dpath.glob("L*/patches-*"))


_KILLED_RUN = textwrap.dedent('''
    import os, signal, sys, time
    from pathlib import Path
    from traitscope.backbones import load_backbone
    from traitscope.images.folder import FolderSource
    from traitscope.shards.build import build_shards

    images, out, kill_at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    run_pid = os.getpid()


    class KilledPartWay(FolderSource):
        """The run dies by SIGKILL (no clean-up at all) when image `kill_at` is decoded (in a worker
        process), once two shards are on disk."""
        def load(self, record):
            if record["index"] == kill_at:
                deadline = time.time() + 60
                while time.time() < deadline and len(list(out.glob("*/progress/*.json"))) < 2:
                    time.sleep(0.005)
                os.kill(run_pid, signal.SIGKILL)
            return super().load(record)

    build_shards(KilledPartWay(images), load_backbone("random-dinov2"), [-2, -1], out, batch_size=2, images_per_shard=2,
                 n_workers=2, verbose=False)
''')


def test_killed_run_resumes_to_the_same_bytes(photos, tmp_path, backbone):
    (photos / "broken.jpg").write_bytes(b"not a jpeg")  # a skipped image must resume the same way too
    script = tmp_path / "killed_run.py"
    script.write_text(_KILLED_RUN)
    killed = subprocess.run([sys.executable, str(script), str(photos), str(tmp_path / "resumed"), "6"],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    (dpath,) = (tmp_path / "resumed").iterdir()
    assert not (dpath / "manifest.json").exists()
    n_finished = len(list((dpath / "progress").glob("*.json")))
    assert 2 <= n_finished < 4
    with pytest.raises(TraitscopeError, match="rerun `traitscope shards` to finish it"):
        Shards(dpath)

    # Resume here, and compare with an uninterrupted run (same settings as the script's).
    for out in ("resumed", "clean"):
        build_shards(FolderSource(photos), backbone, [-2, -1], tmp_path / out, batch_size=2, images_per_shard=2,
                     n_workers=2, verbose=False)
    resumed_files = _file_digests(dpath)
    assert resumed_files == _file_digests(tmp_path / "clean" / dpath.name)
    assert not any(name.endswith((".tmp", ".lock")) for name in resumed_files)
    assert Shards(dpath).manifest["n_skipped"] == 1


def test_half_written_shard_is_never_taken_as_complete(photos, tmp_path, backbone):
    out = tmp_path / "out"
    shards = build_shards(FolderSource(photos), backbone, [-2], out, images_per_shard=3, verbose=False)
    want = _file_digests(shards.dpath)
    # What a crash can leave: no manifest, a shard file cut short, a .tmp file, a record with no file.
    (shards.dpath / "manifest.json").unlink()
    patches_fpath = shards.dpath / "L2" / "patches-00001.npy"
    patches_fpath.write_bytes(patches_fpath.read_bytes()[:1000])
    (shards.dpath / "L2" / "cls-00002.npy.tmp").write_bytes(b"\0" * 10)
    (shards.dpath / "L2" / "cls-00002.npy").unlink()
    again = build_shards(FolderSource(photos), backbone, [-2], out, images_per_shard=3, verbose=False)
    assert _file_digests(again.dpath) == want


def test_a_second_run_on_the_same_folder_is_refused(photos, tmp_path, backbone):
    import fcntl

    from traitscope.shards.build import plan_shards

    dpath = plan_shards(FolderSource(photos), backbone, [-2], tmp_path / "out").dpath
    dpath.mkdir(parents=True)
    with open(dpath / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a run in another process holds it
        with pytest.raises(TraitscopeError, match="another `traitscope shards` run is writing"):
            build_shards(FolderSource(photos), backbone, [-2], tmp_path / "out", verbose=False)
    assert build_shards(FolderSource(photos), backbone, [-2], tmp_path / "out", verbose=False).n_images == 7


def test_unreadable_files_are_skipped_and_listed(photos, tmp_path, backbone, capsys):
    good = (photos / "fish0.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (photos / "notes.jpg").write_text("a text file with an image's name\n")
    (photos / "readme.txt").write_text("not listed: not an image extension\n")
    shards = build_shards(FolderSource(photos), backbone, [-2], tmp_path / "out", images_per_shard=4)
    err = capsys.readouterr().err
    assert "skipped 2 of 9 images" in err and str(shards.dpath / "images.jsonl") in err
    m = shards.manifest
    assert (m["n_listed"], m["n_images"], m["n_skipped"]) == (9, 7, 2)
    skipped = {e["path"]: e for e in shards.listing() if e["skipped"]}
    assert set(skipped) == {"truncated.jpg", "notes.jpg"}
    assert all(e["row"] is None for e in skipped.values())
    assert "truncated" in skipped["truncated.jpg"]["skipped"]
    assert shards.acts(-2, "cls").shape[0] == 7 == len(shards.images)
    assert [e["row"] for e in shards.images] == list(range(7))


def test_fp16_overflow_is_clamped_and_reported_and_nan_is_an_error(photos, tmp_path, capsys):
    loud = load_backbone(MODEL)
    with torch.no_grad():  # a real model whose last recorded block writes huge values
        loud.model.encoder.layer[2].mlp.fc2.bias.fill_(1e6)
    shards = build_shards(FolderSource(photos), loud, [-2], tmp_path / "out", images_per_shard=4)
    assert "beyond the float16 range" in capsys.readouterr().err
    assert shards.manifest["n_clamped"]["L2/patches"] > 0 and shards.manifest["n_clamped"]["L2/cls"] > 0
    acts = shards.acts(-2)[:]
    assert np.isfinite(acts).all() and acts.max() == FP16_MAX
    exact = build_shards(FolderSource(photos), loud, [-2], tmp_path / "out", dtype="float32", verbose=False)
    assert exact.manifest["n_clamped"] == {} and exact.acts(-2)[:].max() > 1e5

    broken = load_backbone(MODEL)
    with torch.no_grad():
        broken.model.encoder.layer[0].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(TraitscopeError, match="NaN or infinite"):
        build_shards(FolderSource(photos), broken, [-2], tmp_path / "nan", verbose=False)
    (dpath,) = (tmp_path / "nan").iterdir()
    assert not list(dpath.rglob("*.npy")) and not list(dpath.rglob("*.tmp"))


def test_patch_and_image_labels_are_stored_beside_the_activations(tmp_path, backbone):
    images, masks = tmp_path / "images", tmp_path / "masks"
    rng = np.random.default_rng(1)
    for cls_name in ("bass", "pike"):
        for i in range(3):
            (images / cls_name).mkdir(parents=True, exist_ok=True)
            (masks / cls_name).mkdir(parents=True, exist_ok=True)
            _photo(rng, 256, 256).save(images / cls_name / f"{i}.jpg")
            mask = np.zeros((256, 256), np.uint8)
            mask[:, 128:] = 2  # right half is a fin
            Image.fromarray(mask).save(masks / cls_name / f"{i}.png")
    (masks / "labels.json").write_text(json.dumps({"0": "background", "2": "fin"}))
    source = FolderSource(images, labels="folders", masks=masks)
    shards = build_shards(source, backbone, [-2], tmp_path / "out", images_per_shard=4, verbose=False)
    assert shards.patch_label_names == ["background", "fin"]
    labels = shards.patch_labels()
    assert labels.shape == (6 * 256, 2) and labels.dtype == np.uint8
    grid = labels[:256].reshape(16, 16, 2)
    assert (grid[:, :8, 0] == 1).all() and (grid[:, 8:, 1] == 1).all()  # left half background, right half fin
    assert shards.image_label_names == ["bass", "pike"]
    np.testing.assert_array_equal(shards.image_labels(), [[1, 0]] * 3 + [[0, 1]] * 3)


def test_cli_prints_the_folder_last(photos, tmp_path, capsys):
    argv = ["shards", "--images", str(photos), "--model", MODEL, "--layers=-2,-1", "--tokens", "cls",
            "--out", str(tmp_path / "out"), "--dtype", "float32", "--batch-size", "3", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    shards = Shards(out[-1])
    assert shards.layers == [2, 3] and shards.token_kinds == ["cls"] and shards.manifest["dtype"] == "float32"
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any("already complete" in line for line in out) and out[-1] == str(shards.dpath)


def _one_error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if "%|" not in line]  # the progress bar, if it got as far
    assert len(err) == 1 and err[0].startswith("traitscope shards: error: "), err
    return err[0]


def test_bad_input_gives_one_error_line(photos, tmp_path, capsys):
    base = ["shards", "--out", str(tmp_path / "out"), "--device", "cpu"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images" in _one_error_line(capsys, base + ["--images", str(empty), "--model", MODEL])
    line = _one_error_line(capsys, base + ["--images", str(tmp_path / "missing"), "--model", MODEL])
    assert "does not exist" in line
    assert "unknown model" in _one_error_line(capsys, base + ["--images", str(photos), "--model", "no-such-model"])
    line = _one_error_line(capsys, base + ["--images", str(photos), "--model", MODEL, "--layers", "7"])
    assert "layer 7 is out of range" in line
    assert "not a layer index" in _one_error_line(capsys, base + ["--images", str(photos), "--layers", "x"])
    assert "not a token kind" in _one_error_line(capsys, base + ["--images", str(photos), "--tokens", "regs"])
    (photos / "notes.jpg").write_text("a text file with an image's name\n")
    line = _one_error_line(capsys, base + ["--images", str(photos), "--model", MODEL, "--strict"])
    assert str(photos / "notes.jpg") in line and "--strict" in line


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_gives_one_line_and_resumes(photos, tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        argv = ["shards", "--images", str(photos), "--model", MODEL, "--dtype", "float32", "--device", "cpu",
                "--images-per-shard", "2", "--batch-size", "2", "--out", str(disk)]
        line = _one_error_line(capsys, argv)
        assert "disk full" in line and "rerun to resume" in line
        (dpath,) = disk.iterdir()
        assert not list(dpath.rglob("*.tmp")) and not (dpath / "manifest.json").exists()
        assert list((dpath / "progress").glob("*.json"))  # finished shards were kept
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        assert main(argv) == 0
        assert "resuming" in capsys.readouterr().out
        want = argv[:-1] + [str(tmp_path / "clean")]
        assert main(want) == 0
        assert _file_digests(dpath) == _file_digests(tmp_path / "clean" / dpath.name)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_streamed_npy_has_the_bytes_of_np_save(tmp_path):
    """Shard files are written row batch by row batch; readers get exactly what `np.save` would write."""
    from traitscope.shards.store import NpyAppender

    rows = np.random.default_rng(0).normal(size=(23, 5, 7)).astype(np.float16)
    appender = NpyAppender(tmp_path / "streamed.npy", np.float16, (5, 7))
    for start in range(0, 23, 4):
        appender.append(rows[start:start + 4])
    assert not (tmp_path / "streamed.npy").exists()  # only the .tmp until it is closed
    appender.close()
    np.save(tmp_path / "saved.npy", rows)
    assert (tmp_path / "streamed.npy").read_bytes() == (tmp_path / "saved.npy").read_bytes()
    assert not (tmp_path / "streamed.npy.tmp").exists()
