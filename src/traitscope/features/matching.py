"""Match the features of two SAEs trained on the same model and layer (a dictionary trained on fish
against one trained on another collection, two seeds, two widths ...).

Two features are alike when they write the same direction (cosine of their decoder rows) and fire on
the same images (Pearson correlation of their per-image maxima over one data set, from both runs'
inference folders on the same shards). Their score is the mean of the two; an optimal one-to-one
assignment (`scipy.optimize.linear_sum_assignment`) pairs the features, and a pair counts as matched
when its score reaches `min_score`. Every feature of either run that is not matched is listed too,
with its best partner on the other side, so what one dictionary has and the other lacks is explicit.
Only features firing on at least `min_images` images take part (dead features match nothing).
"""

import csv
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.optimize
import scipy.sparse

from traitscope.errors import TraitscopeError
from traitscope.features.inference import Inference
from traitscope.files import atomic_open

MIN_SCORE = 0.5
"""Default score (mean of decoder cosine and activation correlation) a pair needs to count as matched."""
MIN_IMAGES = 2
"""Default: features firing on fewer images of the shared data set are left out."""
MAX_CELLS = 200_000_000
"""Largest (features of A) x (features of B) score matrix computed (float32: 800 MB)."""
COLUMNS = ["feature_a", "feature_b", "matched", "score", "decoder_cosine", "activation_corr", "images_a", "images_b"]


class Matching(NamedTuple):
    """One row per feature of either run: a matched pair, or a feature with its best partner unmatched."""

    feature_a: np.ndarray
    """(n,) int64 feature of run A (-1: a row for an unmatched feature of B)."""
    feature_b: np.ndarray
    """(n,) int64 feature of run B (-1: a row for an unmatched feature of A)."""
    matched: np.ndarray
    """(n,) bool: paired one-to-one with a score >= min_score."""
    score: np.ndarray
    """(n,) float32 mean of decoder cosine and activation correlation (for an unmatched feature: with
    its best partner, named in `partner`)."""
    decoder_cosine: np.ndarray
    """(n,) float32 cosine of the two decoder rows."""
    activation_corr: np.ndarray
    """(n,) float32 Pearson correlation of their per-image maxima over the shared data set."""
    partner: np.ndarray
    """(n,) int64 for an unmatched feature: its best-scoring feature on the other side (-1: none)."""
    images_a: np.ndarray
    """(n,) int64 images where feature_a fires (0 when it is -1)."""
    images_b: np.ndarray
    """(n,) int64 images where feature_b fires."""

    def rows(self) -> list[dict]:
        """The table as dicts (COLUMNS plus `partner`), matched pairs first (best first)."""
        return [{"feature_a": int(a), "feature_b": int(b), "matched": bool(m), "score": float(s),
                 "decoder_cosine": float(c), "activation_corr": float(r), "images_a": int(na), "images_b": int(nb),
                 "partner": int(p)}
                for a, b, m, s, c, r, p, na, nb in zip(*self)]


def decoder_cosine(W_a_sd: np.ndarray, W_b_sd: np.ndarray) -> np.ndarray:
    """(s_a, s_b) float32 cosine similarity of the rows of two decoders (each row: a feature's direction)."""
    a = np.asarray(W_a_sd, dtype=np.float32)
    b = np.asarray(W_b_sd, dtype=np.float32)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-8)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-8)
    return a @ b.T


def activation_corr(x_a: scipy.sparse.csr_matrix, x_b: scipy.sparse.csr_matrix) -> np.ndarray:
    """(s_a, s_b) float32 Pearson correlation over images (rows) of the columns of two sparse matrices
    (per-image feature maxima); 0 where a column is constant."""
    n = x_a.shape[0]
    if x_b.shape[0] != n:
        raise TraitscopeError(f"activation correlation needs the same images: {n} against {x_b.shape[0]}")
    x_a, x_b = x_a.astype(np.float64), x_b.astype(np.float64)
    mean_a, mean_b = np.asarray(x_a.mean(axis=0)).ravel(), np.asarray(x_b.mean(axis=0)).ravel()
    std_a = np.sqrt(np.maximum(np.asarray(x_a.multiply(x_a).mean(axis=0)).ravel() - mean_a ** 2, 0))
    std_b = np.sqrt(np.maximum(np.asarray(x_b.multiply(x_b).mean(axis=0)).ravel() - mean_b ** 2, 0))
    cov = np.asarray((x_a.T @ x_b).todense()) / n - np.outer(mean_a, mean_b)
    denom = np.outer(std_a, std_b)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(denom > 0, cov / np.where(denom > 0, denom, 1), 0.0)
    return corr.astype(np.float32)


def match_features(W_a_sd: np.ndarray, W_b_sd: np.ndarray, inf_a: Inference, inf_b: Inference,
                   min_score: float = MIN_SCORE, min_images: int = MIN_IMAGES) -> Matching:
    """Match the features of two runs from their decoders and their inference over the same images."""
    if inf_a.n_images != inf_b.n_images or inf_a.manifest["shards"]["hash"] != inf_b.manifest["shards"]["hash"]:
        raise TraitscopeError("the two inference folders are over different shards: match runs on the same images")
    if np.shape(W_a_sd)[1] != np.shape(W_b_sd)[1]:
        raise TraitscopeError(f"the decoders write {np.shape(W_a_sd)[1]}- and {np.shape(W_b_sd)[1]}-wide vectors: "
                              "only runs on the same model and layer can be matched")
    count_a = np.rint(np.asarray(inf_a.array("feature_image_freq"), np.float64) * inf_a.n_images).astype(np.int64)
    count_b = np.rint(np.asarray(inf_b.array("feature_image_freq"), np.float64) * inf_b.n_images).astype(np.int64)
    alive_a, alive_b = np.flatnonzero(count_a >= min_images), np.flatnonzero(count_b >= min_images)
    if len(alive_a) * len(alive_b) > MAX_CELLS:
        raise TraitscopeError(f"{len(alive_a)} x {len(alive_b)} features is too many pairs to score at once; "
                              "raise --min-images to leave out rare features")
    cos = decoder_cosine(np.asarray(W_a_sd)[alive_a], np.asarray(W_b_sd)[alive_b])
    corr = activation_corr(inf_a.image_max()[:, alive_a], inf_b.image_max()[:, alive_b])
    score = (cos + corr) / 2
    if score.size:
        ia, ib = scipy.optimize.linear_sum_assignment(score, maximize=True)
    else:
        ia = ib = np.zeros(0, np.int64)
    good = score[ia, ib] >= min_score
    ia, ib = ia[good], ib[good]
    order = np.argsort(-score[ia, ib], kind="stable")
    ia, ib = ia[order], ib[order]
    lone_a = np.setdiff1d(np.arange(len(alive_a)), ia)
    lone_b = np.setdiff1d(np.arange(len(alive_b)), ib)
    best_b = score[lone_a].argmax(axis=1) if score.shape[1] else np.full(len(lone_a), -1)
    best_a = score[:, lone_b].argmax(axis=0) if score.shape[0] else np.full(len(lone_b), -1)

    def pick(m, i, j):
        return np.array([m[x, y] if y >= 0 and x >= 0 else np.nan for x, y in zip(i, j)], np.float32)

    fa = np.concatenate([alive_a[ia], alive_a[lone_a], np.full(len(lone_b), -1)])
    fb = np.concatenate([alive_b[ib], np.full(len(lone_a), -1), alive_b[lone_b]])
    ra = np.concatenate([ia, lone_a, best_a])  # score-matrix row / column of each row's pair or partner
    rb = np.concatenate([ib, best_b, lone_b])
    partner = np.concatenate([np.full(len(ia), -1), np.where(best_b >= 0, alive_b[np.maximum(best_b, 0)], -1),
                              np.where(best_a >= 0, alive_a[np.maximum(best_a, 0)], -1)]).astype(np.int64)
    matched = np.concatenate([np.ones(len(ia), bool), np.zeros(len(lone_a) + len(lone_b), bool)])
    return Matching(fa.astype(np.int64), fb.astype(np.int64), matched, pick(score, ra, rb), pick(cos, ra, rb),
                    pick(corr, ra, rb), partner, np.where(fa >= 0, count_a[np.maximum(fa, 0)], 0),
                    np.where(fb >= 0, count_b[np.maximum(fb, 0)], 0))


def write_matching(matching: Matching, csv_fpath: str | Path) -> None:
    """The table as CSV: COLUMNS plus `partner` (an unmatched feature's best partner), -1 for none."""
    rows = matching.rows()
    with atomic_open(csv_fpath, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + ["partner"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
