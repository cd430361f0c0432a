"""Sparse autoencoder variants, one module each, behind a registry."""

# Each variant module registers its variant when imported; in this order, which `traitscope train --help` keeps.
from traitscope.sae import relu, topk, batchtopk, matryoshka, jumprelu, archetypal  # noqa: F401  isort: skip
from traitscope.sae.base import (SAE, ForwardOutput, SAEConfig, SAEParams, build_sae, describe_params, load_sae, register, variant_class,
                                 variants)

__all__ = ["SAE", "ForwardOutput", "SAEConfig", "SAEParams", "build_sae", "describe_params", "load_sae", "register", "variant_class",
           "variants"]
