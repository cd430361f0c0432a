"""The faces workflow: fine-tuning with contrastive + orientation losses, image-level embeddings,
grids of top images, attribute enrichment, and the documented CelebA command sequence.

Real components throughout: a torchvision ResNet-18 and the tiny DINOv2 with random weights (no
download), real image files, the shards pipeline, real SAE runs and real PNG files. The CelebA tests
use ../shared/data/celeba_32 and skip only when it is absent.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from traitscope.backbones import load_backbone
from traitscope.cli import main
from traitscope.errors import TraitscopeError
from traitscope.finetune import grids, losses
from traitscope.finetune.embed import embed_images
from traitscope.finetune.trainer import FinetuneConfig, finetune, load_training_images
from traitscope.images import open_source
from traitscope.shards import Shards
from traitscope.shards.store import write_arrays
from locations import CELEBA, REPO

CELEBA_ATTRS = CELEBA / "list_attr_celeba_000001-000032.txt"
needs_celeba = pytest.mark.skipif(not CELEBA.is_dir(), reason=f"{CELEBA} is absent")

# Small and quick on a 2-core CPU: 32x32 inputs.
QUICK = dict(model="random-resnet18", image_size=32, batch_size=8, head_dim=32, device="cpu")


def _faces_like(dpath: Path, n: int = 12, seed: int = 0) -> Path:
    """n distinct images that are clearly not symmetric under a 180-degree turn (a bright top band)."""
    rng = np.random.default_rng(seed)
    dpath.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(0, 255, (8, 8, 3)).repeat(8, 0).repeat(8, 1).astype(np.uint8)
        pixels[:12] = 255
        Image.fromarray(pixels).save(dpath / f"img{i:03d}.png")
    return dpath


# ---------------------------------------------------------------------------------------------
# Losses as functions.


def test_contrastive_loss_rewards_matching_views_and_single_view_form_is_trivial():
    g = torch.Generator().manual_seed(0)
    e_bd = torch.randn(8, 16, generator=g)
    matched = losses.contrastive_loss(e_bd, e_bd + 0.01 * torch.randn(8, 16, generator=g), temperature=0.1)
    unrelated = losses.contrastive_loss(e_bd, torch.randn(8, 16, generator=g), temperature=0.1)
    assert matched < 0.1 < np.log(8) / 2 < unrelated
    # the single-view form is satisfied by any embedding at all: why the trainer uses two views
    random_bd = torch.randn(8, 16, generator=g)
    assert losses.contrastive_loss(random_bd, random_bd, temperature=0.05) < 0.1


def test_orientation_loss_is_the_squared_error_to_the_negated_embedding():
    e_bd = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    assert losses.orientation_loss(e_bd, -e_bd) == 0
    # (1+1)² + (2+2)² = 20 and (0+0)² + (-1-1)² = 4: mean over images 12
    assert losses.orientation_loss(e_bd, e_bd) == pytest.approx(12.0)
    image = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    assert torch.equal(losses.rot180(image)[..., 0, 0], image[..., -1, -1])
    assert torch.equal(losses.rot180(losses.rot180(image)), image)


# ---------------------------------------------------------------------------------------------
# Training on real images.


def _docs_script() -> str:
    """The bash block of docs/faces.md, with DATA pointing at the shared CelebA folder."""
    text = (REPO / "docs" / "faces.md").read_text()
    (block,) = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert re.search(r"^DATA=\.\./shared/data/celeba_32$", block, flags=re.M)
    return re.sub(r"^DATA=.*$", f"DATA={CELEBA}", block, flags=re.M)


@pytest.fixture(scope="module")
def faces_run(tmp_path_factory):
    """docs/faces.md's command sequence, run by bash as a user would (shared by the CelebA tests)."""
    if not CELEBA.is_dir():
        pytest.skip(f"{CELEBA} is absent")
    cwd = tmp_path_factory.mktemp("faces")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", _docs_script()], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    print(f"docs/faces.md sequence: {seconds:.1f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (shards_dpath,) = [p for p in (cwd / "faces" / "shards").iterdir()
                       if json.loads((p / "manifest.json").read_text()).get("normalize") == "l2"]
    return {"cwd": cwd, "ft": cwd / "faces" / "ft", "shards": Shards(shards_dpath), "run": cwd / "faces" / "runs" / "relu",
            "grids": cwd / "faces" / "grids", "stdout": proc.stdout, "stderr": proc.stderr, "seconds": seconds}


@needs_celeba
def test_contrastive_loss_decreases_on_real_faces(faces_run):
    manifest = json.loads((faces_run["ft"] / "finetune.json").read_text())
    steps = [json.loads(line) for line in (faces_run["ft"] / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 16 and {"loss", "contrastive", "orientation"} <= set(steps[0])
    ev = manifest["eval"]
    assert ev["after"]["contrastive"] < 0.85 * ev["before"]["contrastive"], ev
    first, last = np.mean([s["contrastive"] for s in steps[:4]]), np.mean([s["contrastive"] for s in steps[-4:]])
    assert last < first
    assert "contrastive" in faces_run["stderr"] and "orientation" in faces_run["stderr"]  # the progress bar


@needs_celeba
def test_orientation_loss_turns_upside_down_faces_towards_the_opposite_embedding(faces_run):
    from traitscope.finetune.trainer import normalize_pixels

    model = load_backbone(str(faces_run["ft"]))
    images = load_training_images(open_source(str(CELEBA)), model, verbose=False)
    x_bchw = images.pixels_nchw.float().div(255)
    with torch.no_grad():
        e = model.embed(normalize_pixels(x_bchw, model))
        e_rot = model.embed(normalize_pixels(losses.rot180(x_bchw), model))
    cos = torch.nn.functional.cosine_similarity(e, e_rot).mean().item()
    ev = json.loads((faces_run["ft"] / "finetune.json").read_text())["eval"]
    assert cos == pytest.approx(ev["after"]["cos_rot180"], abs=1e-3)
    assert ev["before"]["cos_rot180"] > 0.5 and cos < ev["before"]["cos_rot180"] - 0.5, (ev, cos)
    assert ev["after"]["orientation"] < ev["before"]["orientation"]


@needs_celeba
def test_celeba_embeddings_are_normalised_shards_with_attributes(faces_run):
    shards = faces_run["shards"]
    assert shards.manifest["normalize"] == "l2" and shards.token_kinds == ["cls"] and shards.n_images == 32
    layer = shards.layers[0]
    np.testing.assert_allclose(np.linalg.norm(shards.acts(layer, "cls")[:], axis=1), 1, rtol=1e-5)
    assert len(shards.image_label_names) == 40 and "Smiling" in shards.image_label_names
    assert [img["path"] for img in shards.images] == [f"{i:06d}.jpg" for i in range(1, 33)]


@needs_celeba
def test_celeba_grids_show_the_top_faces_of_dimensions_and_sae_features(faces_run):
    out, shards = faces_run["grids"], faces_run["shards"]
    top = np.load(out / "top_images.npz")
    layer = shards.layers[0]
    # SAE features: brute-force ranking of L2-normalised codes, firing images only
    from traitscope.sae import load_sae

    sae = load_sae(faces_run["run"])
    with torch.no_grad():
        codes = sae.encode(torch.from_numpy(shards.acts(layer, "cls")[:])).numpy()
    normed = codes / np.maximum(np.linalg.norm(codes, axis=1, keepdims=True), 1e-12)
    assert top["sae_rows"].shape == (sae.d_sae, 16)
    alive = np.flatnonzero((codes > 0).any(axis=0))
    assert len(alive) >= 4
    for f in alive:
        expected = [r for r in np.lexsort((np.arange(32), -normed[:, f]))[:16] if normed[r, f] > 0]
        got = top["sae_rows"][f]
        np.testing.assert_array_equal(got[:len(expected)], expected)
        assert (got[len(expected):] == -1).all()
    # PNGs: one 4x4 grid per dense dimension and per feature that fires
    dense_pngs, sae_pngs = sorted((out / "dense").glob("*.png")), sorted((out / "sae").glob("*.png"))
    assert len(dense_pngs) == 32 and len(sae_pngs) == len(alive)
    assert {Image.open(p).size for p in dense_pngs + sae_pngs} == {(4 * 130 + 2, 4 * 130 + 2)}
    # attribute enrichment per unit
    import csv

    rows = list(csv.DictReader(open(out / "enrichment.csv")))
    assert {r["kind"] for r in rows} == {"dense", "sae"}
    assert all(r["attribute"] in shards.image_label_names and 0 <= float(r["p_value"]) <= 1 for r in rows)
    manifest = json.loads((out / "grids.json").read_text())
    assert manifest["ranking"] == {"by": "normalised", "label": "top images by share of the L2-normalised image vector"}
    assert "top images by share of the L2-normalised image vector" in faces_run["stdout"]
    summary = manifest["enrichment"]
    n_half = int(((top["sae_rows"] >= 0).sum(axis=1) >= 8).sum())
    assert summary["dense"]["n_units"] == 32 and summary["sae"]["n_units"] == n_half > 0
    assert "enrichment (dense, 32 units" in faces_run["stdout"]


@needs_celeba
def test_the_app_blind_test_shows_the_grids_of_the_cli(faces_run, tmp_path):
    """For an image-level run the blind test ranks images as `traitscope grids` does (L2-normalised
    rows), dense dimensions and SAE features alike."""
    from traitscope.app.data import Dataset, Run, dense_top_images, sae_top_rows
    from traitscope.features.inference import run_inference

    shards, top = faces_run["shards"], np.load(faces_run["grids"] / "top_images.npz")
    inference, _ = run_inference(faces_run["run"], shards.dpath, progress=False)
    dataset, run = Dataset(shards.dpath), Run(faces_run["run"], "relu")
    np.testing.assert_array_equal(sae_top_rows(dataset, run, inference, 16, tmp_path), top["sae_rows"])
    np.testing.assert_array_equal(sae_top_rows(dataset, run, inference, 16, tmp_path), top["sae_rows"])  # cached
    dense = dense_top_images(dataset, run.layer, run.token_kind, 16, tmp_path)
    np.testing.assert_array_equal(dense, top["dense_rows"])


@needs_celeba
def test_the_documented_blind_test_starts(faces_run, tmp_path, summary):
    """docs/faces.md's `blind` run on the fine-tuned EfficientNet-Lite0 embeddings has the N = 10 SAE
    features that fill a 16-face grid, so the blind test starts as the docs say (as the app plans it)."""
    from traitscope.app import blind
    from traitscope.app.data import Dataset, InferenceView, Run, sae_top_rows

    shards = faces_run["shards"]
    dataset, run = Dataset(shards.dpath), Run(faces_run["cwd"] / "faces" / "runs" / "blind", "blind")
    inference = InferenceView(run.inference_dpath(dataset.hash))
    rows = sae_top_rows(dataset, run, inference, 16, tmp_path)
    full = np.flatnonzero(rows[:, 15] >= 0)
    summary.append(f"blind run: {len(full)} of {inference.d_sae} SAE features fill a 16-face grid")
    assert len(blind.plan_items(10, 0, np.arange(shards.d_model(run.layer)), full)) == 20


def test_resume_from_checkpoint_continues_identically(tmp_path):
    images = str(_faces_like(tmp_path / "imgs", n=8))
    cfg = dict(QUICK, batch_size=4, save_every=1000)  # 2 steps per epoch
    straight = finetune(FinetuneConfig(**cfg, epochs=3), images, tmp_path / "straight", verbose=False)
    finetune(FinetuneConfig(**cfg, epochs=1), images, tmp_path / "resumed", verbose=False)
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())["step"] == 2
    # as if the run had been killed one step after its last checkpoint: that step's metrics are dropped
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "epoch": 1, "loss": 0.0, "contrastive": 0.0, "orientation": 0.0}) + "\n")
    resumed = finetune(FinetuneConfig(**cfg, epochs=3), images, tmp_path / "resumed", verbose=False)
    a = load_file(str(straight.dpath / "model.safetensors"))
    b = load_file(str(resumed.dpath / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # BatchNorm statistics included
    lines = lambda run: [json.loads(x) for x in (run.dpath / "metrics.jsonl").read_text().splitlines()]
    assert lines(straight) == lines(resumed) and len(lines(resumed)) == 6
    assert straight.manifest["eval"] == resumed.manifest["eval"]
    # rerunning a finished folder does nothing; other settings are refused
    assert finetune(FinetuneConfig(**cfg, epochs=3), images, tmp_path / "resumed", verbose=False).manifest["steps"] == 6
    with pytest.raises(TraitscopeError, match="other settings"):
        finetune(FinetuneConfig(**dict(cfg, lr=0.5), epochs=4), images, tmp_path / "resumed", verbose=False)


def test_vit_finetunes_and_loads_as_a_backbone_in_shards(tmp_path):
    images = str(_faces_like(tmp_path / "imgs", n=8))
    cfg = FinetuneConfig(model="random-dinov2", image_size=56, batch_size=8, epochs=2, head_dim=0, device="cpu")
    result = finetune(cfg, images, tmp_path / "ft", verbose=False)
    backbone = load_backbone(f"finetuned:{result.dpath}")
    assert backbone.n_layers == 4 and backbone.d_model == 64 and backbone.preprocess.crop == 56
    shards = embed_images(backbone, open_source(images), tmp_path / "shards", layer=-1, verbose=False)
    assert shards.token_kinds == ["cls"] and shards.n_images == 8
    assert shards.model["name"] == f"finetuned:{result.dpath}"
    assert shards.model["weights_sha256"] == result.manifest["weights_sha256"]


def test_finetuned_resnet_loads_as_a_backbone_and_produces_shards(tmp_path):
    images = str(_faces_like(tmp_path / "imgs", n=8))
    cfg = FinetuneConfig(**dict(QUICK, batch_size=8), epochs=1)
    result = finetune(cfg, images, tmp_path / "ft", verbose=False)
    backbone = load_backbone(f"finetuned:{result.dpath}")
    assert backbone.embed_layer == backbone.n_layers - 1 and backbone.d_model_at(backbone.embed_layer) == 32
    # through the command line, as a user would; centre crop: the view the model was trained on
    # (load_training_images), which the default grid geometry (the whole image) is not
    assert main(["shards", "--images", images, "--model", f"finetuned:{result.dpath}", "--layers", "-1",
                 "--tokens", "cls", "--dtype", "float32", "--geometry", "center-crop",
                 "--out", str(tmp_path / "shards")]) == 0
    (dpath,) = [p for p in (tmp_path / "shards").iterdir() if (p / "manifest.json").is_file()]
    stored = Shards(dpath).acts(-1, "cls")[:]
    # the stored rows are e(x) of the trained model: compare with a fresh forward pass
    from traitscope.finetune.trainer import normalize_pixels

    pixels = load_training_images(open_source(images), result.model, verbose=False).pixels_nchw.float().div(255)
    with torch.no_grad():
        e = result.model.embed(normalize_pixels(pixels, result.model)).numpy()
    np.testing.assert_allclose(stored, e, rtol=1e-4, atol=1e-4)
    # normalised copy: unit rows, recorded in the manifest
    normed = embed_images(backbone, open_source(images), tmp_path / "shards", normalize=True, verbose=False)
    assert normed.manifest["normalize"] == "l2" and normed.manifest["derived_from"] == Shards(dpath).hash
    np.testing.assert_allclose(np.linalg.norm(normed.acts(-1, "cls")[:], axis=1), 1, rtol=1e-5)


def test_init_from_a_weights_file_or_an_earlier_finetune(tmp_path):
    import torchvision

    images = str(_faces_like(tmp_path / "imgs", n=4))
    torch.manual_seed(123)
    module = torchvision.models.resnet18(weights=None)
    torch.save(module.state_dict(), tmp_path / "r18.pth")
    cfg = dict(QUICK, model="resnet18", batch_size=4)
    first = finetune(FinetuneConfig(**cfg, init=str(tmp_path / "r18.pth"), epochs=0), images, tmp_path / "a", verbose=False)
    assert all(torch.equal(v, first.model.base.model.state_dict()[k]) for k, v in module.state_dict().items())
    assert "weights from" in first.model.description
    second = finetune(FinetuneConfig(**cfg, init=str(first.dpath), epochs=1), images, tmp_path / "b", verbose=False)
    assert second.manifest["steps"] == 1 and "starting from the fine-tune" in second.model.description
    with pytest.raises(TraitscopeError, match="no such file"):
        finetune(FinetuneConfig(**cfg, init=str(tmp_path / "missing.pth")), images, tmp_path / "c", verbose=False)


# ---------------------------------------------------------------------------------------------
# Deterministic order: an index in a saved tensor maps back to the same file after a restart.


def test_image_order_is_sorted_paths_whatever_the_creation_order(tmp_path):
    dpath = tmp_path / "imgs"
    (dpath / "b").mkdir(parents=True)
    names = ["z.png", "b/a.png", "a10.png", "a2.png", "M.png"]
    for i, name in enumerate(names):  # created in this (unsorted) order, with increasing mtimes
        Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(dpath / name)
        os.utime(dpath / name, (1e9 + (len(names) - i), 1e9 + (len(names) - i)))
    expected = sorted(names)
    backbone = load_backbone("random-dinov2")
    first = load_training_images(open_source(str(dpath)), backbone, verbose=False)
    assert [r["path"] for r in first.records] == expected
    shards = embed_images(backbone, open_source(str(dpath)), tmp_path / "shards", verbose=False)
    assert [img["path"] for img in shards.images] == expected
    # "restart": a fresh listing and a reopened shard folder agree row by row, and each row's file
    # is the one whose colour we wrote
    reopened = Shards(shards.dpath)
    again = load_training_images(open_source(str(dpath)), backbone, verbose=False)
    for row, path in enumerate(expected):
        assert again.records[row]["path"] == path == reopened.images[row]["path"]
        assert Image.open(reopened.image_fpath(row)).getpixel((0, 0))[0] == names.index(path) * 50


# ---------------------------------------------------------------------------------------------
# Grids of top images.


def _colour_shards(tmp_path: Path, values_nd: np.ndarray) -> Shards:
    """A cls-only shard folder over n solid-colour images (colour i identifies image i)."""
    dpath = tmp_path / "colours"
    dpath.mkdir()
    n = len(values_nd)
    listing = []
    for i in range(n):
        Image.new("RGB", (32, 32), _colour(i)).save(dpath / f"c{i:03d}.png")
        listing.append({"index": i, "path": f"c{i:03d}.png", "width": 32, "height": 32, "label": None,
                        "row": i, "skipped": None})
    header = {"model": {"name": "test", "n_layers": 1}, "layers": [0], "token_kinds": ["cls"],
              "d_model": {"0": values_nd.shape[1]}, "grid": {"0": [1, 1]},
              "layout": {"n_cls": 1, "n_registers": 0},
              "preprocess": {"crop": 32, "resize": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
                             "interpolation": "bilinear", "mode": "shorter"},
              "dtype": "float32", "images_root": str(dpath), "patch_labels": [], "image_labels": []}
    return write_arrays(tmp_path / "shards", header, listing, {"L0/cls": values_nd.astype(np.float32)})


def _colour(i: int) -> tuple[int, int, int]:
    return (i * 37 % 256, i * 91 % 256, i * 53 % 256)


def test_dense_top_images_are_the_brute_force_ranking_of_l2_normalised_rows(tmp_path):
    rng = np.random.default_rng(0)
    x_nd = rng.normal(size=(40, 6)) * rng.uniform(0.1, 10, size=(40, 1))  # very different norms
    shards = _colour_shards(tmp_path, x_nd)
    top = grids.dense_top_images(shards, n=16)
    normed = x_nd / np.linalg.norm(x_nd, axis=1, keepdims=True)
    for d in range(6):
        np.testing.assert_array_equal(top.rows_un[d], np.argsort(-normed[:, d], kind="stable")[:16])
        np.testing.assert_allclose(top.values_un[d], np.sort(normed[:, d])[::-1][:16], rtol=1e-5)
    # ranked by max (the raw values), the long vectors win instead
    raw = grids.dense_top_images(shards, n=16, by="max")
    for d in range(6):
        np.testing.assert_array_equal(raw.rows_un[d], np.argsort(-x_nd[:, d], kind="stable")[:16])
    assert any((raw.rows_un[d] != top.rows_un[d]).any() for d in range(6))
    assert (top.by, raw.by) == ("normalised", "max")


def test_grid_png_is_4x4_of_the_top_images_best_first(tmp_path):
    rng = np.random.default_rng(1)
    shards = _colour_shards(tmp_path, rng.normal(size=(20, 3)))
    top = grids.dense_top_images(shards, n=16)
    images = grids.ShardImages(shards, cell=20)
    (fpath, *_) = grids.save_grids(top, images, tmp_path / "out", units=[2])
    grid = Image.open(fpath).convert("RGB")
    pad, step = 2, 22
    assert grid.size == (4 * step + pad, 4 * step + pad)
    for place, row in enumerate(top.rows_un[2]):
        y, x = divmod(place, 4)
        centre = (pad + x * step + 10, pad + y * step + 10)
        assert grid.getpixel(centre) == _colour(int(row)), place


def test_batchnorm_is_frozen_from_trained_weights_and_trains_from_a_random_init(tmp_path):
    from traitscope.finetune.trainer import train_mode

    model = load_backbone("random-resnet18")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    train_mode(model, FinetuneConfig(model="efficientnet-lite0"))
    assert model.training and not any(bn.training for bn in bns)
    train_mode(model, FinetuneConfig(model="random-resnet18"))
    assert all(bn.training for bn in bns)
    train_mode(model, FinetuneConfig(model="efficientnet-lite0", batchnorm="batch"))
    assert all(bn.training for bn in bns)
    with pytest.raises(TraitscopeError, match="--batchnorm"):
        finetune(FinetuneConfig(model="random-resnet18", batchnorm="running"), str(tmp_path / "faces"), tmp_path / "out")
