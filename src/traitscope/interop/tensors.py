"""What every foreign reader shares: safe loading of tensors and JSON, and building a traitscope SAE
from another library's weights."""

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from traitscope.errors import TraitscopeError
from traitscope.sae import SAE, SAEConfig, build_sae
from traitscope.sae.topk import TopKSAE


def topk_at_inference(sae: SAE) -> bool:
    """Whether a saved SAE encodes as a TopK SAE: topk, and variants that keep its encoder and constrain
    only their training (archetypal); BatchTopK and Matryoshka are JumpReLUs at inference."""
    return isinstance(sae, TopKSAE) and not hasattr(sae, "threshold")


def read_json_file(fpath: Path) -> dict:
    try:
        obj = json.loads(fpath.read_text())
    except FileNotFoundError:
        raise TraitscopeError(f"{fpath}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TraitscopeError(f"{fpath}: not valid JSON (truncated?): {err}") from None
    if not isinstance(obj, dict):
        raise TraitscopeError(f"{fpath}: expected a JSON object")
    return obj


def load_safetensors(fpath: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a damaged or truncated file is one clear error."""
    if not fpath.is_file():
        raise TraitscopeError(f"{fpath}: missing")
    try:
        return load_file(str(fpath))
    except (SafetensorError, OSError, ValueError) as err:
        raise TraitscopeError(f"{fpath}: not a readable safetensors file (truncated?): {err}") from None


def load_torch_weights(data, where: str) -> dict[str, torch.Tensor]:
    """A torch state dict read with `weights_only=True`: a file that needs pickle is refused."""
    try:
        obj = torch.load(data, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise TraitscopeError(f"{where}: refused: the file needs pickle to load (arbitrary code), and traitscope "
                              f"reads tensors only (torch.load weights_only=True): {first}") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TraitscopeError(f"{where}: not a readable torch file (truncated?): {first}") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TraitscopeError(f"{where}: expected a state dict of tensors")
    return obj


def need(tensors: dict[str, torch.Tensor], names: tuple[str, ...], where: str) -> list[torch.Tensor]:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise TraitscopeError(f"{where}: lacks tensor(s) {', '.join(missing)} (has {', '.join(sorted(tensors))})")
    return [tensors[n].detach().to(torch.float32) for n in names]


def build_foreign(variant: str, W_enc_ds: torch.Tensor, b_enc_s: torch.Tensor, W_dec_sd: torch.Tensor,
                  b_dec_d: torch.Tensor, where: str, *, subtract_b_dec: bool = True, k: int | None = None,
                  threshold: torch.Tensor | float | None = None, prefixes: list[int] | None = None) -> SAE:
    """A traitscope SAE with these weights (W_enc (d_model, d_sae), W_dec (d_sae, d_model)).

    traitscope encodes W_encᵀ(x − b_dec) + b_enc. An SAE that encodes W_encᵀx + b_enc (no b_dec
    subtracted, `subtract_b_dec=False`) gets b_enc + W_encᵀb_dec instead, which gives the same
    pre-activations for every x.
    """
    d_model, d_sae = W_enc_ds.shape
    shapes = {"W_enc": (tuple(W_enc_ds.shape), (d_model, d_sae)), "b_enc": (tuple(b_enc_s.shape), (d_sae,)),
              "W_dec": (tuple(W_dec_sd.shape), (d_sae, d_model)), "b_dec": (tuple(b_dec_d.shape), (d_model,))}
    bad = [f"{n} {got} (expected {want})" for n, (got, want) in shapes.items() if got != want]
    if bad:
        raise TraitscopeError(f"{where}: inconsistent weight shapes: {'; '.join(bad)}")
    if not subtract_b_dec:
        b_enc_s = (b_enc_s.double() + b_dec_d.double() @ W_enc_ds.double()).float()
    sae = build_sae(SAEConfig(variant=variant, d_model=d_model, d_sae=d_sae, k=k, prefixes=prefixes))
    state = {"W_enc": W_enc_ds, "b_enc": b_enc_s, "W_dec": W_dec_sd, "b_dec": b_dec_d}
    if threshold is not None:
        state["threshold"] = torch.as_tensor(threshold, dtype=torch.float32).reshape(sae.threshold.shape)
    if "threshold_updates" in dict(sae.named_buffers()):
        state["threshold_updates"] = torch.ones((), dtype=torch.int64)
    with torch.no_grad():
        for name, tensor in state.items():
            getattr(sae, name).copy_(tensor)
    if not all(torch.isfinite(p).all() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)):
        raise TraitscopeError(f"{where}: the weights hold NaN or infinite values")
    return sae.eval()
