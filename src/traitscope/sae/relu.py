"""ReLU SAE with an L1 penalty: the classic form (Anthropic, 'Towards Monosemanticity' and its
April 2024 update), as used in the faces experiment.

    x̄ = x − b_dec;  f = ReLU(W_encᵀ x̄ + b_enc);  x̂ = W_dec f + b_dec
    loss = ‖x − x̂‖² + λ' Σ_i f_i ‖W_dec[i]‖,   λ' = warm-up · λ / √d_model

The decoder rows are free; the L1 term is weighted by their norms, so shrinking a row cannot buy a
smaller penalty. λ is in the convention where inputs are scaled to E‖x‖² = d_model (λ = 5 is the
update's starting point); training scales inputs to E‖x‖² = 1, hence the 1/√d_model. The trainer warms
λ up linearly over the first `l1_warmup` of training. On save, latents are rescaled so decoder rows have unit norm (codes then
measure each feature's contribution), which leaves reconstructions unchanged.
"""

import dataclasses
import math

import torch

from traitscope.errors import TraitscopeError
from traitscope.sae.base import SAE, ForwardOutput, SAEConfig, SAEParams, register

INIT_ROW_NORM = 0.1
"""Decoder rows start as random directions of this norm (the April 2024 update's initialisation)."""


@dataclasses.dataclass
class ReluParams(SAEParams):
    l1_coeff: float = 5.0
    """L1 coefficient λ, in the convention of inputs scaled to E‖x‖² = d_model."""
    l1_warmup: float = 0.05
    """Fraction of training over which λ ramps up linearly from 0."""

    def resolved(self, d_model: int, d_sae: int) -> "ReluParams":
        if self.l1_coeff < 0:
            raise TraitscopeError(f"the L1 coefficient must be >= 0, not {self.l1_coeff}")
        if not 0 <= self.l1_warmup <= 1:
            raise TraitscopeError(f"l1_warmup must be between 0 and 1, not {self.l1_warmup}")
        return dataclasses.replace(self, l1_coeff=float(self.l1_coeff))

    def label(self) -> str:
        return f"l1_{self.l1_coeff:g}"

    def describe(self) -> str:
        return f"λ={self.l1_coeff:g}"

    def default_lr(self, d_sae: int) -> float:
        return 5e-5


@register
class ReluSAE(SAE):
    variant = "relu"
    Params = ReluParams
    unit_norm_decoder = False
    loss_per_token = True

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        with torch.no_grad():
            self.W_dec.mul_(INIT_ROW_NORM)
            self.W_enc.copy_(self.W_dec.T)

    def encode(self, x_bd: torch.Tensor) -> torch.Tensor:
        return self.pre_acts(x_bd).relu()

    def forward(self, x_bd: torch.Tensor, dead_s: torch.Tensor | None = None, progress: float = 1.0) -> ForwardOutput:
        # (x − b_dec) W_enc + b_enc, written so that b_dec's gradient is a vector product, not a
        # third (batch × d_sae × d_model) matrix product
        codes_bs = torch.addmm(self.b_enc - self.b_dec @ self.W_enc, x_bd, self.W_enc).relu()
        x_hat_bd = self.decode(codes_bs).float()
        sse = ((x_hat_bd - x_bd) ** 2).sum()
        l1 = (codes_bs.float() @ self.W_dec.norm(dim=1)).sum()
        n = x_bd.shape[0]
        warmup = self.params.l1_warmup
        lam = (min(1.0, progress / warmup) if warmup > 0 else 1.0) * self.params.l1_coeff / math.sqrt(self.d_model)
        loss = (sse + lam * l1) / n
        with torch.no_grad():
            sst = ((x_bd - x_bd.mean(0)) ** 2).sum().clamp_min(1e-12)
            n_fired_s = torch.count_nonzero(codes_bs, dim=0)
        parts = {"nmse": (sse / sst).detach(), "mse": (sse / n).detach(), "l1": (l1 / n).detach(),
                 "l0": n_fired_s.sum() / n}
        return ForwardOutput(x_hat_bd, loss, parts, n_fired_s)
