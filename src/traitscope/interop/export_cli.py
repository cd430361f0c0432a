"""`traitscope export RUN --to saelens|sparsify OUT`: a traitscope SAE as a SAELens or sparsify folder,
which those libraries' own loaders read (SAELens `SAE.load_from_disk`, sparsify
`SparseCoder.load_from_disk`) and which `traitscope import` reads back exactly."""

import argparse
from pathlib import Path

from traitscope.errors import TraitscopeError
from traitscope.files import atomic_folder
from traitscope.runs import RunFolder, shards_ref
from traitscope.sae import load_sae

TARGETS = ("saelens", "sparsify")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="traitscope run folder (config.json + sae.safetensors)")
    parser.add_argument("--to", required=True, choices=TARGETS, help="format to write")
    parser.add_argument("out", metavar="OUT", help="folder to write (must not hold an SAE already)")


def provenance(config: dict) -> dict:
    """What the exported files say about where the SAE belongs: model, layer, token kind, shards."""
    ref = shards_ref(config)
    layer, kind = ref.layer, ref.token_kind
    return {"model_name": ref.model, "hook_name": f"blocks.{layer}.{kind}" if layer is not None else None,
            "hook_layer": layer, "token_kind": kind, "shards_hash": ref.hash,
            "weights_sha256": ref.weights_sha256, "exported_by": "traitscope"}


def export_run(run_dpath: Path, to: str, out_dpath: Path) -> Path:
    from traitscope.interop.saelens import write_saelens
    from traitscope.interop.sparsify import write_sparsify

    sae = load_sae(run_dpath)
    meta = provenance(RunFolder(run_dpath).read_config())
    if out_dpath.exists() and (not out_dpath.is_dir() or any(out_dpath.iterdir())):
        raise TraitscopeError(f"{out_dpath} exists and is not an empty folder; choose another or remove it")
    with atomic_folder(out_dpath) as part:
        (write_saelens if to == "saelens" else write_sparsify)(sae, part, meta)
    return out_dpath


def run(args: argparse.Namespace) -> int:
    out = export_run(Path(args.run), args.to, Path(args.out))
    print(f"wrote {out} ({args.to}); read it back with: traitscope import {args.to}:{out} --shards DIR --out RUN")
    return 0
