"""Data-parallel SAE training: each rank trains on its slice of every global batch, and one all-reduce
per SAE and step makes every rank take the one-process step (see docs/distributed.md).

Every rank's loader yields the same global batch of B tokens (the order is a function of the seed and
the position only); rank r trains on rows [r·B/N, (r+1)·B/N). The SAE losses are sums over tokens
divided by a statistic of the whole batch:

    TopK, BatchTopK, Matryoshka:  Σ_t ℓ_t / SST,   SST = Σ_t ‖x_t − mean(x)‖²  (the batch's spread)
    ReLU / L1:                    Σ_t ℓ_t / B

An SAE run on a slice divides by the slice's own SST_r (or n_r), so the one-process loss is
Σ_r w_r · loss_r with w_r = SST_r / SST (or n_r / B). Each rank back-propagates w_r · loss_r, and the
sum of the gradients over ranks is the one-process gradient: clipping, Adam and the decoder
renormalisation then run on identical numbers on every rank, which keep identical weights. The firing
counts and the logged loss parts (weighted the same way) travel in the same all-reduce.

An SAE whose training choices span the whole batch (BatchTopK and Matryoshka keep the B·k largest
pre-activations of the batch) is told, by `SAE.data_parallel_`, the global batch size and how to
gather from the ranks, and makes the same choices as one process would.

Why an explicit all-reduce rather than DistributedDataParallel: the ranks' gradients need unequal
weights (DDP averages them); the firing counts and loss parts would need their own collectives beside
DDP's; one pass trains several SAEs on each batch; and an SAE's backward is a few kernels, so DDP's
overlap of communication with the backward would save little. Gradients are flattened into one buffer
per SAE and step (for d_model 768 and d_sae 16k, 100 MB in float32: NVLink moves it in milliseconds).
"""

from typing import NamedTuple

import torch

from traitscope import dist
from traitscope.errors import TraitscopeError
from traitscope.sae import SAE
from traitscope.sae.base import ForwardOutput

SST_PARTS = ("nmse", "auxk")
"""Logged loss parts divided by the batch's SST; the others (l0, l1, mse) are means over tokens."""


class Weights(NamedTuple):
    """How much this rank's slice counts in the global batch of one step."""

    sst: float
    """SST_r / SST: for losses divided by the batch's spread."""
    tokens: float
    """n_r / B: for means over tokens."""


class DataParallel:
    """This rank's part of a data-parallel training step."""

    def __init__(self, world: dist.World, batch_size: int, device: torch.device):
        if batch_size < world.size:
            raise TraitscopeError(f"a global batch of {batch_size} tokens cannot be split over {world.size} "
                                  "processes; use a larger --batch-size")
        if device.type not in ("cpu", "cuda"):
            raise TraitscopeError(f"data-parallel training over processes runs on cuda or cpu, not {device.type}; "
                                  "use --dist-mode sweep, or one process")
        self.world = world
        self.batch_size = batch_size
        self.rows = slice(world.rank * batch_size // world.size, (world.rank + 1) * batch_size // world.size)
        """This rank's rows of every global batch."""
        self.weights = Weights(1.0, 1.0)
        self.stop = False
        """Whether any rank was asked to stop (Ctrl-C) before this step."""

    @property
    def n_local(self) -> int:
        return self.rows.stop - self.rows.start

    def begin_step(self, x_local_bd: torch.Tensor, stop: bool = False) -> Weights:
        """Weigh this rank's slice in the global batch, and learn whether any rank must stop: one small
        float64 all-reduce of (Σx, Σ‖x‖², stop flag). SST = Σ‖x‖² − ‖Σx‖² / B (float64: no cancellation
        worth speaking of at these sizes); the weights do not depend on the input scale."""
        x = x_local_bd.double()
        s1_d = x.sum(0)
        sst_local = float((x * x).sum() - s1_d.dot(s1_d) / len(x))
        stats = torch.cat([s1_d, (x * x).sum().view(1), torch.tensor([float(stop)], dtype=x.dtype, device=x.device)])
        dist.all_reduce_(stats)
        sst_global = float(stats[-2] - stats[:-2].dot(stats[:-2]) / self.batch_size)
        self.stop = bool(stats[-1] > 0)
        self.weights = Weights(max(sst_local, 0.0) / max(sst_global, 1e-30), self.n_local / self.batch_size)
        return self.weights

    def loss_weight(self, sae: SAE) -> float:
        """What this rank's loss is multiplied by before `backward`."""
        return self.weights.tokens if sae.loss_per_token else self.weights.sst

    def reduce(self, sae: SAE, out: ForwardOutput) -> ForwardOutput:
        """Sum gradients, firing counts and weighted loss parts over ranks, in one all-reduce; returns the
        global loss, parts and counts (the reconstruction stays this rank's)."""
        params = list(sae.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        names = sorted(out.parts)
        device = params[0].device
        values = [out.loss.detach().float() * self.loss_weight(sae)]
        values += [out.parts[n].detach().to(device, torch.float32) * (self.weights.sst if n in SST_PARTS
                                                                       else self.weights.tokens) for n in names]
        flat = torch.cat([g.reshape(-1).float() for g in grads]
                         + [out.n_fired_s.to(torch.float32), torch.stack(values).to(device)])
        dist.all_reduce_(flat)
        offset = 0
        for p, g in zip(params, grads):
            chunk = flat[offset:offset + p.numel()].view(p.shape)
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(chunk)
            offset += p.numel()
        n_fired_s = flat[offset:offset + sae.d_sae].round().long()
        offset += sae.d_sae
        totals = flat[offset:]
        return ForwardOutput(out.x_hat_bd, totals[0], dict(zip(names, totals[1:])), n_fired_s)

    def global_batch_selection(self, sae: SAE) -> None:
        """Make an SAE whose training choices span the batch (BatchTopK) make them over the global batch."""
        sae.data_parallel_(self.batch_size, dist.all_gather_tensor)
