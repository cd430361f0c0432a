"""`traitscope pareto`: compare runs on sparsity (L0) against reconstruction error (NMSE).

Writes pareto.csv and pareto.png (frontier drawn) and prints the frontier runs.
"""

import argparse
from pathlib import Path

from traitscope.errors import TraitscopeError
from traitscope.features.pareto import find_points, frontier_table, mark_frontier, plot, write_csv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", required=True, help="folder of run folders (searched recursively)")
    parser.add_argument("--out", default=None, help="where pareto.csv and pareto.png go (default: --runs)")
    parser.add_argument("--labels", action="store_true", help="write each run's name next to its point")


def run(args: argparse.Namespace) -> int:
    points, skipped = find_points(args.runs)
    for note in skipped:
        print(f"skipped {note}")
    if not points:
        raise TraitscopeError(f"no finished SAE runs (config.json + metrics.json) under {args.runs}")
    points = mark_frontier(points)
    out = Path(args.out or args.runs)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(points, out / "pareto.csv")
    plot(points, out / "pareto.png", labels=args.labels)
    print(f"{len(points)} runs, {sum(p.on_frontier for p in points)} on the frontier:\n")
    print(frontier_table(points))
    print(f"wrote {out / 'pareto.csv'} and {out / 'pareto.png'}")
    return 0
