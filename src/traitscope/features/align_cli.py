"""`traitscope align`: score features against known trait labels, next to the baselines.

Runs (or reuses) inference and the baselines, then writes alignment.csv, alignment.md and
enrichment.csv into the inference folder and prints the markdown table.
"""

import argparse

from traitscope.features.alignment import EVAL_TOKENS, SELECT_IMAGES, align, write_report
from traitscope.features.cli import add_common_arguments, metrics_table, open_and_infer
from traitscope.features.enrichment import top_label_counts, write_enrichment
from traitscope.features.heldout import FIT_TOKENS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--select-tokens", type=int, default=FIT_TOKENS,
                        help=f"training patches on which each label's best feature is chosen (default {FIT_TOKENS})")
    parser.add_argument("--select-images", type=int, default=SELECT_IMAGES,
                        help=f"training images for image-level labels (default {SELECT_IMAGES})")
    parser.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS,
                        help=f"held-out patches scored at most (default {EVAL_TOKENS})")


def run(args: argparse.Namespace) -> int:
    inputs, inf = open_and_infer(args)
    baselines, _ = metrics_table(args, inputs, inf)
    rows = align(inputs, inf, baselines, select_tokens=args.select_tokens, select_images=args.select_images,
                 eval_tokens=args.eval_tokens, progress=not args.quiet)
    md = write_report(rows, inf.dpath / "alignment.csv", inf.dpath / "alignment.md")
    write_enrichment(top_label_counts(inf, inputs.shards), inf.dpath / "enrichment.csv")
    print(f"\n{md}\nwrote {inf.dpath / 'alignment.csv'}, alignment.md and enrichment.csv")
    return 0
