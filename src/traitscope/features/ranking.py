"""Top images of a unit (an SAE feature or a dense dimension of the backbone): one ranking, two orders.

    by="max"         an image's value for the unit: its code (image-level rows) or its largest activation
                     over the image's patches (patch-level rows). `traitscope inference` stores this
                     ranking for every run (`top_rows`); the app's feature pages, `align`'s
                     enrichment.csv and the demo report show it.
    by="normalised"  the unit's value in the image's L2-normalised vector (embedding or SAE codes): an
                     image ranks high when the unit carries a large share of its vector, not merely when
                     the vector is long (the faces experiment, docs/faces.md). `traitscope grids` and the
                     app's blind test rank image-level units this way; a patch-level run has no one
                     vector per image, so it always ranks by max.

Ties go to the lower row. With `positive_only` (SAE features), only images where the unit fires
(> 0) rank; the places left over are -1. Rows index `Shards.images`.
"""

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from traitscope.errors import TraitscopeError

RANKINGS = {
    "max": "top images by max activation",
    "normalised": "top images by share of the L2-normalised image vector",
}
"""Each order's name (the `by` argument) and the label the app, `grids` and the report show."""


def grid_ranking(token_kind: str) -> str:
    """The order of the 4x4 grids (`traitscope grids`, the app's blind test) for units on these tokens:
    image-level ('cls') ones rank by "normalised", as in the faces experiment; patch-level ones by "max"."""
    return "normalised" if token_kind == "cls" else "max"


class TopImages(NamedTuple):
    """The top images of every unit of one kind."""

    kind: str
    """'dense' (dimensions of the stored embedding) or 'sae' (features of an SAE)."""
    rows_un: np.ndarray
    """(n_units, n) int64 rows into `Shards.images`, best first; -1 where fewer than n images qualify."""
    values_un: np.ndarray
    """(n_units, n) float32 the value each image ranked by (0 where rows are -1)."""
    by: str = "normalised"
    """The order: "max" or "normalised" (see RANKINGS)."""

    @property
    def n_units(self) -> int:
        return len(self.rows_un)

    @property
    def label(self) -> str:
        """What a user is shown, e.g. 'top images by max activation'."""
        return RANKINGS[self.by]

    def full_units(self) -> np.ndarray:
        """Units with all n places filled (what a blind test can show as a full grid)."""
        return np.flatnonzero((self.rows_un >= 0).all(axis=1))


def l2_normalize_rows(x_nd: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Each row divided by its Euclidean norm, in float32 or wider (all-zero rows stay zero)."""
    x_nd = np.asarray(x_nd, dtype=np.promote_types(np.asarray(x_nd).dtype, np.float32))
    return x_nd / np.maximum(np.linalg.norm(x_nd, axis=1, keepdims=True), eps)


def row_batches(x_nd, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 block) over consecutive blocks of `batch_size` rows of an array (or memmap)."""
    for start in range(0, len(x_nd), batch_size):
        yield start, np.asarray(x_nd[start:start + batch_size], dtype=np.float32)


def rank_top_images(batches: Iterator[tuple[int, np.ndarray]], n: int, by: str, positive_only: bool = False,
                    kind: str = "dense") -> TopImages:
    """Top-n image rows per unit over (first_row, values_bu) batches of per-image values (one row per
    image: its codes, or its maxima over patches), kept as a running top-n.

    `by`: "normalised" L2-normalises each image row first; "max" ranks the values as they are.
    """
    if by not in RANKINGS:
        raise TraitscopeError(f"unknown ranking {by!r}; one of {', '.join(RANKINGS)}")
    best_vals = best_rows = None
    for start, x_bu in batches:
        if by == "normalised":
            x_bu = l2_normalize_rows(x_bu)
        rows_bu = np.broadcast_to(np.arange(start, start + len(x_bu))[:, None], x_bu.shape)
        if best_vals is not None:
            x_bu, rows_bu = np.concatenate([best_vals, x_bu]), np.concatenate([best_rows, rows_bu])
        if len(x_bu) > n:
            keep = np.argpartition(-x_bu, n - 1, axis=0)[:n]
            x_bu, rows_bu = np.take_along_axis(x_bu, keep, 0), np.take_along_axis(rows_bu, keep, 0)
        best_vals, best_rows = x_bu, rows_bu
    if best_vals is None:
        raise TraitscopeError("no images to rank")
    order = np.lexsort((best_rows, -best_vals), axis=0)
    vals_un = np.take_along_axis(best_vals, order, 0).T.astype(np.float32)
    rows_un = np.take_along_axis(best_rows, order, 0).T.astype(np.int64)
    if positive_only:
        rows_un[vals_un <= 0] = -1
    if rows_un.shape[1] < n:  # fewer images than places
        pad = n - rows_un.shape[1]
        rows_un = np.pad(rows_un, ((0, 0), (0, pad)), constant_values=-1)
        vals_un = np.pad(vals_un, ((0, 0), (0, pad)))
    vals_un[rows_un < 0] = 0
    return TopImages(kind, np.ascontiguousarray(rows_un), np.ascontiguousarray(vals_un), by)
