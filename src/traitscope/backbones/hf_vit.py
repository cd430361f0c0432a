"""Vision transformers from Hugging Face `transformers`: DINOv2 (with and without registers), DINOv3,
the CLIP and SigLIP vision towers, and any such model by hub id or local folder (`hf:<id-or-path>`).

The residual stream after block i is that block's output (`hidden_states[i + 1]`), never the final
layer-normed output. Each family's preprocessing is the one its image processor uses.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from traitscope.backbones.base import (
    CLIP_MEAN,
    CLIP_STD,
    Backbone,
    LayerActs,
    Preprocess,
    TokenLayout,
    capture_block_outputs,
)
from traitscope.backbones.registry import check_hub, register
from traitscope.errors import TraitscopeError


# What each family's image processor does (values from their preprocessor_config.json).
DINOV2_PREPROCESS = Preprocess(crop=224, resize=256, interpolation="bicubic", mode="shorter")
DINOV3_PREPROCESS = Preprocess(crop=224, resize=224, interpolation="bilinear", mode="squash")
CLIP_PREPROCESS = Preprocess(crop=224, resize=224, mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic")
SIGLIP_PREPROCESS = Preprocess(
    crop=224, resize=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", mode="squash"
)


@dataclass(frozen=True)
class _Family:
    """How one `model_type` lays out its tokens and prepares its images."""

    label: str
    vision_class: str
    """transformers class that holds the vision tower alone."""
    has_cls: bool
    preprocess: Preprocess


_FAMILIES = {
    "dinov2": _Family("DINOv2", "Dinov2Model", True, DINOV2_PREPROCESS),
    "dinov2_with_registers": _Family("DINOv2 with registers", "Dinov2WithRegistersModel", True, DINOV2_PREPROCESS),
    "dinov3_vit": _Family("DINOv3", "DINOv3ViTModel", True, DINOV3_PREPROCESS),
    "clip": _Family("CLIP", "CLIPVisionModel", True, CLIP_PREPROCESS),
    "clip_vision_model": _Family("CLIP", "CLIPVisionModel", True, CLIP_PREPROCESS),
    "siglip": _Family("SigLIP", "SiglipVisionModel", False, SIGLIP_PREPROCESS),
    "siglip_vision_model": _Family("SigLIP", "SiglipVisionModel", False, SIGLIP_PREPROCESS),
    "vit": _Family("ViT", "ViTModel", True, Preprocess(crop=224, resize=224, mean=(0.5,) * 3, std=(0.5,) * 3,
                                                        interpolation="bilinear", mode="squash")),
}


def _vision_config(config):
    """The vision part of a config (CLIP and SigLIP checkpoints hold text and vision towers)."""
    return getattr(config, "vision_config", None) or config


def _find_blocks(model: torch.nn.Module, n_layers: int) -> torch.nn.ModuleList:
    """The ModuleList of transformer blocks (encoder.layer, model.layer, encoder.layers, ...)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers and "layer" in name:
            return module
    raise TraitscopeError(f"could not find the {n_layers} transformer blocks in {type(model).__name__}")


class HFViTBackbone(Backbone):
    """A transformers vision transformer whose block outputs are recorded with forward hooks."""

    family = "transformers"

    def __init__(self, model: torch.nn.Module, name: str, description: str, preprocess: Preprocess | None = None):
        super().__init__()
        config = _vision_config(model.config)
        model_type = config.model_type
        if model_type not in _FAMILIES:
            raise TraitscopeError(
                f"{name}: model_type {model_type!r} is not supported by the transformers family "
                f"(supported: {', '.join(sorted(_FAMILIES))})"
            )
        spec = _FAMILIES[model_type]
        self.model = model.eval()
        self.name = name
        self.description = description
        self.model_type = model_type
        self.d_model = config.hidden_size
        self.n_layers = config.num_hidden_layers
        self.patch_size = config.patch_size
        self.preprocess = preprocess or spec.preprocess
        self.blocks = tuple(_find_blocks(model, self.n_layers))  # a tuple: not a second copy in state_dict
        self.n_cls = 1 if spec.has_cls else 0
        self.n_registers = getattr(config, "num_register_tokens", 0) or 0
        self.config_image_size = getattr(config, "image_size", None)
        height, width = self.preprocess.input_hw
        self.layout = TokenLayout(n_cls=self.n_cls, n_registers=self.n_registers,
                                  grid=(height // self.patch_size, width // self.patch_size))

    def _fit_input(self, height: int, width: int) -> None:
        """Every family here takes any multiple of its patch size: DINOv2, CLIP, SigLIP and ViT interpolate
        their position embeddings (bicubic), DINOv3's rotary embeddings follow the grid."""

    @torch.inference_mode()
    def record(self, pixels_bchw: torch.Tensor, layers: list[int]) -> dict[int, LayerActs]:
        param = next(self.model.parameters())
        pixels_bchw = pixels_bchw.to(device=param.device, dtype=param.dtype)
        kwargs = {}
        native = tuple(self.config_image_size) if isinstance(self.config_image_size, (tuple, list)) else (
            self.config_image_size, self.config_image_size)
        if self.model_type.startswith(("clip", "siglip", "vit")) and tuple(pixels_bchw.shape[-2:]) != native:
            kwargs["interpolate_pos_encoding"] = True
        outputs = capture_block_outputs(self.blocks, layers, lambda: self.model(pixel_values=pixels_bchw, **kwargs))
        n_prefix = self.n_cls + self.n_registers
        n_patches = (pixels_bchw.shape[-2] // self.patch_size) * (pixels_bchw.shape[-1] // self.patch_size)
        acts = {}
        for layer in layers:
            tokens_btd = outputs[layer]
            if tokens_btd.shape[1] != n_prefix + n_patches:
                raise RuntimeError(
                    f"{self.name}: block {layer} gave {tokens_btd.shape[1]} tokens, expected "
                    f"{n_prefix} prefix + {n_patches} patches"
                )
            patches_bpd = tokens_btd[:, n_prefix:]
            cls_bd = tokens_btd[:, 0] if self.n_cls else patches_bpd.mean(dim=1)
            acts[layer] = LayerActs(cls_bd=cls_bd, patches_bpd=patches_bpd)
        return acts


# ---------------------------------------------------------------------------------------------
# Random-init test models: small, seeded, no download.


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().eval()


_TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=224)


def _random(name: str) -> Backbone:
    T = transformers
    if name == "random-dinov2":
        model = _seeded(lambda: T.Dinov2Model(T.Dinov2Config(**_TINY, mlp_ratio=2, patch_size=14)))
        label = "DINOv2"
    elif name == "random-dinov2-reg":
        config = T.Dinov2WithRegistersConfig(**_TINY, mlp_ratio=2, patch_size=14, num_register_tokens=4)
        model = _seeded(lambda: T.Dinov2WithRegistersModel(config))
        label = "DINOv2-with-registers (4 registers)"
    elif name == "random-dinov3":
        config = T.DINOv3ViTConfig(**_TINY, intermediate_size=128, patch_size=16, num_register_tokens=4)
        model = _seeded(lambda: T.DINOv3ViTModel(config))
        label = "DINOv3 (4 registers, RoPE)"
    elif name == "random-clip":
        config = T.CLIPVisionConfig(**_TINY, intermediate_size=128, patch_size=16)
        model = _seeded(lambda: T.CLIPVisionModel(config))
        label = "CLIP vision tower"
    elif name == "random-siglip":
        config = T.SiglipVisionConfig(**_TINY, intermediate_size=128, patch_size=16)
        model = _seeded(lambda: T.SiglipVisionModel(config))
        label = "SigLIP vision tower (no CLS: pooled = mean of patches)"
    else:
        raise TraitscopeError(f"unknown random test model {name!r}")
    return HFViTBackbone(model, name, f"random-init {label}-shaped test model (64 wide, 4 blocks); not pretrained")


_RANDOM_NAMES = {
    "random-dinov2": "random-init tiny DINOv2 (patch 14, 16x16 grid at 224) for tests",
    "random-dinov2-reg": "random-init tiny DINOv2 with 4 registers (patch 14) for tests",
    "random-dinov3": "random-init tiny DINOv3 with 4 registers and RoPE (patch 16) for tests",
    "random-clip": "random-init tiny CLIP vision tower (patch 16) for tests",
    "random-siglip": "random-init tiny SigLIP vision tower (patch 16, no CLS) for tests",
}
for _name, _description in _RANDOM_NAMES.items():
    register(_name, _random, _description)


# ---------------------------------------------------------------------------------------------
# Pretrained models by hub id or local folder.


def _preprocess_from_file(path: Path, fallback: Preprocess) -> Preprocess:
    """Preprocessing from a local preprocessor_config.json, or `fallback` where it says nothing usable."""
    fpath = path / "preprocessor_config.json"
    if not fpath.is_file():
        return fallback
    cfg = json.loads(fpath.read_text())
    interpolation = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(cfg.get("resample"), fallback.interpolation)
    mean = tuple(cfg.get("image_mean", fallback.mean))
    std = tuple(cfg.get("image_std", fallback.std))
    size = cfg.get("size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    crop_size = cfg.get("crop_size") or {}
    if isinstance(crop_size, int):
        crop_size = {"height": crop_size, "width": crop_size}
    do_crop = cfg.get("do_center_crop", bool(crop_size))
    if "shortest_edge" in size and do_crop and crop_size.get("height") == crop_size.get("width"):
        return Preprocess(crop=crop_size["height"], resize=size["shortest_edge"], mean=mean, std=std,
                          interpolation=interpolation, mode="shorter")
    if "height" in size and size.get("height") == size.get("width") and not do_crop:
        return Preprocess(crop=size["height"], resize=size["height"], mean=mean, std=std,
                          interpolation=interpolation, mode="squash")
    return fallback


def _from_pretrained_vision(model_class, source: str, name: str) -> torch.nn.Module:
    """The vision tower alone; a CLIP/SigLIP checkpoint's text tower is skipped without a report."""
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(source, dtype=torch.float32, output_loading_info=True)
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    if info.get("missing_keys") or info.get("mismatched_keys"):
        missing = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
        raise TraitscopeError(f"{name}: the checkpoint lacks weights of the vision tower: {', '.join(missing[:8])}")
    return model.eval()


def load_hf(repo_or_path: str, name: str | None = None, description: str | None = None) -> HFViTBackbone:
    """Load a transformers vision transformer by hub id or local folder (the `hf:` prefix)."""
    name = name or f"hf:{repo_or_path}"
    local = Path(repo_or_path).expanduser()
    source = str(local) if local.is_dir() else repo_or_path
    if not local.is_dir():
        check_hub(repo_or_path, name)
    try:
        config = transformers.AutoConfig.from_pretrained(source)
        model_type = _vision_config(config).model_type
        if model_type not in _FAMILIES and config.model_type not in _FAMILIES:
            raise TraitscopeError(
                f"{name}: model_type {config.model_type!r} is not a supported vision transformer "
                f"(supported: {', '.join(sorted(_FAMILIES))})"
            )
        spec = _FAMILIES.get(model_type) or _FAMILIES[config.model_type]
        model_class = getattr(transformers, spec.vision_class)
        model = _from_pretrained_vision(model_class, source, name)
    except OSError as err:
        raise TraitscopeError(
            f"could not load {repo_or_path!r} from a local folder, the Hugging Face hub or its cache "
            f"({str(err).splitlines()[0]}); without a network, use 'dinov2-vits14-saliency-offline'"
        ) from err
    preprocess = _preprocess_from_file(local, spec.preprocess) if local.is_dir() else spec.preprocess
    description = description or f"{spec.label} vision transformer from {repo_or_path}"
    return HFViTBackbone(model, name, description, preprocess)


HUB_MODELS = {
    "dinov2-vits14": ("facebook/dinov2-small", "DINOv2 ViT-S/14 (facebook/dinov2-small)"),
    "dinov2-vitb14": ("facebook/dinov2-base", "DINOv2 ViT-B/14 (facebook/dinov2-base)"),
    "dinov2-vitl14": ("facebook/dinov2-large", "DINOv2 ViT-L/14 (facebook/dinov2-large)"),
    "dinov2-vits14-reg": (
        "facebook/dinov2-with-registers-small",
        "DINOv2 ViT-S/14 with 4 registers (facebook/dinov2-with-registers-small)",
    ),
    "dinov2-vitb14-reg": (
        "facebook/dinov2-with-registers-base",
        "DINOv2 ViT-B/14 with 4 registers (facebook/dinov2-with-registers-base)",
    ),
    "dinov2-vitl14-reg": (
        "facebook/dinov2-with-registers-large",
        "DINOv2 ViT-L/14 with 4 registers (facebook/dinov2-with-registers-large)",
    ),
    "dinov3-vits16": (
        "facebook/dinov3-vits16-pretrain-lvd1689m",
        "DINOv3 ViT-S/16 with 4 registers (facebook/dinov3-vits16-pretrain-lvd1689m; gated on the hub)",
    ),
    "dinov3-vitb16": (
        "facebook/dinov3-vitb16-pretrain-lvd1689m",
        "DINOv3 ViT-B/16 with 4 registers (facebook/dinov3-vitb16-pretrain-lvd1689m; gated on the hub)",
    ),
    "clip-vitb16": ("openai/clip-vit-base-patch16", "OpenAI CLIP ViT-B/16 vision tower (openai/clip-vit-base-patch16)"),
    "siglip-vitb16": (
        "google/siglip-base-patch16-224",
        "SigLIP ViT-B/16 vision tower, no CLS token (google/siglip-base-patch16-224)",
    ),
}


def _load_named(name: str) -> HFViTBackbone:
    repo, description = HUB_MODELS[name]
    return load_hf(repo, name=name, description=description)


for _name, (_repo, _description) in HUB_MODELS.items():
    register(_name, _load_named, _description)
register("hf:", load_hf, "any transformers DINOv2/DINOv3/CLIP/SigLIP/ViT by hub id or local folder")
