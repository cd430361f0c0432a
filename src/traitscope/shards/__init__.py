"""Activation shards: a content-addressed folder of memory-mapped arrays with a manifest."""

from traitscope.shards.store import Shards, TokenArray

__all__ = ["Shards", "TokenArray"]
