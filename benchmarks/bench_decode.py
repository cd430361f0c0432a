"""Decoding speed: images/s of the shards pipeline's decode stage (read, decode, resize, crop), by
worker kind and decoding mode, on the fish photos and on generated 3000-px JPEGs; and how far the
model's input moves when JPEGs are decoded at reduced size.

The stage is `traitscope.shards.build.DecodeJob`, the one function the shards loader runs per image,
run here by the same pool (`decode_pool`) the loader uses, over every image, nothing else timed.
Rows:
  threads, full     -- the pipeline as it was before worker processes and draft decoding (the floor)
  processes, full   -- forked worker processes, same pixels, byte for byte
  threads/processes, draft -- JPEGs decoded at 1/2, 1/4 or 1/8 scale, never below the size the
                       backbone's Preprocess asks for (`Preprocess.resized_size`)
Pixel difference: the uint8 crop the model sees (224 x 224 x 3 for DINOv2), draft against full
decoding, mean and largest absolute difference in 0..255, and the mean in the model's normalised
units (after dividing by the channel std). On a CUDA machine the GPU decoder row is added when
available.

Images: ../shared/data/fishvista_demo (110 museum photos, 217-1130 px high) when present; the 3000-px
JPEGs are those photos (or synthetic smooth images without them) resized to 3000 px wide, quality 90.

    python benchmarks/bench_decode.py [--workers N] [--n-large 40] [--repeats 2]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from traitscope.backbones.hf_vit import DINOV2_PREPROCESS
from traitscope.images import FolderSource
from traitscope.shards.build import DecodeJob, decode_pool, default_workers

FISHVISTA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fishvista_demo"


class _Geometry:
    """What DecodeJob asks of a backbone: its preprocessing and patch grid (no model weights needed)."""

    preprocess = DINOV2_PREPROCESS

    def grid_at(self, layer: int) -> tuple[int, int]:
        return (16, 16)


def large_jpegs(dpath: Path, n: int, width: int = 3000) -> Path:
    """`n` JPEGs `width` px wide: the fish photos resized up, or smooth synthetic images."""
    dpath.mkdir(parents=True, exist_ok=True)
    photos = sorted(p for p in FISHVISTA.iterdir() if p.is_file()) if FISHVISTA.is_dir() else []
    rng = np.random.default_rng(0)
    for i in range(n):
        if photos:
            image = Image.open(photos[i % len(photos)]).convert("RGB")
        else:
            yy, xx = np.mgrid[0:600, 0:900].astype(np.float32)
            image = Image.fromarray(np.clip(np.stack([xx / 4, yy / 3, (xx + yy) / 6], -1)
                                            + rng.normal(0, 8, (600, 900, 3)), 0, 255).astype(np.uint8))
        height = round(width * image.height / image.width)
        image.resize((width, height), Image.Resampling.BICUBIC).save(dpath / f"large{i:04d}.jpg", quality=90)
    return dpath


def images_per_s(source: FolderSource, decode: str, workers: str, n_workers: int, repeats: int) -> float:
    job = DecodeJob(source, _Geometry(), 0, decode)
    records = source.records()
    pool, fn = decode_pool(job, n_workers, workers)
    try:
        list(pool.map(fn, records[:2 * n_workers]))  # warm: imports, page cache, worker start
        best = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            for decoded in pool.map(fn, records):
                assert decoded.skipped is None, decoded.skipped
            best = max(best, len(records) / (time.perf_counter() - t0))
        return best
    finally:
        pool.shutdown()


def pixel_difference(source: FolderSource) -> tuple[float, float, float, int]:
    """(mean |diff| /255, max |diff| /255, mean |diff| in normalised units, images drafted)."""
    full, draft = DecodeJob(source, _Geometry(), 0, "full"), DecodeJob(source, _Geometry(), 0, "draft")
    std = np.asarray(DINOV2_PREPROCESS.std) * 255.0
    means, maxes, normed, n_drafted = [], [], [], 0
    for record in source.records():
        a = full(record).pixels.astype(np.float64)
        b = draft(record).pixels.astype(np.float64)
        d = np.abs(a - b)
        means.append(d.mean())
        maxes.append(d.max())
        normed.append((d / std).mean())
        n_drafted += source.decode(record, DINOV2_PREPROCESS.resized_size).box is not None
    return float(np.mean(means)), float(np.max(maxes)), float(np.mean(normed)), n_drafted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=default_workers(), help="decoding workers (default: the cores)")
    parser.add_argument("--n-large", type=int, default=40, help="generated 3000-px JPEGs (default: 40)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        sets = []
        if FISHVISTA.is_dir():
            sets.append(("fishvista_demo (110 photos, 564-2786 px wide)", FolderSource(FISHVISTA)))
        sets.append((f"{args.n_large} generated 3000-px JPEGs", FolderSource(large_jpegs(Path(tmp) / "large", args.n_large))))
        print(f"decode stage (read, decode, resize to 256, crop 224; DINOv2 geometry), {args.workers} workers, "
              f"best of {args.repeats}")
        for name, source in sets:
            print(f"\n{name}:")
            rates = {}
            for decode in ("full", "draft"):
                for workers in ("threads", "processes"):
                    rates[decode, workers] = images_per_s(source, decode, workers, args.workers, args.repeats)
                    print(f"  {workers:9s} {decode:5s}  {rates[decode, workers]:8.1f} images/s   "
                          f"= {rates[decode, workers] / rates['full', 'threads']:.2f}x the floor (threads, full)")
            mean, largest, normed, n_drafted = pixel_difference(source)
            print(f"  draft vs full, model input: {n_drafted} of {len(source.records())} images drafted; mean |diff| "
                  f"{mean:.3f}/255, largest {largest:.0f}/255, mean {normed:.4f} in normalised units")


if __name__ == "__main__":
    main()
