"""Per-image values of chosen features, as a table to take into R or pandas: a feature as a measured trait.

One row per (image, feature), in image order: the image's path and labels, the feature's maximum and
mean activation over the image's patches, the share of its patches where it fires, and the patch where
it peaks, with that patch's centre as a fraction of the original image's width and height (0 = left /
top edge, 1 = right / bottom edge; a patch on the padding of a letterboxed image can lie outside 0-1,
but padding patches never count). Images where the feature does not fire have max, mean and share 0
and no peak. For an image-level (cls) SAE the one token is the image: max = mean, no position.

Values come from one pass of the SAE over the shards, like `traitscope inference`, so they are exact
for every image, not only for the top images kept in the inference folder.
"""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from traitscope.backbones import Preprocess
from traitscope.errors import TraitscopeError
from traitscope.features.inference import CHUNK_TOKENS, Inference, _chunks
from traitscope.features.inputs import RunInputs
from traitscope.files import tmp_name, unlink_quietly

FORMATS = (".csv", ".parquet")


def parse_features(spec: str, inf: Inference) -> np.ndarray:
    """Feature indices from '3,17,250', 'a-b' ranges, or 'firing' (every feature that fires on some image)."""
    if spec.strip() == "firing":
        return np.flatnonzero(np.asarray(inf.array("feature_image_freq")) > 0)
    features: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            features += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
        except ValueError:
            raise TraitscopeError(f"--features: {part!r} is not a feature index, a range a-b or 'firing'") from None
    bad = [f for f in features if not 0 <= f < inf.d_sae]
    if bad:
        raise TraitscopeError(f"--features: {bad[0]} is not a feature of this SAE (0..{inf.d_sae - 1})")
    if not features:
        raise TraitscopeError("--features names no feature")
    return np.array(sorted(set(features)), dtype=np.int64)


def _image_columns(inputs: RunInputs) -> pd.DataFrame:
    """Per image row: path, label, and one 0/1 column per image label (label_<name>)."""
    shards = inputs.shards
    images = shards.images
    table = pd.DataFrame({"image": [rec["path"] for rec in images], "row": np.arange(len(images)),
                          "label": [rec.get("label") for rec in images]})
    labels = shards.image_labels()
    if labels is not None:
        for j, name in enumerate(shards.image_label_names):
            table[f"label_{name}"] = np.asarray(labels[:, j], dtype=np.int8)
    return table


def _canvas_boxes(inputs: RunInputs) -> np.ndarray | None:
    """(n_images, 4) each image's model input (left, top, right, bottom) as fractions of the image's
    width and height; None when the shards record no preprocessing or hold one token per image."""
    preprocess = inputs.shards.manifest.get("preprocess")
    if inputs.token_kind != "patches" or not preprocess:
        return None
    pre = Preprocess.from_dict(preprocess)
    boxes = np.zeros((inputs.n_images, 4))
    for row, rec in enumerate(inputs.shards.images):
        w, h = int(rec["width"]), int(rec["height"])
        left, top, right, bottom = pre.canvas_box(w, h)
        boxes[row] = (left / w, top / h, right / w, bottom / h)
    return boxes


@torch.no_grad()
def feature_table(inputs: RunInputs, features: np.ndarray, chunk_tokens: int = CHUNK_TOKENS,
                  progress: bool = True) -> pd.DataFrame:
    """The table described in the module docstring, for `features` (ascending indices)."""
    sae, n_p = inputs.sae, inputs.tokens_per_image
    device = sae.W_enc.device
    column_of = torch.full((sae.d_sae,), -1, dtype=torch.int64, device=device)
    column_of[torch.as_tensor(features, device=device)] = torch.arange(len(features), device=device)
    boxes = _canvas_boxes(inputs)
    max_if, mean_if, frac_if = (np.zeros((inputs.n_images, len(features)), np.float32) for _ in range(3))
    peak_if = np.full((inputs.n_images, len(features)), -1, np.int64)
    bar = tqdm(total=inputs.n_images, unit="img", desc="feature values", disable=not progress)
    for first_row, acts_np in _chunks(inputs, chunk_tokens):
        n_img = acts_np.shape[0] // n_p
        tok, feat, vals = sae.encode_sparse(torch.from_numpy(acts_np).to(device=device, dtype=torch.float32))
        col = column_of[feat]
        keep = col >= 0
        codes = torch.zeros(n_img * n_p, len(features), device=device)
        codes[tok[keep], col[keep]] = vals[keep]
        codes_ipf = codes.view(n_img, n_p, len(features)).cpu().numpy()
        rows = slice(first_row, first_row + n_img)
        n_valid = np.full(n_img, n_p)
        valid = inputs.valid_tokens(first_row, first_row + n_img)  # padding patches never count
        if valid is not None:
            codes_ipf *= valid.reshape(n_img, n_p, 1)
            n_valid = np.maximum(1, valid.reshape(n_img, n_p).sum(1))
        max_if[rows] = codes_ipf.max(1)
        mean_if[rows] = codes_ipf.sum(1) / n_valid[:, None]
        frac_if[rows] = (codes_ipf > 0).sum(1) / n_valid[:, None]
        peak_if[rows] = np.where(max_if[rows] > 0, codes_ipf.argmax(1), -1)
        bar.update(n_img)
    bar.close()

    images = _image_columns(inputs)
    table = images.iloc[np.repeat(np.arange(inputs.n_images), len(features))].reset_index(drop=True)
    table["feature"] = np.tile(features, inputs.n_images)
    table["max"] = max_if.reshape(-1)
    table["mean"] = mean_if.reshape(-1)
    table["frac_patches"] = frac_if.reshape(-1)
    peak = peak_if.reshape(-1)
    if inputs.token_kind == "patches":
        rows_n, cols_n = inputs.shards.grid(inputs.layer)
        fired = peak >= 0
        table["peak_patch"] = pd.Series(peak, dtype="Int64").mask(~fired)
        table["peak_row"] = pd.Series(peak // cols_n, dtype="Int64").mask(~fired)
        table["peak_col"] = pd.Series(peak % cols_n, dtype="Int64").mask(~fired)
        if boxes is not None:
            box = boxes[np.repeat(np.arange(inputs.n_images), len(features))]
            fx, fy = ((peak % cols_n) + 0.5) / cols_n, ((peak // cols_n) + 0.5) / rows_n
            table["peak_x"] = np.where(fired, box[:, 0] + fx * (box[:, 2] - box[:, 0]), np.nan)
            table["peak_y"] = np.where(fired, box[:, 1] + fy * (box[:, 3] - box[:, 1]), np.nan)
    return table


def write_table(table: pd.DataFrame, fpath: Path) -> None:
    """CSV or Parquet by the file's suffix, written under a temporary name and renamed into place."""
    suffix = fpath.suffix.lower()
    if suffix not in FORMATS:
        raise TraitscopeError(f"--out {fpath}: the file name must end in .csv or .parquet")
    tmp_fpath = tmp_name(fpath)
    try:
        if suffix == ".csv":
            table.to_csv(tmp_fpath, index=False)
        else:
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise TraitscopeError("writing Parquet needs pyarrow (pip install pyarrow); or write .csv") from None
            table.to_parquet(tmp_fpath, index=False)
        os.replace(tmp_fpath, fpath)
    except BaseException:
        unlink_quietly(tmp_fpath)
        raise
