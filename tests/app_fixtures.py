"""Real files for the app's tests and benchmark: images, a shard folder, SAE runs, inference folders.

The images are real PNGs with a red square planted on one patch of the model's grid (the patch that
the model's resize and crop put there). Inference folders follow docs/formats.md; `write_inference`
makes one whose top-image maps peak on exactly those planted patches, so a heatmap drawn in the
right place covers the red square. `write_inference(..., n_images=100_000)` makes the benchmark's.
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from traitscope.backbones.base import Preprocess
from traitscope.files import atomic_save_npy
from traitscope.shards.store import write_arrays

PREPROCESS = Preprocess(crop=224, resize=256)
GRID = (16, 16)
LAYER = 2
SIZES = [(320, 240), (240, 320), (256, 256), (400, 300), (300, 420)]
SPECIES = ["species_a", "species_b", "species_c"]
IMAGE_LABELS = ["striped", "spotted"]


def planted_patch(i: int) -> tuple[int, int]:
    """(grid row, grid col) of the red square in image i."""
    return (3 + (5 * i) % 10, 2 + (7 * i) % 12)


def patch_box(size: tuple[int, int], patch: tuple[int, int], preprocess: Preprocess = PREPROCESS,
              grid: tuple[int, int] = GRID) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of one grid patch in original image coordinates."""
    left, top, right, bottom = preprocess.crop_box(*size)
    pw, ph = (right - left) / grid[1], (bottom - top) / grid[0]
    r, c = patch
    return (left + c * pw, top + r * ph, left + (c + 1) * pw, top + (r + 1) * ph)


def make_images(dpath: Path, n: int, seed: int = 0) -> list[dict]:
    """n PNGs of varied sizes and grey-blue backgrounds, each with a red square on its planted patch."""
    rng = np.random.default_rng(seed)
    dpath.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        size = SIZES[i % len(SIZES)]
        base = rng.integers(60, 200, 3)
        noise = rng.integers(-25, 25, (size[1], size[0], 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        left, top, right, bottom = patch_box(size, planted_patch(i))
        ImageDraw.Draw(image).rectangle([left + 1, top + 1, right - 2, bottom - 2], fill=(230, 20, 20))
        sub = "ab"[i % 2]
        (dpath / sub).mkdir(exist_ok=True)
        image.save(dpath / sub / f"img_{i:04d}.png")
        records.append({"path": f"{sub}/img_{i:04d}.png", "width": size[0], "height": size[1],
                        "label": SPECIES[i % len(SPECIES)]})
    return records


def make_shards(out_dpath: Path, images_dpath: Path, n_images: int, real_backbone: bool = True):
    """A complete shard folder over `n_images` new images (real random-dinov2 activations by default)."""
    records = make_images(images_dpath, n_images)
    image_labels = np.zeros((n_images, len(IMAGE_LABELS)), np.uint8)
    image_labels[::4, 0] = 1
    image_labels[1::4, 1] = 1
    if real_backbone:
        import torch

        from traitscope.backbones import load_backbone

        backbone = load_backbone("random-dinov2")
        pixels = torch.stack([backbone.preprocess(Image.open(images_dpath / r["path"])) for r in records])
        acts = backbone.record(pixels, [LAYER])[LAYER]
        patches = acts.patches_bpd.numpy().astype(np.float16)
        cls = acts.cls_bd.numpy().astype(np.float16)
        model, preprocess, d_model = backbone.identity(), backbone.preprocess, backbone.d_model
    else:
        rng = np.random.default_rng(1)
        d_model = 64
        patches = rng.standard_normal((n_images, GRID[0] * GRID[1], d_model)).astype(np.float16)
        cls = rng.standard_normal((n_images, d_model)).astype(np.float16)
        model = {"name": "random-dinov2", "family": "transformers", "description": "synthetic",
                 "d_model": d_model, "n_layers": 4, "patch_size": 14, "weights_sha256": "0" * 64}
        preprocess = PREPROCESS
    header = {"model": model, "layers": [LAYER], "token_kinds": ["patches", "cls"],
              "d_model": {str(LAYER): d_model}, "grid": {str(LAYER): list(GRID)},
              "layout": {"n_cls": 1, "n_registers": 0}, "preprocess": preprocess.to_dict(), "dtype": "float16",
              "images_root": str(images_dpath.resolve()), "patch_labels": [], "image_labels": IMAGE_LABELS}
    listing = [{"index": i, **r, "row": i, "skipped": None} for i, r in enumerate(records)]
    arrays = {f"L{LAYER}/patches": patches, f"L{LAYER}/cls": cls, "labels/images": image_labels}
    return write_arrays(out_dpath, header, listing, arrays)


def make_run(run_dpath: Path, shards, d_sae: int = 128, k: int = 8, weights: bool = True) -> Path:
    """An SAE run folder (config.json, metrics.json and, if `weights`, sae.safetensors) on `shards`."""
    run_dpath.mkdir(parents=True, exist_ok=True)
    extra = {"train": {"seed": 0}, "shards": {"hash": shards.hash, "path": str(shards.dpath), "layer": LAYER,
                                                "token_kind": "patches", "model": shards.model["name"],
                                                "weights_sha256": shards.model["weights_sha256"]}}
    cfg = {"variant": "topk", "d_model": shards.d_model(LAYER), "d_sae": d_sae, "k": k, "l1_coeff": None,
           "prefixes": None}
    if weights:
        import torch

        from traitscope.sae import SAEConfig, build_sae

        torch.manual_seed(0)
        build_sae(SAEConfig(**cfg)).save(run_dpath, extra_config=extra)
    else:
        (run_dpath / "config.json").write_text(json.dumps({"sae": cfg, **extra}, indent=2))
    (run_dpath / "metrics.json").write_text(json.dumps({"nmse": 0.2, "l0": float(k), "dead_frac": 0.01,
                                                        "dense_frac": 0.0, "explained_variance": 0.8}))
    return run_dpath


def write_inference(run_dpath: Path, shards_hash: str, n_images: int, d_sae: int, top_n: int = 16,
                    grid: tuple[int, int] = GRID, n_bins: int = 100, per_image: int = 32,
                    label_of_image: list[str] | None = None, seed: int = 0) -> Path:
    """An inference folder as docs/formats.md describes, with planted, checkable content.

    - feature f's top images are distinct rows with decreasing values, and each map peaks on the
      image's planted patch (`planted_patch(row)`, 1.0 x value) with a weaker neighbour to its right;
    - the last feature is dead (no top images, never fires);
    - feature 0 fires in exactly the images whose label is SPECIES[0] (when labels are given);
    - the per-image CSR holds `per_image` features per image drawn from disjoint ranges, plus every
      top-image entry, so it agrees with the top lists.
    Vectorised: n_images=100_000, d_sae=16_384 takes a few seconds.
    """
    rng = np.random.default_rng(seed)
    dpath = run_dpath / "inference" / shards_hash
    dpath.mkdir(parents=True, exist_ok=True)
    n_patches = grid[0] * grid[1]
    top_n_eff = min(top_n, n_images)

    # top images: a random distinct set per feature (a random offset + stride keeps rows distinct)
    start = rng.integers(0, n_images, d_sae)
    stride = 1 + 2 * rng.integers(0, max(1, n_images // (2 * top_n_eff)), d_sae)
    rows = (start[:, None] + stride[:, None] * np.arange(top_n_eff)[None, :]) % n_images
    if label_of_image is not None:  # feature 0: top images all carry SPECIES[0]
        labelled = np.array([i for i, lab in enumerate(label_of_image) if lab == SPECIES[0]])
        rows[0] = labelled[:top_n_eff] if len(labelled) >= top_n_eff else np.resize(labelled, top_n_eff)
    values = np.sort(rng.uniform(1.0, 10.0, (d_sae, top_n_eff)).astype(np.float32), axis=1)[:, ::-1]
    top_rows = np.full((d_sae, top_n), -1, np.int64)
    top_values = np.zeros((d_sae, top_n), np.float32)
    top_rows[:, :top_n_eff], top_values[:, :top_n_eff] = rows, values
    top_rows[-1], top_values[-1] = -1, 0.0  # a dead feature

    maps = np.zeros((d_sae, top_n, n_patches), np.float16)
    i_idx = np.arange(n_images)
    pr, pc = 3 + (5 * i_idx) % 10, 2 + (7 * i_idx) % 12  # planted_patch, vectorised
    peak = (pr * grid[1] + pc)[rows]  # (d_sae, top_n_eff)
    f_idx, s_idx = np.meshgrid(np.arange(d_sae), np.arange(top_n_eff), indexing="ij")
    maps[f_idx, s_idx, peak] = values
    maps[f_idx, s_idx, np.minimum(peak + 1, n_patches - 1)] = values * 0.3
    maps[-1] = 0

    # per-image maxima (CSR): per_image random features from disjoint ranges, plus the top entries
    block = d_sae // per_image
    rand_feat = (np.arange(per_image) * block)[None, :] + rng.integers(0, block, (n_images, per_image))
    rand_val = rng.uniform(0.01, 0.9, (n_images, per_image)).astype(np.float32)
    img = np.concatenate([np.repeat(i_idx, per_image), rows[:-1].ravel()])
    feat = np.concatenate([rand_feat.ravel(), f_idx[:-1].ravel()])
    val = np.concatenate([rand_val.ravel(), values[:-1].ravel()])
    feat[feat == d_sae - 1] = d_sae - 2  # the dead feature never fires
    if label_of_image is not None:
        is_a = np.array([lab == SPECIES[0] for lab in label_of_image])
        keep = (feat != 0) | is_a[img]
        img, feat, val = img[keep], feat[keep], val[keep]
        extra = np.flatnonzero(is_a)
        img, feat = np.concatenate([img, extra]), np.concatenate([feat, np.zeros(len(extra), np.int64)])
        val = np.concatenate([val, np.full(len(extra), 0.5, np.float32)])
    order = np.lexsort((-val, feat, img))
    img, feat, val = img[order], feat[order], val[order]
    first = np.ones(len(img), bool)
    first[1:] = (img[1:] != img[:-1]) | (feat[1:] != feat[:-1])  # keep the max of duplicates
    img, feat, val = img[first], feat[first], val[first]
    indptr = np.zeros(n_images + 1, np.int64)
    np.cumsum(np.bincount(img, minlength=n_images), out=indptr[1:])

    image_counts = np.bincount(feat, minlength=d_sae)
    image_freq = (image_counts / n_images).astype(np.float32)
    freq = (image_freq * rng.uniform(0.05, 0.3, d_sae)).astype(np.float32)
    mean = (freq * rng.uniform(0.5, 3.0, d_sae)).astype(np.float32)
    edges = np.linspace(-5.0, 5.0, n_bins + 1)
    centre = rng.integers(n_bins // 2 - 10, n_bins // 2 + 10, d_sae)
    hist = np.maximum(0, 1000 - 40 * np.abs(np.arange(n_bins)[None, :] - centre[:, None])).astype(np.int64)
    hist = (hist * (image_counts[:, None] > 0)).astype(np.int64)

    arrays = {"feature_freq": freq, "feature_image_freq": image_freq, "feature_mean": mean,
              "feature_hist": hist, "hist_edges": edges, "top_rows": top_rows, "top_values": top_values,
              "top_patch_acts": maps, "image_max_indptr": indptr,
              "image_max_indices": feat.astype(np.int32), "image_max_data": val.astype(np.float32)}
    for name, array in arrays.items():
        atomic_save_npy(dpath / f"{name}.npy", array)
    manifest = {"format": "traitscope-inference/1", "sae_sha256": "synthetic-" + str(seed),
                "shards": {"hash": shards_hash, "path": ""}, "layer": LAYER, "token_kind": "patches",
                "n_images": n_images, "n_patches": n_patches, "grid": list(grid), "top_n": top_n,
                "d_sae": d_sae, "hist_range": [-5.0, 5.0], "n_bins": n_bins}
    (dpath / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dpath


def make_world(root: Path, n_images: int = 48, d_sae: int = 128, fresh_run: bool = False) -> dict:
    """Images, a shard folder and SAE runs under `root`: 'topk-a' and 'topk-b' with generated
    inference folders (seeds 0 and 1) and, with `fresh_run`, 'fresh' without one."""
    shards = make_shards(root / "shards", root / "images", n_images)
    labels = [rec["label"] for rec in shards.images]
    for i, name in enumerate(("topk-a", "topk-b")):
        run = make_run(root / "runs" / name, shards, d_sae=d_sae)
        write_inference(run, shards.hash, n_images, d_sae, label_of_image=labels, seed=i)
    if fresh_run:
        make_run(root / "runs" / "fresh", shards, d_sae=d_sae)
    return {"root": root, "shards": shards, "ratings": root / "ratings", "cache": root / "cache"}


def permuted_run(src_dpath: Path, dst_dpath: Path, perm: np.ndarray) -> Path:
    """A copy of an SAE run whose latent j is the source's latent perm[j] (the same dictionary, reordered)."""
    import torch

    from traitscope.sae import load_sae

    sae = load_sae(src_dpath)
    with torch.no_grad():
        sae.W_enc.copy_(sae.W_enc[:, perm])
        sae.b_enc.copy_(sae.b_enc[perm])
        sae.W_dec.copy_(sae.W_dec[perm])
    config = json.loads((src_dpath / "config.json").read_text())
    sae.save(dst_dpath, extra_config={k: v for k, v in config.items() if k not in ("sae", "format")})
    return dst_dpath
