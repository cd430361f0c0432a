"""BatchTopK SAE (Bussmann et al. 2024): the batch keeps its batch × k largest pre-activations.

Training selects across the whole batch, so a token may use more or fewer than k latents while the
batch averages k. The batch's cut (the smallest kept value) is tracked as a running average, the
`threshold` buffer; at inference the SAE is a JumpReLU with that threshold,

    f = ReLU(pre) · [pre > threshold]

so a token's codes never depend on what else is in the batch.

Data-parallel training (`data_parallel_`) keeps the B·k largest pre-activations of the global batch:
each process offers its own B·k largest, the processes gather them, and each keeps its entries at or
above the global B·k-th value (the one-process rule, ties included); the threshold is updated with
that global cut.
"""

from typing import Callable

import torch

from traitscope.sae.base import SAE, SAEConfig, register
from traitscope.sae.sparse import Selection, batch_topk_flat, make_selection
from traitscope.sae.topk import TopKSAE

THRESHOLD_DECAY = 0.99
"""Running-average decay of the per-batch cut (about the last 100 steps count). Early on the decay is
(1 + n) / (10 + n) after n updates, so the cuts of the first steps, made by an untrained encoder, do
not linger in the threshold of a short run."""


@register
class BatchTopKSAE(TopKSAE):
    variant = "batchtopk"
    input_scaled = SAE.input_scaled + ("threshold",)

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))
        self._global: tuple[int, Callable[[torch.Tensor], torch.Tensor]] | None = None
        """Data-parallel training: (global batch size, all_gather)."""

    def encode(self, x_bd: torch.Tensor) -> torch.Tensor:
        pre_bs = self.pre_acts(x_bd)
        return pre_bs.relu() * (pre_bs > self.threshold)

    def encode_sparse(self, x_bd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre_bs = self._pre_acts_into_buffer(x_bd - self.b_dec)
        tok, feat = (pre_bs > self.threshold.clamp_min(0)).nonzero(as_tuple=True)
        return tok, feat, pre_bs[tok, feat]

    def select(self, pre_bs: torch.Tensor) -> tuple[torch.Tensor, Selection]:
        if self._global is not None:
            flat_idx, values = self._global_select(pre_bs)
        else:
            flat_idx, values = batch_topk_flat(pre_bs, pre_bs.shape[0] * self.params.k)
            if self.training and values.numel():
                self._update_threshold(values.min())
        rows, cols = flat_idx // self.d_sae, flat_idx % self.d_sae
        return values, self.selection(rows, cols, pre_bs.shape[0])

    def data_parallel_(self, batch_size: int, all_gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._global = (batch_size, all_gather)

    def _global_select(self, pre_bs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat indices, values) of this process's entries among the global batch's B·k largest."""
        batch_size, all_gather = self._global
        n_keep = batch_size * self.params.k
        flat_idx, values = batch_topk_flat(pre_bs, n_keep)
        offered = torch.zeros(n_keep, dtype=torch.float32, device=pre_bs.device)  # 0 = no candidate
        offered[:len(values)] = values.float()
        pool = all_gather(offered).reshape(-1)
        n_positive = int((pool > 0).sum())
        if n_positive:
            cut = pool.kthvalue(len(pool) - min(n_keep, n_positive) + 1).values
            keep = values.float() >= cut
            flat_idx, values = flat_idx[keep], values[keep]
            if self.training:
                self._update_threshold(cut)
        return flat_idx, values

    def selection(self, rows: torch.Tensor, cols: torch.Tensor, n_rows: int) -> Selection:
        """Entries (sorted by token, then latent) grouped into one bag per token."""
        return make_selection(rows, cols, rows, n_rows, self.d_sae)

    @torch.no_grad()
    def _update_threshold(self, cut: torch.Tensor) -> None:
        n = int(self.threshold_updates)
        if n == 0:
            self.threshold.copy_(cut)
        else:
            decay = min(THRESHOLD_DECAY, (1 + n) / (10 + n))
            self.threshold.lerp_(cut.to(self.threshold.dtype), 1 - decay)
        self.threshold_updates += 1
