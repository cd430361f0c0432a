"""Vision towers from `open_clip`: `open_clip:<model>/<pretrained tag>`, `open_clip:<model>@<checkpoint>`,
`open_clip:hf-hub:<org/repo>`, `open_clip:local-dir:<folder>`, the `hf-hub:<org/repo>` shorthand, and the
BioCLIP aliases `bioclip` and `bioclip-2`.

Only the visual tower is kept. The residual stream after block i is the output of
`visual.transformer.resblocks[i]` (after `ln_pre`, before `ln_post`); towers built on timm (SigLIP in
open_clip) are recorded like any timm ViT. Preprocessing comes from the tower's `preprocess_cfg`.
"""

import open_clip
import torch
from timm.layers import resample_abs_pos_embed

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
from traitscope.backbones.timm_vit import TimmViTBackbone
from traitscope.errors import TraitscopeError


def openclip_preprocess(visual: torch.nn.Module) -> Preprocess:
    """The eval transform open_clip builds from the tower's preprocess_cfg."""
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    size = cfg.get("size", getattr(visual, "image_size", 224))
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise TraitscopeError(f"non-square input size {tuple(size)} is not supported")
        size = size[0]
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        interpolation = "bicubic"
    # 'shortest': resize the shorter side to size, centre-crop; 'squash': resize to size x size;
    # 'longest': resize the longer side to size, pad (our letterbox).
    mode = {"squash": "squash", "longest": "letterbox"}.get(cfg.get("resize_mode"), "shorter")
    return Preprocess(
        crop=int(size),
        resize=int(size),
        mean=tuple(cfg.get("mean", CLIP_MEAN)),
        std=tuple(cfg.get("std", CLIP_STD)),
        interpolation=interpolation,
        mode=mode,
    )


class OpenClipViTBackbone(Backbone):
    """open_clip's own VisionTransformer: [CLS] + patches through `transformer.resblocks`."""

    family = "open_clip"

    def __init__(self, visual: torch.nn.Module, name: str, description: str, preprocess: Preprocess | None = None):
        super().__init__()
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise TraitscopeError(f"{name}: the vision tower is a {type(visual).__name__}, not a ViT")
        self.model = visual.eval()
        self.name = name
        self.description = description
        self.blocks = tuple(visual.transformer.resblocks)  # a tuple: not a second copy in state_dict
        self.batch_first = getattr(visual.transformer, "batch_first", True)
        self.n_layers = len(self.blocks)
        self.d_model = visual.transformer.width
        self.patch_size = visual.patch_size[0]
        self.preprocess = preprocess or openclip_preprocess(visual)
        self.use_cls = getattr(visual, "pool_type", "tok") == "tok" and not getattr(visual, "attn_pool", None)
        self.native_grid = tuple(visual.grid_size)
        height, width = self.preprocess.input_hw
        self.layout = TokenLayout(n_cls=1, n_registers=0, grid=(height // self.patch_size, width // self.patch_size))

    def _fit_input(self, height: int, width: int) -> None:
        """Any multiple of the patch size: `record` resamples the position embeddings to the grid."""

    def _forward_resampled(self, pixels_bchw: torch.Tensor) -> None:
        """open_clip's `VisionTransformer._embeds` with the position embeddings resampled (bicubic, timm's
        `resample_abs_pos_embed`, which open_clip uses to resize checkpoints) to this input's grid."""
        visual = self.model
        x = visual.conv1(pixels_bchw)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        pos = resample_abs_pos_embed(visual.positional_embedding.unsqueeze(0), new_size=grid,
                                     old_size=self.native_grid, num_prefix_tokens=1)
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
        visual.transformer(visual.ln_pre(visual.patch_dropout(x)))

    @torch.inference_mode()
    def record(self, pixels_bchw: torch.Tensor, layers: list[int]) -> dict[int, LayerActs]:
        param = next(self.model.parameters())
        pixels_bchw = pixels_bchw.to(device=param.device, dtype=param.dtype)
        native = tuple(pixels_bchw.shape[-2:]) == tuple(n * self.patch_size for n in self.native_grid)
        forward = (lambda: self.model(pixels_bchw)) if native else (lambda: self._forward_resampled(pixels_bchw))
        outputs = capture_block_outputs(self.blocks, layers, forward)
        acts = {}
        for layer in layers:
            tokens_btd = outputs[layer] if self.batch_first else outputs[layer].transpose(0, 1)
            patches_bpd = tokens_btd[:, 1:]
            cls_bd = tokens_btd[:, 0] if self.use_cls else patches_bpd.mean(dim=1)
            acts[layer] = LayerActs(cls_bd=cls_bd, patches_bpd=patches_bpd)
        return acts


def backbone_from_visual(visual: torch.nn.Module, name: str, description: str) -> Backbone:
    """Wrap an open_clip vision tower: its own ViT, or a timm trunk (open_clip's SigLIP models)."""
    if isinstance(visual, open_clip.transformer.VisionTransformer):
        return OpenClipViTBackbone(visual, name, description)
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "blocks"):
        backbone = TimmViTBackbone(trunk, name, description, preprocess=openclip_preprocess(visual))
        backbone.family = "open_clip"
        return backbone
    raise TraitscopeError(f"{name}: open_clip vision tower {type(visual).__name__} is not a vision transformer")


def _parse(spec: str) -> tuple[str, str | None]:
    """(model_name, pretrained) from `<model>/<tag>`, `<model>@<checkpoint>`, `hf-hub:...`, `local-dir:...`."""
    if spec.startswith(("hf-hub:", "local-dir:")):
        return spec, None
    if "@" in spec:
        model_name, checkpoint = spec.split("@", 1)
        return model_name, checkpoint
    model_name, _, tag = spec.partition("/")
    if not tag:
        tags = [t for m, t in open_clip.list_pretrained() if m == model_name]
        hint = f"; pretrained tags: {', '.join(tags)}" if tags else ""
        raise TraitscopeError(
            f"open_clip:{spec}: name the weights as open_clip:{model_name}/<pretrained> or "
            f"open_clip:{model_name}@<checkpoint>{hint}"
        )
    return model_name, tag


def _check_hub_for(model_name: str, pretrained: str | None, name: str) -> None:
    if model_name.startswith("hf-hub:"):
        repo = model_name.removeprefix("hf-hub:")
    elif pretrained:
        cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
        repo = (cfg.get("hf_hub") or "").strip("/")
        if not cfg and not pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise TraitscopeError(f"{name}: open_clip has no pretrained tag {pretrained!r} for {model_name}")
    else:
        repo = ""
    if repo:
        check_hub(repo, name, ("open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin"))


def load_open_clip(spec: str, name: str | None = None, description: str | None = None) -> Backbone:
    """Load an open_clip model's vision tower (see the module docstring for the accepted forms)."""
    name = name or f"open_clip:{spec}"
    model_name, pretrained = _parse(spec)
    bare = model_name.split(":", 1)[0] not in ("hf-hub", "local-dir")
    if bare and model_name not in open_clip.list_models():
        raise TraitscopeError(f"{name}: open_clip has no model {model_name!r} (see open_clip.list_models())")
    _check_hub_for(model_name, pretrained, name)
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained, require_pretrained=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise TraitscopeError(f"{name}: could not load ({str(err).splitlines()[0]})") from err
    visual = model.visual
    del model  # the text tower is not needed
    description = description or f"open_clip {model_name} vision tower ({pretrained or 'hub weights'})"
    return backbone_from_visual(visual, name, description)


def load_hf_hub(repo: str) -> Backbone:
    return load_open_clip(f"hf-hub:{repo}", name=f"hf-hub:{repo}")


ALIASES = {
    "bioclip": ("hf-hub:imageomics/bioclip", "BioCLIP ViT-B/16 vision tower (hf-hub:imageomics/bioclip)"),
    "bioclip-2": ("hf-hub:imageomics/bioclip-2", "BioCLIP 2 ViT-L/14 vision tower (hf-hub:imageomics/bioclip-2)"),
}


def _load_alias(name: str) -> Backbone:
    spec, description = ALIASES[name]
    return load_open_clip(spec, name=name, description=description)


def _random_open_clip(name: str) -> Backbone:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        visual = open_clip.transformer.VisionTransformer(
            image_size=224, patch_size=16, width=64, layers=4, heads=2, mlp_ratio=2.0, output_dim=32
        )
    visual.preprocess_cfg = {"size": 224, "mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic",
                             "resize_mode": "shortest"}
    return OpenClipViTBackbone(
        visual.eval(), name, "random-init open_clip ViT-shaped test model (64 wide, 4 blocks, patch 16)"
    )


register(
    "open_clip:",
    load_open_clip,
    "open_clip:<model>/<tag>, open_clip:<model>@<checkpoint>, open_clip:hf-hub:<repo>, open_clip:local-dir:<folder>",
)
register("hf-hub:", load_hf_hub, "an open_clip model on the Hugging Face hub, e.g. hf-hub:imageomics/bioclip")
for _name, (_spec, _description) in ALIASES.items():
    register(_name, _load_alias, _description)
register("random-open_clip", _random_open_clip, "random-init tiny open_clip ViT (CLS, patch 16) for tests")
