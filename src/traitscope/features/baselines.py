"""Baselines that need no SAE: the raw dense dimensions, PCA and k-means, on the same activations.

Each gives per-token feature scores (for alignment: is there one direction that already finds the
trait?) and a reconstruction with its codes (for the metrics table):

- dense: the d_model dimensions themselves; codes = x, reconstruction exact.
- pca: principal components of training tokens (scikit-learn `PCA`); scores are the projections on
  every component, the reconstruction keeps the first `k` (codes: those k projections).
- kmeans: `MiniBatchKMeans` centroids; scores are the negative distance to each centroid, the
  reconstruction is the nearest centroid (codes: one-hot).

Dense and PCA directions have no preferred sign, so alignment scores both signs (`signed`).

Alignment also scores each baseline the way an SAE's codes score: sparsely (`sparse_scores`), where
a token has at most a few non-zero features and ties every other feature at zero. Dense and PCA keep
each token's `l0` largest signed scores (feature i and its negation are separate candidates, so a
token's code is its l0 largest of the 2n values +s, −s), with l0 the SAE's own mean L0; k-means is
the hard assignment (1 at the nearest centroid).
Fitted baselines are saved as safetensors (pickle-free), once per shards, layer and training split
(`traitscope.features.heldout.baselines_for`).
"""

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from traitscope.files import atomic_save_safetensors

if TYPE_CHECKING:
    from sklearn.decomposition import PCA


class Baseline:
    """A fixed map from activations to feature scores and to a reconstruction."""

    name: str
    signed: bool = False
    """Whether a feature's negation is an equally valid feature (alignment scores both)."""

    @property
    def n_features(self) -> int:
        raise NotImplementedError

    @property
    def n_codes(self) -> int:
        """Width of the reconstruction's codes."""
        return self.n_features

    @property
    def label(self) -> str:
        """Row name in the tables."""
        return self.name

    def scores(self, x_bd: torch.Tensor, features: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """(batch, n_selected) scores of the features selected by `features` (a slice or an index
        tensor): higher means more of the feature."""
        raise NotImplementedError

    @property
    def n_candidates(self) -> int:
        """Features alignment chooses from: with `signed`, candidate n_features + i is feature i negated."""
        return self.n_features * (2 if self.signed else 1)

    def candidate_scores(self, x_bd: torch.Tensor) -> torch.Tensor:
        """(batch, n_candidates) scores of every candidate (signed: the negations after the features)."""
        s = self.scores(x_bd)
        return torch.cat([s, -s], 1) if self.signed else s

    def sparse_scores(self, x_bd: torch.Tensor, l0: int) -> torch.Tensor:
        """(batch, n_candidates) non-negative scores with at most `l0` non-zero per token: each token's
        `l0` largest candidate scores (signed: of +s and −s), every other candidate 0."""
        cand = self.candidate_scores(x_bd)
        values, idx = cand.topk(min(l0, cand.shape[1]), dim=1)
        return torch.zeros_like(cand).scatter_(1, idx, values.clamp_(min=0))

    def reconstruct(self, x_bd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂ (batch, d_model), codes (batch, n_codes)) for the metrics table."""
        raise NotImplementedError


class DenseBaseline(Baseline):
    name, signed = "dense", True

    def __init__(self, d_model: int):
        self.d_model = d_model

    @property
    def n_features(self) -> int:
        return self.d_model

    def scores(self, x_bd, features=slice(None)):
        return x_bd[:, features]

    def reconstruct(self, x_bd):
        return x_bd, x_bd


class PCABaseline(Baseline):
    name, signed = "pca", True

    def __init__(self, mean_d: torch.Tensor, components_cd: torch.Tensor, k: int):
        self.mean_d, self.components_cd, self.k = mean_d, components_cd, k

    @property
    def n_features(self) -> int:
        return self.components_cd.shape[0]

    @property
    def n_codes(self) -> int:
        return self.k

    @property
    def label(self) -> str:
        return f"pca (k={self.k})"

    def scores(self, x_bd, features=slice(None)):
        return (x_bd - self.mean_d) @ self.components_cd[features].T

    def reconstruct(self, x_bd):
        comps = self.components_cd[:self.k]
        codes = (x_bd - self.mean_d) @ comps.T
        return codes @ comps + self.mean_d, codes


class KMeansBaseline(Baseline):
    name = "kmeans"

    def __init__(self, centers_cd: torch.Tensor):
        self.centers_cd = centers_cd
        self.center_sq = (centers_cd * centers_cd).sum(1)

    @property
    def n_features(self) -> int:
        return self.centers_cd.shape[0]

    @property
    def label(self) -> str:
        return f"kmeans ({self.n_features})"

    def sq_dist(self, x_bd: torch.Tensor, features: slice = slice(None)) -> torch.Tensor:
        centers = self.centers_cd[features]
        return ((x_bd * x_bd).sum(1, keepdim=True) - 2 * x_bd @ centers.T + self.center_sq[features]).clamp_(min=0)

    def scores(self, x_bd, features=slice(None)):
        return -self.sq_dist(x_bd, features).sqrt_()

    def sparse_scores(self, x_bd, l0):
        """The hard assignment: 1 at each token's nearest centroid (whatever `l0`)."""
        return self.reconstruct(x_bd)[1]

    def reconstruct(self, x_bd):
        nearest = self.sq_dist(x_bd).argmin(1)
        codes = torch.zeros(x_bd.shape[0], self.n_features, dtype=x_bd.dtype)
        codes[torch.arange(x_bd.shape[0]), nearest] = 1
        return self.centers_cd[nearest], codes


BASELINES_FORMAT = "traitscope-baselines/2"
"""Names how the baselines are fitted; a cached fit of another format is not reused."""
KMEANS_EPOCHS = 3
"""Passes of mini-batch k-means over the fitting tokens. Mini-batch k-means moves its centroids
little after the first passes (benchmarks/bench_inference.py prints the held-out error of 3 passes
against scikit-learn's 20 with early stopping), and each pass costs n_tokens x n_clusters x d_model."""
KMEANS_BATCH = 4096
"""Tokens per mini-batch (at least the number of centroids)."""


def fit_pca(x_nd: np.ndarray) -> "PCA":
    """Every principal component, from the d_model x d_model covariance (n_tokens x d_model^2 work,
    not an SVD of the token matrix)."""
    from sklearn.decomposition import PCA  # here: 2 s to import, which commands that only load baselines skip

    n, d_model = x_nd.shape
    solver = "covariance_eigh" if n >= d_model else "full"
    return PCA(n_components=min(d_model, n), svd_solver=solver).fit(x_nd)


def fit_kmeans(x_nd: np.ndarray, n_clusters: int, seed: int = 0, epochs: int = KMEANS_EPOCHS,
               progress: bool = False) -> np.ndarray:
    """(n_clusters, d_model) centroids of scikit-learn's `MiniBatchKMeans`, fed one mini-batch at a
    time (`partial_fit`) behind a progress bar; started from n_clusters distinct tokens drawn at
    random (k-means++ seeding costs as much as several passes at thousands of centroids)."""
    from sklearn.cluster import MiniBatchKMeans  # imported here, as in fit_pca

    n = len(x_nd)
    n_clusters = max(1, min(n_clusters, n))
    rng = np.random.default_rng(seed)
    init = x_nd[np.sort(rng.choice(n, n_clusters, replace=False))]
    kmeans = MiniBatchKMeans(n_clusters=n_clusters, init=init, n_init=1, compute_labels=False,
                             random_state=seed)
    n_batches = max(1, n // max(KMEANS_BATCH, n_clusters))  # every batch holds >= n_clusters tokens
    with tqdm(total=epochs * n, unit="tok", unit_scale=True, desc=f"k-means ({n_clusters} centroids)",
              disable=not progress) as bar:
        for _ in range(epochs):
            for batch in np.array_split(rng.permutation(n), n_batches):
                kmeans.partial_fit(x_nd[np.sort(batch)])
                bar.update(len(batch))
    return kmeans.cluster_centers_


def fit_baselines(x_fit_bd: np.ndarray, pca_k: int, n_clusters: int, seed: int = 0,
                  progress: bool = False) -> list[Baseline]:
    """Fit PCA (all components; the first `pca_k` reconstruct) and k-means on training tokens."""
    x = np.ascontiguousarray(x_fit_bd, dtype=np.float32)
    pca = fit_pca(x)
    centers = fit_kmeans(x, n_clusters, seed=seed, progress=progress)
    return [DenseBaseline(x.shape[1]),
            PCABaseline(torch.from_numpy(pca.mean_.astype(np.float32)),
                        torch.from_numpy(pca.components_.astype(np.float32)), min(pca_k, pca.n_components_)),
            KMeansBaseline(torch.from_numpy(centers.astype(np.float32)))]


def save_baselines(baselines: list[Baseline], fpath: Path, info: dict) -> None:
    """One safetensors file with the fitted parameters; `info` (what they were fitted on) as metadata."""
    tensors, meta = {}, {"info": json.dumps(info)}
    for b in baselines:
        if isinstance(b, DenseBaseline):
            meta["d_model"] = str(b.d_model)
        elif isinstance(b, PCABaseline):
            tensors.update(pca_mean=b.mean_d, pca_components=b.components_cd)
            meta["pca_k"] = str(b.k)
        elif isinstance(b, KMeansBaseline):
            tensors["kmeans_centers"] = b.centers_cd
    atomic_save_safetensors(fpath, {k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


def with_pca_k(baselines: list[Baseline], pca_k: int) -> list[Baseline]:
    """The same baselines with PCA reconstructing from its first `pca_k` components."""
    return [PCABaseline(b.mean_d, b.components_cd, min(pca_k, b.n_features)) if isinstance(b, PCABaseline) else b
            for b in baselines]


def load_baselines(fpath: Path) -> tuple[list[Baseline], dict]:
    """The baselines saved by `save_baselines`, and their `info`."""
    from safetensors import safe_open

    with safe_open(str(fpath), framework="pt") as f:
        meta = f.metadata()
    t = load_file(str(fpath))
    baselines = [DenseBaseline(int(meta["d_model"])),
                 PCABaseline(t["pca_mean"], t["pca_components"], int(meta["pca_k"])),
                 KMeansBaseline(t["kmeans_centers"])]
    return baselines, json.loads(meta["info"])
