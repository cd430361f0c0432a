"""The feature atlas, without Streamlit: one row per feature to sort, filter and page through, where on
the image each feature fires, a 2-D map of the whole dictionary, and the zoomed tiles of its strips.

Everything here reads an inference folder (docs/formats.md) and, for the map, the run's decoder; what
takes more than a moment (peak positions over every top map, the t-SNE) is cached as .npy under the
app's cache folder, keyed by the SAE's weights and the shards.
"""

import warnings
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image

from traitscope.app.data import Dataset, InferenceView, LabelTests, _cache_dpath, load_npy
from traitscope.backbones.base import Preprocess
from traitscope.files import atomic_save_npy
from traitscope.viz import overlay_heatmap

SORTS = {
    "images where it fires": ("images", False),
    "share of patches where it fires": ("patch_freq", False),
    "largest activation": ("max_act", False),
    "enrichment significance (q)": ("q", True),
    "fewest images first": ("images", True),
}
"""Atlas orders: name -> (column, ascending)."""
MIN_IMAGES = 2
"""The atlas hides features firing on fewer images by default (dead and one-image features)."""


def peak_positions(inference: InferenceView, cache_root, chunk: int = 1024) -> np.ndarray:
    """(d_sae, 2) float32 (x, y) in [0, 1] of where each feature peaks on the model's input grid:
    the median over its top images of the centre of the patch where its map is largest; NaN for dead
    features and image-level runs. One pass over `top_patch_acts`, cached."""
    d_sae, (rows, cols) = inference.d_sae, inference.grid
    if inference.top_patch_acts is None:
        return np.full((d_sae, 2), np.nan, np.float32)
    key = {"what": "atlas-peaks/1", "inference": str(inference.dpath), "sae": inference.manifest.get("sae_sha256"),
           "shards": inference.shards_hash}
    fpath = _cache_dpath(cache_root, key) / "peaks.npy"
    if fpath.is_file():
        return load_npy(fpath, mmap=False)
    out = np.full((d_sae, 2), np.nan, np.float32)
    for start in range(0, d_sae, chunk):
        stop = min(start + chunk, d_sae)
        peak = np.asarray(inference.top_patch_acts[start:stop]).argmax(axis=2)  # (chunk, top_n)
        valid = np.asarray(inference.top_rows[start:stop]) >= 0
        xy = np.stack([(peak % cols + 0.5) / cols, (peak // cols + 0.5) / rows], axis=-1).astype(np.float32)
        xy[~valid] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: dead features
            out[start:stop] = np.nanmedian(xy, axis=1)
    atomic_save_npy(fpath, out)
    return out


def feature_table(inference: InferenceView, peaks_s2: np.ndarray, tests: LabelTests | None) -> pd.DataFrame:
    """One row per feature: images (where it fires), image_freq, patch_freq, max_act, x, y (where it
    peaks) and, with labels, its most significant label with count, lift, p and q."""
    d_sae = inference.d_sae
    table = pd.DataFrame({
        "feature": np.arange(d_sae),
        "images": inference.fire_counts(),
        "image_freq": np.asarray(inference.image_freq, dtype=np.float64),
        "patch_freq": np.asarray(inference.freq, dtype=np.float64),
        "max_act": np.asarray(inference.top_values[:, 0], dtype=np.float64),
        "x": peaks_s2[:, 0], "y": peaks_s2[:, 1]})
    if tests is not None:
        best = tests.best(d_sae)
        names = np.array(tests.names + [""], dtype=object)
        table["label"] = names[best["label"]]
        table["label_images"], table["lift"], table["p"], table["q"] = best["count"], best["lift"], best["p"], best["q"]
    return table


class AtlasFilter(NamedTuple):
    """What the atlas shows and in which order."""

    sort: str
    """A key of SORTS."""
    min_images: int = MIN_IMAGES
    """Hide features firing on fewer images."""
    x_range: tuple[float, float] = (0.0, 1.0)
    """Keep features that peak within this horizontal span of the image (0 = left edge)."""
    y_range: tuple[float, float] = (0.0, 1.0)
    """... and this vertical one (0 = top edge)."""
    max_q: float = 1.0
    """Keep features whose best label has a q-value at most this (1: no filter)."""
    label: str = ""
    """Keep features whose most significant label contains this text (case-insensitive)."""


def select(table: pd.DataFrame, filt: AtlasFilter) -> pd.DataFrame:
    """The rows of `table` that pass `filt`, in its order (ties: lower feature index first)."""
    keep = table["images"] >= filt.min_images
    if filt.x_range != (0.0, 1.0) or filt.y_range != (0.0, 1.0):
        keep &= table["x"].between(*filt.x_range) & table["y"].between(*filt.y_range)
    if "q" in table:
        if filt.max_q < 1.0:
            keep &= table["q"] <= filt.max_q
        if filt.label.strip():
            keep &= table["label"].str.contains(filt.label.strip(), case=False, regex=False)
    column, ascending = SORTS[filt.sort]
    if column not in table:
        column, ascending = "images", False
    return table[keep].sort_values([column, "feature"], ascending=[ascending, True], kind="stable")


def decoder_map(W_dec_sd: np.ndarray, sae_sha256: str, cache_root, seed: int = 0) -> np.ndarray:
    """(d_sae, 2) float32 t-SNE of the unit-norm decoder directions (cosine distance), cached by the
    weights' hash: features that write similar directions lie close together."""
    key = {"what": "atlas-tsne/1", "sae": sae_sha256, "seed": seed}
    fpath = _cache_dpath(cache_root, key) / "tsne.npy"
    if fpath.is_file():
        return load_npy(fpath, mmap=False)
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    w_sd = np.asarray(W_dec_sd, dtype=np.float32)
    w_sd = w_sd / np.maximum(np.linalg.norm(w_sd, axis=1, keepdims=True), 1e-8)
    if w_sd.shape[1] > 50 and len(w_sd) > 50:
        w_sd = PCA(50, random_state=seed).fit_transform(w_sd)
    perplexity = float(min(30, max(2, (len(w_sd) - 1) / 3)))
    xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed, metric="cosine").fit_transform(w_sd)
    atomic_save_npy(fpath, xy.astype(np.float32))
    return xy.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Tiles


def zoom_box(acts_hw: np.ndarray, canvas_box: tuple[float, float, float, float], size: tuple[int, int],
             threshold: float = 0.2, margin: float = 1.5, min_frac: float = 0.35) -> tuple[int, int, int, int]:
    """The part of an image (of `size`) to show for a heatmap: the patches where the map reaches
    `threshold` x its maximum, `margin` patches around, at least `min_frac` of the model's view wide
    and high, clipped to the image. The whole view when the map is empty. `canvas_box` is where the
    patch grid lies on the image (`Preprocess.canvas_box`: beyond the image where there is padding)."""
    rows, cols = acts_hw.shape
    left, top, right, bottom = canvas_box
    w, h = size
    vmax = float(acts_hw.max(initial=0.0))
    if vmax <= 0:
        return (max(0, int(round(left))), max(0, int(round(top))), min(w, int(round(right))), min(h, int(round(bottom))))
    r_idx, c_idx = np.nonzero(acts_hw >= threshold * vmax)
    pw, ph = (right - left) / cols, (bottom - top) / rows
    x0, x1 = left + (c_idx.min() - margin) * pw, left + (c_idx.max() + 1 + margin) * pw
    y0, y1 = top + (r_idx.min() - margin) * ph, top + (r_idx.max() + 1 + margin) * ph
    min_w = min_frac * (min(right, w) - max(left, 0))  # of the part of the image the model saw
    min_h = min_frac * (min(bottom, h) - max(top, 0))
    if x1 - x0 < min_w:
        x0, x1 = (x0 + x1 - min_w) / 2, (x0 + x1 + min_w) / 2
    if y1 - y0 < min_h:
        y0, y1 = (y0 + y1 - min_h) / 2, (y0 + y1 + min_h) / 2
    return (max(0, int(x0)), max(0, int(y0)), min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1))))


def draw_tile(image: Image.Image, acts_hw: np.ndarray, preprocess: Preprocess, vmax: float | None,
              side: int, zoom: bool = True, alpha: float = 0.6, heat: bool = True) -> Image.Image:
    """A heatmap tile: `image` with its patch map drawn by `overlay_heatmap` (opacity up to `alpha`),
    cut to where the feature fires when `zoom`, fitted into `side` x `side` pixels. With `heat` off,
    the same cut of the bare image (to compare colours)."""
    box = zoom_box(acts_hw, preprocess.canvas_box(*image.size), image.size) if zoom else (0, 0, *image.size)
    tile = overlay_heatmap(image, acts_hw, preprocess, vmax=vmax, max_alpha=alpha, crop=box) if heat else image.crop(box)
    scale = side / max(tile.size)
    return tile.resize((max(1, round(tile.width * scale)), max(1, round(tile.height * scale))),
                       Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)


def decode_side(size: tuple[int, int], acts_hw: np.ndarray, preprocess: Preprocess, side: int, zoom: bool) -> int:
    """The shorter side an image of `size` must be decoded at for a `side`-pixel tile of it (zoomed or
    whole) to need no enlarging."""
    w, h = size
    box = zoom_box(acts_hw, preprocess.canvas_box(w, h), size) if zoom and acts_hw.size > 1 else (0, 0, w, h)
    scale = side / max(1, box[2] - box[0], box[3] - box[1])
    return max(1, int(np.ceil(min(w, h) * scale)))


def tile_images(dataset: Dataset, rows: np.ndarray, maps_nhw: np.ndarray, vmax: float | None, side: int,
                zoom: bool, alpha: float, heat: bool = True) -> list[Image.Image]:
    """`draw_tile` of each of a feature's top images; a JPEG is decoded at the smallest scale the tile
    needs (the zoom box is worked out from the image's size in the shards' listing first)."""
    tiles = []
    for row, acts_hw in zip(rows, maps_nhw):
        rec = dataset.images[int(row)]
        size = (int(rec.get("width") or 0), int(rec.get("height") or 0))
        min_side = decode_side(size, acts_hw, dataset.preprocess, side, zoom) if min(size) > 0 else None
        image = dataset.open_image(int(row), min_side=min_side)
        if acts_hw.size == 1:  # image-level run: no map to draw or zoom to
            tiles.append(draw_tile(image, np.zeros((1, 1)), dataset.preprocess, None, side, zoom=False, heat=False))
        else:
            tiles.append(draw_tile(image, acts_hw, dataset.preprocess, vmax, side, zoom, alpha, heat))
    return tiles
