"""Vision transformers from `timm`: `timm:<model_name>` (pretrained weights from the hub) or
`timm:<model_name>@<checkpoint>` (a local .safetensors / .pt state_dict).

The residual stream after block i is the output of `model.blocks[i]`; `num_prefix_tokens` says how many
class and register tokens come before the patches. Preprocessing is timm's own eval transform
(`timm.data.resolve_data_config`).
"""

import math

import timm
import torch
from timm.layers import Format

from traitscope.backbones.base import (
    Backbone,
    LayerActs,
    Preprocess,
    TokenLayout,
    capture_block_outputs,
    load_weights,
)
from traitscope.backbones.registry import check_hub, register
from traitscope.errors import TraitscopeError


def timm_preprocess(model: torch.nn.Module) -> Preprocess:
    """timm's eval transform for this model: resize the shorter side to size / crop_pct, centre-crop."""
    cfg = timm.data.resolve_data_config({}, model=model)
    _, height, width = cfg["input_size"]
    if height != width:
        raise TraitscopeError(f"non-square input size {height}x{width} is not supported")
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        interpolation = "bicubic"
    crop_pct = cfg.get("crop_pct") or 1.0
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    # 'squash' with crop_pct < 1 and 'border' (pad) have no exact Preprocess equivalent: the model then
    # sees the squashed whole image, or the centre crop; either way `crop_box` describes what it saw.
    if cfg.get("crop_mode", "center") == "squash":
        return Preprocess(crop=height, resize=height, mean=mean, std=std, interpolation=interpolation, mode="squash")
    resize = math.floor(height / crop_pct)
    return Preprocess(crop=height, resize=resize, mean=mean, std=std, interpolation=interpolation, mode="shorter")


class TimmViTBackbone(Backbone):
    """A timm VisionTransformer (or any timm model with `blocks`, `patch_embed` and `num_prefix_tokens`)."""

    family = "timm"

    def __init__(self, model: torch.nn.Module, name: str, description: str, preprocess: Preprocess | None = None):
        super().__init__()
        for attr in ("blocks", "patch_embed", "num_prefix_tokens", "forward_features"):
            if not hasattr(model, attr):
                raise TraitscopeError(f"{name}: {type(model).__name__} is not a timm vision transformer (no {attr})")
        self.model = model.eval()
        self.name = name
        self.description = description
        self.blocks = tuple(model.blocks)  # a tuple: not a second copy in state_dict
        self.n_layers = len(model.blocks)
        self.d_model = model.embed_dim
        patch = model.patch_embed.patch_size
        self.patch_size = patch[0] if isinstance(patch, (tuple, list)) else patch
        self.preprocess = preprocess or timm_preprocess(model)
        n_cls = 1 if getattr(model, "cls_token", None) is not None else 0
        self.n_prefix = model.num_prefix_tokens
        self.use_cls = n_cls == 1 and getattr(model, "global_pool", "token") == "token"
        height, width = self.preprocess.input_hw
        self.layout = TokenLayout(n_cls=n_cls, n_registers=self.n_prefix - n_cls,
                                  grid=(height // self.patch_size, width // self.patch_size))

    def _fit_input(self, height: int, width: int) -> None:
        """Switch the model to timm's dynamic image size (position embeddings resampled per forward, as
        `timm.create_model(..., dynamic_img_size=True)` does), unless the size is its native one."""
        patch_embed = self.model.patch_embed
        native = getattr(patch_embed, "img_size", None)
        if native is not None and tuple(native) == (height, width):
            return
        if not hasattr(self.model, "dynamic_img_size") or not hasattr(patch_embed, "strict_img_size"):
            raise TraitscopeError(f"{self.name}: {type(self.model).__name__} cannot take {width}x{height} px inputs "
                                  f"(no dynamic image size in timm); use its own geometry and resolution")
        self.model.dynamic_img_size = True
        patch_embed.strict_img_size = False
        patch_embed.flatten = False
        patch_embed.output_fmt = Format.NHWC

    @torch.inference_mode()
    def record(self, pixels_bchw: torch.Tensor, layers: list[int]) -> dict[int, LayerActs]:
        param = next(self.model.parameters())
        pixels_bchw = pixels_bchw.to(device=param.device, dtype=param.dtype)
        outputs = capture_block_outputs(self.blocks, layers, lambda: self.model.forward_features(pixels_bchw))
        acts = {}
        for layer in layers:
            tokens_btd = outputs[layer]
            patches_bpd = tokens_btd[:, self.n_prefix :]
            cls_bd = tokens_btd[:, 0] if self.use_cls else patches_bpd.mean(dim=1)
            acts[layer] = LayerActs(cls_bd=cls_bd, patches_bpd=patches_bpd)
        return acts


def _hub_repo(model_name: str) -> str | None:
    """The Hugging Face repo timm downloads this model's default weights from, if any."""
    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
        return getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    except Exception:
        return None


def load_timm(spec: str) -> TimmViTBackbone:
    """`<model_name>` with timm's pretrained weights, or `<model_name>@<checkpoint path>`."""
    model_name, _, checkpoint = spec.partition("@")
    name = f"timm:{spec}"
    base_name = model_name.split(".")[0]
    if not timm.is_model(base_name):
        close = timm.list_models(f"{base_name.split('_')[0]}_*")[:10] or timm.list_models("vit_*")[:10]
        raise TraitscopeError(f"{name}: timm has no model {model_name!r} (e.g. {', '.join(close)})")
    try:
        if checkpoint:
            model = timm.create_model(model_name, pretrained=False)
            load_weights(model, checkpoint, name)
            description = f"timm {model_name} with weights from {checkpoint}"
        else:
            repo = _hub_repo(model_name)
            if repo:
                check_hub(repo, name, ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"))
            model = timm.create_model(model_name, pretrained=True)
            description = f"timm {model_name} (pretrained weights{f' from {repo}' if repo else ''})"
    except (OSError, RuntimeError) as err:
        raise TraitscopeError(f"{name}: could not load ({str(err).splitlines()[0]})") from err
    return TimmViTBackbone(model, name, description)


def _random_timm(name: str) -> TimmViTBackbone:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "random-timm-vit":
            model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4, embed_dim=64, num_heads=2)
            label = "ViT (CLS token, patch 16)"
        else:
            model = timm.create_model(
                "vit_betwixt_patch16_reg4_gap_256", pretrained=False, depth=4, embed_dim=64, num_heads=2
            )
            label = "ViT with 4 registers and no CLS (pooled = mean of patches, patch 16, 256 input)"
    return TimmViTBackbone(model.eval(), name, f"random-init timm {label}-shaped test model (64 wide, 4 blocks)")


register("timm:", load_timm, "any timm vision transformer: timm:<model_name> or timm:<model_name>@<checkpoint>")
register("random-timm-vit", _random_timm, "random-init tiny timm ViT (CLS, patch 16) for tests")
register("random-timm-vit-reg", _random_timm, "random-init tiny timm ViT with 4 registers and no CLS for tests")
