"""JumpReLU SAE with one threshold per latent, for SAEs trained elsewhere (SAELens' `jumprelu`).

    f = ReLU(pre) · [pre > θ],   pre = W_encᵀ(x − b_dec) + b_enc,   θ: (d_sae,)

traitscope trains BatchTopK instead (its JumpReLU threshold is one number); this variant exists so an
imported per-latent JumpReLU computes the same codes as the library that trained it.
"""

import torch

from traitscope.errors import TraitscopeError
from traitscope.sae.base import SAE, ForwardOutput, SAEConfig, register


@register
class JumpReLUSAE(SAE):
    variant = "jumprelu"
    input_scaled = SAE.input_scaled + ("threshold",)

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))

    def encode(self, x_bd: torch.Tensor) -> torch.Tensor:
        pre_bs = self.pre_acts(x_bd)
        return pre_bs.relu() * (pre_bs > self.threshold)

    def forward(self, x_bd: torch.Tensor, dead_s: torch.Tensor | None = None, progress: float = 1.0) -> ForwardOutput:
        raise TraitscopeError("jumprelu SAEs are imported (e.g. from SAELens), not trained by traitscope; "
                              "train batchtopk for a JumpReLU at inference")
