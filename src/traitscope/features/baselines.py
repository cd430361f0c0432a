"""Baselines that need no SAE: the raw dense dimensions, PCA and k-means, on the same activations.

Each gives per-token feature scores (for alignment: is there one direction that already finds the
trait?) and a reconstruction with its codes (for the metrics table):

- dense: the d_model dimensions themselves; codes = x, reconstruction exact.
- pca: principal components of training tokens (scikit-learn `PCA`); scores are the projections on
  every component, the reconstruction keeps the first `k` (codes: those k projections).
- kmeans: `MiniBatchKMeans` centroids; scores are the negative distance to each centroid, the
  reconstruction is the nearest centroid (codes: one-hot).

Dense and PCA directions have no preferred sign, so alignment scores both signs (`signed`).
Fitted baselines are saved as safetensors (pickle-free) next to the inference results.
"""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from sklearn.cluster import MiniBatchKMeans
from sklearn.decomposition import PCA

from traitscope.files import atomic_save_safetensors


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

    def scores(self, x_bd: torch.Tensor, features: slice = slice(None)) -> torch.Tensor:
        """(batch, n_selected) scores of features[features]: higher means more of the feature."""
        raise NotImplementedError

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

    def reconstruct(self, x_bd):
        nearest = self.sq_dist(x_bd).argmin(1)
        codes = torch.zeros(x_bd.shape[0], self.n_features, dtype=x_bd.dtype)
        codes[torch.arange(x_bd.shape[0]), nearest] = 1
        return self.centers_cd[nearest], codes


def fit_baselines(x_fit_bd: np.ndarray, pca_k: int, n_clusters: int, seed: int = 0) -> list[Baseline]:
    """Fit PCA (all components; the first `pca_k` reconstruct) and k-means on training tokens."""
    x = np.asarray(x_fit_bd, dtype=np.float32)
    n, d_model = x.shape
    pca = PCA(n_components=min(d_model, n), svd_solver="full").fit(x)
    n_clusters = max(1, min(n_clusters, n))
    kmeans = MiniBatchKMeans(n_clusters=n_clusters, random_state=seed, batch_size=4096, n_init=1,
                             max_iter=20, init_size=min(n, max(3 * 4096, 3 * n_clusters))).fit(x)
    return [DenseBaseline(d_model),
            PCABaseline(torch.from_numpy(pca.mean_.astype(np.float32)),
                        torch.from_numpy(pca.components_.astype(np.float32)), min(pca_k, pca.n_components_)),
            KMeansBaseline(torch.from_numpy(kmeans.cluster_centers_.astype(np.float32)))]


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
