"""An SAE run folder and a shard folder opened together, checked to belong together.

An SAE reads one layer and one token kind of one model. Applying it to another data set (a different
shards hash of the same model, layer and width) is allowed; a different model, layer or width is an
error, never a silent mix.
"""

from pathlib import Path
from typing import NamedTuple

import numpy as np

from traitscope.errors import TraitscopeError
from traitscope.runs import RunFolder, shards_ref
from traitscope.sae import SAE, load_sae
from traitscope.shards import PatchValidity, Shards, TokenArray


class RunInputs(NamedTuple):
    """What inference, metrics and alignment read."""

    run_dpath: Path
    config: dict
    """The run's config.json."""
    sae: SAE
    sae_sha256: str
    """sha256 of sae.safetensors: names the weights an inference folder was made from."""
    shards: Shards
    layer: int
    """Stored layer index the SAE reads."""
    token_kind: str
    """'patches' (patch-level SAE, or one trained on all tokens) or 'cls' (image-level SAE)."""
    acts: TokenArray
    """(n_images * tokens_per_image, d_model) activations of that layer and token kind."""
    validity: PatchValidity | None = None
    """Which patch tokens hold image pixels (letterbox and grid pad the rest); None: all of them."""

    @property
    def tokens_per_image(self) -> int:
        return self.acts.rows_per_item

    def token_rows(self, image_rows: np.ndarray) -> np.ndarray:
        """Rows of the flattened token array that belong to these images, image by image, padding left out."""
        rows = np.asarray(image_rows, dtype=np.int64)
        idx = (rows[:, None] * self.tokens_per_image + np.arange(self.tokens_per_image)).reshape(-1)
        return idx if self.validity is None else idx[self.validity.of_rows(idx)]

    def valid_tokens(self, start: int, stop: int) -> np.ndarray | None:
        """(n_images * tokens_per_image,) bool for images [start, stop): True where a token holds image
        pixels; None when every token does."""
        return None if self.validity is None else self.validity.of_images(start, stop).reshape(-1)

    @property
    def n_images(self) -> int:
        return self.shards.n_images


def open_inputs(run_dpath: str | Path, shards_dpath: str | Path, device: str = "cpu") -> RunInputs:
    """Open a run and a shard folder, and check that the SAE was trained on this model, layer and width."""
    run, shards = RunFolder(run_dpath), Shards(shards_dpath)
    run_dpath = run.dpath
    sae = load_sae(run_dpath, device=device)
    config = run.read_config()
    ref = shards_ref(config)
    if ref.layer is None:
        raise TraitscopeError(f"{run.config_fpath} has no 'shards' entry with the layer the SAE was "
                              "trained on; cannot check that it fits these shards")
    name, weights = ref.model, ref.weights_sha256
    if weights and shards.model.get("weights_sha256") and weights != shards.model["weights_sha256"]:
        raise TraitscopeError(
            f"the SAE in {run_dpath} was trained on activations of model {name!r} (weights sha256 "
            f"{weights[:12]}…) but {shards.dpath} holds model {shards.model.get('name')!r} "
            f"(weights sha256 {shards.model['weights_sha256'][:12]}…)")
    if name and not weights and name != shards.model.get("name"):
        raise TraitscopeError(f"the SAE in {run_dpath} was trained on model {name!r}, but {shards.dpath} "
                              f"holds model {shards.model.get('name')!r}")
    layer = ref.layer  # a stored (non-negative) block index
    if layer not in shards.layers:
        raise TraitscopeError(f"the SAE in {run_dpath} reads layer {layer}, which {shards.dpath} does "
                              f"not store (stored layers: {shards.layers})")
    token_kind = ref.view_kind
    if token_kind not in shards.token_kinds:
        raise TraitscopeError(f"the SAE in {run_dpath} reads {token_kind!r} tokens, which {shards.dpath} does "
                              f"not store (stored: {shards.token_kinds})")
    if shards.d_model(layer) != sae.d_model:
        raise TraitscopeError(f"the SAE in {run_dpath} reads width {sae.d_model} but layer {layer} of "
                              f"{shards.dpath} has width {shards.d_model(layer)}")
    validity = shards.patch_validity(layer) if token_kind == "patches" else None
    return RunInputs(run_dpath, config, sae, run.weights_sha256(), shards, layer,
                     token_kind, shards.acts(layer, token_kind), validity)


HELDOUT_FRACTION = 0.1
"""Share of images held out when the run's config names no validation images (see `heldout_rows`)."""


def heldout_rows(inputs: RunInputs) -> np.ndarray:
    """Sorted image rows held out from training: metrics and alignment are reported on these.

    The run's own validation images (config `train.val_rows`, stored by the trainer) when it was
    trained on these shards; otherwise (another data set, or no stored split) a fixed split by image:
    the first `HELDOUT_FRACTION` of a seed-0 permutation of the rows.
    """
    n_images = inputs.n_images
    same_shards = shards_ref(inputs.config).hash == inputs.shards.hash
    stored = _stored_val_rows(inputs.config) if same_shards else None
    if stored is not None:
        rows = np.unique(np.asarray(stored, dtype=np.int64))
        if rows.size and (rows[0] < 0 or rows[-1] >= n_images):
            raise TraitscopeError(f"{inputs.run_dpath}: validation rows outside 0..{n_images - 1}")
        return rows
    perm = np.random.default_rng(0).permutation(n_images)
    n_held = max(1, int(round(HELDOUT_FRACTION * n_images))) if n_images > 1 else 0
    return np.sort(perm[:n_held])


def _stored_val_rows(config: dict) -> list[int] | None:
    rows = (config.get("train") or {}).get("val_rows")
    return rows if isinstance(rows, list) and rows else None


def split_rows(inputs: RunInputs) -> tuple[np.ndarray, np.ndarray]:
    """(training image rows, held-out image rows), both sorted."""
    held = heldout_rows(inputs)
    train = np.setdiff1d(np.arange(inputs.n_images), held)
    return train, held
