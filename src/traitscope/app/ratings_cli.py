"""`traitscope ratings FILE`: the blind test's summary for a saved ratings file."""

import argparse
from pathlib import Path

from traitscope.app.blind import load_session, summarise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a ratings file (.jsonl) written by the app's blind test")
    parser.add_argument("--png", type=Path, default=None, help="also save the histogram of ratings by kind here")


def run(args: argparse.Namespace) -> int:
    session = load_session(args.file)
    summary = summarise(session)
    n_items = len(session.items)
    print(f"{args.file}: {len(session.ratings)} of {n_items} items rated")
    print(summary.text())
    if args.png is not None:
        summary.histogram().save(args.png)
        print(f"histogram saved to {args.png}")
    return 0
