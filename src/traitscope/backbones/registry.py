"""One small registry: a backbone is loaded by name, hub id or local path.

Families register exact names (`register("dinov2-vits14-reg", loader)`) or a prefix
(`register("timm:", loader)`, the rest of the string is passed on). `load_backbone` imports every
family module once, so adding a family means adding a file and a line to FAMILY_MODULES.
"""

import importlib
from typing import Callable

from traitscope.backbones.base import Backbone
from traitscope.errors import TraitscopeError

FAMILY_MODULES = [
    "traitscope.backbones.hf_vit",
    "traitscope.backbones.openclip_vit",
    "traitscope.backbones.timm_vit",
    "traitscope.backbones.resnet",
    "traitscope.backbones.offline_dinov2",
]

Loader = Callable[[str], Backbone]
_LOADERS: dict[str, Loader] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register(name: str, loader: Loader, description: str = "") -> None:
    """Register an exact name, or a prefix when `name` ends with ':'."""
    _LOADERS[name] = loader
    _DESCRIPTIONS[name] = description


def _import_families() -> None:
    for module_name in FAMILY_MODULES:
        importlib.import_module(module_name)


def available() -> dict[str, str]:
    """Registered names and prefixes with their one-line descriptions."""
    _import_families()
    return dict(sorted(_DESCRIPTIONS.items()))


def load_backbone(name: str, device: str = "cpu") -> Backbone:
    """Load a backbone by registered name, 'prefix:rest', or an existing local path."""
    _import_families()
    if name in _LOADERS:
        loader, arg = _LOADERS[name], name
    else:
        prefix = name.split(":", 1)[0] + ":"
        if ":" in name and prefix in _LOADERS:
            loader, arg = _LOADERS[prefix], name.split(":", 1)[1]
        else:
            known = ", ".join(k for k in sorted(_LOADERS) if not k.endswith(":"))
            prefixes = ", ".join(k + "..." for k in sorted(_LOADERS) if k.endswith(":"))
            raise TraitscopeError(f"unknown model {name!r}; known names: {known}; or one of {prefixes}")
    backbone = loader(arg)
    return backbone.to(device).eval()
