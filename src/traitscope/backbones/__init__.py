"""Vision backbones that record residual-stream activations; one module per family."""

from traitscope.backbones.base import Backbone, LayerActs, Preprocess, TokenLayout
from traitscope.backbones.registry import ModelChoice, available, default_model, load_backbone, register

__all__ = [
    "Backbone",
    "LayerActs",
    "ModelChoice",
    "Preprocess",
    "TokenLayout",
    "available",
    "default_model",
    "load_backbone",
    "register",
]
