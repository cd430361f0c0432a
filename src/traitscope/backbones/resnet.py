"""torchvision ResNets: `resnet18`, `resnet50` (ImageNet weights), `torchvision:<arch>@<checkpoint>`
for a local state_dict, and `ResNetBackbone.from_module` around a model already in memory (a fine-tuned
one, for example).

The "layers" of a ResNet are its four stages (layer1..layer4), so -1 is layer4. A stage's output is a
spatial map: its positions, flattened row-major to (H*W, C), play the part of patch tokens, and its
global average pool plays the part of the CLS token (`base.ConvStagesBackbone`).
"""

import json
from pathlib import Path

import torch
import torchvision

from traitscope.backbones.base import ConvStagesBackbone, Preprocess, load_weights, read_state_dict
from traitscope.backbones.registry import register
from traitscope.errors import TraitscopeError

STAGES = ("layer1", "layer2", "layer3", "layer4")
IMAGENET_PREPROCESS = Preprocess(crop=224, resize=256, interpolation="bilinear", mode="shorter")
PREPROCESS_KEY = "traitscope_preprocess"
DESCRIPTION_KEY = "traitscope_description"


class ResNetBackbone(ConvStagesBackbone):
    """A torchvision ResNet recorded at the outputs of its four stages."""

    family = "torchvision"

    def __init__(self, model: torch.nn.Module, name: str, description: str, preprocess: Preprocess):
        if not all(hasattr(model, stage) for stage in STAGES):
            raise TraitscopeError(f"{name}: {type(model).__name__} has no layer1..layer4 stages")
        super().__init__(model, [getattr(model, stage) for stage in STAGES], name, description, preprocess)

    @classmethod
    def from_module(
        cls, model: torch.nn.Module, name: str, preprocess: Preprocess = IMAGENET_PREPROCESS, description: str = ""
    ) -> "ResNetBackbone":
        """Wrap a torchvision ResNet already in memory (e.g. one being fine-tuned)."""
        return cls(model, name, description or f"torchvision {type(model).__name__} ({name})", preprocess)


def new_resnet(arch: str, num_classes: int = 1000) -> torch.nn.Module:
    """An untrained torchvision ResNet (initialised by torch's global generator)."""
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def wrap_resnet(module: torch.nn.Module, arch: str, name: str, preprocess: Preprocess = IMAGENET_PREPROCESS,
                description: str = "") -> ResNetBackbone:
    """A torchvision ResNet module as a backbone that remembers its architecture name (`arch`), so a
    fine-tune's manifest can rebuild it offline."""
    backbone = ResNetBackbone.from_module(module, name, preprocess, description)
    backbone.arch = arch
    return backbone


def _check_arch(arch: str, name: str) -> None:
    archs = [a for a in torchvision.models.list_models(module=torchvision.models) if "res" in a]
    if arch not in archs:
        raise TraitscopeError(f"{name}: {arch!r} is not a torchvision ResNet (one of {', '.join(sorted(archs))})")


def save_checkpoint(model: torch.nn.Module, fpath: str | Path, preprocess: Preprocess, description: str = "") -> None:
    """Save a ResNet's state_dict as safetensors, with its preprocessing in the file's metadata, so
    `torchvision:<arch>@<fpath>` loads it with the geometry it was trained with."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {PREPROCESS_KEY: json.dumps(preprocess.to_dict())}
    if description:
        metadata[DESCRIPTION_KEY] = description
    save_file(state, str(fpath), metadata=metadata)


def _checkpoint_metadata(fpath: Path) -> dict[str, str]:
    if fpath.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(fpath), framework="pt") as f:
        return dict(f.metadata() or {})


def load_torchvision_checkpoint(spec: str) -> ResNetBackbone:
    """`<arch>@<checkpoint>`: a torchvision ResNet with a local state_dict (.safetensors or .pt).

    The classifier's size is read from the checkpoint; preprocessing from the safetensors metadata
    written by `save_checkpoint`, else ImageNet's (resize 256, centre crop 224, bilinear).
    """
    name = f"torchvision:{spec}"
    arch, sep, checkpoint = spec.partition("@")
    if not sep or not checkpoint:
        raise TraitscopeError(f"{name}: give a checkpoint as torchvision:<arch>@<path to .safetensors or .pt>")
    _check_arch(arch, name)
    fpath = Path(checkpoint).expanduser()
    state = read_state_dict(fpath)
    num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 1000
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    load_weights(model, fpath, name)
    metadata = _checkpoint_metadata(fpath)
    preprocess = IMAGENET_PREPROCESS
    if PREPROCESS_KEY in metadata:
        preprocess = Preprocess.from_dict(json.loads(metadata[PREPROCESS_KEY]))
    description = metadata.get(DESCRIPTION_KEY) or f"torchvision {arch} with weights from {fpath.name}"
    return ResNetBackbone(model, name, description, preprocess)


def _weights_preprocess(weights) -> Preprocess:
    transform = weights.transforms()
    return Preprocess(
        crop=transform.crop_size[0],
        resize=transform.resize_size[0],
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        interpolation=transform.interpolation.value,
        mode="shorter",
    )


IMAGENET_MODELS = {
    "resnet18": ("ResNet18_Weights", "ResNet-18, torchvision ImageNet-1k weights (IMAGENET1K_V1)"),
    "resnet50": ("ResNet50_Weights", "ResNet-50, torchvision ImageNet-1k weights (IMAGENET1K_V2)"),
}


def load_imagenet(arch: str) -> ResNetBackbone:
    weights_enum, description = IMAGENET_MODELS[arch]
    weights = getattr(torchvision.models, weights_enum).DEFAULT
    try:
        model = torchvision.models.get_model(arch, weights=weights)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise TraitscopeError(
            f"{arch}: could not get the ImageNet weights ({str(err).splitlines()[0]}); they download from "
            f"download.pytorch.org into {torch.hub.get_dir()}; without a network, use "
            f"'dinov2-vits14-saliency-offline' or torchvision:{arch}@<checkpoint>"
        ) from err
    return ResNetBackbone(model, arch, description, _weights_preprocess(weights))


def _random_resnet18(name: str) -> ResNetBackbone:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None)
    description = "random-init torchvision ResNet-18 for tests; not pretrained"
    return ResNetBackbone(model, name, description, IMAGENET_PREPROCESS)


for _arch, (_weights, _description) in IMAGENET_MODELS.items():
    register(_arch, load_imagenet, _description)
register(
    "torchvision:",
    load_torchvision_checkpoint,
    "a torchvision ResNet with local weights: torchvision:<arch>@<checkpoint>",
)
register("random-resnet18", _random_resnet18, "random-init torchvision ResNet-18 (4 stages as layers) for tests")
