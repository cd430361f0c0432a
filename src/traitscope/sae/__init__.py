"""Sparse autoencoder variants, one module each, behind a registry."""

import importlib

from traitscope.sae.base import (SAE, ForwardOutput, SAEConfig, SAEParams, build_sae, describe_params, load_sae, register, variant_class,
                                 variants)

VARIANT_MODULES = ["relu", "topk", "batchtopk", "matryoshka", "jumprelu"]
for _name in VARIANT_MODULES:
    try:
        importlib.import_module(f"traitscope.sae.{_name}")
    except ModuleNotFoundError as _err:
        if _err.name != f"traitscope.sae.{_name}":
            raise

__all__ = ["SAE", "ForwardOutput", "SAEConfig", "SAEParams", "build_sae", "describe_params", "load_sae", "register", "variant_class",
           "variants"]
