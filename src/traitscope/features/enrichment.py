"""Label enrichment: is a label over-represented among a unit's images, compared with all images?

One test for every command (`enrichment_test`): among `n_drawn` images drawn for a unit, `count`
carry the label, against `n_labelled` of all `n_images`; lift = (count / n_drawn) / (n_labelled /
n_images), p = the one-sided hypergeometric probability of at least `count` by chance. What is drawn
is named where it is used:

    over a unit's top images   `top_image_enrichment` (`traitscope grids`: Bonferroni over attributes);
                               `top_label_counts` gives the counts alone (`align`'s enrichment.csv,
                               per image label and per patch label of each top image's peak patch)
    over its firing images     every image where an SAE feature fires (the app: Benjamini-Hochberg q
                               over every feature-label pair tested)

A feature whose top images are 14 of 16 'red_spot' is a candidate for that trait; one spread over
every label is not.
"""

import csv
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.stats

from traitscope.features.inference import Inference
from traitscope.features.ranking import TopImages
from traitscope.shards import Shards
from traitscope.files import atomic_open


def hypergeom_p(counts, n_total, n_positive, n_drawn) -> np.ndarray:
    """One-sided hypergeometric p-value of seeing at least `counts` labelled items among `n_drawn` drawn
    from `n_total`, of which `n_positive` carry the label (chance alone); arguments broadcast."""
    return scipy.stats.hypergeom.sf(np.asarray(counts) - 1, n_total, n_positive, n_drawn)


class EnrichmentTest(NamedTuple):
    """How much a label is over-represented among the images drawn for a unit (arrays broadcast)."""

    lift: np.ndarray
    """Share of the drawn images with the label / share of all images (NaN where either is undefined)."""
    p: np.ndarray
    """One-sided hypergeometric p-value of at least that many by chance."""


def lift(count, n_drawn, n_labelled, n_images: int) -> np.ndarray:
    """(count / n_drawn) / (n_labelled / n_images), NaN where undefined; arguments broadcast."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.asarray(count) / np.asarray(n_drawn)) / (np.asarray(n_labelled) / n_images)


def enrichment_test(count, n_drawn, n_labelled, n_images: int) -> EnrichmentTest:
    """`count` of `n_drawn` images carry the label, which `n_labelled` of all `n_images` carry."""
    return EnrichmentTest(lift(count, n_drawn, n_labelled, n_images), hypergeom_p(count, n_images, n_labelled, n_drawn))


def bh_q(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values over every test in `p` together."""
    return scipy.stats.false_discovery_control(p) if len(p) else np.asarray(p, dtype=np.float64)


class TopLabelCounts(NamedTuple):
    """How many of each feature's top images (as inference ranked them, by max) carry each label."""

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


def top_label_counts(inf: Inference, shards: Shards) -> list[TopLabelCounts]:
    """Image-label and patch-label counts over every feature's top images (those that exist), ranked
    by max activation (inference's `top_rows`)."""
    rows = np.asarray(inf.top_rows)
    valid = rows >= 0
    n_top = valid.sum(1).astype(np.int64)
    out = []
    image_labels = shards.image_labels()
    if image_labels is not None:
        labels = image_labels[np.where(valid, rows, 0)].astype(np.int64) * valid[..., None]
        out.append(TopLabelCounts("image", shards.image_label_names, labels.sum(1), n_top))
    patch_labels = shards.patch_labels()
    if patch_labels is not None and inf.manifest["token_kind"] == "patches":
        n_p = int(inf.manifest["n_patches"])
        peak = np.asarray(inf.array("top_patch_acts")).argmax(2)  # (d_sae, top_n) patch where the feature peaks
        tokens = np.where(valid, rows, 0) * n_p + peak
        labels = patch_labels[tokens.reshape(-1)].reshape(*tokens.shape, -1).astype(np.int64) * valid[..., None]
        out.append(TopLabelCounts("patch", shards.patch_label_names, labels.sum(1), n_top))
    return out


def write_enrichment(enrichments: list[TopLabelCounts], csv_fpath: Path) -> None:
    """Long-format CSV: feature, level, label, count, n_top (non-zero counts only)."""
    with atomic_open(csv_fpath, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["feature", "level", "label", "count", "n_top"])
        for e in enrichments:
            for feature, j in zip(*np.nonzero(e.counts)):
                writer.writerow([int(feature), e.level, e.names[j], int(e.counts[feature, j]), int(e.n_top[feature])])


class TopImageEnrichment(NamedTuple):
    """How much each attribute is over-represented among each unit's top images, against all images."""

    top_count_ua: np.ndarray
    """(n_units, n_attrs) int64 top images that have the attribute."""
    n_top_u: np.ndarray
    """(n_units,) int64 top images of the unit (fewer than n for a rarely firing feature)."""
    base_rate_a: np.ndarray
    """(n_attrs,) float64 fraction of all images with the attribute."""
    lift_ua: np.ndarray
    """(n_units, n_attrs) top-image rate / base rate (NaN where undefined)."""
    p_ua: np.ndarray
    """(n_units, n_attrs) one-sided hypergeometric p-value of at least that many by chance."""


def top_image_enrichment(top: TopImages, labels_na: np.ndarray) -> TopImageEnrichment:
    """Attribute enrichment of each unit's top images (ranked as `top.by` says) against all images
    (labels: (n_images, n_attrs) 0/1)."""
    labels_na = np.asarray(labels_na, dtype=np.int64)
    n_images = len(labels_na)
    valid_un = top.rows_un >= 0
    counts_ua = np.stack([labels_na[rows[ok]].sum(axis=0) for rows, ok in zip(top.rows_un, valid_un)])
    n_top_u = valid_un.sum(axis=1)
    positives_a = labels_na.sum(axis=0)
    test = enrichment_test(counts_ua, n_top_u[:, None], positives_a[None, :], max(n_images, 1))
    return TopImageEnrichment(counts_ua, n_top_u, positives_a / max(n_images, 1), test.lift, test.p)
