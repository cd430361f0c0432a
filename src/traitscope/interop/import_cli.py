"""`traitscope import FORMAT:PATH --shards DIR --out RUN`: an SAE trained by saev, SAELens or sparsify
becomes a traitscope run folder, so `inference`, `align`, `pareto` and the app use it as they use a
trained one."""

import argparse

from traitscope.interop import FORMATS, read_foreign_sae
from traitscope.interop.runs import METRIC_TOKENS, import_run
from traitscope.shards import Shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="FORMAT:PATH",
                        help=f"the SAE: {', '.join(f + ':PATH' for f in FORMATS)} (a saev dump file, its "
                             "checkpoint/ or run folder; a SAELens or sparsify SAE folder)")
    parser.add_argument("--shards", required=True, metavar="DIR", help="shard folder of the activations it reads")
    parser.add_argument("--out", required=True, metavar="RUN", help="run folder to write (e.g. runs/fish-saev)")
    parser.add_argument("--layer", type=int, default=None,
                        help="layer it reads (default: the one its files name, or the only one stored)")
    parser.add_argument("--token-kind", choices=("patches", "cls"), default=None,
                        help="tokens it reads (default: what its files say, else patches)")
    parser.add_argument("--metric-tokens", type=int, default=METRIC_TOKENS,
                        help="held-out tokens for metrics.json, at most (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="device for the metrics pass (default cpu)")


def run(args: argparse.Namespace) -> int:
    foreign = read_foreign_sae(args.source)
    sae = foreign.sae
    print(f"read {foreign.source['format']} SAE: {sae.cfg.variant}, d_model={sae.d_model}, d_sae={sae.d_sae}"
          + (f", {sae.params.describe()}" if sae.params.describe() else ""))
    result = import_run(foreign, args.shards, args.out, layer=args.layer, token_kind=args.token_kind,
                        metric_tokens=args.metric_tokens, device=args.device)
    if foreign.model_sha256 and foreign.model_sha256 == result.shards_model.get("weights_sha256"):
        print(f"same backbone weights as the shards ({foreign.model}, sha256 {foreign.model_sha256[:12]}…)")
    elif foreign.model:
        print(f"its files say it was trained on {foreign.model}; the shards hold {result.shards_model.get('name')}: "
              "traitscope cannot check that these are the same weights (the widths match)")
    for note in foreign.notes:
        print(f"note: {note}")
    unknown = Shards(args.shards).images_unknown()
    if unknown:
        print(f"note: {unknown}")
    m = result.metrics
    print(f"held-out: nmse {m['nmse']:.4f}, L0 {m['l0']:.1f}, dead {m['dead_frac']:.1%} ({m['n_tokens']:,} tokens)")
    print(f"wrote {result.dpath} (layer {result.layer}, {result.token_kind}); next: traitscope inference "
          f"--run {result.dpath} --shards {args.shards}")
    return 0
