"""SAEs made by other tools, in and out: saev, SAELens, sparsify, the Hugging Face hub (saev's shard
folders are read in place by `traitscope.shards.saev`).

One module per foreign format. Each reader returns a `ForeignSAE` (`interop/foreign.py`): a traitscope
SAE that computes the same codes and reconstructions as the library that wrote the files (biases, decoder orientation,
activation and input scaling mapped into traitscope's form, see `traitscope.sae.base`), plus what the
files say about where it belongs (model, layer) and what could not be carried over.
"""

from pathlib import Path

from traitscope.errors import TraitscopeError
from traitscope.interop.foreign import ForeignSAE
from traitscope.interop.saelens import read_saelens
from traitscope.interop.saev import read_saev_sae
from traitscope.interop.sparsify import read_sparsify

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
        return read_saev_sae(path)
    if fmt == "saelens":
        return read_saelens(path)
    return read_sparsify(path)


__all__ = ["FORMATS", "ForeignSAE", "read_foreign_sae", "split_spec"]
