"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"): one learnt threshold per latent, an L0
penalty, both trained through straight-through estimators.

    f = ReLU(pre) · H(pre − θ),   pre = W_encᵀ(x − b_dec) + b_enc,   θ: (d_sae,)
    loss = ‖x − x̂‖² + λ · ‖f‖₀   (means over the batch's tokens; inputs scaled to E‖x‖² = 1)

H (the step) has no useful derivative, so θ learns from pseudo-derivatives: with the rectangle kernel
K(u) = 1 for |u| < ½ and the bandwidth ε,

    ∂f/∂θ := −(θ/ε) · K((pre − θ)/ε),   ∂H(pre − θ)/∂θ := −(1/ε) · K((pre − θ)/ε)

the pre-activations get their ordinary gradient from f (ReLU · H) and none from the L0 term. Only tokens
whose pre-activation lies within ε/2 of θ move θ: the L0 term raises it, the reconstruction lowers it
where a latent's contribution is worth its cost. The ReLU in front makes a threshold below zero act as
zero (the jump in its pseudo-derivative is then max(θ, 0)), and the L0 term pushes such a θ back up.
θ is the `threshold` tensor itself (the paper learns log θ), so a trained SAE has the tensors of a
SAELens `jumprelu` SAE and one imported from SAELens computes the same codes as the library that
trained it. Decoder rows stay unit-norm, as in Gemma Scope (Lieberum et al. 2024).
"""

import dataclasses

import torch

from traitscope.errors import TraitscopeError
from traitscope.sae.base import SAE, ForwardOutput, SAEConfig, SAEParams, register


@dataclasses.dataclass
class JumpReLUParams(SAEParams):
    l0_coeff: float = 2e-3
    """λ of the L0 penalty, in the convention of inputs scaled to E‖x‖² = 1 (larger: sparser)."""
    bandwidth: float = 1e-3
    """ε, the width of the kernel in the thresholds' pseudo-derivative (in those input units)."""
    init_threshold: float = 1e-3
    """Every latent's threshold at the start."""
    l0_warmup: float = 0.05
    """Fraction of training over which λ ramps up linearly from 0."""

    def resolved(self, d_model: int, d_sae: int) -> "JumpReLUParams":
        checks = [(self.l0_coeff >= 0, f"l0_coeff must be >= 0, not {self.l0_coeff}"),
                  (self.bandwidth > 0, f"bandwidth must be > 0, not {self.bandwidth}"),
                  (self.init_threshold >= 0, f"init_threshold must be >= 0, not {self.init_threshold}"),
                  (0 <= self.l0_warmup <= 1, f"l0_warmup must be between 0 and 1, not {self.l0_warmup}")]
        for ok, message in checks:
            if not ok:
                raise TraitscopeError(message)
        return dataclasses.replace(self, l0_coeff=float(self.l0_coeff))

    def label(self) -> str:
        return f"l0_{self.l0_coeff:g}"

    def describe(self) -> str:
        return f"λ(L0)={self.l0_coeff:g}"


@register
class JumpReLUSAE(SAE):
    variant = "jumprelu"
    Params = JumpReLUParams
    loss_per_token = True
    input_scaled = SAE.input_scaled + ("threshold",)

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.threshold = torch.nn.Parameter(torch.full((cfg.d_sae,), self.params.init_threshold))

    def encode(self, x_bd: torch.Tensor) -> torch.Tensor:
        pre_bs = self.pre_acts(x_bd)
        return pre_bs.relu() * (pre_bs > self.threshold)

    def forward(self, x_bd: torch.Tensor, dead_s: torch.Tensor | None = None, progress: float = 1.0) -> ForwardOutput:
        p = self.params
        # (x − b_dec) W_enc + b_enc, with b_dec's gradient a vector product (as in the ReLU variant)
        pre_bs = torch.addmm(self.b_enc - self.b_dec @ self.W_enc, x_bd, self.W_enc)
        codes_bs = _JumpReLU.apply(pre_bs, self.threshold, p.bandwidth)
        x_hat_bd = self.decode(codes_bs).float()
        n = x_bd.shape[0]
        sse = ((x_hat_bd - x_bd) ** 2).sum()
        l0 = _Step.apply(pre_bs, self.threshold, p.bandwidth).sum()
        lam = (min(1.0, progress / p.l0_warmup) if p.l0_warmup > 0 else 1.0) * p.l0_coeff
        loss = (sse + lam * l0) / n
        with torch.no_grad():
            sst = ((x_bd - x_bd.mean(0)) ** 2).sum().clamp_min(1e-12)
            n_fired_s = torch.count_nonzero(codes_bs, dim=0)
        parts = {"nmse": (sse / sst).detach(), "mse": (sse / n).detach(), "l0": n_fired_s.sum() / n,
                 "threshold": self.threshold.detach().mean()}
        return ForwardOutput(x_hat_bd, loss, parts, n_fired_s)


def _kernel(pre_bs: torch.Tensor, threshold_s: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """K((pre − θ)/ε) / ε with the rectangle kernel K, in float32."""
    return ((pre_bs.float() - threshold_s).abs() < bandwidth / 2).float() / bandwidth


class _JumpReLU(torch.autograd.Function):
    """ReLU(pre) · H(pre − θ); θ's gradient from the pseudo-derivative −(max(θ, 0)/ε) K((pre − θ)/ε)."""

    @staticmethod
    def forward(ctx, pre_bs, threshold_s, bandwidth):
        ctx.save_for_backward(pre_bs, threshold_s)
        ctx.bandwidth = bandwidth
        return pre_bs.relu() * (pre_bs > threshold_s)

    @staticmethod
    def backward(ctx, grad_bs):
        pre_bs, threshold_s = ctx.saved_tensors
        grad_pre = grad_bs * ((pre_bs > threshold_s) & (pre_bs > 0))
        grad_threshold = -threshold_s.clamp_min(0) * (grad_bs.float() * _kernel(pre_bs, threshold_s, ctx.bandwidth)).sum(0)
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    """H(pre − θ) (the latent fires); θ's gradient from −(1/ε) K((pre − θ)/ε), none for pre."""

    @staticmethod
    def forward(ctx, pre_bs, threshold_s, bandwidth):
        ctx.save_for_backward(pre_bs, threshold_s)
        ctx.bandwidth = bandwidth
        return ((pre_bs > threshold_s) & (pre_bs > 0)).float()

    @staticmethod
    def backward(ctx, grad_bs):
        pre_bs, threshold_s = ctx.saved_tensors
        return None, -(grad_bs.float() * _kernel(pre_bs, threshold_s, ctx.bandwidth)).sum(0), None
