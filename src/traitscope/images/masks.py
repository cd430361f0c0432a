"""Segmentation masks: integer id maps turned into per-patch labels through the model's own geometry.

A mask goes through the image's own geometry (`Preprocess.crop_image`, with NEAREST resampling so ids
stay ids: resized and centre-cropped, squashed, or letterboxed), is cut into the patch grid, and each
patch takes the id covering most of its image pixels (ties go to the smaller id; padding never wins).
"""

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from traitscope.backbones.base import Preprocess
from traitscope.errors import TraitscopeError
from traitscope.images.source import ImageError, check_pixels, read_file

NAMES_FNAMES = ("labels.json", "labels.txt")
"""Where a masks folder names its ids, tried in this order."""


def read_mask(fpath: Path) -> np.ndarray:
    """(height, width) int64 ids from a single-channel mask image (L, P, I or 16-bit; palette indices as ids)."""
    data = read_file(fpath)
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_pixels(image)
            image.load()
            try:
                image = ImageOps.exif_transpose(image)
            except Exception:
                pass
            if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise ImageError(f"mask {fpath.name} is {image.mode}; masks hold one integer id per pixel (L, P or I)")
            return np.asarray(image).astype(np.int64)
    except ImageError:
        raise
    except Exception as err:
        raise ImageError(f"cannot read mask {fpath.name}: {err}") from err


PADDING = -1
"""The id `crop_mask` gives pixels of the model's input that are padding (letterbox, grid), not image."""


def crop_mask(mask_hw: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """(height, width) ids of the model's input, through `Preprocess.crop_image` with NEAREST; padding is -1."""
    ids = mask_hw.astype(np.int64) + 1  # 0 is left for the padding `crop_image` adds
    if ids.min(initial=1) < 1 or ids.max(initial=1) >= 1 << 24:
        raise ImageError("mask ids must lie in 0..16777214")
    # Ids travel as 24-bit RGB through the very code that crops images, so the geometry cannot drift.
    rgb = np.stack([(ids >> 16) & 255, (ids >> 8) & 255, ids & 255], axis=-1).astype(np.uint8)
    nearest = dataclasses.replace(preprocess, interpolation="nearest")
    out = np.asarray(nearest.crop_image(Image.fromarray(rgb))).astype(np.int64)
    return ((out[..., 0] << 16) | (out[..., 1] << 8) | out[..., 2]) - 1


def patch_majority(mask_hw: np.ndarray, preprocess: Preprocess, grid: tuple[int, int]) -> np.ndarray:
    """(rows * cols,) int64: the id covering most image pixels of each patch, row-major (ties: smaller
    id); padding pixels never win, and a patch of pure padding gets `PADDING` (-1)."""
    crop_hw = crop_mask(mask_hw, preprocess)
    n_rows, n_cols = grid
    height, width = crop_hw.shape
    row_of_y = np.minimum(np.arange(height) * n_rows // height, n_rows - 1)
    col_of_x = np.minimum(np.arange(width) * n_cols // width, n_cols - 1)
    patch_hw = row_of_y[:, None] * n_cols + col_of_x[None, :]
    uniq, inverse = np.unique(crop_hw, return_inverse=True)
    n_ids = len(uniq)
    counts = np.bincount(patch_hw.ravel() * n_ids + inverse.ravel(), minlength=n_rows * n_cols * n_ids)
    counts = counts.reshape(n_rows * n_cols, n_ids)
    if uniq[0] == PADDING and n_ids > 1:  # padding counts only where a patch holds nothing else
        counts[:, 0] = np.where(counts[:, 1:].sum(axis=1) > 0, 0, counts[:, 0])
    return uniq[counts.argmax(axis=1)]


def read_names(masks_dpath: Path) -> dict[int, str]:
    """Id -> trait name from `labels.json` ({"1": "fin", ...} or a list indexed by id) or `labels.txt`.

    `labels.txt` holds one name per line (line i names id i) or `id name` pairs. Names must be unique.
    """
    for fname in NAMES_FNAMES:
        fpath = masks_dpath / fname
        if fpath.is_file():
            break
    else:
        raise TraitscopeError(
            f"masks folder {masks_dpath} has no labels.json or labels.txt naming its ids "
            '(e.g. labels.json: {"0": "background", "1": "fin"})'
        )
    try:
        if fpath.suffix == ".json":
            data = json.loads(fpath.read_text())
            if isinstance(data, list):
                names = {i: str(name) for i, name in enumerate(data) if name is not None}
            elif isinstance(data, dict):
                names = {int(k): str(v) for k, v in data.items()}
            else:
                raise ValueError("expected a list of names or an object mapping ids to names")
        else:
            lines = [line.strip() for line in fpath.read_text().splitlines()]
            lines = [line for line in lines if line and not line.startswith("#")]
            pairs = [line.split(maxsplit=1) for line in lines]
            if lines and all(len(p) == 2 and p[0].isdigit() for p in pairs):
                names = {int(p[0]): p[1].strip() for p in pairs}
            else:
                names = dict(enumerate(lines))
    except (ValueError, json.JSONDecodeError) as err:
        raise TraitscopeError(f"cannot read mask names from {fpath}: {err}") from err
    if not names:
        raise TraitscopeError(f"{fpath} names no ids")
    if len(set(names.values())) != len(names):
        raise TraitscopeError(f"{fpath} gives the same name to several ids")
    return dict(sorted(names.items()))


def one_hot(ids: np.ndarray, id_to_column: dict[int, int], n_columns: int) -> np.ndarray:
    """(len(ids), n_columns) uint8 with a 1 in each id's column; ids without a column get a zero row."""
    out = np.zeros((len(ids), n_columns), dtype=np.uint8)
    for row, i in enumerate(ids.tolist()):
        col = id_to_column.get(i)
        if col is not None:
            out[row, col] = 1
    return out
