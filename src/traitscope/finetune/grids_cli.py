"""`traitscope grids`: 4x4 grids of the top images of each dense dimension and each SAE feature.

    traitscope grids --shards shards/<hash> [--run runs/<run>] --out grids/ [--n 16]

Writes, under --out:

    dense/dense_<dim>.png, sae/sae_<feature>.png   the grids (best image top-left, row-major)
    top_images.npz        dense_rows, dense_values, sae_rows, sae_values: (n_units, n) arrays;
                          rows index the shards' images (images.jsonl, sorted path order), -1 = none
    enrichment.csv        per unit, its most over-represented image attribute among its top images
                          (when the shards have image labels, e.g. CelebA's 40 attributes)
    grids.json            what was drawn from what, how images were ranked, and the enrichment summary

Images rank by share of the L2-normalised image vector (`--no-normalize`: by max activation), see
`traitscope.features.ranking`; enrichment is a one-sided hypergeometric p over each unit's top images,
Bonferroni over attributes (`traitscope.features.enrichment.top_image_enrichment`).
"""

import argparse
import csv
from pathlib import Path

import numpy as np

from traitscope.errors import TraitscopeError
from traitscope.features.enrichment import top_image_enrichment
from traitscope.features.ranking import RANKINGS
from traitscope.files import atomic_open, atomic_write_json, check_out_dpath
from traitscope.finetune import grids
from traitscope.shards.store import Shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, help="shard folder with image-level (cls) rows")
    parser.add_argument("--run", help="SAE run folder (trained on those cls rows): also draw its features")
    parser.add_argument("--out", required=True, help="output folder for the PNGs and tables")
    parser.add_argument("--n", type=int, default=grids.N_TOP, help="top images per unit (default: 16, a 4x4 grid)")
    parser.add_argument("--layer", type=int, help="layer of the dense embedding (default: the run's, else the deepest stored)")
    parser.add_argument("--no-normalize", dest="normalize", action="store_false",
                        help="rank raw values instead of L2-normalising each image's vector first")
    parser.add_argument("--limit", type=int, help="draw at most this many grids per kind (default: all units)")
    parser.add_argument("--cell", type=int, default=128, help="pixels per image in a grid (default: 128)")


def run(args: argparse.Namespace) -> int:
    for flag, value, low in (("--n", args.n, 1), ("--cell", args.cell, 8), ("--limit", args.limit, 0)):
        if value is not None and value < low:
            raise TraitscopeError(f"{flag} must be at least {low}, not {value}")
    shards = Shards(args.shards)
    out_dpath = check_out_dpath(args.out)
    out_dpath.mkdir(parents=True, exist_ok=True)
    layer = args.layer
    if layer is None and args.run:
        layer = grids.run_layer(args.run)
    layer = grids.default_layer(shards) if layer is None else shards.resolve(layer)

    by = "normalised" if args.normalize else "max"
    print(f"{RANKINGS[by]} (layer {layer})")
    tops = [grids.dense_top_images(shards, layer, args.n, by)]
    if args.run:
        tops.append(grids.sae_top_images(shards, args.run, args.n, by, layer))
    images = grids.ShardImages(shards, cell=args.cell)
    drawn = {}
    for top in tops:
        units = top.full_units() if top.kind == "dense" else np.flatnonzero(top.rows_un[:, 0] >= 0)
        fpaths = grids.save_grids(top, images, out_dpath, units[:args.limit])
        drawn[top.kind] = {"n_units": top.n_units, "n_with_images": len(units), "n_grids": len(fpaths)}
        print(f"{len(fpaths)} {top.kind} grids in {out_dpath / top.kind} "
              f"({top.n_units} units, {len(units)} with top images)")
    np.savez(out_dpath / "top_images.npz", **{f"{t.kind}_{k}": getattr(t, f"{k}_un") for t in tops for k in ("rows", "values")})

    summary = None
    labels_na = shards.image_labels()
    if labels_na is not None:
        names = shards.image_label_names
        rows = []
        for top in tops:
            rows += grids.enrichment_rows(top, top_image_enrichment(top, labels_na), names)
        with atomic_open(out_dpath / "enrichment.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        summary = grids.enrichment_summary(rows, min_top=max(1, args.n // 2))
        for kind, s in summary.items():
            if not s["n_units"]:
                print(f"enrichment ({kind}): no unit has {s['min_top']} or more top images")
                continue
            print(f"enrichment ({kind}, {s['n_units']} units with >= {s['min_top']} top images): mean lift of the best "
                  f"attribute {s['mean_best_lift']:.2f}, {100 * s['frac_significant']:.0f}% significant "
                  f"(hypergeometric p over the top {args.n} images, Bonferroni over {len(names)} attributes, "
                  f"alpha {s['alpha']})")
        print(f"table: {out_dpath / 'enrichment.csv'}")
    atomic_write_json(out_dpath / "grids.json", {
        "format": "traitscope-grids/1",
        "shards": {"hash": shards.hash, "path": str(shards.dpath.resolve()), "normalize": shards.manifest.get("normalize")},
        "run": str(Path(args.run).resolve()) if args.run else None,
        "layer": layer,
        "n": args.n,
        "normalize_before_ranking": args.normalize,
        "ranking": {"by": by, "label": RANKINGS[by]},
        "grids": drawn,
        "enrichment": summary,
    })
    return 0
