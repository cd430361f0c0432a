"""`traitscope train`: train sparse autoencoders on stored activations, several in one pass.

    traitscope train --shards shards/<hash> --layer -2 --sae topk --k 16,32,64 --expansion 16 --tokens 50M

trains three SAEs on one pass over the data and prints each run folder. Comma lists of --sae, --k,
--l1, --d-sae, --expansion, --lr and of the variants' own parameters (--l0-coeff, ...) make a grid, each
parameter applied to the variants that have it; --sweep FILE (JSON or TOML) lists runs explicitly.
Rerunning the same command resumes unfinished runs from their checkpoints and skips finished ones.

On several GPUs or machines, start the same command under torchrun (see docs/distributed.md):

    torchrun --standalone --nproc-per-node 8 -m traitscope.cli train --shards ... [--dist-mode data|sweep]

A sweep file gives shared settings at the top and one entry per SAE; settings that need another
pass over the data (layer, token kind, batch size, budget, seed, ...) must agree across entries:

    # sweep.toml                        # or sweep.json:
    tokens = "50M"                      # {"tokens": "50M", "runs": [
    [[run]]                             #   {"sae": "topk", "k": 32, "expansion": 16},
    sae = "topk"                        #   {"sae": "relu", "l1": 5, "d_sae": 6144, "lr": 1e-4}]}
    k = 32
    expansion = 16
    [[run]]
    sae = "relu"
    l1 = 5
    d_sae = 6144
    lr = 1e-4
"""

import argparse
import dataclasses
import sys

from traitscope.errors import TraitscopeError
from traitscope.sae import variants
from traitscope.train.config import (RunSettings, TrainConfig, coerce, field_docs, load_sweep, plan_runs, setting_names,
                                     variant_fields)

# Per-run fields that take comma lists on the command line (a grid), with their flags.
GRID_FLAGS = {"variant": "--sae", "k": "--k", "l1_coeff": "--l1", "d_sae": "--d-sae", "expansion": "--expansion",
              "lr": "--lr"}
TOKEN_KINDS = ("patches", "cls", "all")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    own = variant_fields()  # every variant's parameters: (field, the variants that have it)
    docs = {name: field_docs(variants()[names[0]].Params)[name].rstrip(".") + f" ({', '.join(names)}"
            + ("" if f.default is None else f"; default {_show(f.default)}") + ")." for name, (f, names) in own.items()}
    shared, per_run = field_docs(TrainConfig), field_docs(RunSettings) | docs
    defaults_t, defaults_r = TrainConfig(), RunSettings()
    data = parser.add_argument_group("data (shared by every SAE of the pass)")
    data.add_argument("--shards", required=True, metavar="DIR", help=shared["shards"])
    data.add_argument("--sweep", metavar="FILE", help="JSON or TOML file listing the runs (example above); "
                      "keys are the long option names with underscores ('sae' and 'l1' work too)")
    grid = parser.add_argument_group("SAEs (comma lists make a grid)")
    grid.add_argument("--sae", "--variant", dest="sae", action="append", metavar="VARIANT", help=per_run["variant"] + " (default: topk)")
    grid.add_argument("--k", metavar="K[,K...]", help=per_run["k"])
    grid.add_argument("--l1", dest="l1_coeff", metavar="L1[,L1...]", help=per_run["l1_coeff"])
    grid.add_argument("--d-sae", metavar="N[,N...]", help=per_run["d_sae"])
    grid.add_argument("--expansion", metavar="X[,X...]", help=per_run["expansion"])
    grid.add_argument("--lr", metavar="LR[,LR...]", help=per_run["lr"])
    grid.add_argument("--prefixes", metavar="N,N,...", help=per_run["prefixes"])
    for name in own_grid(own):
        grid.add_argument("--" + name.replace("_", "-"), dest=name, metavar=f"{name.upper()}[,...]", help=per_run[name])
    optim = parser.add_argument_group("optimiser (per SAE)")
    for f in dataclasses.fields(RunSettings):
        if f.name in GRID_FLAGS or f.name == "params":
            continue
        default = getattr(defaults_r, f.name)
        optim.add_argument("--" + f.name.replace("_", "-"), dest=f.name, metavar=f.name.upper(),
                           help=per_run[f.name] + ("" if default is None else f" (default: {_show(default)})"))
    for f in dataclasses.fields(TrainConfig):
        if f.name == "shards":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults_t, f.name)
        help_text = shared[f.name] + ("" if default is None or f.type is bool else f" (default: {_show(default)})")
        if f.type is bool:
            data.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_text)
        else:
            data.add_argument(flag, dest=f.name, metavar=f.name.upper(), help=help_text)


def own_grid(own: dict) -> list[str]:
    """The variants' own parameters that take comma lists under their own names (k and l1 are above;
    prefixes is itself a list)."""
    return [name for name, (f, _) in own.items() if name not in GRID_FLAGS and "list" not in str(f.type)]


def _flag(name: str) -> str:
    return GRID_FLAGS.get(name, "--" + name.replace("_", "-"))


def _show(value) -> str:
    return f"{value:,}".replace(",", "_") if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000 \
        else str(value)


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def config_from_args(args: argparse.Namespace):
    """(TrainConfig, [RunSettings]) from the command line and an optional sweep file."""
    shared_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    run_fields = setting_names() - shared_fields
    if args.tokens is not None and str(args.tokens).strip().lower() in TOKEN_KINDS:
        raise TraitscopeError(f"--tokens is the token budget (e.g. 50M); for the token kind use --token-kind {args.tokens}")
    own = own_grid(variant_fields())
    given = {name: coerce(name, getattr(args, name)) for name in shared_fields | run_fields
             if name not in GRID_FLAGS and name != "prefixes" and name not in own and getattr(args, name, None) is not None}
    if args.prefixes:
        given["prefixes"] = coerce("prefixes", args.prefixes)
    if given.get("token_kind") not in (None, *TOKEN_KINDS):
        raise TraitscopeError(f"--token-kind must be one of {', '.join(TOKEN_KINDS)}, not {given['token_kind']!r}")
    grid: dict[str, list] = {}
    asked = [v for value in (args.sae or []) for v in _split(value)]
    if asked:
        grid["variant"] = asked
    for name, flag in GRID_FLAGS.items():
        if name == "variant":
            continue
        values = _split(getattr(args, name))
        if values:
            grid[name] = [coerce(name, v) for v in values]
    for name in own:  # one value: for every SAE it fits (a sweep's too); several: a grid
        values = [coerce(name, v) for v in _split(getattr(args, name))]
        if len(values) > 1:
            grid[name] = values
        elif values:
            given[name] = values[0]
    base = TrainConfig(**{k: v for k, v in given.items() if k in shared_fields})
    run_defaults = {k: v for k, v in given.items() if k in run_fields}
    if args.sweep:
        if grid:
            flags = ", ".join(_flag(k) for k in grid)
            raise TraitscopeError(f"give the runs either as a grid ({flags}) or in --sweep, not both")
        top, entries = load_sweep(args.sweep)
        sweep_shared = {k: v for k, v in top.items() if k in shared_fields}
        run_defaults.update({k: v for k, v in top.items() if k in run_fields})
        for key, value in sweep_shared.items():
            if key in given and given[key] != value:
                raise TraitscopeError(f"{key} is {given[key]!r} on the command line but {value!r} in {args.sweep}")
        return plan_runs(base, run_defaults, {}, entries, shared_overrides=sweep_shared)
    return plan_runs(base, run_defaults, grid, None)


def run(args: argparse.Namespace) -> int:
    from traitscope import dist
    from traitscope.train.trainer import train

    cfg, settings = config_from_args(args)
    with dist.session(dist.pick_device(cfg.device)) as world:
        results = train(cfg, settings)
    # every SAE's line is printed once: by rank 0, or in a sweep by the process that trained it
    if not (world.is_main or cfg.dist_mode == "sweep"):
        return 1 if any(r.status not in ("trained", "already trained", "stopped") for r in results) else 0
    if results:
        print()
    failed = 0
    for r in results:
        if r.status in ("trained", "already trained") and r.metrics:
            m = r.metrics
            print(f"{r.dpath}  {r.status}: NMSE {m['nmse']:.4f}, L0 {m['l0']:.1f}, "
                  f"dead {m['dead_frac']:.1%} on held-out images ({m['dead_frac_train']:.1%} in training), "
                  f"dense {m['dense_frac']:.1%}")
        elif r.status == "stopped":
            print(f"{r.dpath}  stopped with a checkpoint; rerun the same command to continue")
        else:
            failed += 1
            print(f"{r.dpath}  failed: {r.message}", file=sys.stderr)
    return 1 if failed else 0

