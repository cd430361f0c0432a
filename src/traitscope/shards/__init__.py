"""Activation shards: a content-addressed folder of memory-mapped arrays with a manifest."""

from traitscope.shards import saev  # noqa: F401  (registers saev's shard layout with Shards)
from traitscope.shards.store import PatchValidity, Shards, TokenArray

__all__ = ["PatchValidity", "Shards", "TokenArray"]
