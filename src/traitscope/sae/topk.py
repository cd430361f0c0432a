"""TopK SAE (Gao et al. 2024): each token keeps its k largest pre-activations, with an AuxK loss.

    f = ReLU(TopK_k(W_encᵀ(x − b_dec) + b_enc));  x̂ = W_dec f + b_dec
    loss = ‖x − x̂‖² / ‖x − mean(x)‖²  (over the batch)  +  α · AuxK

AuxK: the residual e = x − x̂ is reconstructed from the k_aux largest pre-activations among *dead*
latents (no firing for a while); its normalised error pulls dead latents back towards useful
directions. Its coefficients pass a leaky ReLU (slope `auxk_leak` below zero): a latent whose
pre-activation is negative on every token still gets a gradient (docs/training.md, "Dead latents on
low-dimensional data"). This class also holds the sparse training pass the whole TopK family shares (see
`traitscope.sae.sparse`): one dense GEMM for the pre-activations, everything else on the selected
entries only.
"""

import dataclasses
import math

import torch

from traitscope.errors import TraitscopeError
from traitscope.sae.base import SAE, ForwardOutput, SAEConfig, SAEParams, register
from traitscope.sae.sparse import Selection, decode_sparse, encode_at, one_thread, topk_rows, topk_selection


@dataclasses.dataclass
class TopKParams(SAEParams):
    k: int = 32
    """Active latents per token."""
    k_aux: int | None = None
    """Dead latents used by the AuxK loss per token (default d_model / 2)."""
    auxk_alpha: float = 1 / 4
    """Weight of the AuxK loss (0 turns it off)."""
    auxk_leak: float = 0.1
    """Slope of AuxK's coefficients below zero (0: a plain ReLU, under which a latent negative on every token
    gets no gradient and stays dead)."""

    def resolved(self, d_model: int, d_sae: int) -> "TopKParams":
        if not 1 <= self.k <= d_sae:
            raise TraitscopeError(f"k={self.k} must be between 1 and d_sae={d_sae}")
        if self.k_aux is not None and self.k_aux < 1:
            raise TraitscopeError(f"k_aux must be >= 1, not {self.k_aux}")
        if self.auxk_alpha < 0:
            raise TraitscopeError(f"auxk_alpha must be >= 0, not {self.auxk_alpha}")
        if not 0 <= self.auxk_leak < 1:
            raise TraitscopeError(f"auxk_leak must be in [0, 1), not {self.auxk_leak}")
        return dataclasses.replace(self)

    def label(self) -> str:
        return f"k{self.k}"

    def describe(self) -> str:
        return f"k={self.k}"

    def default_lr(self, d_sae: int) -> float:
        """2e-3 / √(d_sae / 16384): ten times the TopK paper's, which learnt half as much per token in runs
        of ~100 steps (docs/training.md)."""
        return 2e-3 / math.sqrt(d_sae / 2 ** 14)

    @property
    def uses_dead_latents(self) -> bool:
        return self.auxk_alpha > 0


@register
class TopKSAE(SAE):
    variant = "topk"
    Params = TopKParams

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self._pre_bs: torch.Tensor | None = None  # reused (batch, d_sae) buffer: no 100 MB allocation a step

    # --- inference ---
    def encode(self, x_bd: torch.Tensor) -> torch.Tensor:
        pre_bs = self.pre_acts(x_bd)
        values_bk, idx_bk = topk_rows(pre_bs, self.params.k)
        return torch.zeros_like(pre_bs).scatter_(1, idx_bk, values_bk.relu())

    def encode_sparse(self, x_bd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The k selected latents per token straight from the pre-activations: no dense code matrix."""
        values_bk, feat_bk = topk_rows(self._pre_acts_into_buffer(x_bd - self.b_dec), self.params.k)
        tok_bk = torch.arange(x_bd.shape[0], device=x_bd.device)[:, None].expand_as(feat_bk)
        fired = values_bk > 0
        return tok_bk[fired], feat_bk[fired], values_bk[fired]

    # --- training ---
    def select(self, pre_bs: torch.Tensor) -> tuple[torch.Tensor, Selection]:
        """Which pre-activations are active in training: values (nnz,) and where they are."""
        return topk_selection(pre_bs, self.params.k)

    def reconstruction_loss(self, acts: torch.Tensor, sel: Selection, x_bd: torch.Tensor,
                            sst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised reconstruction loss, x̂) from the active values."""
        x_hat_bd = decode_sparse(acts, self.W_dec, sel) + self.b_dec
        return ((x_hat_bd - x_bd) ** 2).sum() / sst, x_hat_bd

    def _pre_acts_into_buffer(self, xc_bd: torch.Tensor) -> torch.Tensor:
        shape = (xc_bd.shape[0], self.d_sae)
        dtype = torch.get_autocast_dtype(xc_bd.device.type) if torch.is_autocast_enabled(xc_bd.device.type) \
            else self.W_enc.dtype
        buf = self._pre_bs
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != xc_bd.device:
            buf = self._pre_bs = torch.empty(shape, dtype=dtype, device=xc_bd.device)
        return torch.addmm(self.b_enc.to(dtype), xc_bd.to(dtype), self.W_enc.to(dtype), out=buf)

    def forward(self, x_bd: torch.Tensor, dead_s: torch.Tensor | None = None, progress: float = 1.0) -> ForwardOutput:
        with torch.no_grad():
            xc_bd = x_bd - self.b_dec
            pre_bs = self._pre_acts_into_buffer(xc_bd)  # the one dense GEMM
            values, sel = self.select(pre_bs)
            sst = ((x_bd - x_bd.mean(0)) ** 2).sum().clamp_min(1e-12)
        with torch.autocast(x_bd.device.type, enabled=False):
            acts = encode_at(values.float(), xc_bd, self.W_enc, self.b_enc, self.b_dec, sel).relu()
            loss, x_hat_bd = self.reconstruction_loss(acts, sel, x_bd, sst)
            parts = {"nmse": (((x_hat_bd - x_bd) ** 2).sum() / sst).detach()}
            if dead_s is not None and self.params.auxk_alpha > 0:
                auxk = self.auxk_loss(pre_bs, xc_bd, x_bd - x_hat_bd.detach(), sst, dead_s, self.params.k_aux)
                if auxk is not None:
                    loss = loss + self.params.auxk_alpha * auxk
                    parts["auxk"] = auxk.detach()
            with one_thread(x_bd.device):
                fired = sel.cols[acts.detach() > 0]
                n_fired_s = torch.bincount(fired, minlength=self.d_sae)
        parts["l0"] = torch.tensor(fired.numel() / x_bd.shape[0])
        return ForwardOutput(x_hat_bd, loss, parts, n_fired_s)

    def auxk_loss(self, pre_bs: torch.Tensor, xc_bd: torch.Tensor, e_bd: torch.Tensor, sst: torch.Tensor,
                  dead_s: torch.Tensor, k_aux: int | None) -> torch.Tensor | None:
        """Normalised error of reconstructing the residual from the top dead latents (None if none dead)."""
        dead_idx = dead_s.nonzero().squeeze(1)
        n_dead = dead_idx.numel()
        if n_dead == 0:
            return None
        k_aux = k_aux or self.d_model // 2
        k_use = min(k_aux, n_dead)
        with torch.no_grad():
            values, sel = topk_selection(pre_bs.index_select(1, dead_idx), k_use, dead_idx, self.d_sae)
        acts = torch.nn.functional.leaky_relu(encode_at(values.float(), xc_bd, self.W_enc, self.b_enc, self.b_dec, sel),
                                              self.params.auxk_leak)
        e_hat_bd = decode_sparse(acts, self.W_dec, sel)
        return min(n_dead / k_aux, 1.0) * ((e_hat_bd - e_bd) ** 2).sum() / sst

