"""`traitscope inference`: every feature's activations over a data set, plus held-out metrics.

Writes `<run>/inference/<shards-hash>/` (see docs/formats.md): frequencies, means, histograms, top
images with patch maps, per-image maxima; and the held-out metrics table of the SAE next to the
dense, PCA and k-means baselines (metrics.csv / metrics.md). A rerun with the same inputs reuses it.
"""

import argparse

import numpy as np

from traitscope import dist
from traitscope.features.heldout import FIT_TOKENS, baselines_for, check_baseline_settings, heldout_metrics
from traitscope.features.inference import run_inference
from traitscope.features.inputs import open_inputs


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="SAE run folder (config.json + sae.safetensors)")
    parser.add_argument("--shards", required=True, help="shard folder (the one the SAE was trained on, or "
                        "another data set from the same model and layer)")
    parser.add_argument("--top-n", type=int, default=16, help="top images kept per feature (default 16)")
    parser.add_argument("--device", default="auto", help="'cpu', 'cuda', ... (default: cuda when available)")
    parser.add_argument("--fit-tokens", type=int, default=FIT_TOKENS,
                        help=f"training tokens the PCA / k-means baselines are fitted on (default {FIT_TOKENS})")
    parser.add_argument("--pca-k", type=int, default=None,
                        help="PCA components in the reconstruction (default: the SAE's k, or its mean L0)")
    parser.add_argument("--kmeans-clusters", type=int, default=None,
                        help="k-means centroids (default: the SAE's number of latents). The baselines are "
                        "fitted once per shards, layer and training split and cached in <shards>/baselines/; "
                        "k-means is scikit-learn's mini-batch k-means, 3 passes over the fitting tokens")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--no-metrics", action="store_true",
                        help="skip the held-out metrics table (SAE and baselines)")


def open_and_infer(args: argparse.Namespace):
    """Open the run and shards, and compute (or reuse) the inference folder; prints where it is."""
    check_baseline_settings(args.fit_tokens, args.pca_k, args.kmeans_clusters)
    device = str(dist.pick_device(args.device))
    inputs = open_inputs(args.run, args.shards, device=device)
    inf, computed = run_inference(inputs.run_dpath, inputs.shards.dpath, top_n=args.top_n, progress=not args.quiet,
                                  inputs=inputs)
    print(f"{'wrote' if computed else 'reused'} {inf.dpath}")
    return inputs, inf


def metrics_table(args: argparse.Namespace, inputs, inf):
    baselines, info = baselines_for(inputs, inf, fit_tokens=args.fit_tokens, pca_k=args.pca_k,
                                    n_clusters=args.kmeans_clusters, progress=not args.quiet)
    return baselines, heldout_metrics(inputs, inf, baselines, info)


def run(args: argparse.Namespace) -> int:
    inputs, inf = open_and_infer(args)
    freq = np.asarray(inf.array("feature_freq"))
    print(f"{inf.n_images} images, {inf.d_sae} features: {int((freq == 0).sum())} never fire, "
          f"{int((freq > 0.1).sum())} fire on more than 10% of tokens")
    if not args.no_metrics:
        _, (_, md) = metrics_table(args, inputs, inf)
        print(f"\nHeld-out metrics ({inf.dpath / 'metrics.csv'}):\n{md}")
    return 0
