"""Which labels a feature's top images (and top patches) carry, with counts.

For a feature's top-N images (from the inference folder): how many carry each image label; and, with
per-patch labels, how many of their most activated patches (one per top image: the patch where the
feature peaks) carry each patch label. A feature whose top images are 14 of 16 'red_spot' is a
candidate for that trait; one spread over every label is not.
"""

import csv
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.stats

from traitscope.features.inference import Inference
from traitscope.shards import Shards
from traitscope.files import atomic_open


def hypergeom_p(counts, n_total, n_positive, n_drawn) -> np.ndarray:
    """One-sided hypergeometric p-value of seeing at least `counts` labelled items among `n_drawn` drawn
    from `n_total`, of which `n_positive` carry the label (chance alone); arguments broadcast."""
    return scipy.stats.hypergeom.sf(np.asarray(counts) - 1, n_total, n_positive, n_drawn)


class Enrichment(NamedTuple):
    level: str
    """'image' (labels of the top images) or 'patch' (labels of each top image's peak patch)."""
    names: list[str]
    """Label names (columns of counts)."""
    counts: np.ndarray
    """(d_sae, n_labels) int64: top images (peak patches) carrying each label."""
    n_top: np.ndarray
    """(d_sae,) int64: top images the counts are over (fewer than top_n for rare features)."""

    def top_labels(self, feature: int, k: int = 5) -> list[tuple[str, int]]:
        """The feature's most frequent labels with counts, most frequent first (zero counts dropped)."""
        counts = self.counts[feature]
        order = np.argsort(-counts, kind="stable")[:k]
        return [(self.names[j], int(counts[j])) for j in order if counts[j] > 0]


def label_enrichment(inf: Inference, shards: Shards) -> list[Enrichment]:
    """Image-label and patch-label enrichment of every feature's top images (those that exist)."""
    rows = np.asarray(inf.top_rows)
    valid = rows >= 0
    n_top = valid.sum(1).astype(np.int64)
    out = []
    image_labels = shards.image_labels()
    if image_labels is not None:
        labels = image_labels[np.where(valid, rows, 0)].astype(np.int64) * valid[..., None]
        out.append(Enrichment("image", shards.image_label_names, labels.sum(1), n_top))
    patch_labels = shards.patch_labels()
    if patch_labels is not None and inf.manifest["token_kind"] == "patches":
        n_p = int(inf.manifest["n_patches"])
        peak = np.asarray(inf.array("top_patch_acts")).argmax(2)  # (d_sae, top_n) patch where the feature peaks
        tokens = np.where(valid, rows, 0) * n_p + peak
        labels = patch_labels[tokens.reshape(-1)].reshape(*tokens.shape, -1).astype(np.int64) * valid[..., None]
        out.append(Enrichment("patch", shards.patch_label_names, labels.sum(1), n_top))
    return out


def write_enrichment(enrichments: list[Enrichment], csv_fpath: Path) -> None:
    """Long-format CSV: feature, level, label, count, n_top (non-zero counts only)."""
    with atomic_open(csv_fpath, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["feature", "level", "label", "count", "n_top"])
        for e in enrichments:
            for feature, j in zip(*np.nonzero(e.counts)):
                writer.writerow([int(feature), e.level, e.names[j], int(e.counts[feature, j]), int(e.n_top[feature])])
