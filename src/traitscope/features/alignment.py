"""Do single features line up with known traits? Average precision of the best feature per label.

For every label (per patch: synthetic traits, segmentation masks; per image: class folders, a CSV,
CelebA attributes) and every method — the SAE, the dense dimensions, PCA components, k-means
centroids — the feature with the highest average precision on *training* images is chosen, and its
AP and purity@16 (share of positives among its 16 highest-scoring items) are reported on *held-out*
images. A logistic-regression probe per label on the dense activations gives the ceiling. Coverage
is the share of labels whose chosen feature reaches held-out AP >= 0.5.

Every method is scored two ways, and only like is compared with like:
- dense scores rank every item: the SAE's pre-activations, the dense dimensions, PCA projections,
  k-means negative distance;
- sparse scores rank only the items where a feature fires and tie every other item at zero: the
  SAE's codes; the dense dimensions and PCA projections keeping each token's L0 largest signed
  values (L0 = the SAE's mean active latents per token); the k-means hard assignment.
A sparse feature cannot rank the patches where it is silent, so a dense baseline against SAE codes
is not a fair comparison (k-means −distance looked better than the SAE for that reason alone).

Levels: patch labels are scored per patch token (patch-level SAEs only); image labels per image,
where a patch-level score's image score is its maximum over the image's patches (the SAE codes'
exact per-image maxima come from the inference folder) and the probe reads mean-pooled activations.

Sampling (fixed seed, so reruns agree): features are chosen on at most `select_tokens` training
patches (default 50,000) or `select_images` training images (default 8,192); held-out scores use every
held-out image, and at most `eval_tokens` held-out patches (default 500,000).

Dominant labels — base rate above 0.5 on training data, or named 'background' — reach a high AP by
base rate alone; they are reported separately and left out of mean AP and coverage. So are labels
with no positive in the training or held-out data (AP undefined).

Dense and PCA directions have no preferred sign: both signs are candidates (feature `-i` is the
negation of dimension / component i). SAE and k-means features are used as they are.

A secondary view, *sets* (scoring 'set'), asks how well a label is found by a few features together,
for when a dictionary splits a trait into several (red circles, red squares, ... for 'red'): up to
SET_SIZE sparse features, an item scoring the largest of their scores, each scaled to its largest
value on the training sample (the k-means baseline's set is a union of clusters). Sets grow greedily
from the best single feature, adding the one of the label's SET_POOL best features that raises the
training AP most, while one does. The single best feature stays the headline.
"""

import csv
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from traitscope.dist import cpus_per_rank
from traitscope.errors import TraitscopeError
from traitscope.features.baselines import Baseline
from traitscope.features.heldout import FIT_TOKENS, mean_l0, sample_tokens, token_indices
from traitscope.features.inference import Inference
from traitscope.features.inputs import RunInputs, split_rows
from traitscope.files import atomic_open, atomic_write_bytes

PURITY_AT = 16
COVERAGE_AP = 0.5
DOMINANT_RATE = 0.5
SELECT_IMAGES = 8192
EVAL_TOKENS = 500_000
CHUNK_TOKENS = 8192
SET_SIZE = 3
"""Most features in a set (the secondary view)."""
SET_POOL = 16
"""A set's candidates: the label's features with the highest training AP on their own."""


class LabelScore(NamedTuple):
    """One (label, method) row of the alignment table."""

    level: str
    """'patch' or 'image'."""
    label: str
    dominant: bool
    """Base rate > 0.5 or named 'background': reported apart, left out of the summary."""
    base_rate: float
    """Share of positives among the held-out items."""
    n_pos: int
    """Held-out positives."""
    method: str
    """'sae', 'dense', 'pca', 'kmeans' or 'probe'."""
    scoring: str
    """'dense' (every item ranked: SAE pre-activations, dimensions, projections, k-means −distance, the
    probe), 'sparse' (only where a feature fires: SAE codes, top-L0 dimensions / projections,
    k-means hard assignment) or 'set' (a few sparse features together; see the module doc)."""
    feature: str
    """Chosen feature index ('-i': negated dimension / component; a set: 'i+j+k'); '' for the probe."""
    train_ap: float
    """AP of the chosen feature on the training sample (the selection criterion)."""
    ap: float
    """AP on held-out items."""
    purity: float
    """Share of positives among the 16 highest-scoring held-out items."""


class MethodSummary(NamedTuple):
    level: str
    method: str
    scoring: str
    """'dense', 'sparse' or 'set' (see `LabelScore.scoring`)."""
    mean_ap: float
    coverage: float
    """Share of (non-dominant, scorable) labels whose held-out AP >= 0.5."""
    n_labels: int


# --- average precision for many features at once ---------------------------------------------------

def average_precision_matrix(scores_nf: torch.Tensor, y_nl: torch.Tensor) -> torch.Tensor:
    """(n_features, n_labels) AP of every feature column against every (0/1) label column.

    The same value as `sklearn.metrics.average_precision_score` (tied scores form one threshold):
    AP = Σ_{positives i} precision(i's score as the threshold) / n_pos, where the precision is the
    share of positives among the items scoring at least as high as i. Each feature's column is sorted
    once to count, for every item, the items scoring at least as high (`at_least`, which falls as the
    score rises); per label, sorting the positives' counts orders them by score and gives how many
    positives score at least as high. So the work per label is n_pos, not n, per feature. numpy's
    sorts (vectorised) make the whole matrix about 5 times faster than torch's sort did here. NaN for
    labels without positives.
    """
    s_fn = np.ascontiguousarray(scores_nf.numpy().T)
    n_feat = s_fn.shape[0]
    order = np.argsort(s_fn, axis=1)[:, ::-1]  # highest first
    at_least = np.empty(s_fn.shape, dtype=np.int32)
    np.put_along_axis(at_least, order, _run_ends(np.take_along_axis(s_fn, order, 1)) + 1, 1)
    del order
    y = y_nl.numpy() > 0
    out = np.full((n_feat, y.shape[1]), np.nan)
    for j in range(y.shape[1]):
        pos = np.flatnonzero(y[:, j])
        if len(pos):
            counts = np.sort(at_least[:, pos], axis=1)  # highest scores first
            out[:, j] = ((_run_ends(counts) + 1) / counts).sum(1) / len(pos)
    return torch.from_numpy(out)


def _run_ends(a_fm: np.ndarray) -> np.ndarray:
    """For each place of rows sorted either way: the last place of its run of equal values."""
    is_last = np.ones(a_fm.shape, dtype=bool)
    is_last[:, :-1] = a_fm[:, 1:] != a_fm[:, :-1]
    return _ends(is_last)


def _ends(is_last: np.ndarray) -> np.ndarray:
    """For each place along the last axis: the first place at or after it where `is_last` holds."""
    m = is_last.shape[-1]
    ends = np.where(is_last, np.arange(m, dtype=np.int32), np.int32(m))
    return np.minimum.accumulate(ends[..., ::-1], axis=-1)[..., ::-1]


def sparse_average_precision(items: torch.Tensor, features: torch.Tensor, values: torch.Tensor,
                             n_features: int, y_nl: torch.Tensor) -> torch.Tensor:
    """(n_features, n_labels) AP of non-negative sparse scores: entry (item, feature, value > 0);
    every item not listed for a feature scores 0 (one tie group, ranked last).

    The same value as the dense computation, in O(nnz log nnz): with P positives among n items and
    TP of them scored above 0, AP = Σ_{listed i} y_i · precision(end of i's tie group) / P + (P − TP) / n.
    """
    n = y_nl.shape[0]
    order = torch.argsort(values, descending=True, stable=True)
    order = order[torch.argsort(features[order], stable=True)]  # by feature, then value descending
    f, v, it = features[order], values[order], items[order]
    counts = torch.bincount(f, minlength=n_features)
    starts = torch.cumsum(counts, 0) - counts
    rank = (torch.arange(len(f)) - starts[f] + 1).double()
    is_end = torch.ones(len(f), dtype=torch.bool)
    is_end[:-1] = (f[:-1] != f[1:]) | (v[:-1] != v[1:])
    group_end = torch.from_numpy(_ends(is_end.numpy()).astype(np.int64))
    out = torch.empty(n_features, y_nl.shape[1], dtype=torch.float64)
    for j in range(y_nl.shape[1]):
        y = y_nl[:, j].double()
        n_pos = y.sum()
        y_sorted = y[it]
        cum = torch.cat([torch.zeros(1, dtype=torch.float64), y_sorted.cumsum(0)])
        tp = cum[1:] - cum[starts[f]]  # positives so far within the feature
        listed = torch.zeros(n_features, dtype=torch.float64).index_add_(0, f, y_sorted * (tp / rank)[group_end])
        tp_listed = cum[starts + counts] - cum[starts]
        out[:, j] = listed / n_pos + (n_pos - tp_listed) / n
    return out


def best_features(block: Callable[[int, int], torch.Tensor], n_candidates: int, y_nl: torch.Tensor,
                  n_best: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """For each label: the `n_best` candidate features with the highest AP, best first (ties: lowest
    index first), and their APs, as (n_best, n_labels) arrays.

    `block(start, stop)` gives the (n, stop - start) scores of a range of candidates. -1 / NaN for
    labels without positives (and past the last candidate). Ranges are scored side by side, one per
    core, and merged in order.
    """
    n = y_nl.shape[0]
    width = max(1, (1 << 22) // max(n, 1))
    best_ap = np.full((0, y_nl.shape[1]), -1.0)
    best_idx = np.zeros((0, y_nl.shape[1]), dtype=np.int64)

    def ap_of(start: int) -> np.ndarray:
        scores = block(start, min(start + width, n_candidates)).float()
        return np.nan_to_num(average_precision_matrix(scores, y_nl).numpy(), nan=-1.0)

    starts = range(0, n_candidates, width)
    for start, ap in zip(starts, side_by_side(ap_of, starts)):
        idx = np.broadcast_to(np.arange(start, start + len(ap))[:, None], ap.shape)
        best_idx, best_ap = _top(np.concatenate([best_idx, idx]), np.concatenate([best_ap, ap]), n_best)
    return _pad(best_idx, best_ap, n_best)


def side_by_side(fn: Callable, items) -> list:
    """[fn(item) for item in items], on one thread per core this process may use (`cpus_per_rank`;
    numpy's sorts, BLAS and torch's kernels release the GIL). Each call runs without autograd: torch's
    grad mode is per thread."""
    def call(item):
        with torch.no_grad():
            return fn(item)

    with ThreadPoolExecutor(cpus_per_rank()) as pool:
        return list(pool.map(call, items))


def _top(idx: np.ndarray, ap: np.ndarray, n_best: int) -> tuple[np.ndarray, np.ndarray]:
    """Per label (column): the n_best rows of highest AP, earlier rows first among ties."""
    order = np.argsort(-ap, axis=0, kind="stable")[:n_best]
    return np.take_along_axis(idx, order, 0), np.take_along_axis(ap, order, 0)


def _pad(idx: np.ndarray, ap: np.ndarray, n_best: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_best, n_labels) arrays, -1 / NaN where AP is undefined or candidates ran out."""
    short = n_best - len(idx)
    idx = np.concatenate([idx, np.full((short, idx.shape[1]), -1)]) if short > 0 else idx
    ap = np.concatenate([ap, np.full((short, ap.shape[1]), -1.0)]) if short > 0 else ap
    return np.where(ap < 0, -1, idx), np.where(ap < 0, np.nan, ap)


def best_sparse_features(items: torch.Tensor, features: torch.Tensor, values: torch.Tensor, n_features: int,
                         y_nl: torch.Tensor, n_best: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """`best_features` for non-negative sparse scores (an SAE's codes, a baseline's top-L0 codes)."""
    ap = np.nan_to_num(sparse_average_precision(items, features, values, n_features, y_nl).numpy(), nan=-1.0)
    idx = np.broadcast_to(np.arange(n_features)[:, None], ap.shape)
    return _pad(*_top(idx, ap, n_best), n_best)


def triplet_columns(items: torch.Tensor, features: torch.Tensor, values: torch.Tensor, n_items: int,
                    idx: np.ndarray) -> torch.Tensor:
    """(n_items, len(idx)) dense scores of features `idx` (distinct) from sparse (item, feature, value) triplets."""
    order = np.argsort(idx)
    sorted_idx = torch.as_tensor(np.asarray(idx)[order], dtype=features.dtype)
    keep = torch.isin(features, sorted_idx)
    out = torch.zeros(n_items, len(idx))
    out[items[keep], torch.as_tensor(order)[torch.searchsorted(sorted_idx, features[keep])]] = values[keep].float()
    return out


def grow_set(columns_nm: torch.Tensor, y_n: torch.Tensor, size: int = SET_SIZE) -> tuple[list[int], float]:
    """A label's set: positions among the columns (column 0 the best single feature), and its AP.

    Each column (non-negative scores on the training items) is scaled to its largest value; the set's
    score is the largest scaled score of its columns. The set grows greedily while a column raises its AP.
    """
    scaled = columns_nm / columns_nm.amax(0).clamp(min=1e-30)
    chosen, combined = [0], scaled[:, 0]
    best = float(average_precision_matrix(combined[:, None], y_n[:, None])[0, 0])
    while len(chosen) < min(size, scaled.shape[1]):
        ap = average_precision_matrix(torch.maximum(combined[:, None], scaled), y_n[:, None])[:, 0]
        ap[chosen] = -1.0
        j = int(ap.argmax())
        if not ap[j] > best + 1e-9:
            break
        chosen.append(j)
        combined, best = torch.maximum(combined, scaled[:, j]), float(ap[j])
    return chosen, best


def heldout_scores(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """(AP, purity@16) of one score column on held-out items; NaN without positives."""
    if y.sum() == 0:
        return float("nan"), float("nan")
    top = np.argsort(-s, kind="stable")[:PURITY_AT]
    return float(average_precision_score(y, s)), float(y[top].mean())


# --- score providers -----------------------------------------------------------------------------

class SAEScores(Baseline):
    """The SAE seen through the baselines' interface: `scores` are its pre-activations (dense
    scoring), `sparse_scores` its codes (sparse scoring)."""

    name = "sae"

    def __init__(self, sae):
        self.sae = sae

    @property
    def n_features(self) -> int:
        return self.sae.d_sae

    def scores(self, x_bd, features=slice(None)):
        return self.sae.pre_acts(x_bd.to(self.sae.W_enc.device), features).cpu()

    def sparse_scores(self, x_bd, l0):
        return self.sae.encode(x_bd.to(self.sae.W_enc.device)).cpu()


class _Method(NamedTuple):
    """A method's candidate features at one level, in one scoring."""

    n_features: int
    """Base features; with `signed`, candidate n_features + i is the negation of feature i."""
    signed: bool
    select: Callable[[torch.Tensor, int], tuple[np.ndarray, np.ndarray]]
    """(training labels (n_train, n_labels), n_best) -> per label the n_best candidates, best first
    (-1: none), and their APs, as (n_best, n_labels) arrays."""
    held: Callable[[np.ndarray], np.ndarray]
    """candidate indices -> (n_held, len(indices)) held-out scores."""
    train: Callable[[np.ndarray], torch.Tensor] | None = None
    """Sparse scorings: candidate indices (distinct) -> (n_train, len(indices)) training scores, for sets."""

    def name(self, idx: int) -> str:
        return f"-{idx - self.n_features}" if idx >= self.n_features else str(idx)


def _dense_method(b: Baseline, block: Callable[[int, int], torch.Tensor],
                  held: Callable[[np.ndarray], np.ndarray]) -> _Method:
    return _Method(b.n_features, b.signed, lambda y, n_best: best_features(block, b.n_candidates, y, n_best), held)


def _with_negations(scores: Callable[[slice], torch.Tensor], n_features: int) -> Callable[[int, int], torch.Tensor]:
    """Candidate block function over [features, their negations] from a base-feature score function."""
    def block(start: int, stop: int) -> torch.Tensor:
        parts = []
        if start < n_features:
            parts.append(scores(slice(start, min(stop, n_features))))
        if stop > n_features:
            parts.append(-scores(slice(max(start, n_features) - n_features, stop - n_features)))
        return torch.cat(parts, 1)
    return block


def _take(b: Baseline, x_bd: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    """(batch, len(idx)) scores of candidates `idx` (signed: >= n_features are negated), computing only those."""
    scores = b.scores(x_bd, torch.as_tensor(idx % b.n_features))
    return scores * torch.as_tensor(np.where(idx >= b.n_features, -1.0, 1.0), dtype=scores.dtype)


def _triplets(sparse_scores: Callable[[torch.Tensor], torch.Tensor],
              x_nd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-zero sparse scores of x as (token, feature, value), computed in chunks."""
    parts = []
    for start in range(0, x_nd.shape[0], CHUNK_TOKENS):
        s = sparse_scores(x_nd[start:start + CHUNK_TOKENS])
        tok, feat = s.nonzero(as_tuple=True)
        parts.append((tok + start, feat, s[tok, feat].float()))
    if not parts:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return tuple(torch.cat([p[i] for p in parts]) for i in range(3))


@torch.no_grad()
def _pooled(inputs: RunInputs, image_rows: np.ndarray, fn: Callable[[torch.Tensor], torch.Tensor],
            reduce: str) -> torch.Tensor:
    """(n_images, width) per-image max (or mean) over tokens of fn(acts), streamed image by image; padding
    patches are left out."""
    per_image = inputs.tokens_per_image
    step = max(1, CHUNK_TOKENS // per_image)
    out = []
    for start in range(0, len(image_rows), step):
        rows = image_rows[start:start + step]
        idx = token_indices(rows, per_image)
        x = torch.from_numpy(inputs.acts[idx].astype(np.float32))
        s = fn(x).view(len(rows), per_image, -1)
        if inputs.validity is None:
            out.append(s.amax(1) if reduce == "max" else s.mean(1))
            continue
        valid = torch.from_numpy(inputs.validity.of_rows(idx)).view(len(rows), per_image, 1)
        if reduce == "max":
            out.append(s.masked_fill(~valid, -torch.inf).amax(1))
        else:
            out.append((s * valid).sum(1) / valid.sum(1).clamp(min=1))
    return torch.cat(out) if out else torch.zeros(0, 0)


# --- the alignment of one run --------------------------------------------------------------------

def _is_dominant(name: str, base_rate: float) -> bool:
    return base_rate > DOMINANT_RATE or name.strip().lower() == "background"


def _probe(x_train: np.ndarray, y_train: np.ndarray, x_held: np.ndarray) -> np.ndarray:
    """(n_held, n_labels) decision values of a logistic regression per label (NaN without both classes).

    The labels are fitted side by side, one per core, each with a one-thread BLAS: L-BFGS's products
    are too small to gain from BLAS threads (the demo's 15 labels on 50k tokens: 33 s label by label,
    14 s side by side here, the same values)."""
    scaler = StandardScaler().fit(x_train)
    xt, xh = scaler.transform(x_train), scaler.transform(x_held)
    out = np.full((len(x_held), y_train.shape[1]), np.nan)
    fit = [j for j in range(y_train.shape[1]) if 0 < y_train[:, j].sum() < len(y_train)]

    def decision(j: int) -> np.ndarray:
        return LogisticRegression(max_iter=1000).fit(xt, y_train[:, j]).decision_function(xh)

    with threadpool_limits(1):
        for j, values in zip(fit, side_by_side(decision, fit)):
            out[:, j] = values
    return out


class _Level(NamedTuple):
    name: str
    labels: list[str]
    y_train: np.ndarray
    y_held: np.ndarray
    methods: dict[tuple[str, str], _Method]
    """(method, scoring) -> its candidates."""
    probe_x: tuple[np.ndarray, np.ndarray]
    """(training, held-out) dense inputs of the probe, aligned with y_train / y_held."""


def _patch_level(inputs: RunInputs, scorers: list[Baseline], l0: int, select_tokens: int, eval_tokens: int) -> _Level:
    labels = inputs.shards.patch_label_names
    label_arr = inputs.shards.patch_labels()
    if label_arr.n_rows != inputs.acts.n_rows or label_arr.width != len(labels):
        raise TraitscopeError(f"{inputs.shards.dpath}: patch labels are {label_arr.shape}, expected "
                              f"({inputs.acts.n_rows}, {len(labels)}) to match the patch tokens")
    train_rows, held_rows = split_rows(inputs)
    idx_train = sample_tokens(inputs, train_rows, select_tokens, seed=1)
    idx_held = sample_tokens(inputs, held_rows, eval_tokens, seed=2)
    x_train = torch.from_numpy(inputs.acts[idx_train].astype(np.float32))
    x_held = torch.from_numpy(inputs.acts[idx_held].astype(np.float32))

    def chunked(fn: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
        return torch.cat([fn(x_held[s:s + CHUNK_TOKENS]) for s in range(0, len(x_held), CHUNK_TOKENS)]).numpy()

    methods = {}
    for b in scorers:
        base = lambda cols, b=b: b.scores(x_train, cols)  # noqa: E731
        block = _with_negations(base, b.n_features) if b.signed else (lambda s0, s1, base=base: base(slice(s0, s1)))
        methods[b.name, "dense"] = _dense_method(
            b, block, lambda idx, b=b: chunked(lambda x: _take(b, x, idx)))
        sparse = lambda x, b=b: b.sparse_scores(x, l0)  # noqa: E731
        triplets = _triplets(sparse, x_train)
        methods[b.name, "sparse"] = _Method(
            b.n_features, b.signed, lambda y, n_best, b=b, t=triplets: best_sparse_features(*t, b.n_candidates, y, n_best),
            lambda idx, sparse=sparse: chunked(lambda x: sparse(x)[:, torch.as_tensor(idx)]),
            lambda idx, t=triplets: triplet_columns(*t, len(x_train), idx))
    return _Level("patch", labels, label_arr[idx_train], label_arr[idx_held], methods,
                  (x_train.numpy(), x_held.numpy()))


def _image_level(inputs: RunInputs, inf: Inference, scorers: list[Baseline], l0: int, select_images: int) -> _Level:
    labels = inputs.shards.image_label_names
    y_all = inputs.shards.image_labels()
    if y_all.shape != (inputs.n_images, len(labels)):
        raise TraitscopeError(f"{inputs.shards.dpath}: image labels are {y_all.shape}, expected "
                              f"({inputs.n_images}, {len(labels)})")
    train_rows, held_rows = split_rows(inputs)
    if len(train_rows) > select_images:
        train_rows = np.sort(np.random.default_rng(3).choice(train_rows, size=select_images, replace=False))
    methods = {}
    for b in scorers:
        # pooled per image, a negated feature is max(-s) = -min(s): pool the candidates themselves
        for scoring, cand in (("dense", b.candidate_scores), ("sparse", lambda x, b=b: b.sparse_scores(x, l0))):
            if b.name == "sae" and scoring == "sparse":
                image_max = inf.image_max()  # the SAE codes' exact per-image maxima
                sae_train, sae_held = image_max[train_rows].tocoo(), image_max[held_rows]
                triplets = (torch.from_numpy(sae_train.row.astype(np.int64)),
                            torch.from_numpy(sae_train.col.astype(np.int64)),
                            torch.from_numpy(sae_train.data.astype(np.float32)))
                methods[b.name, scoring] = _Method(
                    b.n_features, False,
                    lambda y, n_best, t=triplets, n=b.n_features: best_sparse_features(*t, n, y, n_best),
                    lambda idx, h=sae_held: h[:, idx].toarray(),
                    lambda idx, t=triplets: triplet_columns(*t, len(train_rows), idx))
                continue
            train_pooled = _pooled(inputs, train_rows, cand, "max")
            methods[b.name, scoring] = _dense_method(
                b, lambda s0, s1, t=train_pooled: t[:, s0:s1],
                lambda idx, cand=cand: _pooled(inputs, held_rows, lambda x: cand(x)[:, torch.as_tensor(idx)],
                                               "max").numpy())
            if scoring == "sparse":
                methods[b.name, scoring] = methods[b.name, scoring]._replace(
                    train=lambda idx, t=train_pooled: t[:, torch.as_tensor(idx)])
    probe_x = (_pooled(inputs, train_rows, lambda x: x, "mean").numpy(),
               _pooled(inputs, held_rows, lambda x: x, "mean").numpy())
    return _Level("image", labels, y_all[train_rows], y_all[held_rows], methods, probe_x)


@torch.no_grad()
def align(inputs: RunInputs, inf: Inference, baselines: list[Baseline], select_tokens: int = FIT_TOKENS,
          select_images: int = SELECT_IMAGES, eval_tokens: int = EVAL_TOKENS,
          progress: bool = False) -> list[LabelScore]:
    """Score every label of the shards against the SAE, the baselines and the probe, in dense and in
    sparse scoring (the sparse baselines keep the SAE's mean L0 over the data set)."""
    shards = inputs.shards
    scorers = [SAEScores(inputs.sae), *baselines]
    l0 = mean_l0(inf)
    builders = []
    if shards.patch_label_names and inputs.token_kind == "patches":
        builders.append(lambda: _patch_level(inputs, scorers, l0, select_tokens, eval_tokens))
    if shards.image_label_names:
        builders.append(lambda: _image_level(inputs, inf, scorers, l0, select_images))
    if not builders:
        why = "its patch labels need a patch-level SAE" if shards.patch_label_names else "it has no labels"
        raise TraitscopeError(f"nothing to align in {shards.dpath}: {why} (make shards with --labels, "
                              "segmentation masks or a synthetic trait set)")
    bar = tqdm(total=len(builders) * (2 * len(scorers) + 2), desc="align", unit="step", disable=not progress)
    rows: list[LabelScore] = []
    for build in builders:
        level = build()
        bar.update(1)
        y_train, y_held = level.y_train.astype(np.float32), level.y_held.astype(np.float32)
        base_train = y_train.mean(0) if len(y_train) else np.zeros(len(level.labels))
        base_held = y_held.mean(0) if len(y_held) else np.full(len(level.labels), np.nan)

        def row(j: int, method: str, scoring: str, feature: str, train_ap: float,
                held_scores: np.ndarray | None) -> LabelScore:
            ap, purity = heldout_scores(y_held[:, j], held_scores) if held_scores is not None else (np.nan, np.nan)
            name = level.labels[j]
            return LabelScore(level.name, name, _is_dominant(name, float(base_train[j])), float(base_held[j]),
                              int(y_held[:, j].sum()), method, scoring, feature, float(train_ap), ap, purity)

        set_rows = []
        for (method, scoring), m in level.methods.items():
            pool, pool_ap = m.select(torch.from_numpy(y_train), SET_POOL if m.train else 1)
            idx, train_ap = pool[0], pool_ap[0]
            valid = idx >= 0
            held = np.full((len(y_held), len(level.labels)), np.nan)
            if valid.any():
                held[:, valid] = m.held(idx[valid])
            rows += [row(j, method, scoring, m.name(int(idx[j])) if valid[j] else "", train_ap[j],
                         held[:, j] if valid[j] else None) for j in range(len(level.labels))]
            if m.train:
                sets = side_by_side(lambda j: _grow(m, pool[:, j], y_train[:, j]) if valid[j] else None,
                                    range(len(level.labels)))
                held_sets = _held_sets(m, sets)
                set_rows += [row(j, method, "set", "+".join(m.name(int(i)) for i in sets[j][0]), sets[j][1],
                                 held_sets[j]) if sets[j] else row(j, method, "set", "", np.nan, None)
                             for j in range(len(level.labels))]
            bar.update(1)
        rows += set_rows
        probe = _probe(level.probe_x[0], y_train, level.probe_x[1])
        rows += [row(j, "probe", "dense", "", np.nan, None if np.isnan(probe[:, j]).any() else probe[:, j])
                 for j in range(len(level.labels))]
        bar.update(1)
    bar.close()
    return rows


class _Set(NamedTuple):
    features: np.ndarray
    """Candidate indices, in the order they joined."""
    train_ap: float
    scale: np.ndarray
    """Each feature's largest score on the training items."""


def _grow(m: _Method, pool: np.ndarray, y_n: np.ndarray) -> _Set:
    """A label's set, grown from its pool of best features (best first) on the training items."""
    pool = pool[pool >= 0]
    columns = m.train(pool)
    chosen, train_ap = grow_set(columns, torch.from_numpy(y_n))
    return _Set(pool[chosen], train_ap, columns[:, chosen].amax(0).clamp(min=1e-30).numpy())


def _held_sets(m: _Method, sets: list[_Set | None]) -> list[np.ndarray | None]:
    """Each set's held-out scores (the largest scaled score of its features), from one pass over the
    held-out items for every feature of every set."""
    used = np.unique(np.concatenate([s.features for s in sets if s] or [np.zeros(0, np.int64)]))
    if not len(used):
        return [None] * len(sets)
    held = m.held(used)
    return [(held[:, np.searchsorted(used, s.features)] / s.scale).max(1) if s else None for s in sets]


def summarise(rows: list[LabelScore]) -> list[MethodSummary]:
    """Mean held-out AP and coverage per (level, method, scoring), over non-dominant labels with an AP."""
    out = []
    for level, method, scoring in dict.fromkeys((r.level, r.method, r.scoring) for r in rows):
        aps = [r.ap for r in rows if (r.level, r.method, r.scoring) == (level, method, scoring)
               and not r.dominant and not np.isnan(r.ap)]
        out.append(MethodSummary(level, method, scoring, float(np.mean(aps)) if aps else float("nan"),
                                 float(np.mean([a >= COVERAGE_AP for a in aps])) if aps else float("nan"), len(aps)))
    return out


class Comparison(NamedTuple):
    """The SAE against one baseline, in one scoring, at one level."""

    level: str
    scoring: str
    sae: MethodSummary
    baseline: MethodSummary
    outcome: str
    """'beats' (mean AP and coverage at least as high, one higher), 'is beaten by' (the reverse),
    'ties with', or 'splits with' (one higher, the other lower)."""


def compare(summaries: list[MethodSummary]) -> list[Comparison]:
    """The SAE against each baseline scored the same way (dense with dense, sparse with sparse)."""
    by = {(s.level, s.method, s.scoring): s for s in summaries}
    out = []
    for (level, method, scoring), other in by.items():
        sae = by.get((level, "sae", scoring))
        if sae is None or method in ("sae", "probe"):
            continue
        d = np.nan_to_num([sae.mean_ap - other.mean_ap, sae.coverage - other.coverage])
        outcome = ("ties with" if not d.any() else "beats" if (d >= 0).all() else
                   "is beaten by" if (d <= 0).all() else "splits with")
        out.append(Comparison(level, scoring, sae, other, outcome))
    return out


SCORING_TEXT = {"dense": "Dense scores (SAE pre-activations; dense dimensions, PCA projections, k-means −distance)",
                "sparse": "Sparse scores (SAE codes; dense dimensions and PCA projections kept at the SAE's L0 per "
                          "token, k-means hard assignment)",
                "set": f"Sets of up to {SET_SIZE} features (sparse scores, an item scoring the largest of its "
                       "features' scores, each scaled to its largest on the training items; k-means: a union of clusters)"}
HEADLINE = ("dense", "sparse")
"""The scorings of the headline: the single best feature (sets are a secondary view)."""


def headline(summaries: list[MethodSummary], level: str, scorings: tuple[str, ...] = HEADLINE) -> list[str]:
    """One plain sentence per scoring of the headline (or of `scorings`): does the SAE beat each
    baseline scored the same way?"""
    lines = []
    for scoring in scorings:
        text = SCORING_TEXT[scoring]
        comps = [c for c in compare(summaries) if c.level == level and c.scoring == scoring]
        if not comps or not comps[0].sae.n_labels:
            continue
        sae = comps[0].sae
        verdicts = ", ".join(f"{c.outcome} {c.baseline.method} ({_fmt(c.baseline.mean_ap)}, "
                             f"{_fmt(c.baseline.coverage, '.0%')})" for c in comps)
        wins = sum(c.outcome == "beats" for c in comps)
        lines.append(f"{text}: the SAE (mean AP {_fmt(sae.mean_ap)}, coverage {_fmt(sae.coverage, '.0%')}) "
                     f"{verdicts}; it beats {_count_of(wins, len(comps), 'baseline')}.")
    return lines


def _count_of(n: int, total: int, noun: str) -> str:
    """'every baseline', 'the one baseline', '2 of 3 baselines', 'none of the 3 baselines'."""
    if n == total:
        return f"every {noun}" if total > 1 else f"the one {noun}"
    return f"{n} of {total} {noun}s" if n else f"none of the {total} {noun}s" if total > 1 else f"not the one {noun}"


# --- output --------------------------------------------------------------------------------------

COLUMNS = {"dense": (("sae", "sae pre-act"), ("dense", "dense"), ("pca", "pca"), ("kmeans", "kmeans −dist"),
                     ("probe", "probe")),
           "sparse": (("sae", "sae codes"), ("dense", "dense top-L0"), ("pca", "pca top-L0"),
                      ("kmeans", "kmeans hard")),
           "set": (("sae", "sae set"), ("dense", "dense top-L0 set"), ("pca", "pca top-L0 set"),
                   ("kmeans", "kmeans clusters"))}
"""Per scoring: (method, column title) of the per-label tables, in order."""


def _fmt(v: float, spec: str = ".3f") -> str:
    return "n/a" if v is None or np.isnan(v) else format(v, spec)


def read_alignment(csv_fpath: Path) -> list[LabelScore]:
    """The rows of an alignment.csv; files written before the `scoring` column scored the SAE by its
    codes (sparse) and every other method densely."""
    rows = []
    with open(csv_fpath, newline="") as f:
        for r in csv.DictReader(f):
            scoring = r.get("scoring") or ("sparse" if r["method"] == "sae" else "dense")
            rows.append(LabelScore(r["level"], r["label"], r["dominant"] == "True", float(r["base_rate"]),
                                   int(r["n_pos"]), r["method"], scoring, r["feature"], float(r["train_ap"]),
                                   float(r["ap"]), float(r["purity"])))
    return rows


def write_report(rows: list[LabelScore], csv_fpath: Path, md_fpath: Path) -> str:
    """alignment.csv (one row per level, label, method and scoring) and alignment.md; returns the markdown."""
    with atomic_open(csv_fpath, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(LabelScore._fields)
        writer.writerows(rows)
    md = alignment_markdown(rows)
    atomic_write_bytes(md_fpath, md.encode())
    return md


def alignment_markdown(rows: list[LabelScore]) -> str:
    """Per level: the like-for-like headline, the summary per method and scoring, the per-label tables."""
    lines = []
    for level in dict.fromkeys(r.level for r in rows):
        at = [r for r in rows if r.level == level]
        summaries = summarise(at)
        by = {(s.method, s.scoring): s for s in summaries}
        verdicts = [f"- {h}" for h in headline(summaries, level)]
        lines += [f"## {level}-level labels", "", *verdicts, *([""] if verdicts else []),
                  f"Summary over {level}-level labels (not dominant, with held-out positives); coverage is the share "
                  "with AP >= 0.5:", "",
                  "| method | " + " | ".join(f"{s}: mean AP | {s}: coverage" for s in COLUMNS) + " | labels |",
                  "| --- | " + "---: | " * (2 * len(COLUMNS)) + "---: |"]
        for method in dict.fromkeys(s.method for s in summaries):
            got = [by.get((method, scoring)) for scoring in COLUMNS]
            cells = [f"{_fmt(x.mean_ap)} | {_fmt(x.coverage, '.0%')}" if x else " | " for x in got]
            n = next(x for x in got if x).n_labels
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {n} |")
        sets = headline(summaries, level, ("set",))
        lines += ["", *(f"Secondary view. {h}" for h in sets), *([""] if sets else [])]
        for scoring, columns in COLUMNS.items():
            cols = [(m, title) for m, title in columns if (m, scoring) in {(r.method, r.scoring) for r in at}]
            if not cols:
                continue
            lines += [f"### {level}-level, {SCORING_TEXT[scoring][0].lower() + SCORING_TEXT[scoring][1:]}", "",
                      ("Held-out AP / purity@16 of each label's best set of features (chosen on training images; "
                       "feature indices in brackets, `-i`: negated)" if scoring == "set" else
                       "Held-out AP / purity@16 of each label's best single feature (chosen on training images; "
                       "feature index in brackets, `-i`: negated)")
                      + ("; the probe is a logistic regression on the dense activations (the ceiling)."
                         if any(m == "probe" for m, _ in cols) else "."), ""]
            for dominant in (False, True):
                labels = list(dict.fromkeys(r.label for r in at if r.dominant == dominant))
                if not labels:
                    continue
                if dominant:
                    lines += ["Dominant labels (base rate > 0.5 or 'background': high AP by base rate alone; "
                              "not in the summary):", ""]
                lines += ["| label | base rate | " + " | ".join(t for _, t in cols) + " |",
                          "| --- | ---: | " + " | ".join("---:" for _ in cols) + " |"]
                for label in labels:
                    cells = {r.method: r for r in at if r.label == label and (r.scoring == scoring or r.method == "probe")}
                    any_row = next(iter(cells.values()))
                    text = [f"{_fmt(cells[m].ap)} / {_fmt(cells[m].purity, '.2f')}" +
                            (f" [{cells[m].feature}]" if cells[m].feature else "") if m in cells else "" for m, _ in cols]
                    lines.append(f"| {label} | {_fmt(any_row.base_rate, '.3f')} | " + " | ".join(text) + " |")
                lines.append("")
    return "\n".join(lines)
