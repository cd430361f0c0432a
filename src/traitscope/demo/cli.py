"""`traitscope demo`: the whole workflow on an embedded default, with a report.

With no options it generates the synthetic trait set, extracts activations with the offline
saliency-fine-tuned DINOv2 ViT-S/14, trains a small sweep (TopK at several k and one ReLU/L1) in one
pass, draws the Pareto plot, runs inference and trait alignment against baselines, and writes
<out>/report.html. A rerun reuses every finished step.
"""

import argparse
import dataclasses

from traitscope.demo.pipeline import DemoConfig, run_demo
from traitscope.train.config import field_docs, parse_count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    docs, defaults = field_docs(DemoConfig), DemoConfig()
    for f in dataclasses.fields(DemoConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{docs[f.name]} (default: {default})"
        if f.name == "ks":
            parser.add_argument(flag, default=",".join(map(str, default)), help=help_text)
        elif f.name == "tokens":
            parser.add_argument(flag, default=default, type=parse_count, help=help_text)
        else:
            parser.add_argument(flag, default=default, type=type(default) if default is not None else str,
                                help=help_text)


def run(args: argparse.Namespace) -> int:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)}
    values["ks"] = tuple(int(k) for k in str(values["ks"]).split(",") if k.strip())
    result = run_demo(DemoConfig(**values))
    print(f"\nreport: {result.report_fpath.resolve()}")
    print(f"open the app on the same outputs:\n  traitscope app --runs {result.runs_dpath} --shards {result.shards_dpath}")
    return 0
