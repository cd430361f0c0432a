"""`traitscope pull hf:<owner>/<repo>[/<subfolder>]`: an SAE from the Hugging Face hub.

Without --out it downloads into the hub cache and says what it found. With --out it writes a run
folder: a traitscope run is copied; a SAELens, sparsify or saev SAE is imported onto --shards."""

import argparse
from pathlib import Path

from traitscope.errors import TraitscopeError
from traitscope.interop import read_foreign_sae
from traitscope.interop.hub import copy_run, detect_layout, download
from traitscope.interop.runs import import_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="hf:OWNER/REPO[/SUBFOLDER]", help="hub repository (and folder) to pull")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    parser.add_argument("--out", default=None, metavar="RUN", help="run folder to write (default: only download)")
    parser.add_argument("--shards", default=None, metavar="DIR",
                        help="shard folder the SAE reads (needed to import a SAELens, sparsify or saev SAE; "
                             "checked against a traitscope run)")
    parser.add_argument("--layer", type=int, default=None, help="layer it reads, for an import (see `import`)")
    parser.add_argument("--token-kind", choices=("patches", "cls"), default=None, help="tokens it reads, for an import")


def run(args: argparse.Namespace) -> int:
    dpath = download(args.source, args.revision)
    layout = detect_layout(dpath)
    print(f"{args.source}: {layout} SAE in {dpath}")
    if args.out is None:
        if layout == "traitscope":
            print(f"next: traitscope pull {args.source} --out runs/NAME [--shards DIR]")
        else:
            print(f"next: traitscope import {layout}:{dpath} --shards DIR --out runs/NAME")
        return 0
    out = Path(args.out)
    if layout == "traitscope":
        if args.shards:
            from traitscope.features.inputs import open_inputs

            open_inputs(dpath, args.shards)  # the SAE must read these shards' model, layer and width
        copy_run(dpath, out, {"spec": args.source, "revision": args.revision, "path": str(dpath)})
        print(f"wrote {out}; next: traitscope inference --run {out} --shards DIR")
        return 0
    if not args.shards:
        raise TraitscopeError(f"{args.source} holds a {layout} SAE: give --shards (the activations it reads) to "
                              "import it as a run folder")
    foreign = read_foreign_sae(f"{layout}:{dpath}")
    foreign = foreign._replace(source=foreign.source | {"hub": args.source, "revision": args.revision})
    result = import_run(foreign, args.shards, out, layer=args.layer, token_kind=args.token_kind)
    for note in foreign.notes:
        print(f"note: {note}")
    m = result.metrics
    print(f"held-out: nmse {m['nmse']:.4f}, L0 {m['l0']:.1f}; wrote {out} (layer {result.layer}, {result.token_kind})")
    return 0
