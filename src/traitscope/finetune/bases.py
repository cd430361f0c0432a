"""The base model a fine-tune starts from: a torchvision ResNet, the offline ImageNet EfficientNet-Lite0
or any registered backbone, with ImageNet, random, or given weights (`--init`)."""

import dataclasses
from pathlib import Path

import torch

from traitscope.backbones import efficientnet
from traitscope.backbones.base import Backbone, load_weights
from traitscope.backbones.registry import load_backbone
from traitscope.backbones.resnet import ResNetBackbone, new_resnet
from traitscope.errors import TraitscopeError
from traitscope.finetune.model import load_finetuned, rewrap

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def _resnet_arch(model: str) -> str | None:
    arch = model.removeprefix("random-")
    return arch if arch in RESNET_ARCHS else None


def _reinit(base: Backbone, seed: int) -> Backbone:
    """The same architecture with freshly initialised (seeded) weights."""
    from traitscope.backbones.hf_vit import HFViTBackbone

    if isinstance(base, efficientnet.EfficientNetBackbone):
        return efficientnet.EfficientNetBackbone(efficientnet.new_model(seed), base.name, base.description, base.preprocess)
    if not isinstance(base, HFViTBackbone):
        raise TraitscopeError(f"--init random is supported for ResNets, EfficientNet-Lite0 and transformers ViTs, "
                              f"not {base.name} ({base.family})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = type(base.model)(base.model.config).eval()
    return HFViTBackbone(model, base.name, base.description, base.preprocess)


def build_base(model: str, init: str, image_size: int | None, seed: int) -> tuple[Backbone, str]:
    """The base backbone to fine-tune and a note on its starting weights (for the description)."""
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
        if init == "imagenet":  # the registry's ImageNet ResNets (torchvision's weights API)
            base, note = load_backbone(arch), "ImageNet weights (torchvision)"
        elif path is not None:  # the registry's torchvision:<arch>@<checkpoint>
            base, note = load_backbone(f"torchvision:{arch}@{path}"), f"weights from {path}"
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module = new_resnet(arch)
            base, note = ResNetBackbone.from_module(module, arch, description=f"torchvision {arch}"), f"random init (seed {seed})"
        base.arch = arch  # what finetune.json records to rebuild it offline
    else:
        if init == "imagenet" and model != efficientnet.NAME:
            raise TraitscopeError(f"--init imagenet is for torchvision ResNets and {efficientnet.NAME}; {model} "
                                  "loads its own weights (use --init default)")
        base = load_backbone(model)
        note = "its own weights"
        if init == "random":
            base, note = _reinit(base, seed), f"random init (seed {seed})"
        elif path is not None:
            load_weights(getattr(base, "model", base), path, f"--init {path}")
            note = f"weights from {path}"
    if image_size is not None:
        pre = base.preprocess
        resize = max(image_size, round(image_size * pre.resize / pre.crop))
        base = rewrap(base, dataclasses.replace(pre, crop=image_size, resize=resize))
    return base, note
