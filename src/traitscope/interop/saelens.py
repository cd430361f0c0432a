"""SAELens (jbloomAus/SAELens) SAE folders: `cfg.json` + `sae_weights.safetensors`.

The weights are W_enc (d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec, and `threshold` (d_sae,) for
JumpReLU; SAELens encodes act((x − b_dec·apply_b_dec_to_input) W_enc + b_enc) and decodes
f W_dec + b_dec. Read (SAELens 6.x `cfg.json`, and 3.x–5.x ones that carry the same keys):

| architecture | traitscope | how |
| --- | --- | --- |
| standard | relu | as is |
| topk | topk | `rescale_acts_by_decoder_norm` folded into the weights (same codes) |
| jumprelu | jumprelu | per-latent threshold (SAELens saves a BatchTopK SAE this way) |
| batchtopk, matryoshka_batchtopk (training checkpoints) | batchtopk | `topk_threshold` is the threshold |

`apply_b_dec_to_input: false` is mapped exactly; `normalize_activations` `none` and
`expected_average_only_in` (which SAELens does not apply at run time) are read; per-token
normalisations (`constant_norm_rescale`, `layer_norm`), whitening, gated SAEs, transcoders and
`hook_z` reshaping are refused. Export writes `standard`, `topk` or `jumprelu` (BatchTopK and
Matryoshka SAEs become JumpReLU with their threshold on every latent, as SAELens saves its own).
"""

import re
from pathlib import Path

import torch

from traitscope.errors import TraitscopeError
from traitscope.files import atomic_save_safetensors, atomic_write_json
from traitscope.interop.foreign import ForeignSAE
from traitscope.interop.tensors import build_foreign, load_safetensors, need, read_json_file, topk_at_inference
from traitscope.sae import SAE

CFG_FNAME, WEIGHTS_FNAME = "cfg.json", "sae_weights.safetensors"
NORMALIZATIONS_READ = ("none", "expected_average_only_in", None)


def read_saelens(dpath: Path) -> ForeignSAE:
    if not (dpath / CFG_FNAME).is_file():
        raise TraitscopeError(f"{dpath}: not a SAELens SAE folder (needs {CFG_FNAME} and {WEIGHTS_FNAME})")
    cfg = read_json_file(dpath / CFG_FNAME)
    tensors = load_safetensors(dpath / WEIGHTS_FNAME)
    where = str(dpath)
    arch, norm = cfg.get("architecture", "standard"), cfg.get("normalize_activations", "none")
    fn = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    if "architecture" not in cfg and fn == "topk":  # before SAELens 6: topk was an activation of 'standard'
        arch, cfg = "topk", cfg | {"k": (cfg.get("activation_fn_kwargs") or {}).get("k", cfg.get("k"))}
    if isinstance(norm, bool):  # before SAELens 6
        norm = "expected_average_only_in" if norm else "none"
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").float().exp()
    if "scaling_factor" in tensors:
        if not torch.allclose(tensors["scaling_factor"].float(), torch.ones(1)):
            raise TraitscopeError(f"{where}: a fine-tuning scaling_factor other than 1 (SAELens < 6) is not read")
        del tensors["scaling_factor"]
    if norm not in NORMALIZATIONS_READ:
        raise TraitscopeError(f"{where}: normalize_activations={norm!r} rescales each token at run time, which a "
                              "linear SAE cannot reproduce; traitscope reads 'none' and 'expected_average_only_in'")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise TraitscopeError(f"{where}: reshape_activations={cfg['reshape_activations']!r} (attention heads) is "
                              "not a vision-token SAE traitscope reads")
    W_enc, b_enc, W_dec, b_dec = need(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), where)
    for name, (got, want) in {"d_in": (W_enc.shape[0], cfg.get("d_in")), "d_sae": (W_enc.shape[1], cfg.get("d_sae"))}.items():
        if want is not None and int(want) != got:
            raise TraitscopeError(f"{where}: cfg.json says {name}={want} but W_enc is {tuple(W_enc.shape)}")
    kwargs: dict = {}
    if arch == "standard":
        variant = "relu"
    elif arch == "topk":
        variant = "topk"
        kwargs["k"] = int(cfg.get("k", 100))
        if cfg.get("rescale_acts_by_decoder_norm"):
            # codes = TopK(pre · |W_dec|) and x̂ = (codes / |W_dec|) W_dec: unit decoder rows, scaled encoder
            norms_s = W_dec.norm(dim=1)
            W_enc, b_enc, W_dec = W_enc * norms_s, b_enc * norms_s, W_dec / norms_s[:, None]
    elif arch == "jumprelu":
        variant = "jumprelu"
        (kwargs["threshold"],) = need(tensors, ("threshold",), where)
    elif arch in ("batchtopk", "matryoshka_batchtopk"):
        variant = "batchtopk"
        kwargs["k"] = max(1, int(round(float(cfg.get("k", 1)))))
        (kwargs["threshold"],) = need(tensors, ("topk_threshold",), where)
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise TraitscopeError(f"{where}: a {arch} training checkpoint with rescale_acts_by_decoder_norm; save it "
                                  "for inference with SAELens first (it becomes jumprelu)")
    else:
        raise TraitscopeError(f"{where}: SAELens architecture {arch!r} is not one traitscope reads "
                              "(standard, topk, jumprelu, batchtopk, matryoshka_batchtopk)")
    sae = build_foreign(variant, W_enc, b_enc, W_dec, b_dec, where,
                        subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)), **kwargs)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    model = meta.get("model_name", cfg.get("model_name"))
    hook = meta.get("hook_name", cfg.get("hook_name"))
    layer = meta.get("hook_layer", cfg.get("hook_layer"))
    token_kind = meta.get("token_kind") if meta.get("token_kind") in ("patches", "cls") else _token_kind(hook)
    if layer is None and isinstance(hook, str) and (m := re.search(r"(?:blocks|layers?)[._](-?\d+)", hook)):
        layer = int(m.group(1))
    notes = []
    if norm == "expected_average_only_in":
        notes.append("normalize_activations=expected_average_only_in: the SAE was trained on rescaled activations; "
                     "like SAELens' load_from_disk, traitscope applies it to raw activations (no scale is stored)")
    source = {"format": "saelens", "path": str(dpath.resolve()), "architecture": arch,
              "sae_lens_version": meta.get("sae_lens_version"), "cfg": cfg}
    return ForeignSAE(sae, source, model=model, layer=int(layer) if isinstance(layer, int) else None,
                      token_kind=token_kind, notes=tuple(notes), model_sha256=meta.get("weights_sha256"))


def _token_kind(hook) -> str | None:
    if isinstance(hook, str):
        if hook.endswith("/cls") or hook.endswith(".cls"):
            return "cls"
        if hook.endswith("/patches") or hook.endswith(".patches"):
            return "patches"
    return None


def saelens_architecture(sae: SAE) -> str:
    """standard (relu), topk (`topk_at_inference`), or jumprelu for an SAE that is a JumpReLU at inference
    (it has a threshold)."""
    arch = ("standard" if sae.cfg.variant == "relu" else "topk" if topk_at_inference(sae)
            else "jumprelu" if hasattr(sae, "threshold") else None)
    if arch is None:
        raise TraitscopeError(f"SAELens has no architecture for {sae.cfg.variant} SAEs (it reads relu, topk, archetypal "
                              "and JumpReLU ones: jumprelu, batchtopk, matryoshka)")
    return arch


def write_saelens(sae: SAE, dpath: Path, metadata: dict) -> None:
    """Write `sae` as a SAELens inference folder (SAELens' `SAE.load_from_disk` reads it)."""
    arch = saelens_architecture(sae)
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if arch == "jumprelu":
        thr = sae.threshold.detach().float()
        tensors["threshold"] = thr.expand(sae.d_sae) if thr.ndim == 0 else thr
    tensors = {k: v.detach().float().cpu().contiguous().clone() for k, v in tensors.items()}
    cfg = {"architecture": arch, "d_in": sae.d_model, "d_sae": sae.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": metadata}
    if arch == "topk":
        cfg |= {"k": int(sae.params.k), "rescale_acts_by_decoder_norm": False}
    dpath.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(dpath / WEIGHTS_FNAME, tensors)
    atomic_write_json(dpath / CFG_FNAME, cfg)


__all__ = ["read_saelens", "write_saelens"]
