"""Segmentation masks: integer id maps turned into per-patch labels through the model's own geometry.

A mask holds one integer id per pixel (L, P or I PNGs), or is an RGB image whose colours the names
file keys (`{"#808000": "road"}`, or a `class_dict.csv` of name, r, g, b as CamVid's and many other
sets ship): a colour's id is then R·65536 + G·256 + B.

A mask goes through the image's own geometry (`Preprocess.crop_image`, with NEAREST resampling so ids
stay ids: resized and centre-cropped, squashed, or letterboxed), is cut into the patch grid, and each
patch takes the id covering most of its image pixels (ties go to the smaller id; padding never wins).
"""

import csv
import dataclasses
import glob
import io
import json
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from traitscope.backbones.base import Preprocess
from traitscope.errors import TraitscopeError
from traitscope.images.source import ImageError, check_pixels, read_file

NAMES_FNAMES = ("labels.json", "labels.txt", "class_dict.csv")
"""Where a masks folder names its ids, tried in this order."""

ID_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "1")
"""Image modes that hold one integer id per pixel (a palette image's indices are its ids)."""


class MaskNames(NamedTuple):
    """What a masks folder's ids are called."""

    names: dict[int, str]
    """Id -> name, by id."""
    colours: bool
    """True: the masks are colour images and each id is a colour, R·65536 + G·256 + B."""


def read_mask(fpath: Path, colours: bool = False) -> np.ndarray:
    """(height, width) int64 ids from a mask image: one id per pixel (L, P, I or 16-bit; palette indices
    as ids), or with `colours` each pixel's colour R·65536 + G·256 + B (any mode; alpha is ignored)."""
    data = read_file(fpath)
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_pixels(image)
            image.load()
            try:
                image = ImageOps.exif_transpose(image)
            except Exception:
                pass
            if colours:
                if image.mode in ID_MODES and image.mode != "P":
                    raise ImageError(f"mask {fpath.name} is {image.mode}, one id per pixel, but the masks' names are "
                                     "colours: name its ids instead (labels.json: {\"1\": \"fin\"})")
                rgb = np.asarray(image.convert("RGB")).astype(np.int64)
                return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
            if image.mode not in ID_MODES:
                raise ImageError(f"mask {fpath.name} is {image.mode}: masks hold one integer id per pixel (L, P or I), "
                                 'or name their colours in labels.json ({"#808000": "road"}) or class_dict.csv')
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
    if ids.min(initial=1) < 1:
        raise ImageError("mask ids must be 0 or more")
    if ids.max(initial=1) >= 1 << 24:  # more than 24 bits (white in a colour mask): crop the ids' ranks
        uniq, rank = np.unique(mask_hw, return_inverse=True)
        out = crop_mask(rank.reshape(mask_hw.shape), preprocess)
        return np.where(out == PADDING, PADDING, uniq[np.maximum(out, 0)])
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


def mask_suffix(masks_dpath: Path, paths: list[str], tries: int = 100) -> str:
    """What every mask adds to its image's name, from the first of the first `tries` images that has a
    mask of its own name (a.jpg: a.png; then '') or just one PNG named like it plus '_' or '-' and more
    (CamVid's a.png: a_L.png; then '_L'); '' when none does (the caller reports the missing masks)."""
    for path in paths[:tries]:
        fpath = masks_dpath / path
        if fpath.with_suffix(".png").is_file():
            return ""
        found = list(fpath.parent.glob(glob.escape(fpath.stem) + "[_-]*.png"))
        if len(found) == 1:
            return found[0].name[len(fpath.stem):-len(".png")]
    return ""


def read_names(masks_dpath: Path) -> MaskNames:
    """Trait names from `labels.json` ({"1": "fin", ...}, a list indexed by id, or colours as keys:
    {"#80ff00": "fin"} or {"128,255,0": "fin"}), `labels.txt` (one name per line, line i naming id i, or
    `id name` pairs) or `class_dict.csv` (a header with name, r, g, b: colour masks). Names must be unique.
    """
    for fname in NAMES_FNAMES:
        fpath = masks_dpath / fname
        if fpath.is_file():
            break
    else:
        raise TraitscopeError(
            f"masks folder {masks_dpath} has no labels.json, labels.txt or class_dict.csv naming its ids "
            '(e.g. labels.json: {"0": "background", "1": "fin"})'
        )
    colours = False
    try:
        if fpath.suffix == ".csv":
            names, colours = _read_class_dict(fpath), True
        elif fpath.suffix == ".json":
            data = json.loads(fpath.read_text())
            if isinstance(data, list):
                names = {i: str(name) for i, name in enumerate(data) if name is not None}
            elif isinstance(data, dict):
                keyed = {k: _colour(k) for k in data}
                colours = any(v is not None for v in keyed.values())
                if colours and None in keyed.values():
                    an_id = next(k for k, v in keyed.items() if v is None)
                    a_colour = next(k for k, v in keyed.items() if v is not None)
                    raise ValueError(f"keys must be all ids or all colours, not both ({an_id!r} and {a_colour!r})")
                names = {(keyed[k] if colours else int(k)): str(v) for k, v in data.items()}
            else:
                raise ValueError("expected a list of names or an object mapping ids (or colours) to names")
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
        raise TraitscopeError(f"{fpath} gives the same name to several {'colours' if colours else 'ids'}")
    return MaskNames(dict(sorted(names.items())), colours)


_RGB = re.compile(r"[(\[]?\s*(\d{1,3})\s*[,\s]\s*(\d{1,3})\s*[,\s]\s*(\d{1,3})\s*[)\]]?")


def _colour(key: str) -> int | None:
    """R·65536 + G·256 + B of '#rrggbb' or 'r,g,b' (also '(r, g, b)', 'r g b'); None for anything else."""
    key = key.strip()
    if re.fullmatch(r"#[0-9a-fA-F]{6}", key):
        return int(key[1:], 16)
    match = _RGB.fullmatch(key)
    if match is None:
        return None
    r, g, b = (int(v) for v in match.groups())
    if max(r, g, b) > 255:
        raise ValueError(f"colour {key!r} has a channel above 255")
    return (r << 16) | (g << 8) | b


def _read_class_dict(fpath: Path) -> dict[int, str]:
    """Colour -> name from a CSV with a header naming the columns name, r, g, b (any case, any order)."""
    with fpath.open(newline="") as f:
        rows = list(csv.reader(f))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if not {"name", "r", "g", "b"} <= set(header):
        raise ValueError(f"the header must name the columns name, r, g, b (found: {', '.join(header) or 'nothing'})")
    col = {h: header.index(h) for h in ("name", "r", "g", "b")}
    names = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        colour = _colour(",".join(row[col[c]] for c in "rgb"))
        if colour is None:
            raise ValueError(f"line {line}: r, g, b must be integers 0-255")
        if colour in names:
            raise ValueError(f"line {line}: the colour of {row[col['name']].strip()!r} is also {names[colour]!r}'s")
        names[colour] = row[col["name"]].strip()
    return names


def one_hot(ids: np.ndarray, id_to_column: dict[int, int], n_columns: int) -> np.ndarray:
    """(len(ids), n_columns) uint8 with a 1 in each id's column; ids without a column get a zero row."""
    out = np.zeros((len(ids), n_columns), dtype=np.uint8)
    for row, i in enumerate(ids.tolist()):
        col = id_to_column.get(i)
        if col is not None:
            out[row, col] = 1
    return out
