"""Loader speed: shuffled training batches from `ShuffledLoader` against a plain sequential read of
the same shard files, same run, same page-cache state.

Random activations (800 images x 256 patches x d_model 384 in 8 shard files; float32, 315 MB, then
float16, the default storage, read as float32 batches and as stored) are written with `write_arrays`
to a temp dir and flushed to disk. The loader is timed in its steady state
(block buffers allocated): an epoch of shuffled batches of `train`'s default size (2048 rows; chunked reads, shuffle
buffer, validation rows dropped), read with prefetch off, so that all of its work falls inside its own
window and none runs beside the other side's (a background reader refills its two-block lead
whenever the caller is elsewhere: that made the old figures depend on how idle the second core was).

The floor, *sequential read*: the loader's own chunks, in file order, each copied once into memory
the size of the loader's block (cycled), in the batches' dtype: the same reads into the same amount
of memory, without the shuffle. For reference, a sequential read into one reused chunk-sized buffer (it stays in the CPU
cache, which no shuffle buffer can) is printed too, with the loader's share of it, and so is a
sequential read into block-sized memory on as many threads as the loader's readers (the loader fills
a block's chunks on several threads).

Each of `--repeats` rounds times the four back to back (in a rotating order); a figure is the
median over rounds of the round's ratio, so that other work on the machine, which comes and goes,
weighs on every side alike; the lowest and highest rounds and the 1-minute load average before and
after are printed beside it. `--cache warm` (default): the files are in the page cache (a first read
warms it): the figures are memory bandwidth and CPU. `--cache cold`: before each timed read the files
are evicted from the page cache (MADV_DONTNEED + posix_fadvise DONTNEED; no root needed), so every
side reads them from the disk. Target: shuffled >= 50% of sequential.

Peer (optional, `--saev-python`): saev 0.1's own shuffled loader (`saev.activations.Dataset` in a
`torch.utils.data.DataLoader(shuffle=True)`, as `saev.training` builds it; 2 workers, one per core
here), on saev-format shards of the same activations, run by a Python that has saev installed (it is
not a traitscope dependency):

    python3 -m venv /work/wt/peer-venv
    /work/wt/peer-venv/bin/pip install -c constraints.txt -r benchmarks/requirements-interop.txt
    python benchmarks/bench_loader.py [--repeats 8] [--cache warm|cold] [--saev-python /work/wt/peer-venv/bin/python]
"""

import argparse
import json
import mmap
import os
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from traitscope.shards.store import write_arrays
from traitscope.train import TrainConfig
from traitscope.train.loader import ShuffledLoader, TokenSplit, tensor_view

D_MODEL, BATCH = 384, TrainConfig.batch_size  # the batches `train` takes by default
N_IMAGES, GRID = 800, (16, 16)
TARGET = 0.5


def make_shards(root: Path, n_images: int = N_IMAGES, d_model: int = D_MODEL, dtype=np.float32):
    """Random activations of `n_images` images of GRID patches, 100 images per shard file."""
    rng = np.random.default_rng(0)
    n_p = GRID[0] * GRID[1]
    acts = rng.standard_normal((n_images, n_p, d_model), dtype=np.float32).astype(dtype, copy=False)
    header = {"model": {"name": "bench", "family": "random", "n_layers": 12, "d_model": d_model,
                        "weights_sha256": "0" * 64},
              "layers": [10], "token_kinds": ["patches"], "d_model": {"10": d_model}, "grid": {"10": list(GRID)},
              "layout": {"n_cls": 1, "n_registers": 0}, "preprocess": {}, "dtype": np.dtype(dtype).name,
              "images_root": str(root), "patch_labels": [], "image_labels": []}
    listing = [{"index": i, "path": f"{i}.png", "width": 224, "height": 224, "label": None, "row": i,
                "skipped": None} for i in range(n_images)]
    return write_arrays(root / "shards", header, listing, {"L10/patches": acts}, images_per_shard=100)


class Rate(NamedTuple):
    tokens_per_s: float
    """Tokens over wall-clock seconds."""
    cpu_ns_per_token: float
    """CPU time of the whole process (every thread) per token: what a busy machine cannot hide."""


def _rate(fn, n_tokens: int) -> Rate:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return Rate(n_tokens / wall, cpu / n_tokens * 1e9)


def sequential_rate(split: TokenSplit, chunk_rows: int = 8192, buf: np.ndarray | None = None,
                    threads: int = 1) -> Rate:
    """Plain sequential read of every shard file in chunks of `chunk_rows` rows, one after the other
    into `buf` (cycled; default: one reused chunk-sized buffer, which stays in the CPU cache). A `buf`
    of another dtype than the shards' is filled by torch's cast, as the loader casts. `threads` > 1:
    that many threads read every threads-th chunk each, side by side."""
    buf = np.empty((chunk_rows, split.d_model), dtype=split.dtype) if buf is None else buf
    parts, at = [], 0  # (chunk, where in buf)
    for rows in split.arrays[0].maps:
        for start in range(0, len(rows), chunk_rows):
            part = rows[start:start + chunk_rows]
            at = 0 if at + len(part) > len(buf) else at
            parts.append((part, at))
            at += len(part)

    def read(share: list) -> None:
        for part, at in share:
            if buf.dtype == part.dtype:
                np.copyto(buf[at:at + len(part)], part)
            else:
                torch.from_numpy(buf[at:at + len(part)]).copy_(tensor_view(part))

    def read_all() -> None:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, [parts[t::threads] for t in range(threads)]))

    return _rate(read_all if threads > 1 else lambda: read(parts), sum(len(rows) for rows in split.arrays[0].maps))


def shuffled_rate(loader: ShuffledLoader, n_batches: int) -> Rate:
    """Shuffled batches of float32 tokens from a loader (the batches are dropped as a trainer drops them)."""
    def take() -> None:
        for _ in range(n_batches):
            next(loader)

    return _rate(take, n_batches * loader.batch_size)


def sequential_tokens_per_s(split: TokenSplit, chunk_rows: int = 8192) -> float:
    return sequential_rate(split, chunk_rows).tokens_per_s


def evict(split: TokenSplit) -> None:
    """Drop the split's shard files from the page cache: this process's maps let go of their pages
    (MADV_DONTNEED), then the kernel drops them (POSIX_FADV_DONTNEED; no root needed). Dirty pages
    cannot be dropped, hence the `os.sync()` after writing."""
    for array in split.arrays:
        for rows, fpath in zip(array.maps, array.fpaths):
            rows._mmap.madvise(mmap.MADV_DONTNEED)  # a numpy memmap's own mmap
            fd = os.open(fpath, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class LoaderFigures(NamedTuple):
    """Tokens/s of the shuffled loader against a sequential read of the same files, timed back to back."""

    sequential: float
    """Median tokens/s over the rounds of a sequential read into memory the size of the loader's block
    (the loader's reads and memory, without the shuffle)."""
    shuffled: float
    """Median shuffled-loader tokens/s over the rounds."""
    ratio: float
    """Median over the rounds of the round's shuffled / sequential tokens/s."""
    ratio_low: float
    """The lowest round's ratio."""
    ratio_high: float
    """The highest round's ratio."""
    cached: float
    """Median tokens/s of a sequential read into one reused chunk-sized buffer (stays in the CPU cache)."""
    cached_ratio: float
    """Median over the rounds of shuffled / cached."""
    readers: int
    """The loader's reading threads."""
    threaded: float
    """Median tokens/s of the sequential read into block-sized memory by as many threads as the loader's readers."""
    threaded_ratio: float
    """Median over the rounds of shuffled / threaded."""
    n_train_tokens: int
    sequential_cpu_ns: float
    """Median CPU time per token of the sequential read."""
    shuffled_cpu_ns: float
    """Median CPU time per token of the shuffled loader."""
    load: tuple[float, float]
    """1-minute load average before and after the rounds."""
    cache: str
    """'warm' or 'cold' page cache."""


def loader_figures(shards, repeats: int, batch_size: int = BATCH, as_stored: bool = False,
                   cache: str = "warm") -> LoaderFigures:
    """`as_stored`: batches in the shards' dtype, as `train` takes them on a GPU (else float32)."""
    os.sync()  # no write-back of the new files during the rounds, and clean pages can be evicted
    split = TokenSplit(shards, shards.layers[0], "patches", val_frac=0.05, seed=0)
    epoch_batches = split.n_train_tokens // batch_size
    load_before = os.getloadavg()[0]
    sides = {"seq": [], "cached": [], "threaded": [], "shuf": []}
    sequential_rate(split)  # warm the page cache (and the maps)
    # prefetch=False: the loader reads its blocks in the timed thread, so all of its work falls inside its
    # own window, and none of it runs beside the sequential reads (a background reader would refill
    # its two-block lead there, on their time)
    with ShuffledLoader(split, batch_size, seed=0, as_stored=as_stored, prefetch=False) as loader:
        shuffled_rate(loader, 3 * epoch_batches // 2)  # its block buffers allocated
        block_nd = np.ones((loader.capacity, split.d_model), dtype=loader.out_dtype)  # so is the floor's (touched)
        for r in range(repeats):  # back to back, in a rotating order
            for side in np.roll(list(sides), r):
                if cache == "cold":
                    evict(split)
                if side == "seq":
                    sides[side].append(sequential_rate(split, loader.chunk_rows, block_nd))
                elif side == "cached":
                    sides[side].append(sequential_rate(split, loader.chunk_rows, block_nd[:loader.chunk_rows]))
                elif side == "threaded":
                    sides[side].append(sequential_rate(split, loader.chunk_rows, block_nd, loader.n_readers))
                else:
                    sides[side].append(shuffled_rate(loader, epoch_batches))
    seqs, cached, threaded, shufs = sides["seq"], sides["cached"], sides["threaded"], sides["shuf"]
    ratios = [b.tokens_per_s / a.tokens_per_s for a, b in zip(seqs, shufs)]
    return LoaderFigures(statistics.median(r.tokens_per_s for r in seqs), statistics.median(r.tokens_per_s for r in shufs),
                         statistics.median(ratios), min(ratios), max(ratios),
                         statistics.median(r.tokens_per_s for r in cached),
                         statistics.median(b.tokens_per_s / a.tokens_per_s for a, b in zip(cached, shufs)),
                         loader.n_readers, statistics.median(r.tokens_per_s for r in threaded),
                         statistics.median(b.tokens_per_s / a.tokens_per_s for a, b in zip(threaded, shufs)),
                         split.n_train_tokens, statistics.median(r.cpu_ns_per_token for r in seqs),
                         statistics.median(r.cpu_ns_per_token for r in shufs), (load_before, os.getloadavg()[0]), cache)


def print_figures(f: LoaderFigures, n_tokens: int, what: str = "float32") -> None:
    n_cpus = os.cpu_count() or 1
    print(f"loader ({f.n_train_tokens:,} training tokens of {n_tokens:,} per epoch, {what}, {f.cache} page cache; "
          f"load average {f.load[0]:.1f} -> {f.load[1]:.1f} on {n_cpus} cores):")
    print(f"  sequential read   {f.sequential:12,.0f} tokens/s   (the loader's chunks in file order, into memory "
          f"the size of its block)")
    print(f"  shuffled loader   {f.shuffled:12,.0f} tokens/s   = {f.ratio:.0%} of sequential "
          f"(median of the rounds, lowest {f.ratio_low:.0%}, highest {f.ratio_high:.0%}; "
          f"target >= {TARGET:.0%}: {'met' if f.ratio >= TARGET else 'NOT met'})")
    print(f"  CPU time per token: sequential {f.sequential_cpu_ns:.0f} ns, shuffled {f.shuffled_cpu_ns:.0f} ns")
    print(f"  (into one reused chunk-sized buffer, which stays in the CPU cache, a sequential read makes "
          f"{f.cached:,.0f} tokens/s: the loader is {f.cached_ratio:.0%} of that)")
    print(f"  (the loader reads with {f.readers} threads; read by as many threads side by side, a sequential read "
          f"makes {f.threaded:,.0f} tokens/s: the loader is {f.threaded_ratio:.0%} of that)")
    if max(f.load) > 2 * n_cpus:
        print("  the load average is above 2 per core: the figures mostly measure the other work; rerun later")


# --- the peer: saev 0.1's shuffled loader, in a Python that has saev ---

SAEV_SCRIPT = """
import json, sys, time, torch
from saev import activations, config
root, batch_size, n_batches, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
dataset = activations.Dataset(config.DataLoad(shard_root=root, patches="patches", layer=10,
                                              scale_mean=False, scale_norm=False))
loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=True,
                                     persistent_workers=workers > 0)
batches = iter(loader)
next(batches)  # workers started
t0 = time.perf_counter()
for _ in range(n_batches):
    next(batches)
print(json.dumps({"tokens_per_s": n_batches * batch_size / (time.perf_counter() - t0)}))
"""


def write_saev_shards(split: TokenSplit, root: Path, images_per_shard: int = 100) -> Path:
    """The split's patch activations as saev 0.1 shards (acts*.bin + metadata.json, a zero CLS row first)."""
    array = split.arrays[0]
    n_images, n_p, d = split.shards.n_images, array.rows_per_item, array.width
    root.mkdir(parents=True, exist_ok=True)
    for s, first in enumerate(range(0, n_images, images_per_shard)):
        acts = np.zeros((images_per_shard, 1, n_p + 1, d), dtype=np.float32)
        n = min(images_per_shard, n_images - first)
        acts[:n, 0, 1:] = array.read(first * n_p, (first + n) * n_p).reshape(n, n_p, d)
        acts.tofile(root / f"acts{s:06d}.bin")
    meta = {"vit_family": "dinov2", "vit_ckpt": "bench", "layers": [10], "n_patches_per_img": n_p, "cls_token": True,
            "d_vit": d, "seed": 0, "n_imgs": n_images, "n_patches_per_shard": images_per_shard * (n_p + 1),
            "data": "bench"}
    (root / "metadata.json").write_text(json.dumps(meta))
    return root


def saev_tokens_per_s(python: str, shards, root: Path, n_batches: int = 4, workers: int = 2) -> float:
    """saev 0.1's `DataLoader(Dataset, shuffle=True)` on saev shards of the same tokens (page cache warmed)."""
    split = TokenSplit(shards, shards.layers[0], "patches", val_frac=0.05, seed=0)
    saev_dpath = write_saev_shards(split, root / "saev")
    os.sync()
    for fpath in sorted(saev_dpath.glob("acts*.bin")):  # warm, as for traitscope's side
        fpath.read_bytes()
    out = subprocess.run([python, "-c", SAEV_SCRIPT, str(saev_dpath), str(BATCH), str(n_batches), str(workers)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8, help="rounds of both sides back to back (default: 8)")
    parser.add_argument("--cache", choices=("warm", "cold"), default="warm",
                        help="both sides read from the page cache (warm) or from the disk (cold)")
    parser.add_argument("--saev-python", help="a Python with saev 0.1 installed: adds saev's shuffled loader as a row")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp))
        f = loader_figures(shards, args.repeats, cache=args.cache)
        print_figures(f, N_IMAGES * GRID[0] * GRID[1])
        half = make_shards(Path(tmp) / "float16", dtype=np.float16)  # the default storage
        for as_stored, what in ((False, "float16 shards, float32 batches (a CPU trainer)"),
                                (True, "float16 shards and batches (as `train` takes them on a GPU)")):
            print_figures(loader_figures(half, args.repeats, as_stored=as_stored, cache=args.cache),
                          N_IMAGES * GRID[0] * GRID[1], what)
        if args.saev_python:
            rate = saev_tokens_per_s(args.saev_python, shards, Path(tmp))
            print(f"  saev 0.1 loader   {rate:12,.0f} tokens/s   = {rate / f.sequential:.1%} of sequential "
                  f"(DataLoader(shuffle=True), 2 workers, warm page cache; load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
