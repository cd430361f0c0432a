"""Training speed: tokens/s of an SAE training step against the encoder-GEMM floor, same run; and the
shuffled loader against a plain sequential read of the same shard files.

Step: d_model 384, d_sae 6144, k 32, batch 4096, float32, torch.set_num_threads(2). The *floor* is
the tokens/s a step would reach if it cost only x @ W_enc for the same batch. A step is the trainer's
own `train_step` (forward, sparse backward, decoder-gradient projection, clipping, fused Adam, decoder
renormalisation, dead-latent counters). Target: TopK and BatchTopK >= 50% of the floor. In each of
REPEATS rounds the floor and the step are timed back to back (best of two each); the ratio is the
median over rounds, so a machine that other work makes busy for a while affects both alike. ReLU/L1 (dense by nature), Matryoshka and a bfloat16-product TopK step are
printed too, and the whole `train()` loop (loader included) for TopK.

Loader: random float32 activations written with `write_arrays` to a temp dir (page cache warmed by a
first read); shuffled batches of `train`'s default size from `ShuffledLoader` (steady state: chunked
reads, shuffle buffer, validation rows dropped), an epoch at a time, against a sequential read of the
same files into the same amount of memory (benchmarks/bench_loader.py, which prints this figure alone
and says how it is measured). Target: shuffled >= 50% of sequential.

GPU (only where CUDA is available): can the loader keep a GPU busy? At d_model 768, d_sae 16384,
k 32, batch 4096 on float16 shards (the default storage), the loader's tokens/s *into the GPU* (batches
assembled in pinned memory, copied with non_blocking=True, as `train` does) against the GPU's TopK
step rate (float32 and bfloat16 autocast). Target: loader >= 1x the step rate, so the GPU is never
starved. Without a GPU this section says so and is skipped.

    python benchmarks/bench_train.py [--repeats N]
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from bench_loader import GRID, N_IMAGES, loader_figures, make_shards, print_figures, sequential_tokens_per_s
from traitscope.sae import build_sae
from traitscope.train import RunSettings, TrainConfig, train
from traitscope.train.loader import ShuffledLoader, TokenSplit
from traitscope.train.trainer import Run, adam_impl, train_step

D_MODEL, D_SAE, K, BATCH = 384, 6144, 32, 4096
STEP_TARGET = 0.5
GPU_D_MODEL, GPU_D_SAE, GPU_IMAGES, GPU_FEED_TARGET = 768, 16_384, 600, 1.0


# --- training step ---

def make_run(variant: str, device: torch.device, d_model: int = D_MODEL, d_sae: int = D_SAE) -> Run:
    settings = RunSettings(variant=variant, k=None if variant == "relu" else K, d_sae=d_sae).resolved(d_model)
    torch.manual_seed(0)
    sae = build_sae(settings.sae_config(d_model)).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=settings.lr, **adam_impl(device))
    return Run(Path("."), settings, {}, sae, opt, torch.zeros(d_sae, dtype=torch.long, device=device))


def best_seconds(fn, n: int) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class Figures(NamedTuple):
    """Tokens/s of one case against the floor."""

    floor: float
    """Best floor tokens/s over the rounds."""
    step: float
    """Best step tokens/s over the rounds."""
    ratio: float
    """Median over rounds of (floor time / step time), each round timing both back to back."""


def step_figures(x_bd: torch.Tensor, repeats: int) -> dict[str, Figures]:
    """Each case's step against the floor, timed back to back in every round."""
    W_enc = make_run("topk", x_bd.device).sae.W_enc.detach()
    pre_bs = torch.empty(BATCH, D_SAE)
    floor = lambda: torch.mm(x_bd, W_enc, out=pre_bs)  # noqa: E731
    cases = {"topk": ("topk", False), "batchtopk": ("batchtopk", False), "matryoshka": ("matryoshka", False),
             "relu": ("relu", False), "topk bf16": ("topk", True)}
    runs = {name: make_run(variant, x_bd.device) for name, (variant, _) in cases.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for name, (_, bf16) in cases.items():  # warm-up: buffers, thresholds, allocator
        for step in range(3):
            train_step(runs[name], x_bd, step, 10_000, bf16=bf16)
    for rnd in range(repeats):
        for name, (_, bf16) in cases.items():
            if name == "relu" and rnd >= max(1, repeats // 2):
                continue  # the dense step is slow; fewer rounds
            run, step0 = runs[name], 3 + rnd * 2
            t_floor = best_seconds(floor, 2)
            t_step = best_seconds(lambda: train_step(run, x_bd, step0, 10_000, bf16=bf16), 2)
            times[name].append((t_floor, t_step))
    return {name: Figures(BATCH / min(f for f, _ in pairs), BATCH / min(s for _, s in pairs),
                          statistics.median(f / s for f, s in pairs)) for name, pairs in times.items()}


def end_to_end_tokens_per_s(shards, root: Path) -> float:
    """The whole `train()` loop (loader, every step, metrics lines) for TopK; the median logged rate."""
    cfg = TrainConfig(shards=str(shards.dpath), tokens=60 * BATCH, batch_size=BATCH, out=str(root / "runs"),
                      quiet=True, log_every=10, checkpoint_every=10**12, val_tokens=BATCH)
    (result,) = train(cfg, [RunSettings(variant="topk", k=K, d_sae=D_SAE)], echo=lambda *a: None)
    records = [json.loads(ln) for ln in (result.dpath / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in records[1:])  # the first window includes start-up


# --- the loader against a GPU's step rate ---

class GpuFeed(NamedTuple):
    """Tokens/s into the device against the device's training-step rate."""

    loader: float
    """Shuffled batches from float16 shards, as stored in pinned memory, copied to the device (non-blocking)
    and made float32 there, as `train` does."""
    step: float
    """TopK `train_step` on the device, float32."""
    step_bf16: float
    """The same step with bfloat16 autocast."""


def gpu_feed_figures(root: Path, device: torch.device, repeats: int) -> GpuFeed:
    """The loader's rate into `device` and the TopK step rate there, best of `repeats` rounds each."""
    shards = make_shards(root / "gpu", GPU_IMAGES, GPU_D_MODEL, np.float16)
    split = TokenSplit(shards, 10, "patches", val_frac=0.05, seed=0)
    sequential_tokens_per_s(split)  # warm the page cache
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n_batches = split.n_train_tokens // BATCH
    loader_best = 0.0
    cuda = device.type == "cuda"
    with ShuffledLoader(split, BATCH, seed=0, pin_memory=cuda, as_stored=cuda) as loader:  # as `train` does
        for _ in range(2 * n_batches):  # every block buffer allocated and in use
            next(loader).to(device, non_blocking=True).float()
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            for _ in range(n_batches):
                x_bd = next(loader).to(device, non_blocking=True).float()
            sync()
            loader_best = max(loader_best, n_batches * BATCH / (time.perf_counter() - t0))
    x_bd = x_bd / x_bd.pow(2).sum(1).mean().sqrt()
    steps = {}
    for bf16 in (False, True):
        run = make_run("topk", device, GPU_D_MODEL, GPU_D_SAE)
        for step in range(3):  # warm-up: kernels, buffers, allocator
            train_step(run, x_bd, step, 10_000, bf16=bf16)
        best, n = 0.0, 10
        for rnd in range(repeats):
            sync()
            t0 = time.perf_counter()
            for step in range(n):
                train_step(run, x_bd, 3 + rnd * n + step, 10_000, bf16=bf16)
            sync()
            best = max(best, n * BATCH / (time.perf_counter() - t0))
        steps[bf16] = best
    return GpuFeed(loader_best, steps[False], steps[True])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="alternating timing rounds (default: 5)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; d_model {D_MODEL}, d_sae {D_SAE}, "
          f"k {K}, batch {BATCH}, float32")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = make_shards(root)
        print()
        print_figures(loader_figures(shards, args.repeats), N_IMAGES * GRID[0] * GRID[1])
        split = TokenSplit(shards, 10, "patches", val_frac=0.05, seed=0)

        x_bd = torch.from_numpy(split.arrays[0].read(0, BATCH).astype(np.float32))
        x_bd /= x_bd.pow(2).sum(1).mean().sqrt()  # the trainer's unit mean squared norm
        figures = step_figures(x_bd, args.repeats)
        print("\ntraining step (tokens/s, best of the rounds; ratio: median over rounds of floor time / step time,"
              "\nboth timed back to back; floor = x @ W_enc alone on the same batch):")
        for name, f in figures.items():
            verdict = f" (target >= {STEP_TARGET:.0%}: {'met' if f.ratio >= STEP_TARGET else 'NOT met'})" \
                if name in ("topk", "batchtopk") else ""
            print(f"  {name:11s} step {f.step:9,.0f}   floor {f.floor:9,.0f}   ratio {f.ratio:.0%}{verdict}")
        W_enc = make_run("topk", x_bd.device).sae.W_enc.detach()
        floor_before = BATCH / best_seconds(lambda: x_bd @ W_enc, 3)
        e2e = end_to_end_tokens_per_s(shards, root)
        floor = max(floor_before, BATCH / best_seconds(lambda: x_bd @ W_enc, 3))
        print(f"\nwhole train() loop, TopK (loader, steps, metrics): {e2e:,.0f} tokens/s; floor around it "
              f"{floor:,.0f} = {e2e / floor:.0%}")

        print(f"\nloader against a GPU (d_model {GPU_D_MODEL}, d_sae {GPU_D_SAE}, k {K}, batch {BATCH}, "
              "float16 shards):")
        if not torch.cuda.is_available():
            print("  no CUDA GPU here: skipped (the same code runs where one is present)")
        else:
            device = torch.device("cuda")
            feed = gpu_feed_figures(root, device, args.repeats)
            print(f"  {torch.cuda.get_device_name(device)}")
            for name, step in (("float32", feed.step), ("bfloat16", feed.step_bf16)):
                ratio = feed.loader / step
                print(f"  loader into the GPU {feed.loader:12,.0f} tokens/s   TopK step ({name}) {step:12,.0f} "
                      f"tokens/s   = {ratio:.2f}x (target >= {GPU_FEED_TARGET:.0f}x: "
                      f"{'met' if ratio >= GPU_FEED_TARGET else 'NOT met'})")

if __name__ == "__main__":
    main()
