"""Matryoshka SAE (Bussmann et al. 2025; Nabeshima 2024): nested prefixes of the dictionary each
reconstruct the input.

With prefixes m_1 < m_2 < … < m_G = d_sae, the first m_g latents alone must reconstruct x:

    x̂_g = Σ_{j < m_g} f_j W_dec[j] + b_dec;   loss = mean_g ‖x − x̂_g‖² / ‖x − mean(x)‖²

so early latents learn general features and later ones refine them. Codes come from BatchTopK (a
JumpReLU with a learned threshold at inference), as in the paper. In training the active entries of
each token are decoded per prefix group in one sparse pass, and a cumulative sum gives every x̂_g.
"""

import dataclasses

import torch

from traitscope.errors import TraitscopeError
from traitscope.sae.base import SAEConfig, register
from traitscope.sae.batchtopk import BatchTopKSAE
from traitscope.sae.sparse import Selection, decode_sparse, make_selection
from traitscope.sae.topk import TopKParams


def default_prefixes(d_sae: int, levels: int = 5) -> list[int]:
    """`levels` sizes halving from d_sae: d_sae/16, d_sae/8, d_sae/4, d_sae/2, d_sae for 5 (dropping sizes
    below 1 and repeats)."""
    return sorted({max(1, d_sae >> shift) for shift in range(levels)})


@dataclasses.dataclass
class MatryoshkaParams(TopKParams):
    prefixes: list[int] | None = None
    """Nested dictionary sizes, the last equal to d_sae (default: prefix_levels sizes halving from d_sae)."""
    prefix_levels: int = 5
    """Default prefixes: this many sizes halving from d_sae (5: d_sae/16 ... d_sae; 7: from d_sae/64).
    Smaller first prefixes found more CamVid classes and fewer synthetic traits (docs/alignment.md)."""

    def resolved(self, d_model: int, d_sae: int) -> "MatryoshkaParams":
        params = super().resolved(d_model, d_sae)
        if self.prefix_levels < 1:
            raise TraitscopeError(f"prefix_levels must be >= 1, not {self.prefix_levels}")
        prefixes = (default_prefixes(d_sae, self.prefix_levels) if self.prefixes is None
                    else [int(v) for v in self.prefixes])
        if (not prefixes or prefixes[-1] != d_sae or prefixes[0] < 1
                or any(a >= b for a, b in zip(prefixes, prefixes[1:]))):
            raise TraitscopeError(f"prefixes {prefixes} must increase strictly from at least 1 and end at "
                                  f"d_sae={d_sae}")
        return dataclasses.replace(params, prefixes=prefixes)


@register
class MatryoshkaSAE(BatchTopKSAE):
    variant = "matryoshka"
    Params = MatryoshkaParams

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("_ends", torch.tensor(self.params.prefixes[:-1], dtype=torch.long), persistent=False)

    @property
    def n_groups(self) -> int:
        return len(self.params.prefixes)

    def selection(self, rows: torch.Tensor, cols: torch.Tensor, n_rows: int) -> Selection:
        """One bag per (token, prefix group): entries sorted by (token, latent) are sorted by bag too."""
        group = torch.bucketize(cols, self._ends, right=True)
        return make_selection(rows, cols, rows * self.n_groups + group, n_rows * self.n_groups, self.d_sae)

    def reconstruction_loss(self, acts: torch.Tensor, sel: Selection, x_bd: torch.Tensor,
                            sst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts_bgd = decode_sparse(acts, self.W_dec, sel).view(x_bd.shape[0], self.n_groups, -1)
        sse, residual_bd = _PrefixSSE.apply(parts_bgd, x_bd - self.b_dec)
        return sse / (sst * self.n_groups), x_bd - residual_bd


class _PrefixSSE(torch.autograd.Function):
    """Σ_g ‖x̄ − Σ_{j<=g} parts_j‖², the squared errors of every prefix reconstruction, and the full
    residual (no gradient). One (batch, d_model) slice at a time, so nothing (batch, groups, d_model)
    is built besides the parts and their gradient."""

    @staticmethod
    def forward(ctx, parts_bgd, xc_bd):
        residual = xc_bd.clone()
        residuals, sse = [], parts_bgd.new_zeros(())
        for g in range(parts_bgd.shape[1]):
            residual = residual - parts_bgd[:, g]
            residuals.append(residual)
            sse = sse + torch.linalg.vecdot(residual.view(-1), residual.view(-1))
        ctx.save_for_backward(*residuals)
        ctx.mark_non_differentiable(residual)
        return sse, residual

    @staticmethod
    def backward(ctx, grad_sse, _grad_residual):
        residuals = ctx.saved_tensors
        grad_parts = torch.empty((residuals[0].shape[0], len(residuals), residuals[0].shape[1]),
                                 dtype=residuals[0].dtype, device=residuals[0].device)
        acc = torch.zeros_like(residuals[0])
        for g in reversed(range(len(residuals))):  # part g enters the residuals of prefixes g, g+1, ...
            acc += residuals[g]
            torch.mul(acc, -2 * grad_sse, out=grad_parts[:, g])
        return grad_parts, acc * (2 * grad_sse)
