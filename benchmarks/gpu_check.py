"""One command that checks every GPU path of traitscope and times it against floors measured in the
same run, writing every figure to one JSON file. Made for a short loan of one GPU (an H200 with 16
CPU cores here): it stays within `--budget-s` (default 420 s), skipping what would not fit and saying
so. On a machine without CUDA it runs the same code on the CPU at small sizes (a few minutes) and
says what it skipped.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--budget-s 420]     # or: make gpu-check
    PYTHONPATH=src python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json  # on a GPU box without pip

Sections, each a ratio against a floor timed in the same run:
  decode     images/s of the shards decode stage (threads/processes x full/draft) on generated
             3000-px JPEGs; floor: threads + full decoding
  shards     `build_shards` images/s end to end on those JPEGs (decode full, draft, and device: nvJPEG
             on the GPU) against the bare backbone forward on
             preprocessed batches already on the device (float32 and bfloat16 autocast); the backbone
             is a random-init DINOv2 ViT-B/14 with 4 registers (the hub cannot be reached there)
  train      tokens/s of one training step of TopK, BatchTopK and Matryoshka (d_model 768, d_sae
             16 x 768, k 32, bfloat16 autocast) against the encoder GEMM alone on the same batch
  loader     the shuffled loader against a sequential read of the same float16 shards; on CUDA also
             its rate into the GPU against the TopK step rate
  inference  `traitscope inference` tokens/s end to end against the encoder GEMM
  torchrun   2 processes sharing the one GPU (--device cuda:0): shards (the same folder as one
             process), and training in sweep and data-parallel mode (NCCL refuses two ranks on one
             GPU: the error is recorded)
Needs only what the package needs; a model family whose library is missing (open_clip) is left out.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import images_per_s  # noqa: E402
from bench_loader import loader_figures, make_shards  # noqa: E402
from bench_train import gpu_feed_figures, make_run  # noqa: E402

from traitscope.images import FolderSource  # noqa: E402
from traitscope.shards.build import build_shards, decode_pool, default_workers  # noqa: E402
from traitscope.train.trainer import train_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class Check:
    """Runs the sections in order within a time budget, collecting figures and skips into one dict."""

    def __init__(self, budget_s: float, out_fpath: Path):
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.out_fpath = out_fpath
        self.figures: dict = {}
        self.skipped: dict[str, str] = {}
        self.errors: dict[str, str] = {}

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def section(self, name: str, fn, need_s: float) -> None:
        if self.left_s() < need_s:
            self.skip(name, f"{self.left_s():.0f} s of the budget left, the section needs about {need_s:.0f} s")
            return
        t0 = time.perf_counter()
        print(f"\n== {name}", flush=True)
        try:
            result = fn()
            if result is not None:
                self.figures[name] = result
        except Exception as err:  # one broken path must not hide the others
            self.errors[name] = f"{type(err).__name__}: {err}"
            print(f"  ERROR {self.errors[name]}\n{traceback.format_exc()}", flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        self.write()

    def skip(self, name: str, why: str) -> None:
        self.skipped[name] = why
        print(f"\n== {name}: skipped: {why}", flush=True)
        self.write()

    def write(self) -> None:
        self.out_fpath.write_text(json.dumps({"figures": self.figures, "skipped": self.skipped,
                                              "errors": self.errors, "seconds": round(time.perf_counter() - self.t0)},
                                             indent=1))


def say(label: str, value: float, floor: float | None = None, unit: str = "") -> None:
    ratio = f"   = {value / floor:.2f}x the floor" if floor else ""
    print(f"  {label:42s} {value:14,.1f} {unit}{ratio}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- data -----------------------------------------------------------------------------------------

def _write_jpeg(args: tuple[int, Path, int]) -> None:
    """A 3000-px photo-like JPEG: smooth colour fields, a few discs, sensor noise (seeded)."""
    seed, fpath, width = args
    rng = np.random.default_rng(seed)
    height = width * 2 // 3
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([xx / width * 200 + 30, yy / height * 180 + 40, (xx + yy) / (width + height) * 160 + 50], -1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.2) * height
        rgb[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    rgb += rng.normal(0, 6, rgb.shape).astype(np.float32)
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(fpath, quality=90)


def large_jpegs(dpath: Path, n: int, width: int = 3000, n_distinct: int = 32) -> Path:
    """`n` 3000-px JPEGs: `n_distinct` generated in parallel, the rest copies of them."""
    dpath.mkdir(parents=True, exist_ok=True)
    n_distinct = min(n, n_distinct)
    with ProcessPoolExecutor(max(1, min(n_distinct, os.cpu_count() or 1))) as pool:
        list(pool.map(_write_jpeg, [(i, dpath / f"{i:05d}.jpg", width) for i in range(n_distinct)]))
    for i in range(n_distinct, n):
        shutil.copyfile(dpath / f"{i % n_distinct:05d}.jpg", dpath / f"{i:05d}.jpg")
    return dpath


def vit_backbone(size: str, device: torch.device):
    """A random-init DINOv2 with 4 registers: ViT-B/14 (768 wide, 12 blocks) or ViT-Ti/14 (192, 12)."""
    import transformers as T

    from traitscope.backbones.hf_vit import HFViTBackbone

    width, heads = {"base": (768, 12), "tiny": (192, 3)}[size]
    config = T.Dinov2WithRegistersConfig(hidden_size=width, num_hidden_layers=12, num_attention_heads=heads,
                                         patch_size=14, image_size=518, num_register_tokens=4)
    torch.manual_seed(0)
    model = T.Dinov2WithRegistersModel(config).eval()
    return HFViTBackbone(model, f"random-dinov2-vit{size[0]}14-reg",
                         f"random-init DINOv2 ViT-{size[0].upper()}/14 with 4 registers").to(device).eval()


# --- sections -------------------------------------------------------------------------------------

def decode_section(source: FolderSource, n_workers: int, device: torch.device) -> dict:
    out = {"n_images": len(source.records()), "n_workers": n_workers}
    floor = None
    for decode in ("full", "draft"):
        for workers in ("threads", "processes"):
            rate = images_per_s(source, decode, workers, n_workers, repeats=1)
            floor = floor or rate
            out[f"{workers}_{decode}_images_per_s"] = round(rate, 1)
            say(f"decode {workers}, {decode}", rate, floor, "images/s")
    out["floor"] = "threads_full_images_per_s"
    return out


def shards_section(source: FolderSource, backbone, device: torch.device, n_workers: int, batch_size: int,
                   root: Path) -> dict:
    records = source.records()
    n = len(records)
    job_pixels = []
    from traitscope.shards.build import DecodeJob, _normalize

    pool, fn = decode_pool(DecodeJob(source, backbone, backbone.resolve_layers([-2])[0], "full"), n_workers,
                           "processes")
    try:
        job_pixels = [d.pixels for d in pool.map(fn, records)]
    finally:
        pool.shutdown()
    batches = [_normalize(torch.from_numpy(np.stack(job_pixels[i:i + batch_size])).to(device), backbone.preprocess)
               for i in range(0, n, batch_size)]
    layers = backbone.resolve_layers([-2])
    out = {"n_images": n, "batch_size": batch_size, "model": backbone.description, "layer": layers[0]}
    for dtype in ("float32", "bfloat16"):
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
        with autocast:
            backbone.record(batches[0], layers)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            for pixels_bchw in batches:
                backbone.record(pixels_bchw, layers)
            sync(device)
        out[f"bare_forward_{dtype}_images_per_s"] = round(n / (time.perf_counter() - t0), 1)
        say(f"bare forward, {dtype}", out[f"bare_forward_{dtype}_images_per_s"], unit="images/s")
    del batches
    for decode in ("full", "draft", "device"):  # device: nvJPEG on a CUDA GPU
        t0 = time.perf_counter()
        build_shards(source, backbone, [-2], root / f"shards-{decode}", batch_size=batch_size, decode=decode,
                     n_workers=n_workers, verbose=False)
        rate = n / (time.perf_counter() - t0)
        out[f"build_shards_{decode}_images_per_s"] = round(rate, 1)
        for dtype in ("float32", "bfloat16"):
            out[f"build_shards_{decode}_vs_{dtype}_forward"] = round(rate / out[f"bare_forward_{dtype}_images_per_s"], 3)
        say(f"build_shards, decode {decode} (model in float32)", rate, out["bare_forward_float32_images_per_s"],
            "images/s")
        shutil.rmtree(root / f"shards-{decode}")
    return out


def train_section(device: torch.device, batch: int, d_model: int, d_sae: int, bf16: bool, rounds: int) -> dict:
    torch.manual_seed(0)
    x_bd = torch.randn(batch, d_model, device=device)
    x_bd /= x_bd.pow(2).sum(1).mean().sqrt()
    W_enc = torch.randn(d_model, d_sae, device=device) / d_model ** 0.5

    def floor() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            x_bd @ W_enc

    def timed(fn, n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / n

    n_inner = 20 if device.type == "cuda" else 1
    out = {"batch": batch, "d_model": d_model, "d_sae": d_sae, "k": 32, "dtype": "bfloat16" if bf16 else "float32"}
    for variant in ("topk", "batchtopk", "matryoshka"):
        run = make_run(variant, device, d_model, d_sae)
        step = iter(range(10**9))
        one = lambda: train_step(run, x_bd, next(step), 10**6, bf16=bf16)  # noqa: E731
        for _ in range(3):
            one()
        timed(floor, 2)
        pairs = [(timed(floor, n_inner), timed(one, n_inner)) for _ in range(rounds)]
        step_rate, floor_rate = batch / min(s for _, s in pairs), batch / min(f for f, _ in pairs)
        out[variant] = {"step_tokens_per_s": round(step_rate), "gemm_tokens_per_s": round(floor_rate),
                        "ratio": round(statistics.median(f / s for f, s in pairs), 3)}
        say(f"{variant} step", step_rate, floor_rate, "tokens/s")
    return out


def loader_section(root: Path, device: torch.device, n_images: int, d_model: int) -> dict:
    shards = make_shards(root / "loader", n_images, d_model, np.float16)
    f = loader_figures(shards, repeats=5, as_stored=True)  # float16 batches, as `train` takes them on a GPU
    out = {"n_tokens": f.n_train_tokens, "dtype": "float16", "d_model": d_model,
           "sequential_tokens_per_s": round(f.sequential), "shuffled_tokens_per_s": round(f.shuffled),
           "ratio": round(f.ratio, 3), "sequential_cpu_ns_per_token": round(f.sequential_cpu_ns, 1),
           "shuffled_cpu_ns_per_token": round(f.shuffled_cpu_ns, 1)}
    say("sequential read", f.sequential, unit="tokens/s")
    say("shuffled loader", f.shuffled, f.sequential, "tokens/s")
    shutil.rmtree(root / "loader")
    if device.type == "cuda":
        feed = gpu_feed_figures(root, device, repeats=3)
        out["into_gpu"] = {"loader_tokens_per_s": round(feed.loader), "topk_step_float32_tokens_per_s": round(feed.step),
                           "topk_step_bfloat16_tokens_per_s": round(feed.step_bf16),
                           "loader_vs_step_bfloat16": round(feed.loader / feed.step_bf16, 3)}
        say("loader into the GPU", feed.loader, feed.step_bf16, "tokens/s (floor: TopK bf16 step)")
    return out


def inference_section(root: Path, device: torch.device, n_images: int, d_model: int, d_sae: int) -> dict:
    from traitscope.features.inference import run_inference
    from traitscope.sae import SAEConfig, build_sae

    shards = make_shards(root / "inf", n_images, d_model, np.float16)
    torch.manual_seed(0)
    sae = build_sae(SAEConfig("topk", d_model, d_sae, k=32))
    run_dpath = root / "run"
    sae.save(run_dpath, {"shards": {"hash": shards.hash, "path": str(shards.dpath), "layer": 10,
                                    "token_kind": "patches", "model": "bench", "weights_sha256": "0" * 64}})
    n_tokens = shards.acts(10).shape[0]
    x_bd = torch.from_numpy(shards.acts(10).read(0, 4096).astype(np.float32)).to(device)
    W_enc = sae.W_enc.detach().to(device)
    x_bd @ W_enc
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n_tokens // 4096):
        x_bd @ W_enc
    sync(device)
    floor = (n_tokens // 4096) * 4096 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    run_inference(run_dpath, shards.dpath, top_n=16, device=str(device), progress=False)
    rate = n_tokens / (time.perf_counter() - t0)
    say("encoder GEMM (float32)", floor, unit="tokens/s")
    say("inference end to end", rate, floor, "tokens/s")
    return {"n_tokens": n_tokens, "d_model": d_model, "d_sae": d_sae, "gemm_tokens_per_s": round(floor),
            "inference_tokens_per_s": round(rate), "ratio": round(rate / floor, 3)}


def torchrun_section(root: Path, images: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "traitscope.cli"]
    one = [sys.executable, "-m", "traitscope.cli"]
    out = {}

    def call(name: str, cmd: list[str], timeout_s: float = 240) -> str | None:
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        out[name] = {"returncode": done.returncode, "seconds": round(time.perf_counter() - t0, 1)}
        if done.returncode != 0:
            out[name]["error"] = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "")[:400]
        print(f"  {name}: exit {done.returncode} in {out[name]['seconds']} s {out[name].get('error', '')}", flush=True)
        return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else None

    shards_args = ["shards", "--images", str(images), "--model", "random-dinov2", "--layers=-2", "--device", "cuda:0",
                   "--images-per-shard", "16"]
    two = call("shards_2_processes", run + shards_args + ["--out", str(root / "tr2")])
    single = call("shards_1_process", one + shards_args + ["--out", str(root / "tr1")])
    if two and single:
        same = all((Path(two) / rel).read_bytes() == (Path(single) / rel).read_bytes()
                   for rel in ("L2/patches-00000.npy", "images.jsonl"))
        out["shards_same_folder_and_bytes"] = Path(two).name == Path(single).name and same
        train_args = ["train", "--shards", single, "--layer", "-2", "--sae", "topk", "--k", "8", "--d-sae", "512",
                      "--tokens", "200k", "--batch-size", "4096", "--device", "cuda:0", "--dtype", "bfloat16", "--quiet"]
        call("train_sweep_2_processes", run + train_args + ["--dist-mode", "sweep", "--k", "8,16",
                                                            "--out", str(root / "sweep")])
        call("train_data_parallel_2_processes", run + train_args + ["--out", str(root / "dp")])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json", help="the JSON file of figures (default: gpu_check.json)")
    parser.add_argument("--budget-s", type=float, default=420, help="stop starting sections after this (default: 420)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    check = Check(args.budget_s, Path(args.out))
    n_workers = default_workers()
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_cores": os.cpu_count(),
           "decode_workers": n_workers, "device": str(device),
           "gpu": torch.cuda.get_device_name(device) if cuda else None,
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    check.figures["environment"] = env
    print(json.dumps(env))
    if not cuda:
        print("no CUDA device: the CPU runs every path at small sizes; GPU-only parts are skipped and listed")
    # Sizes: the GPU run's, or small ones that keep the CPU run to a few minutes.
    n_jpegs = 2000 if cuda else 8
    vit = "base" if cuda else "tiny"
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        source = FolderSource(large_jpegs(root / "jpegs", n_jpegs, n_distinct=32 if cuda else 4))
        print(f"{n_jpegs} generated 3000-px JPEGs in {time.perf_counter() - t0:.0f} s")
        check.section("decode", lambda: decode_section(source, n_workers, device), 20)
        backbone = vit_backbone(vit, device)
        check.section("shards", lambda: shards_section(source, backbone, device, n_workers, 128 if cuda else 4, root),
                      60 if cuda else 40)
        del backbone
        if cuda:
            check.section("train", lambda: train_section(device, 4096, 768, 16 * 768, True, 5), 30)
        else:  # a 768 x 12288 step takes seconds on 2 cores: smaller, float32 (bf16 autocast on a CPU is slow)
            check.section("train", lambda: train_section(device, 256, 768, 4 * 768, False, 2), 30)
        check.section("loader", lambda: loader_section(root, device, 1200 if cuda else 200, 768), 30)
        check.section("inference", lambda: inference_section(root, device, 800 if cuda else 24, 768,
                                                             16 * 768 if cuda else 4 * 768), 30)
        if not cuda:
            check.skip("torchrun", "no GPU to share (2 CPU processes under torchrun are tested by tests/test_dist.py)")
        elif shutil.which("nvidia-smi") is None and torch.cuda.device_count() < 1:
            check.skip("torchrun", "no GPU visible")
        else:
            images = root / "few"
            images.mkdir()
            for i in range(64):
                _write_jpeg((i, images / f"{i:03d}.jpg", 640))
            check.section("torchrun", lambda: torchrun_section(root, images), 150)
        if not cuda:
            check.skip("decode_cuda", "no CUDA device: the CUDA JPEG decoder was not run (the shards row 'device' "
                                      "ran the same code with torchvision's CPU decoder)")
            check.skip("gpu_sizes", "on the CPU: 8 JPEGs, ViT-Ti/14 instead of ViT-B/14, training at batch 256 with "
                                    "d_sae 4 x 768 in float32 (bf16 autocast on a CPU is no GPU figure), loader on "
                                    "200 images, inference at d_sae 4 x 768; the loader into a GPU is not run")
    check.write()
    print(f"\nwrote {args.out} ({time.perf_counter() - check.t0:.0f} s); skipped: {', '.join(check.skipped) or 'nothing'}; "
          f"errors: {', '.join(check.errors) or 'none'}")


if __name__ == "__main__":
    main()
