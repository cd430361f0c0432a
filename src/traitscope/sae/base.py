"""What every SAE variant shares: parameters, encode/decode, and pickle-free save/load.

    x̄ = x − b_dec;  f = act(W_enc x̄ + b_enc);  x̂ = W_dec f + b_dec

Shapes: W_enc (d_model, d_sae), b_enc (d_sae), W_dec (d_sae, d_model), b_dec (d_model).
A saved SAE takes raw activations: any input scaling used in training is folded into the weights.
"""

import dataclasses
import json
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch

from traitscope.errors import TraitscopeError
from traitscope.runs import CONFIG_FNAME, WEIGHTS_FNAME, RunFolder


@dataclasses.dataclass
class SAEConfig:
    """Architecture of one SAE (training settings live in the trainer's config)."""

    variant: str
    """Registered variant name: 'relu', 'topk', 'batchtopk', 'matryoshka'."""
    d_model: int
    """Width of the activations it reads."""
    d_sae: int
    """Number of latents (dictionary size)."""
    k: int | None = None
    """Active latents per token (TopK family); None for ReLU/L1."""
    l1_coeff: float | None = None
    """λ of the L1 penalty (ReLU/L1 only)."""
    prefixes: list[int] | None = None
    """Matryoshka: nested dictionary sizes, the last equal to d_sae."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ForwardOutput(NamedTuple):
    """What a training forward pass returns."""

    x_hat_bd: torch.Tensor
    """Reconstruction."""
    loss: torch.Tensor
    """Total loss to minimise."""
    parts: dict[str, torch.Tensor]
    """Named loss parts for logging (nmse, l1, auxk, ...), detached scalars."""
    n_fired_s: torch.Tensor
    """(d_sae,) int64 number of tokens of the batch on which each latent fired."""


class SAE(torch.nn.Module):
    """Base class: subclasses set `variant` and implement `encode` and `forward` (training loss)."""

    variant: ClassVar[str]
    unit_norm_decoder: ClassVar[bool] = True
    """Decoder rows are kept at unit norm during training (the ReLU/L1 variant weights its L1 instead)."""
    input_scaled: ClassVar[tuple[str, ...]] = ("b_enc", "b_dec")
    """Parameters and buffers in input units: divided by the input scale when it is folded in."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d, s = cfg.d_model, cfg.d_sae
        # W_enc is (d_model, d_sae) but stored latent-major (a transposed view of (d_sae, d_model)): a
        # sparse training step writes its gradient one latent row at a time, with no transposing copy.
        self.W_enc = torch.nn.Parameter(torch.empty(s, d).t())
        self.b_enc = torch.nn.Parameter(torch.zeros(s))
        self.W_dec = torch.nn.Parameter(torch.empty(s, d))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))
        torch.nn.init.kaiming_uniform_(self.W_dec)
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
            self.W_enc.copy_(self.W_dec.T)

    @property
    def d_model(self) -> int:
        return self.cfg.d_model

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def pre_acts(self, x_bd: torch.Tensor, latents: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """(batch, n_selected) pre-activations W_enc x̄ + b_enc of the latents selected (a slice or indices)."""
        return (x_bd - self.b_dec) @ self.W_enc[:, latents] + self.b_enc[latents]

    def encode(self, x_bd: torch.Tensor) -> torch.Tensor:
        """Inference codes (batch, d_sae): a token's codes never depend on the rest of the batch."""
        raise NotImplementedError

    def encode_sparse(self, x_bd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The positive codes of `encode` as (token, latent, value) triplets, in no particular order."""
        codes_bs = self.encode(x_bd)
        tok, feat = (codes_bs > 0).nonzero(as_tuple=True)
        return tok, feat, codes_bs[tok, feat]

    def decode(self, codes_bs: torch.Tensor) -> torch.Tensor:
        return codes_bs @ self.W_dec + self.b_dec

    def forward(self, x_bd: torch.Tensor, dead_s: torch.Tensor | None = None, l1_scale: float = 1.0,
                k_aux: int | None = None, auxk_alpha: float = 1 / 32) -> ForwardOutput:
        """Training pass on (scaled) activations: reconstruction, loss and its parts.

        `dead_s` (bool, d_sae) marks latents that have not fired for a while (AuxK revives them);
        `l1_scale` is the warm-up factor of the L1 penalty (ReLU/L1); `k_aux` (default d_model / 2)
        and `auxk_alpha` set the AuxK loss of the TopK family.
        """
        raise NotImplementedError

    # --- training-time constraints ---
    @torch.no_grad()
    def init_b_dec_(self, b_dec_d: torch.Tensor) -> None:
        """Start the decoder bias at a data statistic (mean or geometric median of the inputs)."""
        self.b_dec.copy_(b_dec_d)

    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Remove from each decoder row's gradient its component along the row (unit-norm variants;
        the rows are unit vectors, kept so by `normalize_decoder_` after every step)."""
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        W, g = self.W_dec, self.W_dec.grad
        g.addcmul_(W, torch.linalg.vecdot(g, W).unsqueeze(1), value=-1)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Put decoder rows back on the unit sphere after an optimiser step (unit-norm variants)."""
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # --- making a saved SAE take raw activations ---
    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """An SAE trained on `scale * x` becomes one that takes raw `x`, with codes in raw units.

        Every activation function here is positively homogeneous (ReLU, TopK, JumpReLU with its
        threshold scaled alike), so dividing b_enc, b_dec (and thresholds) by `scale` gives
        codes_raw = codes / scale and x̂_raw = x̂ / scale with the same (unit-norm) decoder rows.
        """
        tensors = dict(self.named_parameters()) | dict(self.named_buffers())
        for name in self.input_scaled:
            tensors[name].div_(scale)

    @torch.no_grad()
    def unit_decoder_rows_(self) -> None:
        """Rescale latents so every decoder row has unit norm; reconstructions are unchanged."""
        norms_s = self.W_dec.norm(dim=1).clamp_min(1e-12)
        self.W_dec.div_(norms_s[:, None])
        self.W_enc.mul_(norms_s[None, :])
        self.b_enc.mul_(norms_s)

    # --- persistence: sae.safetensors + config.json ---
    def save(self, dpath: str | Path, extra_config: dict | None = None) -> None:
        """Write a run folder (`traitscope.runs`): the weights, then config.json with `extra_config`."""
        run = RunFolder(dpath)
        # each file is renamed into place whole: a run killed mid-save keeps the previous SAE
        run.write_weights({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()})
        run.write_config({"sae": self.cfg.to_dict(), **(extra_config or {})})


_VARIANTS: dict[str, type[SAE]] = {}


def register(cls: type[SAE]) -> type[SAE]:
    """Class decorator: make a variant available by its `variant` name."""
    _VARIANTS[cls.variant] = cls
    return cls


def variants() -> dict[str, type[SAE]]:
    """Every registered variant by name (the package `traitscope.sae`, always imported before this
    module, imports every variant module)."""
    return dict(_VARIANTS)


def build_sae(cfg: SAEConfig) -> SAE:
    registry = variants()
    if cfg.variant not in registry:
        raise TraitscopeError(f"unknown SAE variant {cfg.variant!r}; known: {', '.join(sorted(registry))}")
    return registry[cfg.variant](cfg)


def load_sae(run_dpath: str | Path, device: str = "cpu") -> SAE:
    """Load a saved SAE from its run folder, without the command line that made it."""
    run = RunFolder(run_dpath)
    if not (run.is_run and run.has_weights):
        raise TraitscopeError(f"{run.dpath} is not an SAE run folder (needs {CONFIG_FNAME} and {WEIGHTS_FNAME})")
    fix = "retrain it (traitscope train with the same settings resumes from its checkpoint) or delete the folder"
    config = run.read_config(fix)
    try:
        sae = build_sae(SAEConfig(**config["sae"]))
    except (KeyError, TypeError, ValueError) as err:
        raise TraitscopeError(f"{run.config_fpath} is damaged (its 'sae' entry does not describe an SAE: {err}); "
                              f"{fix}") from None
    expected = sae.state_dict()
    tensors = run.read_weights(expected, fix)
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise TraitscopeError(f"{run.weights_fpath} is damaged (tensors {', '.join(extra)} are not in a "
                              f"{sae.cfg.variant} SAE); {fix}")
    sae.load_state_dict(tensors)
    return sae.to(device).eval()
