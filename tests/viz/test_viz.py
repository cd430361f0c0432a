"""Heatmaps sit on the patches the model saw: checked pixel by pixel on images with a planted patch."""

import matplotlib
import numpy as np
import pytest
from PIL import Image

from traitscope.backbones.base import Preprocess
from traitscope.viz import MAX_ALPHA, image_grid, overlay_heatmap, ratings_histogram

GREY = (120, 120, 120)
TOP = np.array(matplotlib.colormaps["inferno"](1.0)[:3]) * 255  # colour at activation == vmax


def blended(level: float, vmax: float = 1.0) -> np.ndarray:
    """The colour a GREY pixel takes under a patch with activation `level`."""
    norm = min(level / vmax, 1.0)
    colour = np.array(matplotlib.colormaps["inferno"](norm)[:3]) * 255
    alpha = MAX_ALPHA * norm
    return np.array(GREY) * (1 - alpha) + colour * alpha


def patch_centre(pre: Preprocess, size, grid, r, c, scale=1.0):
    left, top, right, bottom = pre.crop_box(*size)
    pw, ph = (right - left) / grid[1], (bottom - top) / grid[0]
    return int((left + (c + 0.5) * pw) * scale), int((top + (r + 0.5) * ph) * scale)


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (224, 224), (517, 389)])
@pytest.mark.parametrize("pre", [Preprocess(crop=224, resize=256), Preprocess(crop=224, resize=224),
                                 Preprocess(crop=224, resize=256, mode="squash")])
def test_planted_patch_is_coloured_and_nothing_else(size, pre):
    grid = (16, 16)
    acts = np.zeros(grid, np.float32)
    acts[3, 11] = 2.5
    out = np.asarray(overlay_heatmap(Image.new("RGB", size, GREY), acts, pre)).astype(int)
    x, y = patch_centre(pre, size, grid, 3, 11)
    assert np.abs(out[y, x] - blended(1.0)).max() <= 1, "the planted patch has the top colour of the map"
    changed = np.argwhere(np.abs(out - GREY).sum(axis=2) > 0)
    left, top, right, bottom = pre.crop_box(*size)
    pw, ph = (right - left) / grid[1], (bottom - top) / grid[0]
    # every changed pixel lies in the planted patch's box (pixel centres inside it)
    assert ((changed[:, 1] + 0.5 >= left + 11 * pw) & (changed[:, 1] + 0.5 <= left + 12 * pw)).all()
    assert ((changed[:, 0] + 0.5 >= top + 3 * ph) & (changed[:, 0] + 0.5 <= top + 4 * ph)).all()
    assert len(changed) >= int(pw - 1) * int(ph - 1)


def test_overlay_matches_the_models_own_crop():
    """Overlay on the original, then crop as the model does: the colour lands on patch (r, c) of its input."""
    pre = Preprocess(crop=224, resize=256, interpolation="nearest")
    grid, (r, c) = (16, 16), (12, 4)
    acts = np.zeros(grid)
    acts[r, c] = 1.0
    drawn = overlay_heatmap(Image.new("RGB", (640, 480), GREY), acts, pre)
    model_view = np.asarray(pre.crop_image(drawn)).astype(int)
    p = 224 // 16
    inside = model_view[r * p + 2:(r + 1) * p - 2, c * p + 2:(c + 1) * p - 2]
    assert np.abs(inside - blended(1.0)).max() <= 1
    model_view[r * p:(r + 1) * p, c * p:(c + 1) * p] = GREY
    assert np.abs(model_view - GREY).max() <= 1, "no colour outside the planted patch in the model's view"


def test_opacity_and_colour_grow_with_activation_and_vmax_is_shared():
    pre = Preprocess(crop=224, resize=224)
    acts = np.zeros((14, 14))
    acts[0, 0], acts[0, 1], acts[0, 2] = 0.25, 0.5, 1.0
    out = np.asarray(overlay_heatmap(Image.new("RGB", (224, 224), GREY), acts, pre)).astype(int)
    for col, level in [(0, 0.25), (1, 0.5), (2, 1.0)]:
        assert np.abs(out[8, col * 16 + 8] - blended(level)).max() <= 1
    dist = [np.abs(out[8, col * 16 + 8] - GREY).sum() for col in range(3)]
    assert dist[0] < dist[1] < dist[2]
    # vmax=2: the strongest patch is drawn at half strength, comparable across images
    out2 = np.asarray(overlay_heatmap(Image.new("RGB", (224, 224), GREY), acts, pre, vmax=2.0)).astype(int)
    assert np.abs(out2[8, 2 * 16 + 8] - blended(1.0, vmax=2.0)).max() <= 1
    # an all-zero map changes nothing
    zero = overlay_heatmap(Image.new("RGB", (224, 224), GREY), np.zeros((14, 14)), pre)
    assert np.asarray(zero).tolist() == np.asarray(Image.new("RGB", (224, 224), GREY)).tolist()


def test_thumbnail_keeps_the_patch_in_place():
    pre = Preprocess(crop=224, resize=256)
    size, grid = (1200, 800), (16, 16)
    acts = np.zeros(grid)
    acts[7, 9] = 1.0
    out = overlay_heatmap(Image.new("RGB", size, GREY), acts, pre, max_side=300)
    assert max(out.size) == 300
    x, y = patch_centre(pre, size, grid, 7, 9, scale=300 / 1200)
    assert np.abs(np.asarray(out)[y, x].astype(int) - blended(1.0)).max() <= 1


def test_bad_maps_are_refused():
    with pytest.raises(ValueError):
        overlay_heatmap(Image.new("RGB", (50, 50)), np.zeros(16), Preprocess(crop=224, resize=256))


def test_image_grid_places_cells_and_leaves_empty_ones_blank():
    red, blue = Image.new("RGB", (100, 50), (255, 0, 0)), Image.new("RGB", (40, 80), (0, 0, 255))
    grid = image_grid([red, None, blue], n_cols=2, cell=60, pad=4)
    assert grid.size == (2 * 64 + 4, 2 * 64 + 4)
    px = np.asarray(grid)
    assert tuple(px[4 + 30, 4 + 30]) == (255, 0, 0)         # first cell: red, letterboxed
    assert tuple(px[4 + 30, 68 + 30]) == (255, 255, 255)    # second cell: empty
    assert tuple(px[68 + 30, 4 + 30]) == (0, 0, 255)        # third cell: blue


def test_ratings_histogram_is_an_image():
    image = ratings_histogram({"dense": np.array([1, 2, 2, 3]), "sae": np.array([5, 6, 7])})
    assert image.mode == "RGB" and image.width > 200
