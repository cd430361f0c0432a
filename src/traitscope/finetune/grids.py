"""Maximally activating images of image-level units, as 4x4 grids, and attribute enrichment.

A unit is a dense dimension of the stored embedding or a feature of an image-level SAE. As in the
faces experiment, units rank images by "normalised" (`traitscope.features.ranking`: each image's
vector, embedding or SAE codes, L2-normalised first) unless told "max"; SAE features rank only
images where they fire. Enrichment is `traitscope.features.enrichment.top_image_enrichment` over
each unit's top images.

Rows index `Shards.images` (the kept images in the source's sorted listing order), so a row maps to
the same file after a restart. `traitscope grids` writes the grids as PNGs with an enrichment table;
the app's blind test ranks with the same function and draws with `grid_image`.
"""

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from traitscope.backbones.base import Preprocess
from traitscope.errors import TraitscopeError
from traitscope.features.enrichment import TopImageEnrichment
from traitscope.features.ranking import TopImages, rank_top_images, row_batches
from traitscope.images import load_image, open_source
from traitscope.runs import RunFolder
from traitscope.sae import load_sae
from traitscope.shards.store import Shards
from traitscope.viz import image_grid
from traitscope.files import atomic_open

GRID_SIDE = 4
N_TOP = GRID_SIDE * GRID_SIDE


def default_layer(shards: Shards) -> int:
    """The deepest stored layer with CLS / pooled rows."""
    if "cls" not in shards.token_kinds:
        raise TraitscopeError(f"{shards.dpath} has no image-level (cls) rows; make shards with --tokens cls")
    return max(shards.layers)


def dense_top_images(shards: Shards, layer: int | None = None, n: int = N_TOP, by: str = "normalised",
                     batch_size: int = 4096) -> TopImages:
    """Top images per dimension of the stored CLS / pooled embedding of `layer` (default: deepest)."""
    acts = shards.acts(default_layer(shards) if layer is None else layer, "cls")
    return rank_top_images(row_batches(acts, batch_size), n, by, positive_only=False, kind="dense")


def run_layer(run_dpath: str | Path) -> int | None:
    """The layer an SAE run was trained on, from its config.json."""
    return RunFolder(run_dpath).shards.layer


def sae_codes(shards: Shards, run_dpath: str | Path, layer: int | None = None,
              batch_size: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
    """(first_row, codes_bs) batches of an SAE's codes for the CLS rows of `layer` (default: the run's)."""
    if RunFolder(run_dpath).shards.token_kind == "patches":
        raise TraitscopeError(f"{run_dpath} was trained on patch tokens; grids of top images need an image-level "
                              "SAE (traitscope train --token-kind cls)")
    sae = load_sae(run_dpath)
    if layer is None:
        layer = run_layer(run_dpath)
    layer = default_layer(shards) if layer is None else layer
    acts = shards.acts(layer, "cls")
    if acts.width != sae.d_model:
        raise TraitscopeError(f"{run_dpath} reads {sae.d_model}-wide activations; layer {layer} of "
                              f"{shards.dpath} is {acts.width} wide")
    with torch.no_grad():
        for start, x_bd in row_batches(acts, batch_size):
            yield start, sae.encode(torch.from_numpy(x_bd)).numpy()


def sae_top_images(shards: Shards, run_dpath: str | Path, n: int = N_TOP, by: str = "normalised",
                   layer: int | None = None) -> TopImages:
    """Top images per SAE feature (firing images only), by default by its codes L2-normalised per image."""
    return rank_top_images(sae_codes(shards, run_dpath, layer), n, by, positive_only=True, kind="sae")


# ---------------------------------------------------------------------------------------------
# Pictures.


class ShardImages:
    """Opens the image behind a shard row, cut to what the model saw (the centre crop's square, or the whole
    image under letterbox, grid and squash); caches thumbnails."""

    def __init__(self, shards: Shards, cell: int = 128):
        self.shards = shards
        self.cell = cell
        self.preprocess = Preprocess.from_dict(shards.manifest["preprocess"])
        self._source = None
        self.thumbnail = lru_cache(maxsize=2048)(self._thumbnail)

    def open(self, row: int) -> Image.Image:
        fpath = self.shards.image_fpath(row)
        if fpath.is_file():
            return load_image(fpath)
        if self._source is None:  # not a folder (e.g. a Hugging Face dataset): reopen the source
            self._source = open_source(self.shards.manifest["source"]["spec"])
        return self._source.load(self.shards.images[row])

    def _thumbnail(self, row: int) -> Image.Image:
        image = self.open(row)
        seen = image.crop(tuple(round(v) for v in self.preprocess.crop_box(*image.size)))
        return ImageOps.contain(seen, (self.cell, self.cell), Image.Resampling.BICUBIC)  # aspect kept


def grid_image(images: ShardImages, rows: np.ndarray) -> Image.Image:
    """A 4x4 grid of the images of `rows` (best first, row-major); -1 leaves a cell empty."""
    return image_grid([images.thumbnail(int(r)) if r >= 0 else None for r in rows], n_cols=GRID_SIDE,
                      cell=images.cell)


def save_grids(top: TopImages, images: ShardImages, out_dpath: str | Path, units=None) -> list[Path]:
    """One PNG per unit, `<out>/<kind>/<kind>_<unit>.png`; units with no image at all are skipped."""
    dpath = Path(out_dpath) / top.kind
    dpath.mkdir(parents=True, exist_ok=True)
    units = range(top.n_units) if units is None else units
    fpaths = []
    for u in units:
        if top.rows_un[u, 0] < 0:
            continue
        fpath = dpath / f"{top.kind}_{u:05d}.png"
        with atomic_open(fpath, "wb") as f:
            grid_image(images, top.rows_un[u]).save(f, format="PNG")
        fpaths.append(fpath)
    return fpaths


# ---------------------------------------------------------------------------------------------
# Attribute enrichment.


def enrichment_rows(top: TopImages, enr: TopImageEnrichment, names: list[str]) -> list[dict]:
    """Per unit with top images: its most significant attribute (lowest p, then highest lift)."""
    rows = []
    for u in range(top.n_units):
        if enr.n_top_u[u] == 0:
            continue
        lift = np.nan_to_num(enr.lift_ua[u], nan=-1.0)
        a = int(np.lexsort((-lift, enr.p_ua[u]))[0])
        rows.append({"kind": top.kind, "unit": u, "n_top": int(enr.n_top_u[u]), "attribute": names[a],
                     "top_count": int(enr.top_count_ua[u, a]), "top_rate": float(enr.top_count_ua[u, a] / enr.n_top_u[u]),
                     "base_rate": float(enr.base_rate_a[a]), "lift": float(enr.lift_ua[u, a]),
                     "p_value": float(enr.p_ua[u, a]),
                     "p_bonferroni": float(min(1.0, enr.p_ua[u, a] * len(names)))})
    return rows


def enrichment_summary(rows: list[dict], min_top: int = N_TOP // 2, alpha: float = 0.05) -> dict:
    """Per kind, over units with at least `min_top` top images (a feature that fires on one or two
    images has a large and meaningless lift): how many, the mean lift of their best attribute, and the
    fraction significant after Bonferroni over attributes."""
    summary = {}
    for kind in sorted({r["kind"] for r in rows}):
        kept = [r for r in rows if r["kind"] == kind and r["n_top"] >= min_top]
        summary[kind] = {"n_units": len(kept), "min_top": min_top, "alpha": alpha,
                         "mean_best_lift": float(np.mean([r["lift"] for r in kept])) if kept else None,
                         "frac_significant": float(np.mean([r["p_bonferroni"] < alpha for r in kept])) if kept else None}
    return summary
