"""`traitscope demo`: the whole workflow on an embedded default, with a report.

With no options it generates the synthetic trait set, extracts activations with the offline
saliency-fine-tuned DINOv2 ViT-S/14, trains a small sweep (Matryoshka at several k; `--l1` adds a ReLU/L1
SAE) in one pass, draws the Pareto plot, runs inference and trait alignment against baselines, and writes
<out>/report.html. A rerun reuses every finished step.
"""

import argparse

from traitscope.cli_config import add_config
from traitscope.demo.pipeline import DemoConfig, run_demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    add_config(parser, DemoConfig, dest="cfg")


def run(args: argparse.Namespace) -> int:
    result = run_demo(args.cfg)
    print(f"\nreport: {result.report_fpath.resolve()}")
    print(f"open the app on the same outputs:\n  traitscope app --runs {result.runs_dpath} --shards {result.shards_dpath}")
    return 0
