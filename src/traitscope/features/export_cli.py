"""`traitscope export-features`: per-image values of chosen features as CSV or Parquet, for R or pandas.

    traitscope export-features --run runs/<run> --shards shards/<hash> --features 12,40,311 --out traits.csv

One row per image and feature: image (path under the shards' images root), row, label (and label_<name>
0/1 columns when the shards have image labels), feature, max and mean activation over the image's
patches, frac_patches (share of its patches where the feature fires), peak_patch / peak_row / peak_col
(the patch where it peaks, row-major over the patch grid) and peak_x / peak_y (that patch's centre as a
fraction of the original image's width and height, 0 = left / top). Empty peak columns: the feature does
not fire on that image. The run's inference folder is computed first if it does not exist (`--features
firing` reads it).
"""

import argparse
from pathlib import Path

import torch

from traitscope.features.export import feature_table, parse_features, write_table
from traitscope.features.inference import run_inference
from traitscope.features.inputs import open_inputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("--run", required=True, help="SAE run folder (config.json + sae.safetensors)")
    parser.add_argument("--shards", required=True, help="shard folder of the images to measure (same model and "
                        "layer as the SAE)")
    parser.add_argument("--features", required=True,
                        help="feature indices: '12,40,311', ranges '0-99', or 'firing' (every feature that fires "
                        "on some image: a long table)")
    parser.add_argument("--out", required=True, help="output file: .csv, or .parquet (needs pyarrow)")
    parser.add_argument("--device", default="auto", help="'cpu', 'cuda', ... (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    out_fpath = Path(args.out)
    if out_fpath.suffix.lower() not in (".csv", ".parquet"):  # refused before any work
        write_table(None, out_fpath)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    inputs = open_inputs(args.run, args.shards, device=device)
    inf, _ = run_inference(inputs.run_dpath, inputs.shards.dpath, progress=not args.quiet, inputs=inputs)
    features = parse_features(args.features, inf)
    table = feature_table(inputs, features, progress=not args.quiet)
    write_table(table, out_fpath)
    print(f"wrote {out_fpath}: {inputs.n_images} images x {len(features)} features = {len(table):,} rows")
    return 0
