"""Input geometry (issue 11): whole specimens at the resolution traits need.

What a user relies on: every geometry (grid, letterbox, squash, center-crop) is one `Preprocess`, recorded in
the shard manifest with its resolution and the reference pipeline it reproduces; shards made before keep
their meaning; the fish photos in ../shared/data/fishvista_demo are seen whole.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from traitscope.backbones import Preprocess, load_backbone
from traitscope.backbones.hf_vit import DINOV2_PREPROCESS
from traitscope.cli import main
from traitscope.images import FolderSource, median_aspect
from traitscope.shards import Shards
from traitscope.shards.store import content_hash

REPO = Path(__file__).resolve().parents[1]
FISH = REPO.parent / "shared" / "data" / "fishvista_demo"
MODEL = "random-dinov2"  # patch 14, 16x16 patches at 224


@pytest.fixture
def long_photos(tmp_path) -> Path:
    """Five long photos (aspect 2.5 to 3.5) and one tall one."""
    dpath = tmp_path / "photos"
    dpath.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(300, 100), (350, 100), (250, 100), (330, 110), (280, 100), (120, 300)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(dpath / f"fish{i}.png")
    return dpath


def test_a_manifest_from_before_geometries_means_the_centre_crop():
    old = {"crop": 224, "resize": 256, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
           "interpolation": "bicubic", "mode": "shorter"}  # a manifest's `preprocess` before this change
    pre = Preprocess.from_dict(old)
    assert pre == DINOV2_PREPROCESS and pre.geometry == "center-crop" and pre.input_hw == (224, 224)
    assert pre.to_dict() == {**old, "mean": tuple(old["mean"]), "std": tuple(old["std"])}  # same content hash
    assert content_hash(pre.to_dict()) == content_hash(old)
    assert pre.with_geometry("center-crop", None, 14) == pre
    # 640x480: resized to 341x256 (torchvision's int()), crop margins round(58.5) = 58 and 16
    assert pre.placement(640, 480) == ((341, 256), (-58, -16))
    assert pre.crop_box(640, 480) == pytest.approx((58 * 640 / 341, 16 * 480 / 256, 282 * 640 / 341, 240 * 480 / 256))


def test_each_geometry_places_a_long_image_as_documented():
    base = DINOV2_PREPROCESS
    width, height = 2786, 1130  # the largest fish photo
    letterbox = base.with_geometry("letterbox", 448, 14)
    assert letterbox.input_hw == (448, 448) and letterbox.placement(width, height) == ((448, 182), (0, 133))
    assert letterbox.seen_fraction(width, height) == 1.0
    valid = letterbox.valid_patches(width, height, (32, 32))
    assert valid.all(axis=1).tolist() == [9 <= r <= 22 for r in range(32)]  # fish at 133..315 px: rows 9..22
    grid = base.with_geometry("grid", 224, 14, aspect=3.2)
    assert grid.input_hw == (9 * 14, 29 * 14) and grid.geometry == "grid"  # 261 patches, about 16 x 16
    squash = base.with_geometry("squash", 224, 14)
    assert squash.placement(width, height) == ((224, 224), (0, 0)) and squash.seen_fraction(width, height) == 1.0
    crop = base.with_geometry("center-crop", 448, 14)
    assert (crop.crop, crop.resize) == (448, 512)
    assert crop.seen_fraction(width, height) == pytest.approx(448 / int(512 * 2786 / 1130) * 448 / 512)
    with pytest.raises(Exception, match="not a multiple of the model's patch size 14 .try 294 or 308"):
        base.with_geometry("grid", 300, 14)


def test_cli_records_geometry_resolution_and_reference(long_photos, tmp_path, capsys):
    argv = ["shards", "--images", str(long_photos), "--model", MODEL, "--layers=-1", "--geometry", "grid",
            "--resolution", "112", "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    shards = Shards(out[-1])
    m = shards.manifest
    aspect = median_aspect(FolderSource(long_photos), FolderSource(long_photos).records())
    assert aspect == pytest.approx(2.9)  # the median of 3, 3.5, 2.5, 3, 2.8 and 0.4
    assert m["geometry"] == "grid" and m["resolution"] == 112 and m["input_size"] == [5 * 14, 14 * 14]
    assert shards.grid(-1) == (5, 14) and "open_clip" in m["preprocess_reference"]
    assert Preprocess.from_dict(m["preprocess"]).input_hw == (70, 196)
    assert any(line.startswith("per image: a 196x70 px input (grid, 5x14 patches)") for line in out)
    assert len(shards.acts(-1)) == 6 * 70


def test_a_resolution_the_patches_do_not_divide_is_one_error_line(long_photos, tmp_path, capsys):
    argv = ["shards", "--images", str(long_photos), "--model", MODEL, "--resolution", "100",
            "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["traitscope shards: error: resolution 100 is not a multiple of the model's patch size 14 "
                   "(try 98 or 112)"]


@pytest.mark.skipif(not FISH.is_dir(), reason="shared fish photos not present")
def test_the_whole_fish_is_seen(capsys):
    """Share of each fish photo's pixels that reach the model: 100% under grid and letterbox."""
    source = FolderSource(FISH)
    sizes = [source.image_size(r) for r in source.records()]
    centre = [DINOV2_PREPROCESS.seen_fraction(w, h) for w, h in sizes]
    aspect = median_aspect(source, source.records())
    grid = DINOV2_PREPROCESS.with_geometry("grid", 224, 14, aspect)
    letterbox = DINOV2_PREPROCESS.with_geometry("letterbox", 224, 14)
    with capsys.disabled():
        print(f"\nfish photos seen by the centre crop: {np.mean(centre):.1%} of pixels on average "
              f"({min(centre):.1%} to {max(centre):.1%}); grid ({grid.input_hw[1]}x{grid.input_hw[0]} px, "
              f"median aspect {aspect:.2f}) and letterbox: 100%")
    assert len(sizes) == 110 and max(centre) < 0.5
    assert all(grid.seen_fraction(w, h) == pytest.approx(1.0) == letterbox.seen_fraction(w, h) for w, h in sizes)
