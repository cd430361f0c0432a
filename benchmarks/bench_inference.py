"""Inference speed: tokens/s of `traitscope inference` against the encoder-GEMM floor, same run.

The floor is the one product no SAE inference can avoid, x @ W_enc, timed on the same chunks
(4096 tokens, float32) on the same threads, written into a preallocated output (its fastest form). The whole inference pass (reading the shards, encoding,
statistics, top-N with patch maps, per-image maxima, writing the folder) is timed end to end.
Target: inference >= 50% of the floor's tokens/s. Both are timed REPEATS times, alternating, and
the best of each is kept, so a busy machine affects them alike.

d_model 384, d_sae 6144, TopK k=32, random activations written with `write_arrays` in a temp dir,
torch.set_num_threads(2).
"""

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from traitscope.features.inference import CHUNK_TOKENS, run_inference
from traitscope.sae import SAEConfig, build_sae, load_sae
from traitscope.shards import Shards
from traitscope.shards.store import write_arrays

D_MODEL, D_SAE, K = 384, 6144, 32
N_IMAGES, GRID = 256, (16, 16)
TARGET = 0.5
REPEATS = 3


def make_inputs(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    n_p = GRID[0] * GRID[1]
    acts = rng.normal(size=(N_IMAGES, n_p, D_MODEL)).astype(np.float16)
    header = {"model": {"name": "bench", "family": "random", "n_layers": 12, "d_model": D_MODEL,
                        "weights_sha256": "0" * 64},
              "layers": [10], "token_kinds": ["patches"], "d_model": {"10": D_MODEL}, "grid": {"10": list(GRID)},
              "layout": {"n_cls": 1, "n_registers": 0}, "preprocess": {}, "dtype": "float16",
              "images_root": str(root), "patch_labels": [], "image_labels": []}
    listing = [{"index": i, "path": f"{i}.png", "width": 224, "height": 224, "label": None, "row": i,
                "skipped": None} for i in range(N_IMAGES)]
    shards = write_arrays(root / "shards", header, listing, {"L10/patches": acts}, images_per_shard=64)
    torch.manual_seed(0)
    sae = build_sae(SAEConfig("topk", D_MODEL, D_SAE, k=K))
    run_dpath = root / "run"
    sae.save(run_dpath, {"shards": {"hash": shards.hash, "path": str(shards.dpath), "layer": 10,
                                    "token_kind": "patches", "model": "bench", "weights_sha256": "0" * 64}})
    return run_dpath, shards.dpath


@torch.no_grad()
def seconds(fn, x_bd: torch.Tensor, n_chunks: int) -> float:
    """Seconds for n_chunks calls fn(x) on one chunk of real activations."""
    t0 = time.perf_counter()
    for _ in range(n_chunks):
        fn(x_bd)
    return time.perf_counter() - t0


def inference_seconds(run_dpath: Path, shards_dpath: Path) -> float:
    shutil.rmtree(run_dpath / "inference", ignore_errors=True)
    t0 = time.perf_counter()
    _, computed = run_inference(run_dpath, shards_dpath, top_n=16, progress=False)
    assert computed
    return time.perf_counter() - t0


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        run_dpath, shards_dpath = make_inputs(Path(tmp))
        n_tokens = N_IMAGES * GRID[0] * GRID[1]
        sae = load_sae(run_dpath)
        W_enc = sae.W_enc.detach()
        x_bd = torch.from_numpy(Shards(shards_dpath).acts(10).read(0, CHUNK_TOKENS).astype(np.float32))
        n_chunks = n_tokens // CHUNK_TOKENS
        out_bs = torch.empty(len(x_bd), D_SAE)
        gemm, encode = (lambda x: torch.mm(x, W_enc, out=out_bs)), sae.encode_sparse
        seconds(encode, x_bd, 1)  # warm-up
        floor_s, encode_s, inference_s = [], [], []
        for _ in range(REPEATS):
            floor_s.append(seconds(gemm, x_bd, n_chunks))
            encode_s.append(seconds(encode, x_bd, n_chunks))
            inference_s.append(inference_seconds(run_dpath, shards_dpath))
        floor, inference = n_chunks * CHUNK_TOKENS / min(floor_s), n_tokens / min(inference_s)
        encode_only = n_chunks * CHUNK_TOKENS / min(encode_s)
        t0 = time.perf_counter()
        _, computed = run_inference(run_dpath, shards_dpath, top_n=16, progress=False)
        rerun_s = time.perf_counter() - t0
    ratio = inference / floor
    print(f"bench_inference: d_model {D_MODEL}, d_sae {D_SAE}, TopK k={K}, {N_IMAGES} images x "
          f"{GRID[0] * GRID[1]} patches = {n_tokens} tokens, {torch.get_num_threads()} threads, "
          f"best of {REPEATS}")
    print(f"  encoder GEMM floor (x @ W_enc):   {floor:,.0f} tokens/s")
    print(f"  SAE encode (sae.encode_sparse):  {encode_only:,.0f} tokens/s = {encode_only / floor:.0%} of the floor")
    print(f"  inference (end to end):          {inference:,.0f} tokens/s = {ratio:.0%} of the floor "
          f"(target >= {TARGET:.0%}: {'met' if ratio >= TARGET else 'NOT met'})")
    print(f"  rerun with the same inputs: reused={not computed} in {rerun_s:.2f} s")
    print(json.dumps({"bench": "inference", "floor_tokens_per_s": round(floor), "tokens_per_s": round(inference),
                      "encode_tokens_per_s": round(encode_only),
                      "ratio": round(ratio, 3), "target": TARGET}))


if __name__ == "__main__":
    main()
