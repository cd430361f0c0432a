"""The base model a fine-tune starts from: a torchvision ResNet or any registered backbone, with
ImageNet, random, or given weights (`--init`)."""

import dataclasses
from pathlib import Path

import torch
import torchvision

from traitscope.backbones.base import Backbone
from traitscope.backbones.registry import load_backbone
from traitscope.errors import TraitscopeError

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def _resnet_arch(model: str) -> str | None:
    arch = model.removeprefix("random-")
    return arch if arch in RESNET_ARCHS else None


def wrap_resnet(module: torch.nn.Module, arch: str, name: str, preprocess=None) -> Backbone:
    """A torchvision ResNet module as a backbone (pooled output of the last stage as its CLS row)."""
    from traitscope.backbones.resnet import ResNetBackbone

    backbone = ResNetBackbone.from_module(module, name, preprocess)
    backbone.arch = arch
    return backbone


def _state_dict_from_file(fpath: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a .pth/.pt file holding tensors only (no pickled code)."""
    if fpath.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(fpath))
    try:
        state = torch.load(fpath, map_location="cpu", weights_only=True)
    except Exception as err:
        raise TraitscopeError(f"{fpath}: not a weights file torch can load safely ({err})") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TraitscopeError(f"{fpath}: expected a state dict (name -> tensor)")
    return state


def _load_weights(module: torch.nn.Module, fpath: Path, what: str) -> None:
    state = _state_dict_from_file(fpath)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise TraitscopeError(f"{fpath} does not fit {what}: {str(err).splitlines()[0]}") from err


def _imagenet_resnet(arch: str) -> torch.nn.Module:
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    module = torchvision.models.get_model(arch, weights=None)
    try:
        module.load_state_dict(weights.get_state_dict(progress=False))
    except Exception as err:  # URLError, OSError, hash mismatch
        raise TraitscopeError(
            f"could not get torchvision's ImageNet weights for {arch} ({weights}: {err}); offline, use "
            f"--init random or --init <weights file> (e.g. {Path(weights.url).name} copied from elsewhere)"
        ) from err
    return module


def _reinit(base: Backbone, seed: int) -> Backbone:
    """The same architecture with freshly initialised (seeded) weights."""
    from traitscope.backbones.hf_vit import HFViTBackbone

    if not isinstance(base, HFViTBackbone):
        raise TraitscopeError(f"--init random is supported for ResNets and transformers ViTs, not {base.name} ({base.family})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = type(base.model)(base.model.config).eval()
    return HFViTBackbone(model, base.name, base.description, base.preprocess)


def build_base(model: str, init: str, image_size: int | None, seed: int) -> tuple[Backbone, str]:
    """The base backbone to fine-tune and a note on its starting weights (for the description)."""
    from traitscope.finetune.model import load_finetuned, rewrap

    arch = _resnet_arch(model)
    path = Path(init).expanduser() if init not in ("default", "imagenet", "random") else None
    if path is not None and not path.exists():
        raise TraitscopeError(f"--init {init}: no such file or folder (use imagenet, random, a weights file "
                              "or a `traitscope finetune` folder)")
    if path is not None and path.is_dir():
        base = load_finetuned(path).base
        note = f"starting from the fine-tune in {path}"
    elif arch is not None:
        if init == "default":
            init = "random" if model.startswith("random-") else "imagenet"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if init == "imagenet":
                module, note = _imagenet_resnet(arch), "ImageNet weights (torchvision)"
            else:
                module = torchvision.models.get_model(arch, weights=None)
                note = f"random init (seed {seed})"
        if path is not None:
            _load_weights(module, path, f"torchvision's {arch}")
            note = f"weights from {path}"
        base = wrap_resnet(module, arch, arch, None)
    else:
        if init == "imagenet":
            raise TraitscopeError(f"--init imagenet is for torchvision ResNets; {model} loads its own weights "
                                  "(use --init default)")
        base = load_backbone(model)
        note = "its own weights"
        if init == "random":
            base, note = _reinit(base, seed), f"random init (seed {seed})"
        elif path is not None:
            inner = getattr(base, "model", base)
            _load_weights(inner, path, model)
            note = f"weights from {path}"
    if image_size is not None:
        pre = base.preprocess
        resize = max(image_size, round(image_size * pre.resize / pre.crop))
        base = rewrap(base, dataclasses.replace(pre, crop=image_size, resize=resize))
    return base, note
