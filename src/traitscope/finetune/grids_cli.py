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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from simple_parsing import field

from traitscope.cli_config import add_config
from traitscope.errors import TraitscopeError
from traitscope.features.enrichment import top_image_enrichment
from traitscope.features.ranking import RANKINGS
from traitscope.files import atomic_open, atomic_write_json, check_out_dpath
from traitscope.finetune import grids
from traitscope.shards.store import Shards


@dataclass
class GridsConfig:
    """What `traitscope grids` draws; every field is also a command-line option."""

    shards: str = field(default="", required=True)
    """Shard folder with image-level (cls) rows."""
    run: str | None = None
    """SAE run folder (trained on those cls rows): also draw its features."""
    out: str = field(default="", required=True)
    """Output folder for the PNGs and tables."""
    n: int = grids.N_TOP
    """Top images per unit (16: a 4x4 grid)."""
    layer: int | None = None
    """Layer of the dense embedding (default: the run's, else the deepest stored)."""
    normalize: bool = True
    """L2-normalise each image's vector before ranking (--no-normalize: rank raw values, by max activation)."""
    limit: int | None = None
    """Draw at most this many grids per kind (default: all units)."""
    cell: int = 128
    """Pixels per image in a grid."""

    def validate(self) -> None:
        """Raise TraitscopeError naming the first impossible setting."""
        for flag, value, low in (("--n", self.n, 1), ("--cell", self.cell, 8), ("--limit", self.limit, 0)):
            if value is not None and value < low:
                raise TraitscopeError(f"{flag} must be at least {low}, not {value}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config(parser, GridsConfig, dest="cfg")


def run(args: argparse.Namespace) -> int:
    cfg = args.cfg
    cfg.validate()
    shards = Shards(cfg.shards)
    out_dpath = check_out_dpath(cfg.out)
    out_dpath.mkdir(parents=True, exist_ok=True)
    layer = cfg.layer
    if layer is None and cfg.run:
        layer = grids.run_layer(cfg.run)
    layer = grids.default_layer(shards) if layer is None else shards.resolve(layer)

    by = "normalised" if cfg.normalize else "max"
    print(f"{RANKINGS[by]} (layer {layer})")
    tops = [grids.dense_top_images(shards, layer, cfg.n, by)]
    if cfg.run:
        tops.append(grids.sae_top_images(shards, cfg.run, cfg.n, by, layer))
    images = grids.ShardImages(shards, cell=cfg.cell)
    drawn = {}
    for top in tops:
        units = top.full_units() if top.kind == "dense" else np.flatnonzero(top.rows_un[:, 0] >= 0)
        fpaths = grids.save_grids(top, images, out_dpath, units[:cfg.limit])
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
        summary = grids.enrichment_summary(rows, min_top=max(1, cfg.n // 2))
        for kind, s in summary.items():
            if not s["n_units"]:
                print(f"enrichment ({kind}): no unit has {s['min_top']} or more top images")
                continue
            print(f"enrichment ({kind}, {s['n_units']} units with >= {s['min_top']} top images): mean lift of the best "
                  f"attribute {s['mean_best_lift']:.2f}, {100 * s['frac_significant']:.0f}% significant "
                  f"(hypergeometric p over the top {cfg.n} images, Bonferroni over {len(names)} attributes, "
                  f"alpha {s['alpha']})")
        print(f"table: {out_dpath / 'enrichment.csv'}")
    atomic_write_json(out_dpath / "grids.json", {
        "format": "traitscope-grids/1",
        "shards": {"hash": shards.hash, "path": str(shards.dpath.resolve()), "normalize": shards.manifest.get("normalize")},
        "run": str(Path(cfg.run).resolve()) if cfg.run else None,
        "layer": layer,
        "n": cfg.n,
        "normalize_before_ranking": cfg.normalize,
        "ranking": {"by": by, "label": RANKINGS[by]},
        "grids": drawn,
        "enrichment": summary,
    })
    return 0
