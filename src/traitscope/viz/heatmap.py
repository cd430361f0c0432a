"""Activation heatmaps over images, and image grids: plain functions that take arrays and return images.

The app, the demo report and the faces workflow all draw with these, so a feature looks the same
everywhere. A heatmap is drawn over the *original* image, one cell per patch of the model's grid, each
cell over exactly the pixels that patch saw: the grid covers `preprocess.canvas_box(width, height)`, the
model's whole input mapped back onto the original (the centre crop's square, or the whole image and the
padding around it under letterbox and grid; padding cells fall outside the image and are never drawn).
"""

from collections.abc import Sequence

import matplotlib
import numpy as np
from PIL import Image, ImageOps

from traitscope.backbones.base import Preprocess

MAX_ALPHA = 0.8
"""Opacity of a patch at the top of the colour scale; a patch with zero activation is transparent."""


def fit_thumbnail(image: Image.Image, max_side: int | None) -> Image.Image:
    """`image` as RGB, shrunk (never enlarged) so that its longer side is at most `max_side`."""
    image = image.convert("RGB")
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    return image


def patch_index_maps(size: tuple[int, int], box: tuple[float, float, float, float],
                     grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """For each pixel column and row of an image of `size` (w, h): the patch column / row it falls in.

    `box` (left, top, right, bottom) is the region the patch grid covers, in that image's pixel
    coordinates; a pixel belongs to the patch that contains its centre, and pixels outside the box
    get -1. Returns (col_of_x (w,), row_of_y (h,)), int64.
    """
    (w, h), (left, top, right, bottom), (rows, cols) = size, box, grid
    fx = ((np.arange(w) + 0.5) - left) / (right - left) * cols
    fy = ((np.arange(h) + 0.5) - top) / (bottom - top) * rows
    col_of_x = np.floor(fx).astype(np.int64)
    row_of_y = np.floor(fy).astype(np.int64)
    col_of_x[(fx < 0) | (col_of_x >= cols)] = -1
    row_of_y[(fy < 0) | (row_of_y >= rows)] = -1
    return col_of_x, row_of_y


def heat_rgba(acts_hw: np.ndarray, vmax: float | None = None, cmap: str = "inferno",
              max_alpha: float = MAX_ALPHA) -> np.ndarray:
    """(rows, cols, 4) float32 colours in [0, 1]: colour map of acts / vmax, opacity growing with it.

    `vmax` defaults to the largest activation in `acts_hw`; negative values count as zero.
    """
    acts_hw = np.nan_to_num(np.asarray(acts_hw, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if vmax is None:
        vmax = float(acts_hw.max(initial=0.0))
    norm_hw = np.clip(acts_hw / vmax, 0.0, 1.0) if vmax > 0 else np.zeros_like(acts_hw)
    rgba = matplotlib.colormaps[cmap](norm_hw).astype(np.float32)
    rgba[..., 3] = max_alpha * norm_hw
    return rgba


def overlay_heatmap(image: Image.Image, acts_hw: np.ndarray, preprocess: Preprocess,
                    vmax: float | None = None, cmap: str = "inferno", max_side: int | None = None,
                    max_alpha: float = MAX_ALPHA, crop: tuple[int, int, int, int] | None = None) -> Image.Image:
    """The original `image` with a patch-grid activation map drawn over the region the model saw.

    acts_hw: (rows, cols) activations on the model's patch grid (row-major, as in the shards).
    preprocess: the model's geometry (the shard manifest's `preprocess`); the grid covers
        `preprocess.canvas_box(image.width, image.height)` of the original image, whatever its size.
    vmax: activation drawn at full colour and opacity (default: this map's maximum). Pass one value,
        e.g. a feature's largest activation, to make several images comparable.
    cmap: matplotlib colour map; a patch's opacity grows linearly from 0 (activation 0) to `max_alpha`.
    max_side: draw on a copy shrunk to at most this many pixels on its longer side (for thumbnails).
    crop: (left, top, right, bottom) in `image`'s pixels: draw and return only this part (the same
        pixels as cropping the whole drawing, at a fraction of the work for a zoomed tile).

    Pixels the model did not see (outside a centre crop) are left as they are. Returns an RGB image.
    """
    acts_hw = np.asarray(acts_hw)
    if acts_hw.ndim != 2:
        raise ValueError(f"acts_hw must be 2-D (rows, cols), got shape {acts_hw.shape}")
    box = preprocess.canvas_box(*image.size)
    if crop is not None:
        image = image.crop(crop)
        box = (box[0] - crop[0], box[1] - crop[1], box[2] - crop[0], box[3] - crop[1])
    orig_w, orig_h = image.size
    canvas = fit_thumbnail(image, max_side)
    sx, sy = canvas.width / orig_w, canvas.height / orig_h
    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)

    col_of_x, row_of_y = patch_index_maps(canvas.size, box, acts_hw.shape)
    xs, ys = np.flatnonzero(col_of_x >= 0), np.flatnonzero(row_of_y >= 0)
    out_hwc = np.array(canvas)  # uint8; only the part under the grid is blended in float
    if len(xs) and len(ys):
        rgba = heat_rgba(acts_hw, vmax, cmap, max_alpha)[row_of_y[ys][:, None], col_of_x[xs][None, :]]
        alpha = rgba[..., 3:]
        region = out_hwc[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1]
        blended = region * (1.0 - alpha) + rgba[..., :3] * 255.0 * alpha
        region[:] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return Image.fromarray(out_hwc)


def image_grid(images: Sequence[Image.Image | None], n_cols: int = 4, cell: int = 160, pad: int = 2,
               background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Images in a grid of `n_cols` columns, each fitted (aspect kept) into a `cell`-pixel square.

    A None leaves its cell empty, so a feature with fewer top images than cells still makes a grid.
    """
    if n_cols < 1 or cell < 1 or pad < 0:
        raise ValueError("image_grid needs n_cols >= 1, cell >= 1 and pad >= 0")
    n_rows = max(1, -(-len(images) // n_cols))
    step = cell + pad
    grid = Image.new("RGB", (n_cols * step + pad, n_rows * step + pad), background)
    for i, image in enumerate(images):
        if image is None:
            continue
        thumb = ImageOps.contain(image.convert("RGB"), (cell, cell))
        x = pad + (i % n_cols) * step + (cell - thumb.width) // 2
        y = pad + (i // n_cols) * step + (cell - thumb.height) // 2
        grid.paste(thumb, (x, y))
    return grid
