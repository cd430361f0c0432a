"""Which SAE features fire where in one image, computed on the fly (torch is imported only here).

A dataset image is encoded from its stored activations (the SAE alone); an uploaded image goes
through the backbone named in the shard manifest first, with the manifest's preprocessing.
"""

import numpy as np
import torch
from PIL import Image

from traitscope.app.data import Dataset, Run
from traitscope.backbones import Backbone, load_backbone
from traitscope.errors import TraitscopeError
from traitscope.sae import SAE, load_sae


def load_run_sae(run: Run) -> SAE:
    return load_sae(run.dpath, device="cpu")


def load_dataset_backbone(dataset: Dataset) -> tuple[Backbone, bool]:
    """The backbone the dataset's shards were made with, and whether its weights hash matches."""
    backbone = load_backbone(dataset.model_name, device="cpu")
    expected = dataset.manifest["model"].get("weights_sha256")
    matches = expected is None or backbone.weights_sha256() == expected
    if backbone.preprocess != dataset.preprocess:  # the shards' geometry and resolution
        backbone.set_preprocess(dataset.preprocess)
    return backbone, matches


@torch.inference_mode()
def encode_acts(sae: SAE, acts_td: np.ndarray, batch: int = 4096) -> np.ndarray:
    """SAE codes (tokens, d_sae) float32 of raw activations (tokens, d_model)."""
    out = []
    for start in range(0, len(acts_td), batch):
        x = torch.from_numpy(np.asarray(acts_td[start:start + batch], dtype=np.float32))
        out.append(sae.encode(x).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, sae.d_sae), np.float32)


def dataset_image_codes(sae: SAE, dataset: Dataset, run: Run, row: int) -> np.ndarray:
    """(n_tokens, d_sae) codes of a dataset image from its stored activations (n_tokens = patches or 1)."""
    if not 0 <= row < dataset.n_images:
        raise TraitscopeError(f"image row {row} is out of range")
    acts = dataset.shards.acts(run.layer, run.token_kind)
    per_image = acts.rows_per_item
    codes = encode_acts(sae, acts.read(row * per_image, (row + 1) * per_image))
    validity = dataset.shards.patch_validity(run.layer) if run.token_kind == "patches" else None
    if validity is not None:  # padding patches never fire
        codes[~validity.of_images(row, row + 1)[0]] = 0
    return codes


@torch.inference_mode()
def new_image_codes(backbone: Backbone, sae: SAE, dataset: Dataset, run: Run, image: Image.Image) -> np.ndarray:
    """(n_tokens, d_sae) codes of a new image: manifest preprocessing, backbone, then the SAE."""
    layer = dataset.shards.resolve(run.layer)
    pixels_bchw = dataset.preprocess(image).unsqueeze(0)
    acts = backbone.record(pixels_bchw, [layer])[layer]
    tokens_td = acts.patches_bpd[0] if run.token_kind == "patches" else acts.cls_bd
    codes = encode_acts(sae, tokens_td.float().numpy())
    if run.token_kind == "patches":  # padding patches never fire
        codes[~dataset.preprocess.valid_patches(*image.size, dataset.grid(run.layer)).reshape(-1)] = 0
    return codes


def top_features(codes_td: np.ndarray, n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """(features, max activation over tokens) of the n strongest features in one image."""
    max_s = codes_td.max(axis=0)
    order = np.argsort(-max_s, kind="stable")[:n]
    order = order[max_s[order] > 0]
    return order, max_s[order]
