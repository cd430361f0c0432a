"""Input geometry (issue 11): whole specimens at the resolution traits need.

What a user relies on: every geometry (grid, letterbox, squash, center-crop) is one `Preprocess`, recorded in
the shard manifest with its resolution and the reference pipeline it reproduces; shards made before keep
their meaning; the fish photos in ../shared/data/fishvista_demo are seen whole.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from traitscope.backbones import Preprocess, load_backbone
from traitscope.backbones.hf_vit import DINOV2_PREPROCESS
from traitscope.cli import main
from traitscope.images import FolderSource, median_aspect
from traitscope.shards import Shards
from traitscope.shards.store import content_hash
from locations import FISH

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
def test_the_whole_fish_is_seen(summary):
    """Share of each fish photo's pixels that reach the model: 100% under grid and letterbox."""
    source = FolderSource(FISH)
    sizes = [source.image_size(r) for r in source.records()]
    centre = [DINOV2_PREPROCESS.seen_fraction(w, h) for w, h in sizes]
    aspect = median_aspect(source, source.records())
    grid = DINOV2_PREPROCESS.with_geometry("grid", 224, 14, aspect)
    letterbox = DINOV2_PREPROCESS.with_geometry("letterbox", 224, 14)
    summary.append(f"fish photos seen by the centre crop: {np.mean(centre):.1%} of pixels on average "
                   f"({min(centre):.1%} to {max(centre):.1%}); grid ({grid.input_hw[1]}x{grid.input_hw[0]} px, "
                   f"median aspect {aspect:.2f}) and letterbox: 100%")
    assert len(sizes) == 110 and max(centre) < 0.5
    assert all(grid.seen_fraction(w, h) == pytest.approx(1.0) == letterbox.seen_fraction(w, h) for w, h in sizes)


def test_padding_patches_are_never_trained_on_counted_or_ranked(long_photos, tmp_path, capsys):
    """Letterboxed long photos: most patches are padding; none reaches training, statistics or top images."""
    from traitscope.features import open_inputs, run_inference
    from traitscope.train.loader import ShuffledLoader, TokenSplit

    assert main(["shards", "--images", str(long_photos), "--model", MODEL, "--layers=-1", "--geometry", "letterbox",
                 "--resolution", "112", "--out", str(tmp_path / "shards"), "--device", "cpu"]) == 0
    shards = Shards(capsys.readouterr().out.strip().splitlines()[-1])
    validity = shards.patch_validity(-1)
    pre = Preprocess.from_dict(shards.manifest["preprocess"])
    expected = np.stack([pre.valid_patches(r["width"], r["height"], (8, 8)).reshape(-1) for r in shards.images])
    np.testing.assert_array_equal(validity.of_images(0, shards.n_images), expected)
    assert 0.3 < expected.mean() < 0.6  # 3:1 photos in a square: about 3 rows of 8 hold image

    split = TokenSplit(shards, -1, "patches", val_frac=0.2, seed=0)
    acts = shards.acts(-1)[:]
    valid_rows = expected.reshape(-1) & ~np.repeat(split.is_val, 64)
    assert split.n_train_tokens == valid_rows.sum()
    with ShuffledLoader(split, 16, seed=0, chunk_rows=64, prefetch=False) as loader:
        seen = np.concatenate([next(loader).numpy() for _ in range(split.n_train_tokens // 16)])
    as_set = lambda rows: {r.tobytes() for r in rows.astype(np.float32)}  # noqa: E731
    assert as_set(seen) == as_set(acts[valid_rows])  # one epoch: every valid training token, nothing else

    assert main(["train", "--shards", str(shards.dpath), "--sae", "topk", "--k", "4", "--d-sae", "32",
                 "--tokens", "2000", "--batch-size", "64", "--val-frac", "0.2", "--out", str(tmp_path / "runs"),
                 "--quiet"]) == 0
    run = next((tmp_path / "runs").rglob("sae.safetensors")).parent
    assert json.loads((run / "config.json").read_text())["train"]["n_train_tokens"] == split.n_train_tokens
    inf, _ = run_inference(run, shards.dpath, top_n=4, progress=False)
    maps = np.asarray(inf.array("top_patch_acts"))  # (d_sae, top_n, 64)
    rows = np.asarray(inf.top_rows)
    assert (rows >= 0).any()
    for f, slot in zip(*np.nonzero(rows >= 0)):
        assert not maps[f, slot][~expected[rows[f, slot]]].any()  # never a value on padding
    inputs = open_inputs(run, shards.dpath)
    codes = inputs.sae.encode(torch.from_numpy(acts.astype(np.float32))).detach().numpy()
    freq = (codes[expected.reshape(-1)] > 0).mean(0)
    np.testing.assert_allclose(np.asarray(inf.array("feature_freq")), freq, rtol=1e-5)


@pytest.mark.parametrize("geometry", ["grid", "letterbox", "squash", "center-crop"])
def test_a_drawn_region_and_its_mask_stay_aligned(tmp_path, geometry):
    """A red rectangle near the edge of a long photo and its mask land on the same patches."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rgb = np.full((100, 310, 3), 200, dtype=np.uint8)
    mask = np.zeros((100, 310), dtype=np.uint8)
    for x0, y0 in [(6, 30), (150, 10), (255, 55)]:  # a head, a dorsal fin, a tail
        rgb[y0:y0 + 30, x0:x0 + 45] = (255, 0, 0)
        mask[y0:y0 + 30, x0:x0 + 45] = 1
    Image.fromarray(rgb).save(images / "fish.png")
    Image.fromarray(mask).save(masks / "fish.png")
    (masks / "labels.json").write_text(json.dumps({"0": "background", "1": "spot"}))
    source = FolderSource(images, masks=masks)
    pre = DINOV2_PREPROCESS.with_geometry(geometry, 224, 14, aspect=3.1)
    grid = (pre.input_hw[0] // 14, pre.input_hw[1] // 14)
    record = source.records()[0]
    labels = source.patch_labels(record, pre, grid)[:, 1].reshape(grid).astype(bool)
    seen = np.asarray(pre.crop_image(source.load(record)), dtype=np.int64)
    red = (seen[..., 0] > 230) & (seen[..., 1] < 30)
    red_share = red.reshape(grid[0], 14, grid[1], 14).mean(axis=(1, 3))
    np.testing.assert_array_equal(labels, red_share > 0.5)
    assert labels.sum() >= (4 if geometry != "center-crop" else 1)
    valid = pre.valid_patches(310, 100, grid)
    assert not labels[~valid].any() and source.patch_labels(record, pre, grid)[~valid.reshape(-1)].sum() == 0


@pytest.mark.parametrize("geometry", ["grid", "letterbox"])
def test_heatmaps_cover_the_whole_image_patch_for_patch(geometry):
    """Every pixel of the original lies under exactly the patch that saw it; padding cells are never drawn."""
    from traitscope.viz.heatmap import overlay_heatmap, patch_index_maps

    width, height = 310, 100
    pre = DINOV2_PREPROCESS.with_geometry(geometry, 224, 14, aspect=3.1)
    grid = (pre.input_hw[0] // 14, pre.input_hw[1] // 14)
    row0, col0, row1, col1 = pre.valid_box(width, height, grid)
    col_of_x, row_of_y = patch_index_maps((width, height), pre.canvas_box(width, height), grid)
    assert (col_of_x >= col0).all() and (col_of_x < col1).all() and (row_of_y >= row0).all() and (row_of_y < row1).all()
    assert col_of_x[0] == col0 and col_of_x[-1] == col1 - 1 and row_of_y[0] == row0 and row_of_y[-1] == row1 - 1
    # each pixel's patch is where that pixel landed in the model's input
    (new_w, new_h), (ox, oy) = pre.placement(width, height)
    x_in = (np.arange(width) + 0.5) * new_w / width + ox
    np.testing.assert_array_equal(col_of_x, np.floor(x_in / 14).astype(int))

    acts_hw = np.zeros(grid, dtype=np.float32)
    acts_hw[:, col0] = 1.0  # the head end
    acts_hw[:, col1 - 1] = 1.0  # the tail end
    acts_hw[~pre.valid_patches(width, height, grid)] = 5.0  # padding (letterbox: rows above and below) is never drawn
    drawn = np.asarray(overlay_heatmap(Image.new("RGB", (width, height), "white"), acts_hw, pre, vmax=1.0))
    changed = (drawn != 255).any(axis=2)
    assert changed[:, 0].all() and changed[:, -1].all() and not changed[:, width // 2].any()


# --- pixel-exact against the named reference pipelines ---------------------------------------------


def _odd_photos() -> list[Image.Image]:
    """Long, tall, nearly square and odd-margin sizes (301x517: the crop margin 107.5 rounds to 108)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            for w, h in [(339, 97), (640, 480), (301, 517), (700, 283), (225, 224)]]


def test_every_geometry_matches_its_reference_pipeline_exactly():
    """torchvision for the centre crop (Meta's DINOv2 eval transform, saev), open_clip's own transforms for
    every geometry, timm's eval transform: the same normalised tensors, to the last bit."""
    import open_clip
    import timm
    from torchvision import transforms as T

    from traitscope.backbones.base import CLIP_MEAN, CLIP_STD

    photos = _odd_photos()
    bicubic = T.InterpolationMode.BICUBIC
    dinov2_ref = T.Compose([T.Resize(256, interpolation=bicubic), T.CenterCrop(224), T.ToTensor(),
                            T.Normalize(DINOV2_PREPROCESS.mean, DINOV2_PREPROCESS.std)])
    assert "torchvision" in DINOV2_PREPROCESS.reference
    for photo in photos:
        assert torch.equal(dinov2_ref(photo), DINOV2_PREPROCESS(photo))

    clip = Preprocess(crop=224, resize=224, mean=CLIP_MEAN, std=CLIP_STD)
    for resize_mode, geometry in [("shortest", "center-crop"), ("squash", "squash"), ("longest", "letterbox"),
                                  ("longest", "grid")]:
        pre = clip.with_geometry(geometry, 224, 16, aspect=3.0)
        ref = open_clip.image_transform(pre.input_hw, is_train=False, mean=CLIP_MEAN, std=CLIP_STD,
                                        resize_mode=resize_mode, interpolation="bicubic", fill_color=0)
        for photo in photos:
            assert torch.equal(ref(photo), pre(photo)), (geometry, photo.size)
    assert "open_clip" in clip.with_geometry("grid", 224, 16, 3.0).reference

    timm_backbone = load_backbone("random-timm-vit")
    ref = timm.data.create_transform(**timm.data.resolve_data_config({}, model=timm_backbone.model))
    for photo in photos:
        assert torch.equal(ref(photo), timm_backbone.preprocess(photo))


def test_transformers_processors_round_the_crop_differently():
    """Why the manifest names the reference: transformers' AutoImageProcessor convention (floor division)
    puts DINOv2's crop one pixel from torchvision's on an odd margin that rounds up; otherwise the two agree
    to within the few grey levels of its antialiased tensor resize."""
    import transformers

    processor = transformers.BitImageProcessor(  # what AutoImageProcessor gives for facebook/dinov2-*
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
        image_mean=list(DINOV2_PREPROCESS.mean), image_std=list(DINOV2_PREPROCESS.std))
    std = torch.tensor(DINOV2_PREPROCESS.std).view(3, 1, 1)
    for photo in _odd_photos():
        hf = processor(photo, return_tensors="pt")["pixel_values"][0]
        ours = DINOV2_PREPROCESS(photo)
        levels = ((hf - ours) * std * 255).abs()
        if photo.size == (301, 517):  # resized to 256x439: margin 107.5, torchvision 108, floor 107
            assert levels.max() > 50
            assert ((hf[:, 1:] - ours[:, :-1]) * std * 255).abs().mean() < 5  # the same, one row lower
        else:
            assert levels.max() < 6


def _edge_trait_photos(dpath: Path, n_images: int) -> Path:
    """Long 768x256 photos: a synthetic-set tile (1-3 objects with known traits) at the left end, plain
    background elsewhere; the image label is whether an object at that end is red. Returns the labels CSV."""
    from traitscope.images.synthetic import draw_image

    dpath.mkdir()
    lines = ["path,red_at_edge"]
    yy, xx = np.mgrid[0:256, 0:512]
    for i in range(n_images):
        tile, _, objects = draw_image(7, i, 256)
        rng = np.random.default_rng([7, i])
        rest = rng.uniform(90, 170) + 30 * np.sin(xx / rng.uniform(40, 90))[..., None] + rng.normal(0, 6, (256, 512, 3))
        photo = np.concatenate([tile, np.clip(rest, 0, 255).astype(np.uint8)], axis=1)
        Image.fromarray(photo).save(dpath / f"{i:04d}.png")
        lines.append(f"{i:04d}.png,{int(any(o['colour'] == 'red' for o in objects))}")
    (dpath.parent / "labels.csv").write_text("\n".join(lines) + "\n")
    return dpath.parent / "labels.csv"


def test_a_trait_at_the_edge_is_found_by_the_default_and_missed_by_the_centre_crop(tmp_path, capsys, summary):
    """Alignment AP of the SAE's best feature for 'red object at the left end': the centre crop never shows
    that end, the default grid does."""
    from traitscope.features import open_inputs, run_inference
    from traitscope.features.alignment import align

    labels = _edge_trait_photos(tmp_path / "photos", 64)
    ap = {}
    for geometry in ("grid", "center-crop"):
        assert main(["shards", "--images", str(tmp_path / "photos"), "--labels", str(labels), "--model", MODEL,
                     "--layers=-1", "--geometry", geometry, "--resolution", "112", "--out", str(tmp_path / "shards"),
                     "--device", "cpu"]) == 0
        shards_dpath = capsys.readouterr().out.strip().splitlines()[-1]
        runs = tmp_path / f"runs-{geometry}"
        assert main(["train", "--shards", shards_dpath, "--sae", "topk", "--k", "8", "--d-sae", "64", "--tokens",
                     "6k", "--batch-size", "256", "--val-frac", "0.4", "--out", str(runs), "--quiet"]) == 0
        run = next(runs.rglob("sae.safetensors")).parent
        inputs = open_inputs(run, shards_dpath)
        inf, _ = run_inference(run, shards_dpath, progress=False, inputs=inputs)
        rows = align(inputs, inf, [], select_tokens=5000, eval_tokens=5000)
        (score,) = [r for r in rows if r.label == "red_at_edge" and r.method == "sae" and r.scoring == "sparse"]
        ap[geometry] = (score.ap, score.base_rate)
    summary.append(f"red object at the edge, SAE alignment AP (base rate): grid {ap['grid'][0]:.3f} "
                   f"({ap['grid'][1]:.3f}), center-crop {ap['center-crop'][0]:.3f} ({ap['center-crop'][1]:.3f})")
    (grid_ap, base_rate), (crop_ap, _) = ap["grid"], ap["center-crop"]  # measured: 0.657, 0.154; 0.177
    assert grid_ap > max(0.5, 3 * base_rate) and crop_ap < base_rate + 0.15


def test_the_atlas_zooms_onto_the_patches_that_fire_under_letterbox():
    """The atlas's zoomed tile of a feature firing at a long photo's head shows the head, not the middle."""
    from traitscope.app.atlas import zoom_box

    width, height = 310, 100
    pre = DINOV2_PREPROCESS.with_geometry("letterbox", 224, 14)
    row0, col0, row1, col1 = pre.valid_box(width, height, (16, 16))
    acts_hw = np.zeros((16, 16), dtype=np.float32)
    acts_hw[(row0 + row1) // 2, col0] = 1.0  # the head end, in the middle row of the photo
    left, top, right, bottom = zoom_box(acts_hw, pre.canvas_box(width, height), (width, height), margin=0)
    _, canvas_top, _, canvas_bottom = pre.canvas_box(width, height)
    y_fire = canvas_top + ((row0 + row1) // 2 + 0.5) * (canvas_bottom - canvas_top) / 16
    assert left == 0 and right < width / 2 and top < y_fire < bottom  # the head end, around the patch that fires


def test_images_without_a_size_count_as_all_image_pixels():
    """saev shards read in place record no image size: every patch of such an image is valid, even under a
    padding preprocess; images that do have a size keep their padding left out."""
    from traitscope.shards.store import patch_validity

    pre = Preprocess(crop=112, resize=112, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear",
                     mode="letterbox").to_dict()
    assert patch_validity(pre, [None, None], (8, 8)) is None
    validity = patch_validity(pre, [None, (300, 100)], (8, 8))
    valid = validity.of_images(0, 2)
    assert valid[0].all() and not valid[1].all()


def test_few_patch_tokens_per_image_earn_a_resolution_hint(long_photos, tmp_path, capsys):
    """A CNN's last stage at 224 px has one token per 32 px (4x12 for these long photos): shards says so and
    names the resolution with four times as many; at that resolution it says nothing."""
    argv = ["shards", "--images", str(long_photos), "--model", "random-efficientnet-lite0", "--layers=-4,-2",
            "--tokens", "patches", "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert main(argv) == 0
    hints = [line for line in capsys.readouterr().out.splitlines() if "patch tokens per image" in line]
    assert len(hints) == 1 and hints[0].startswith("layer -2 has 4x12 patch tokens per image, one per 32 px"), hints
    assert "--resolution 448 gives four times as many" in hints[0]  # the coarser of the two layers is named
    assert main([*argv, "--resolution", "448"]) == 0
    assert "patch tokens per image" not in capsys.readouterr().out
