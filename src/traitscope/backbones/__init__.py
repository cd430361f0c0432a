"""Vision backbones that record residual-stream activations; one module per family."""

from traitscope.backbones.base import Backbone, LayerActs, Preprocess, TokenLayout
from traitscope.backbones.registry import available, load_backbone, register

__all__ = ["Backbone", "LayerActs", "Preprocess", "TokenLayout", "available", "load_backbone", "register"]
