"""`traitscope match RUN_A RUN_B --shards S --out match.csv`: pair the features of two SAEs.

Both runs must read the same model and layer; their inference over the shards is computed when
missing (or reused). The table (traitscope.features.matching) is what the app's Compare runs page shows.
"""

import argparse
from pathlib import Path

import torch

from traitscope.errors import TraitscopeError
from traitscope.features.inference import run_inference
from traitscope.features.inputs import open_inputs
from traitscope.features.matching import MIN_IMAGES, MIN_SCORE, match_features, write_matching


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", metavar="RUN_A", help="an SAE run folder")
    parser.add_argument("run_b", metavar="RUN_B", help="another, on the same model and layer")
    parser.add_argument("--shards", required=True, help="shard folder both runs are applied to (same images)")
    parser.add_argument("--out", type=Path, required=True, help="CSV to write")
    parser.add_argument("--min-score", type=float, default=MIN_SCORE,
                        help="mean of decoder cosine and activation correlation a pair needs to count as matched "
                        f"(default {MIN_SCORE})")
    parser.add_argument("--min-images", type=int, default=MIN_IMAGES,
                        help=f"leave out features firing on fewer images (default {MIN_IMAGES}: dead and one-image)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if not -1.0 <= args.min_score <= 1.0:
        raise TraitscopeError("--min-score must lie in [-1, 1]")
    if args.out.parent and not args.out.parent.is_dir():
        raise TraitscopeError(f"--out {args.out}: folder {args.out.parent} does not exist")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    found = []
    for run_dpath in (args.run_a, args.run_b):
        inputs = open_inputs(run_dpath, args.shards, device=device)
        inf, _ = run_inference(inputs.run_dpath, inputs.shards.dpath, progress=not args.quiet, inputs=inputs)
        found.append((inputs, inf))
    (in_a, inf_a), (in_b, inf_b) = found
    if (in_a.layer, in_a.token_kind) != (in_b.layer, in_b.token_kind):
        raise TraitscopeError(f"RUN_A reads layer {in_a.layer} {in_a.token_kind} tokens, RUN_B layer {in_b.layer} "
                              f"{in_b.token_kind}: only runs on the same model and layer can be matched")
    matching = match_features(in_a.sae.W_dec.detach().cpu().numpy(), in_b.sae.W_dec.detach().cpu().numpy(),
                              inf_a, inf_b, args.min_score, args.min_images)
    write_matching(matching, args.out)
    n_pairs = int(matching.matched.sum())
    only_a = int(((matching.feature_b < 0)).sum())
    only_b = int(((matching.feature_a < 0)).sum())
    print(f"{n_pairs} matched pairs (score >= {args.min_score}), {only_a} features only in RUN_A, "
          f"{only_b} only in RUN_B (features firing on >= {args.min_images} images); wrote {args.out}")
    return 0
