"""Reconstruction and sparsity metrics of an encoder/decoder pair on held-out activations.

    NMSE = Σ‖x − x̂‖² / Σ‖x − x̄‖²           (x̄: per-dimension mean of the evaluated tokens)
    explained variance = 1 − Σ_d Var(x_d − x̂_d) / Σ_d Var(x_d)
    L0 = mean number of non-zero codes per token
    dead = share of codes never non-zero; dense = share non-zero on more than 10% of tokens

The same numbers for an SAE (training's validation, `traitscope.features.heldout`) and for the
baselines that need no SAE (`traitscope.features.baselines`), so one table compares them. Everything
is accumulated in float64 over batches: memory does not grow with the number of tokens.
"""

from typing import NamedTuple

import torch

DENSE_THRESHOLD = 0.1
"""A code is 'dense' when it is non-zero on more than this share of tokens."""


class Metrics(NamedTuple):
    """One row of the metrics table."""

    nmse: float
    """Sum of squared errors over the total sum of squares around the per-dimension means."""
    explained_variance: float
    """1 − (summed per-dimension variance of the residual) / (summed per-dimension variance of x)."""
    l0: float
    """Mean number of non-zero codes per token."""
    dead_frac: float
    """Share of codes that are zero on every evaluated token."""
    dense_frac: float
    """Share of codes non-zero on more than 10% of evaluated tokens."""
    n_tokens: int
    """Tokens evaluated."""
    n_codes: int
    """Width of the code (d_sae for an SAE)."""


class MetricsAccumulator:
    """Add batches of (x, x̂, codes); `result()` gives the metrics over everything added."""

    def __init__(self, d_model: int, n_codes: int):
        self.n_codes = n_codes
        self.n = 0
        self.x_sum = torch.zeros(d_model, dtype=torch.float64)
        self.x_sq = torch.zeros(d_model, dtype=torch.float64)
        self.r_sum = torch.zeros(d_model, dtype=torch.float64)
        self.r_sq = torch.zeros(d_model, dtype=torch.float64)
        self.fire = torch.zeros(n_codes, dtype=torch.int64)

    @torch.no_grad()
    def add(self, x_bd: torch.Tensor, x_hat_bd: torch.Tensor, codes_bs: torch.Tensor) -> None:
        x, r = x_bd.double().cpu(), (x_bd - x_hat_bd).double().cpu()
        self.n += x.shape[0]
        self.x_sum += x.sum(0)
        self.x_sq += (x * x).sum(0)
        self.r_sum += r.sum(0)
        self.r_sq += (r * r).sum(0)
        self.fire += (codes_bs != 0).sum(0).cpu()

    def result(self) -> Metrics:
        n = max(self.n, 1)
        sst = float((self.x_sq - self.x_sum ** 2 / n).sum())
        sse = float(self.r_sq.sum())
        residual_var = float((self.r_sq - self.r_sum ** 2 / n).sum())
        freq = self.fire.double() / n
        return Metrics(
            nmse=sse / sst if sst > 0 else float("nan"),
            explained_variance=1 - residual_var / sst if sst > 0 else float("nan"),
            l0=float(self.fire.sum()) / n,
            dead_frac=float((self.fire == 0).double().mean()),
            dense_frac=float((freq > DENSE_THRESHOLD).double().mean()),
            n_tokens=self.n,
            n_codes=self.n_codes,
        )
