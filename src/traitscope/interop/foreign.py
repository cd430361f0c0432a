"""What every foreign-format reader returns: a traitscope SAE and what the files say about it."""

from typing import NamedTuple

from traitscope.sae import SAE


class ForeignSAE(NamedTuple):
    """An SAE read from another library's files."""

    sae: SAE
    """The traitscope SAE (eval mode, float32) that computes the foreign SAE's codes on raw activations."""
    source: dict
    """What was read: `format` (saev, saelens, sparsify), `path`, the format's version or schema, and
    the foreign settings kept as written (recorded in the imported run's config.json)."""
    model: str | None = None
    """The backbone the files say the SAE was trained on, if they say."""
    layer: int | None = None
    """The layer the files say the SAE reads, if they say (the foreign library's numbering)."""
    token_kind: str | None = None
    """'patches' or 'cls' when the files say which tokens the SAE was trained on."""
    notes: tuple[str, ...] = ()
    """Plain statements of what traitscope could not check or carry over."""
    model_sha256: str | None = None
    """sha256 of the backbone's weights, when the files record it (a traitscope export does)."""
