"""Training settings: what a whole pass over the data shares, and what each SAE of the pass may vary.

`TrainConfig` is shared by every SAE trained in one pass (the data, its order, the token budget);
`RunSettings` describes one SAE and its optimiser. A grid or sweep file is a list of RunSettings over
one TrainConfig; settings that would need a different pass over the data are refused up front.
The docstring under each field is also the command line's help.
"""

import dataclasses
import hashlib
import json
import math
import re
import typing
from pathlib import Path

from simple_parsing import field

from traitscope.cli_config import Count, comma_list, option_type, parse_count
from traitscope.errors import TraitscopeError
from traitscope.sae import SAEConfig, SAEParams, variants
from traitscope.sae.base import make_params, variant_class

TOKEN_KINDS = ("patches", "cls", "all")


def token_budget(text: str | int) -> int:
    """A token budget such as 50M; a token kind given instead is pointed to --token-kind."""
    if str(text).strip().lower() in TOKEN_KINDS:
        raise TraitscopeError(f"{text!r} is a token kind; --tokens is the token budget (e.g. 50M), the kind is "
                              f"--token-kind {text}")
    return parse_count(text)


@dataclasses.dataclass
class TrainConfig:
    """Settings shared by every SAE of one pass over the data."""

    shards: str = field(default="", required=True, metavar="DIR")
    """Shard folder (made by `traitscope shards`)."""
    layer: int | None = None
    """Layer to train on, as stored or as a negative index of the model (default: the last stored)."""
    token_kind: str = "patches"
    """Tokens to train on: patches, cls (the CLS / pooled token) or all (both)."""
    tokens: Count = field(default=50_000_000, type=option_type(token_budget, "token budget"))
    """Token budget: training tokens seen (50M, 1e6, ...); more than the data set means several epochs."""
    batch_size: Count = 2048
    """Tokens per optimiser step (2048: a lower held-out error than 4096 on the same tokens, and fewer
    dead latents; docs/training.md, "Batch size")."""
    seed: int = 0
    """Seed of the validation split, the data order and the initialisation."""
    val_frac: float = 0.05
    """Share of images held out for validation (every token of a held-out image)."""
    val_split: str = "random"
    """Which images are held out: 'random' (a seeded draw) or 'contiguous' (5 runs of neighbouring rows,
    spread evenly over the data set, rows in file-name order: video frames or near-duplicate neighbours
    stay on one side)."""
    val_tokens: Count = 262_144
    """At most this many validation tokens are evaluated at the end."""
    dtype: str = "float32"
    """float32, or bfloat16 for the forward pass's matrix products (weights and Adam stay float32)."""
    chunk_rows: Count = 4096
    """Rows per contiguous read of the shuffled loader."""
    buffer_mb: int = 256
    """Size of the loader's shuffle buffer in MB (chunks from random places are mixed inside it; the
    loader holds up to four: one being read, one ready, one in use, one its last batch still refers to)."""
    device: str = "auto"
    """cpu, cuda, mps, or auto (cuda if available, else mps, else cpu); under torchrun, cuda means the GPU of
    the process's LOCAL_RANK."""
    dist_mode: str = "data"
    """Under torchrun: 'data' trains every SAE data-parallel (each process takes a share of every batch),
    'sweep' gives SAE i to process i mod N (see docs/distributed.md)."""
    threads: int | None = None
    """CPU threads for torch (default: torch's own choice, usually one per core)."""
    out: str = "runs"
    """Folder under which each SAE gets its run folder."""
    name: str | None = None
    """Run folder name instead of the content-addressed one (a single SAE only)."""
    log_every: int = 50
    """Steps between lines of metrics.jsonl."""
    checkpoint_every: Count = 5_000_000
    """Tokens between checkpoints (a killed run resumes from the last one)."""
    stop_after: Count | None = None
    """Stop with a checkpoint after this many tokens, as if interrupted; rerun without it to go on."""
    log_to: str = "none"
    """Also log to 'tensorboard' or 'wandb' (only when installed; nothing is sent by default)."""
    restart: bool = False
    """Discard existing checkpoints and results of these runs and train them from scratch."""
    quiet: bool = False
    """No progress bar."""

    def validate(self) -> None:
        """Raise TraitscopeError naming the first impossible setting (the out folder is checked on use)."""
        checks = [(self.batch_size >= 1, f"batch_size must be at least 1, not {self.batch_size}"),
                  (self.tokens >= 1, "the token budget must be at least 1 token"),
                  (self.token_kind in TOKEN_KINDS, f"--token-kind must be one of {', '.join(TOKEN_KINDS)}, "
                                                   f"not {self.token_kind!r}"),
                  (self.dtype in ("float32", "bfloat16"), f"dtype must be float32 or bfloat16, not {self.dtype!r}"),
                  (self.chunk_rows >= 1 and self.buffer_mb >= 1, "chunk_rows and buffer_mb must be positive"),
                  (self.log_every >= 1 and self.checkpoint_every >= 1, "log_every and checkpoint_every must be positive"),
                  (self.val_tokens >= 1, "val_tokens must be positive"),
                  (self.val_frac != 0, "--val-frac 0 holds out no images, and every reported metric is measured on "
                                       "held-out images; use a share such as 0.2"),
                  (0 < self.val_frac < 1, f"--val-frac must lie between 0 and 1 (exclusive), not {self.val_frac:g}"),
                  (self.threads is None or self.threads >= 0, f"--threads must be at least 1 (0: torch's default), "
                                                              f"not {self.threads}"),
                  (self.dist_mode in ("data", "sweep"), f"dist_mode must be data or sweep, not {self.dist_mode!r}"),
                  (self.log_to in ("none", "tensorboard", "wandb"),
                   f"log_to must be none, tensorboard or wandb, not {self.log_to!r}")]
        for ok, message in checks:
            if not ok:
                raise TraitscopeError(message)


REFERENCE_BATCH = 4096
"""Batch size the variants' default learning rates are for; other sizes scale it by the square root of
the ratio (Adam's square-root rule: at 1024 tokens half the rate, measured in docs/training.md)."""

DEFAULT_VARIANT = "matryoshka"
"""What `traitscope train` trains unless told: it finds more known traits than TopK with both offline
backbones (docs/alignment.md), and at the same held-out L0 it reconstructs better than sparsify's TopK
(docs/training.md, "Matryoshka, the default")."""


@dataclasses.dataclass(init=False)
class RunSettings:
    """Settings of one SAE: its variant and size, the variant's own parameters, and the optimiser.

    The variant's parameters are its `Params` (`traitscope.sae.<variant>`); they may be given by name:
    `RunSettings(variant="topk", k=32, d_sae=16384)`.
    """

    variant: str = field(default=DEFAULT_VARIANT, alias=["--sae"], type=comma_list(), action="append", metavar="VARIANT[,...]")
    """SAE variant (a name registered in traitscope.sae: relu, topk, batchtopk, matryoshka, ...)."""
    d_sae: int | None = field(default=None, type=comma_list(parse_count), metavar="N[,N...]")
    """Number of latents; or give expansion."""
    expansion: float | None = field(default=None, type=comma_list(float), metavar="X[,X...]")
    """d_sae as a multiple of d_model (default 16 when d_sae is not given)."""
    lr: float | None = field(default=None, type=comma_list(float), metavar="LR[,LR...]")
    """Peak learning rate of Adam (default: the variant's rate for batches of 4096 tokens, times
    sqrt(batch size / 4096); for the TopK family 2e-3 / sqrt(d_sae / 16384) at 4096, 5e-5 for relu)."""
    lr_warmup: int = 1000
    """Steps of linear learning-rate warm-up (at most a tenth of the steps)."""
    lr_decay: str = "linear"
    """Learning-rate decay to zero: linear, cosine or none."""
    decay_start: float = 0.8
    """Fraction of training after which the learning rate decays."""
    beta1: float = 0.9
    """Adam β1."""
    beta2: float = 0.999
    """Adam β2."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0: no clipping)."""
    b_dec_init: str = "mean"
    """Initial decoder bias: the data's mean or geometric median ('median')."""
    dead_tokens: Count = 8192
    """A latent is dead after this many tokens without firing (AuxK then trains it). With AuxK's weight of
    1/4 this short window kept the dead share under 1% in runs of 125 steps on both sets of
    docs/training.md ("Against sparsify")."""
    params: SAEParams | None = field(default=None, cmd=False)
    """The variant's own parameters (its Params; defaults where not given)."""

    def __init__(self, variant: str = DEFAULT_VARIANT, params: SAEParams | None = None, **values):
        common = [f for f in dataclasses.fields(self) if f.name not in ("variant", "params")]
        for f in common:
            setattr(self, f.name, values.pop(f.name, f.default))
        self.variant = variant
        if params is not None and values:
            raise TypeError(f"give the {variant} parameters as params or by name, not both")
        self.params = params if params is not None else make_params(variant, values)

    def resolved(self, d_model: int, batch_size: int = REFERENCE_BATCH) -> "RunSettings":
        """A copy with every default filled in for inputs of width d_model, trained in batches of
        batch_size tokens; impossible values refused."""
        s = dataclasses.replace(self)
        if s.d_sae is not None and s.expansion is not None and s.d_sae != round(s.expansion * d_model):
            raise TraitscopeError(f"give d_sae or expansion, not both (d_sae={s.d_sae}, expansion={s.expansion} "
                                  f"× d_model {d_model} = {s.expansion * d_model:g})")
        if s.d_sae is None:
            s.d_sae = int(round((s.expansion if s.expansion is not None else 16) * d_model))
        s.expansion = None
        if s.d_sae < 1:
            raise TraitscopeError(f"d_sae must be at least 1, not {s.d_sae}")
        try:
            s.params = s.params.resolved(d_model, s.d_sae)
        except TraitscopeError as err:
            raise TraitscopeError(f"{s.variant}: {err}") from None
        if s.lr is None:
            s.lr = s.params.default_lr(s.d_sae) * math.sqrt(batch_size / REFERENCE_BATCH)
        checks = [(s.lr > 0, f"lr must be > 0, not {s.lr}"), (s.lr_warmup >= 0, "lr_warmup must be >= 0"),
                  (s.lr_decay in ("linear", "cosine", "none"), f"lr_decay must be linear, cosine or none, not {s.lr_decay!r}"),
                  (0 <= s.decay_start <= 1, "decay_start must be between 0 and 1"),
                  (0 <= s.beta1 < 1 and 0 <= s.beta2 < 1, "Adam betas must be in [0, 1)"),
                  (s.grad_clip >= 0, "grad_clip must be >= 0"),
                  (s.b_dec_init in ("mean", "median"), f"b_dec_init must be mean or median, not {s.b_dec_init!r}"),
                  (s.dead_tokens >= 1, "dead_tokens must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise TraitscopeError(message)
        return s

    def sae_config(self, d_model: int) -> SAEConfig:
        """The SAE's architecture (call on a resolved copy)."""
        return SAEConfig(self.variant, d_model, self.d_sae, params=self.params)

    def label(self) -> str:
        """Short human part of the run folder name: variant, sparsity, width."""
        return "-".join(part for part in (self.variant, self.params.label(), str(self.d_sae)) if part)

    def flat(self) -> dict:
        """Every setting by name, the variant's parameters beside the common ones, as run identities
        hash them: a run made before variants owned their parameters, or before a parameter was added
        (LATER_PARAMS), keeps its identity (and folder)."""
        common = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "params"}
        params = dataclasses.asdict(self.params)
        own = {k: v for k, v in params.items() if LATER_PARAMS.get(k, ...) != v
               and not (k in DEFAULT_OF and params[DEFAULT_OF[k]] is not None)}
        return {**common, **IDENTITY_V1, **own}


IDENTITY_V1 = {"k": None, "l1_coeff": None, "prefixes": None, "l1_warmup": 0.05, "k_aux": None, "auxk_alpha": 1 / 32}
"""Per-variant settings every run identity held before variants owned their parameters, with the value
it held where the variant did not use one; kept so that those runs' folders are found and resumed."""


LATER_PARAMS = {"auxk_leak": 0, "prefix_levels": 5}
"""Variant parameters added later, with the value every run made before them had: left out of the
identity at that value, so that those runs' folders are found and resumed."""


DEFAULT_OF = {"prefix_levels": "prefixes"}
"""Variant parameters that only choose another's default: left out of the identity when that one is given."""


def variant_fields() -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """Every variant parameter's name: its field (type, default) and the variants that have it."""
    found: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for name, cls in variants().items():
        for f in dataclasses.fields(cls.Params):
            found.setdefault(f.name, (f, []))[1].append(name)
    return found


# Fields of TrainConfig that decide the data a pass sees: they are part of each run's identity.
DATA_FIELDS = ("layer", "token_kind", "tokens", "batch_size", "seed", "val_frac", "dtype", "chunk_rows",
               "buffer_mb")


def run_identity(cfg: TrainConfig, settings: RunSettings, shards_hash: str, layer: int) -> dict:
    """Everything that decides a run's result: its folder name hashes this."""
    shared = {f: getattr(cfg, f) for f in DATA_FIELDS} | {"layer": layer}
    if cfg.val_split != "random":  # runs made before the option keep their identity
        shared["val_split"] = cfg.val_split
    return {"shards": shards_hash, **shared, **settings.flat()}


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


# --- numbers, files and grids ---

ALIASES = {"sae": "variant", "l1": "l1_coeff"}


def _field_types(cls) -> dict[str, type]:
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    return hints


def setting_names() -> set[str]:
    """Every name a sweep file or the command line may set: TrainConfig's, RunSettings' and every
    variant's parameters."""
    return ({f.name for f in dataclasses.fields(TrainConfig)} | {f.name for f in dataclasses.fields(RunSettings)}
            | set(variant_fields())) - {"params"}


def coerce(name: str, value):
    """A sweep-file or command-line value as the field's type."""
    if value is None:
        return None
    types = _field_types(TrainConfig) | _field_types(RunSettings) | {n: f.type for n, (f, _) in variant_fields().items()}
    if Count in (types[name], *typing.get_args(types[name])):
        return parse_count(value)
    text = str(types[name])
    if "list[int]" in text:  # e.g. prefixes: "128,512,2048" or a list
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        return [parse_count(v) for v in value]
    try:
        if "bool" in text:
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        if "int" in text and "float" not in text:
            return int(value) if re.fullmatch(r"\s*-?\d+\s*", str(value)) else parse_count(value)  # '4k' too
        if "float" in text:
            return float(value)
    except (TypeError, ValueError, TraitscopeError):
        raise TraitscopeError(f"{name}: {value!r} is not a valid value") from None
    return value


def load_sweep(fpath: str | Path) -> tuple[dict, list[dict]]:
    """(shared settings, list of per-run settings) from a JSON or TOML sweep file.

    JSON: a list of objects, or an object with shared keys and a "runs" list. TOML: shared keys at the
    top and one [[run]] table per SAE. Keys are field names of TrainConfig / RunSettings and of the
    variants' parameters ('sae' and 'l1' are accepted for 'variant' and 'l1_coeff').
    """
    fpath = Path(fpath)
    if not fpath.is_file():
        raise TraitscopeError(f"sweep file {fpath} does not exist")
    text = fpath.read_text()
    try:
        if fpath.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as err:
        raise TraitscopeError(f"sweep file {fpath} is not valid {fpath.suffix.lstrip('.').upper() or 'JSON'}: {err}") from None
    if isinstance(data, list):
        shared, entries = {}, data
    elif isinstance(data, dict):
        entries = data.get("runs", data.get("run", []))
        shared = {k: v for k, v in data.items() if k not in ("runs", "run")}
    else:
        raise TraitscopeError(f"sweep file {fpath}: expected a list of runs or an object with 'runs'")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise TraitscopeError(f"sweep file {fpath}: needs at least one run (a list of objects / [[run]] tables)")
    known = setting_names()
    out_entries = []
    for i, entry in enumerate([shared, *entries]):
        clean = {}
        for key, value in entry.items():
            key = ALIASES.get(key, key).replace("-", "_")
            if key not in known:
                where = "top level" if i == 0 else f"run {i}"
                raise TraitscopeError(f"sweep file {fpath} ({where}): unknown setting {key!r}")
            clean[key] = coerce(key, value)
        out_entries.append(clean)
    return out_entries[0], out_entries[1:]


def plan_runs(base: TrainConfig, run_defaults: dict, grid: dict[str, list], entries: list[dict] | None,
              shared_overrides: dict | None = None) -> tuple[TrainConfig, list[RunSettings]]:
    """One TrainConfig and the RunSettings of every SAE of the pass.

    `grid` maps per-run settings to lists of values (a Cartesian product); `entries` (from a sweep
    file) lists runs explicitly. A variant's parameter given in the grid or for every run applies to
    the variants that have it. Shared settings given per run must agree across runs, else the pass is
    impossible and refused.
    """
    run_fields = ({f.name for f in dataclasses.fields(RunSettings)} | set(variant_fields())) - {"params"}
    base = dataclasses.replace(base, **(shared_overrides or {}))
    if entries:
        variants_asked = [e.get("variant", run_defaults.get("variant", DEFAULT_VARIANT)) for e in entries]
        check_fits(variants_asked, run_defaults)
        runs = [dict(fitting(run_defaults, variant), **{k: v for k, v in e.items() if k in run_fields})
                for e, variant in zip(entries, variants_asked)]
        for key in sorted({k for e in entries for k in e if k not in run_fields}):
            values = [e.get(key, getattr(base, key)) for e in entries]
            if len(set(map(repr, values))) > 1:
                which = ", ".join(f"run {i}: {v!r}" for i, v in enumerate(values, 1))
                raise TraitscopeError(f"these runs cannot share one pass over the data: {key} differs ({which}); "
                                      "train them with separate commands")
            base = dataclasses.replace(base, **{key: values[0]})
    else:
        runs = expand_grid(run_defaults, grid)
    cfg = base
    settings = []
    for run in runs:
        try:
            settings.append(RunSettings(**run))
        except TypeError as err:
            raise TraitscopeError(f"bad run settings {run}: {err}") from None
    return cfg, settings


FLAGS = {"l1_coeff": "--l1"}
"""Command-line flags not spelt as the setting's name."""


def check_fits(variants_asked: list[str], values: dict) -> None:
    """Refuse an unknown variant, and a variant parameter that none of the variants asked for has."""
    for variant in variants_asked:
        variant_class(variant)
    fields = variant_fields()
    for key in values:
        if key in fields and not any(v in fields[key][1] for v in variants_asked):
            flag = FLAGS.get(key, "--" + key.replace("_", "-"))
            raise TraitscopeError(f"{flag} applies to {', '.join(fields[key][1])} SAEs, but the SAEs asked for are "
                                  f"{', '.join(dict.fromkeys(variants_asked))}")


def fitting(values: dict, variant: str) -> dict:
    """`values` without the variant parameters that `variant` does not have."""
    fields = variant_fields()
    return {k: v for k, v in values.items() if k not in fields or variant in fields[k][1]}


def expand_grid(run_defaults: dict, grid: dict[str, list]) -> list[dict]:
    """Cartesian product of the grid's lists; a variant's parameter (k, l1_coeff, prefixes, ...) applies to
    the variants that have it."""
    variants_asked = grid.get("variant") or [run_defaults.get("variant", DEFAULT_VARIANT)]
    check_fits(variants_asked, {k: v for k, v in grid.items() if v} | run_defaults)
    runs = []
    for variant in variants_asked:
        combos = [dict(fitting(run_defaults, variant), variant=variant)]
        for key, values in fitting(grid, variant).items():
            if key == "variant" or not values:
                continue
            combos = [dict(c, **{key: v}) for c in combos for v in values]
        runs.extend(combos)
    return runs
