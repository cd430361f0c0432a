"""What every SAE variant shares: parameters, encode/decode, and pickle-free save/load.

    x̄ = x − b_dec;  f = act(W_enc x̄ + b_enc);  x̂ = W_dec f + b_dec

Shapes: W_enc (d_model, d_sae), b_enc (d_sae), W_dec (d_sae, d_model), b_dec (d_model).
A saved SAE takes raw activations: any input scaling used in training is folded into the weights.
"""

import dataclasses
import math
from pathlib import Path
from typing import Callable, ClassVar, NamedTuple

import torch

from traitscope.errors import TraitscopeError
from traitscope.runs import CONFIG_FNAME, WEIGHTS_FNAME, RunFolder


@dataclasses.dataclass
class SAEParams:
    """A variant's own hyper-parameters: each variant subclasses this as its `Params`, with a docstring
    under each field (the command line's help) and its defaults, and says here how to check them, how
    to name them and which learning rate suits them. The base has no fields."""

    def resolved(self, d_model: int, d_sae: int) -> "SAEParams":
        """A copy with the defaults that depend on the SAE's size filled in; impossible values refused
        (TraitscopeError)."""
        return dataclasses.replace(self)

    def label(self) -> str:
        """The sparsity part of a run folder's name, such as 'k32' or 'l1_5' (empty: none)."""
        return ""

    def describe(self) -> str:
        """The sparsity setting as tables and titles show it, such as 'k=32' or 'λ=5' (empty: none)."""
        return ""

    def default_lr(self, d_sae: int) -> float:
        """Adam's peak learning rate for batches of 4096 tokens when none is given (the trainer scales it
        by √(batch / 4096)): 2e-4 / √(d_sae / 16384), the scaling of Gao et al. 2024."""
        return 2e-4 / math.sqrt(d_sae / 2 ** 14)

    @property
    def uses_dead_latents(self) -> bool:
        """Whether the training loss is told which latents are dead (AuxK revives them)."""
        return False


FORMAT1_KEYS = ("k", "l1_coeff", "prefixes")
"""Keys of a config.json 'sae' entry written before variants owned their parameters: every variant
listed all three, null where unused. They are still written (null when the variant has no such
parameter), and a null among them is read as not given."""


@dataclasses.dataclass(init=False)
class SAEConfig:
    """Architecture of one SAE: what every variant has, and the variant's own parameters.

    `SAEConfig("topk", 768, 16384, k=32)` gives the variant's parameters by name; `to_dict` is the flat
    'sae' entry of config.json and `SAEConfig(**entry)` reads it back (older entries included).
    """

    variant: str
    """Registered variant name (`traitscope.sae.variants()`: relu, topk, batchtopk, matryoshka, ...)."""
    d_model: int
    """Width of the activations it reads."""
    d_sae: int
    """Number of latents (dictionary size)."""
    params: SAEParams
    """The variant's own hyper-parameters (its `Params`; defaults where not given)."""

    def __init__(self, variant: str, d_model: int, d_sae: int, params: SAEParams | None = None, **own):
        self.variant, self.d_model, self.d_sae = variant, d_model, d_sae
        if params is not None and own:
            raise TypeError(f"give the {variant} parameters as params or by name, not both")
        self.params = params if params is not None else make_params(variant, own)

    def to_dict(self) -> dict:
        return {"variant": self.variant, "d_model": self.d_model, "d_sae": self.d_sae,
                **dict.fromkeys(FORMAT1_KEYS), **dataclasses.asdict(self.params)}


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
    """Base class: subclasses set `variant` (and `Params`, their own hyper-parameters) and implement
    `encode` and `forward` (training loss)."""

    variant: ClassVar[str]
    Params: ClassVar[type[SAEParams]] = SAEParams
    """The variant's own hyper-parameters (a dataclass subclassing `SAEParams`)."""
    loss_per_token: ClassVar[bool] = False
    """The training loss is a mean over the batch's tokens (else a sum divided by the batch's spread,
    Σ‖x − mean(x)‖²): data-parallel training weighs each process's share of the batch accordingly."""
    unit_norm_decoder: ClassVar[bool] = True
    """Decoder rows are kept at unit norm during training (the ReLU/L1 variant weights its L1 instead, the
    archetypal one keeps its rows near the data's hull). A saved SAE has unit rows, except an archetypal
    one (see `ArchetypalSAE.unit_decoder_rows_`)."""
    input_scaled: ClassVar[tuple[str, ...]] = ("b_enc", "b_dec")
    """Parameters and buffers in input units: divided by the input scale when it is folded in."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if not isinstance(cfg.params, self.Params):
            raise TypeError(f"a {self.variant} SAE takes {self.Params.__name__}, not {type(cfg.params).__name__}")
        try:
            params = cfg.params.resolved(cfg.d_model, cfg.d_sae)
        except TraitscopeError as err:
            raise TraitscopeError(f"{self.variant} SAE: {err}") from None
        self.cfg = dataclasses.replace(cfg, params=params)
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

    @property
    def params(self) -> SAEParams:
        """The variant's own hyper-parameters, defaults filled in."""
        return self.cfg.params

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

    def forward(self, x_bd: torch.Tensor, dead_s: torch.Tensor | None = None, progress: float = 1.0) -> ForwardOutput:
        """Training pass on (scaled) activations: reconstruction, loss and its parts.

        `dead_s` (bool, d_sae) marks latents that have not fired for a while (given when
        `params.uses_dead_latents`); `progress` is the share of training done after this step, in
        (0, 1] (for warm-ups of a penalty). Every other knob of the loss is one of `params`.
        """
        raise NotImplementedError

    # --- training-time constraints ---
    def training_form_(self) -> None:
        """Put the SAE in the form the trainer trains and checkpoints, before its optimiser is made (and
        on the copy folded for saving). A variant that trains its dictionary through a parametrisation
        (archetypal) registers it here, and its state dict then holds the parametrisation's tensors;
        folding the input scale (`fold_input_scale_`) gives the plain form back. Nothing by default."""

    @torch.no_grad()
    def init_b_dec_(self, b_dec_d: torch.Tensor) -> None:
        """Start the decoder bias at a data statistic (mean or geometric median of the inputs)."""
        self.b_dec.copy_(b_dec_d)

    def init_from_data_(self, sample_nd: torch.Tensor) -> None:
        """Start-up from a sample of (scaled) training tokens, after the decoder bias: a variant whose
        dictionary depends on the data (archetypal) builds it here. Nothing by default."""

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

    def data_parallel_(self, batch_size: int, all_gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """From now on each training batch is this process's share of a global batch of `batch_size`
        tokens; `all_gather(t)` stacks a tensor from every process. A variant whose training choices
        span the whole batch (BatchTopK) makes them span the global batch; the others need nothing."""

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


def variant_class(name: str) -> type[SAE]:
    """The registered class of a variant name; TraitscopeError naming the known ones otherwise."""
    registry = variants()
    if name not in registry:
        raise TraitscopeError(f"unknown SAE variant {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def make_params(variant: str, values: dict) -> SAEParams:
    """A variant's `Params` from values by name (None: not given, the default); TypeError naming the
    variant's parameters for one it does not have."""
    cls = variant_class(variant).Params
    known = [f.name for f in dataclasses.fields(cls)]
    given = {key: value for key, value in values.items() if value is not None}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise TypeError(f"{variant} SAEs have no parameter {', '.join(unknown)} "
                        f"(theirs: {', '.join(known) or 'none'})")
    return cls(**given)


def describe_params(entry: dict) -> str:
    """The sparsity setting ('k=32', 'λ=5') of a config.json 'sae' entry, as its variant words it; ''
    for a variant not known here or an entry that does not describe one."""
    try:
        return SAEConfig(**entry).params.describe()
    except (TraitscopeError, TypeError, ValueError):
        return ""


def build_sae(cfg: SAEConfig) -> SAE:
    return variant_class(cfg.variant)(cfg)


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
