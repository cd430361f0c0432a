"""SAEs and shards made by other tools, in and out: saev, SAELens, sparsify, the Hugging Face hub.

One module per foreign format. Each reader returns a `ForeignSAE`: a traitscope SAE that computes the
same codes and reconstructions as the library that wrote the files (biases, decoder orientation,
activation and input scaling mapped into traitscope's form, see `traitscope.sae.base`), plus what the
files say about where it belongs (model, layer) and what could not be carried over.
"""

from pathlib import Path
from typing import NamedTuple

from traitscope.errors import TraitscopeError
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


FORMATS = ("saev", "saelens", "sparsify")
"""Prefixes of `traitscope import FORMAT:PATH`."""


def split_spec(spec: str) -> tuple[str, Path]:
    """'saev:/path' -> ('saev', Path('/path')); an unknown or missing prefix is an error."""
    fmt, sep, path = spec.partition(":")
    if not sep or fmt not in FORMATS or not path:
        raise TraitscopeError(f"{spec!r}: give the format and the path, as {' | '.join(f + ':PATH' for f in FORMATS)}")
    path = Path(path).expanduser()
    if not path.exists():
        raise TraitscopeError(f"{spec}: no such file or folder")
    return fmt, path


def read_foreign_sae(spec: str) -> ForeignSAE:
    """Read `FORMAT:PATH` (saev checkpoint file or folder, SAELens or sparsify folder)."""
    fmt, path = split_spec(spec)
    if fmt == "saev":
        from traitscope.interop.saev import read_saev_sae
        return read_saev_sae(path)
    if fmt == "saelens":
        from traitscope.interop.saelens import read_saelens
        return read_saelens(path)
    from traitscope.interop.sparsify import read_sparsify
    return read_sparsify(path)


__all__ = ["FORMATS", "ForeignSAE", "read_foreign_sae", "split_spec"]
