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
import typing

from simple_parsing.docstring import get_attribute_docstring

from traitscope.cli_config import add_config, comma_list, parse_count, show_default
from traitscope.errors import TraitscopeError
from traitscope.runs import RunFolder
from traitscope.sae import variant_class, variants
from traitscope.sae.batchtopk import BatchTopKSAE
from traitscope.train.config import RunSettings, TrainConfig, load_sweep, plan_runs, setting_names, variant_fields

# Per-run settings whose comma lists on the command line make a grid (in help and messages by their flag).
GRID_FLAGS = {"variant": "--sae", "k": "--k", "l1_coeff": "--l1", "d_sae": "--d-sae", "expansion": "--expansion",
              "lr": "--lr"}
# Command-line types of the variants' parameters (the others: a comma list of their annotation's type).
PARAM_TYPES = {"k": comma_list(parse_count), "l1_coeff": comma_list(float), "prefixes": comma_list(parse_count)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("--sweep", metavar="FILE", help="JSON or TOML file listing the runs (example above); "
                        "keys are the long option names with underscores ('sae' and 'l1' work too)")
    add_config(parser, TrainConfig, dest="shared", given_only=True)
    add_config(parser, RunSettings, dest="run", given_only=True)
    add_config(parser, variant_params(), dest="params", given_only=True)


def variant_params() -> type:
    """Every registered variant's parameters as one dataclass for the command line: each option is the
    variant's default unless given, its help the docstring of the first variant that has it, naming the
    variants that have it and their default."""
    fields = []
    for name, (f, owners) in variant_fields().items():
        doc = " ".join(get_attribute_docstring(variants()[owners[0]].Params, name).docstring_below.split())
        default = "" if f.default in (None, dataclasses.MISSING) else f"; default {show_default(f.default)}"
        parse = PARAM_TYPES.get(name) or comma_list(_item_type(f.type))
        options = {"help": f"{doc.rstrip('.')} ({', '.join(owners)}{default}).",
                   "custom_args": {"type": parse, "metavar": f"{name.upper()}[,...]"}}
        if name in GRID_FLAGS and GRID_FLAGS[name] != "--" + name.replace("_", "-"):
            options["alias"] = [GRID_FLAGS[name]]
        fields.append((name, f.type | None, dataclasses.field(default=None, metadata=options)))
    return dataclasses.make_dataclass("SAEParameters", fields, namespace={
        "__doc__": "Each variant's own parameters (traitscope.sae.<variant>.Params); comma lists make a grid."})


def _item_type(annotation) -> typing.Callable:
    """How one value of a parameter reads: a count for an int (1k), a float, else the text."""
    types = [t for t in (annotation, *typing.get_args(annotation)) if t in (int, float)]
    return {int: parse_count, float: float}.get(types[0] if types else None, str)


def _flag(name: str) -> str:
    return GRID_FLAGS.get(name, "--" + name.replace("_", "-"))


def config_from_args(args: argparse.Namespace):
    """(TrainConfig, [RunSettings]) from the command line and an optional sweep file."""
    shared_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    run_fields = setting_names() - shared_fields
    given = dict(vars(args).get("shared", {}))
    run_defaults = dict(vars(args).get("run", {})) | dict(vars(args).get("params", {}))
    grid = {name: list(run_defaults.pop(name)) for name in GRID_FLAGS if name in run_defaults}
    if "variant" in grid:  # --sae may be repeated, each a comma list
        grid["variant"] = [v for values in grid["variant"] for v in values]
    if "prefixes" in run_defaults:
        run_defaults["prefixes"] = list(run_defaults["prefixes"])
    for name in set(variant_fields()) & set(run_defaults) - {"prefixes"}:  # one value: for every SAE it fits
        values = run_defaults.pop(name)  # (a sweep's too); several: a grid
        if len(values) > 1:
            grid[name] = list(values)
        else:
            run_defaults[name] = values[0]
    base = TrainConfig(**given)
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
            for hint in (l0_hint(r.dpath, m), dead_latent_hint(r.dpath, m)):
                if hint:
                    print(hint)
        elif r.status == "stopped":
            print(f"{r.dpath}  stopped with a checkpoint; rerun the same command to continue")
        else:
            failed += 1
            print(f"{r.dpath}  failed: {r.message}", file=sys.stderr)
    return 1 if failed else 0


DEAD_HINT_FRAC = 0.05
"""Share of latents silent at the end of training above which `train` adds a note."""


def dead_latent_hint(dpath, metrics: dict) -> str:
    """A line naming the two levers when many latents died ('' when few did): half the learning rate,
    or fewer latents.

    Measured (docs/training.md, "Dead latents on low-dimensional data"): with AuxK at weight 1/8, half the
    rate took the fish sample's dead share at 1,536 latents from 6.4% to 0.8%; on the demo's synthetic set
    at k = 8, where 77% of 3,072 latents died, half the rate let more die, and 768 latents reconstructed as
    well with 10% dead (with AuxK at 1/4 on an 8k window: 86% of 3,072 and 5% of 768)."""
    if metrics.get("dead_frac_train", 0) < DEAD_HINT_FRAC:
        return ""
    lr = RunFolder(dpath).read_config().get("train", {}).get("lr")
    rate = f" (--lr {lr / 2:.2g})" if isinstance(lr, (int, float)) else ""
    return (f"  note: {metrics['dead_frac_train']:.0%} of its latents stopped firing in training; half the learning "
            f"rate{rate} keeps more alive on some data, and at a small k the data may use fewer latents than the "
            f"SAE has (docs/training.md, \"Dead latents on low-dimensional data\")")


L0_HINT_EXCESS = 0.05
"""Share by which a learned-threshold SAE's held-out L0 may exceed k before `train` adds a note."""


def l0_hint(dpath, metrics: dict) -> str:
    """A line saying why an SAE with a learned threshold (BatchTopK, Matryoshka) fires more than k latents
    on held-out images ('' when it does not): the threshold keeps k on the training tokens, and new
    images fire more (docs/training.md, "Matryoshka, the default")."""
    sae = RunFolder(dpath).read_config().get("sae", {})
    k, variant = sae.get("k"), sae.get("variant")
    if not isinstance(k, int) or variant not in variants() or not issubclass(variant_class(variant), BatchTopKSAE):
        return ""
    if metrics.get("l0", 0) <= k * (1 + L0_HINT_EXCESS):
        return ""
    return (f"  note: L0 {metrics['l0']:.1f} on held-out images for k = {k}: its learned threshold keeps {k} on the "
            f"training tokens, and new images fire more; --sae topk keeps exactly {k} (docs/training.md, "
            f"\"Matryoshka, the default\")")
