"""Validity on real photos: do single SAE features find CamVid's labelled classes, against baselines?

Runs the real command line, as a user would, on `../shared/data/camvid_train` (367 street-scene frames
of three drives, per-pixel masks of 11 classes):

1. `traitscope shards --masks --resolution 448` — patch tokens of the offline DINOv2-S (layer -2), each
   patch labelled with the classes its pixels show. The frames are 480 x 360 px, which 448 keeps at about
   their own size; at the models' own 224 they shrink to 256 x 192, and a CNN's last stage has 48 tokens
   per frame, too few for small classes (and for k-means' thousands of centroids: docs/alignment.md);
2. `traitscope train --val-split contiguous --val-frac 0.2` — TopK and Matryoshka SAEs in one pass, at
   train's default width (`--variants` names others, e.g. archetypal; `--d-sae` another width).
   Neighbouring frames are near-duplicates, so the held-out 20% are 5 runs of neighbouring frames
   spread over the drives, not a random draw (which would score features on twins of the frames they
   were chosen on);
3. `traitscope align` per SAE — per class, the single feature with the best AP on training patches,
   its AP on the held-out frames' patches, next to the dense dimensions, PCA, k-means and a
   logistic-regression probe (the ceiling), every method scored both ways (dense scores: SAE
   pre-activations against dimensions / projections / k-means −distance; sparse scores: SAE codes
   against dimensions / projections kept at the SAE's L0 and the k-means hard assignment).

Prints the per-class table, mean AP / coverage (share of classes with held-out AP >= 0.5) per method
and scoring, and whether each SAE beats each baseline scored the same way; then the same for the
secondary view, each class's best set of up to 3 sparse features. Reruns reuse the shards,
the trained runs and the inference folders. Measured on 2 idle CPU cores: 8.1 minutes with the
offline DINOv2-S, about 4 with `--model efficientnet-lite0` (figures in docs/alignment.md).

Another set of photos with per-pixel masks runs the same way with `--images DIR --masks DIR` (the
held-out share is then contiguous runs of its sorted file names). A set with per-image labels runs
with `--images DIR --labels SPEC` (`folders`, a CSV or a CelebA attribute list, as `traitscope shards`
takes them), scored per image (a patch feature's image score is its largest over the image's patches);
its held-out images are then a random draw (class folders sort one class after another, so contiguous
runs would hold out whole classes), or contiguous runs with `--val-split contiguous`.

    python benchmarks/study_camvid.py [--data DIR | --images DIR (--masks DIR | --labels SPEC)] [--out DIR] [--tokens N]
                                      [--d-sae N] [--k K] [--model M] [--layer L] [--resolution PX] [--variants V,...]
                                      [--seed S] [--val-split contiguous|random]
"""

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from traitscope.features.alignment import COLUMNS, headline, read_alignment, summarise

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "camvid_train"
VARIANTS = "topk,matryoshka"


def cli(*args: str) -> str:
    """Run `traitscope ARGS` in a fresh process (as a user would); its stdout, or exit with its error."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "traitscope.cli", *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"traitscope {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    print(f"  traitscope {args[0]}: {time.perf_counter() - t0:.0f} s", flush=True)
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="CamVid folder with images/ and masks/")
    parser.add_argument("--images", type=Path, help="another set's photos (default: DATA/images)")
    parser.add_argument("--masks", type=Path, help="their masks, ids or colours with their names (default: DATA/masks; "
                                                   "docs/tutorial.md)")
    parser.add_argument("--labels", help="per-image labels instead of masks: 'folders', a CSV or a CelebA attribute "
                                         "list (docs/tutorial.md); scored per image")
    parser.add_argument("--val-split", choices=("contiguous", "random"), default=None,
                        help="how the 20%% held-out images are drawn (default: contiguous runs of the sorted names "
                             "with masks, random with --labels)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/traitscope-camvid"), help="work folder (reused)")
    parser.add_argument("--tokens", default="1M", help="training tokens per SAE (default 1M, about 13 epochs)")
    parser.add_argument("--d-sae", help="latents per SAE (default: train's, 16 per dimension)")
    parser.add_argument("--k", default="32", help="active latents per token (default 32)")
    parser.add_argument("--model", default="dinov2-vits14-saliency-offline",
                        help="backbone (default: the offline DINOv2-S; efficientnet-lite0 is the offline CNN)")
    parser.add_argument("--layer", default="-2", help="layer whose patch tokens are modelled (default -2)")
    parser.add_argument("--resolution", default="448", help="side of the model's square input in pixels (default 448: "
                                                            "192 tokens per frame at a CNN's last stage, 48 at 224)")
    parser.add_argument("--variants", default=VARIANTS, help=f"SAE variants, one run each (default {VARIANTS})")
    parser.add_argument("--seed", default="0", help="seed of the SAEs' initialisation and data order (the held-out "
                                                    "frames stay the same)")
    args = parser.parse_args()
    if args.labels and args.masks:
        sys.exit("give --masks or --labels, not both")
    images = args.images = args.images or args.data / "images"
    if args.labels:
        truth, args.level = ["--labels", args.labels], "image"
        args.val_split = args.val_split or "random"
        print(f"alignment benchmark: {images.resolve()} with the labels {args.labels}", flush=True)
    else:
        args.masks = args.masks or args.data / "masks"
        truth, args.level = ["--masks", str(args.masks)], "patch"
        args.val_split = args.val_split or "contiguous"
        print(f"alignment benchmark: {images.resolve()} with the masks of {args.masks.resolve()}", flush=True)
    for what, dpath in (("photos", images), ("masks", args.masks)):
        if dpath is not None and not dpath.is_dir():
            sys.exit(f"no folder of {what} at {dpath} (the CamVid set of ../shared/data, or give --images and --masks "
                     "or --labels)")
    t0 = time.perf_counter()

    shards = Path(cli("shards", "--images", str(images), *truth,
                      "--model", args.model, "--layers", args.layer, "--tokens", "patches",
                      "--resolution", args.resolution,
                      "--out", str(args.out / "shards")).strip().splitlines()[-1])
    runs_dpath = args.out / (f"runs-{shards.name}-{args.tokens}-{args.d_sae or 'x16'}-k{args.k}"
                             + (f"-seed{args.seed}" if args.seed != "0" else ""))  # one run per variant
    width = ["--d-sae", args.d_sae] if args.d_sae else []
    out = cli("train", "--shards", str(shards), "--sae", args.variants, *width, "--k", args.k,
              "--tokens", args.tokens, "--val-frac", "0.2", "--val-split", args.val_split, "--seed", args.seed,
              "--out", str(runs_dpath), "--quiet")
    # the runs of this command (the folder may also hold runs made with other defaults before)
    made = [Path(line.split("  ")[0]) for line in out.splitlines() if " trained: " in line]  # "PATH  trained: …"
    runs = {}
    for run in made:
        cli("align", "--run", str(run), "--shards", str(shards), "--quiet")
        sae = json.loads((run / "config.json").read_text())["sae"]
        runs[sae["variant"]] = read_alignment(run / "inference" / shards.name / "alignment.csv")
    report(runs, args, sae["d_sae"], time.perf_counter() - t0)


def report(runs: dict, args: argparse.Namespace, d_sae: int, seconds: float) -> None:
    """The per-class table (baselines from the first run: every run's are fitted on the same tokens),
    the summary per method and scoring, and the like-for-like verdicts."""
    runs = {v: [r for r in rows if r.level == args.level] for v, rows in runs.items()}
    first = next(iter(runs.values()))
    truth = f"Patch labels of {args.masks}" if args.level == "patch" else f"Image labels {args.labels}"
    held = "in 5 contiguous runs" if args.val_split == "contiguous" else "at random"
    print(f"\n{truth}, held-out AP of each class's best single feature; {args.model} layer "
          f"{args.layer} at {args.resolution} px, {args.tokens} tokens, {d_sae} latents, "
          f"k={args.k}, seed {args.seed}; 20% of the images held out {held}; {seconds / 60:.1f} minutes in all\n")
    cols = [(f"{v} {title.split()[1]}", v, "sae", s) for v in runs for s, cols in COLUMNS.items()
            for m, title in cols if m == "sae"]
    cols += [(title, None, m, s) for s, cols in COLUMNS.items() for m, title in cols if m != "sae"]
    print("| class | base rate | " + " | ".join(c[0] for c in cols) + " |")
    print("| --- | ---: |" + " ---: |" * len(cols))
    unscored = [label for label in dict.fromkeys(r.label for r in first)
                if all(math.isnan(r.ap) for r in first if r.label == label)]
    for label in dict.fromkeys(r.label for r in first if r.label not in unscored):
        cells = []
        for _, variant, method, scoring in cols:
            rows = runs[variant] if variant else first
            r = next((r for r in rows if (r.label, r.method) == (label, method)
                      and (r.scoring == scoring or method == "probe")), None)
            cells.append("" if r is None else f"{r.ap:.3f}")
        any_row = next(r for r in first if r.label == label)
        print(f"| {label}{' (dominant)' if any_row.dominant else ''} | {any_row.base_rate:.3f} | "
              + " | ".join(cells) + " |")
    if unscored:
        print(f"\n(no held-out positives, so no AP: {', '.join(unscored)})")
    print("\nmean AP / coverage (classes with AP >= 0.5), dense scores | sparse scores | sets of sparse features:")
    out = {}
    for variant, rows in runs.items():
        summaries = summarise(rows)
        for s in summaries:
            if s.method != "sae" and variant != next(iter(runs)):
                continue
            name = f"{variant} sae" if s.method == "sae" else s.method
            out[f"{name}/{s.scoring}"] = [s.mean_ap, s.coverage]
        for line in headline(summaries, args.level, tuple(COLUMNS)):
            print(f"  {variant}: {line}")
    for name in dict.fromkeys(k.split("/")[0] for k in out):
        both = [out.get(f"{name}/{s}") for s in COLUMNS]
        print(f"  {name:16s} " + " | ".join(f"{v[0]:.3f} / {v[1]:.0%}" if v else "-" for v in both))
    print(json.dumps({"bench": "camvid", "masks": args.masks and str(args.masks), "labels": args.labels,
                      "val_split": args.val_split, "model": args.model, "layer": args.layer,
                      "resolution": args.resolution, "tokens": args.tokens, "d_sae": d_sae, "k": args.k,
                      "seed": args.seed, "minutes": round(seconds / 60, 1),
                      "mean_ap_coverage": {k: [round(x, 3) for x in v] for k, v in out.items()}}))


if __name__ == "__main__":
    main()
