"""sparsify (EleutherAI/sparsify) SAE folders: `cfg.json` + `sae.safetensors`.

The weights are `encoder.weight` (d_sae, d_in) and `encoder.bias` (an nn.Linear), `W_dec`
(d_sae, d_in) and `b_dec`; sparsify encodes TopK_k(ReLU(encoder(x − b_dec))) and decodes
f W_dec + b_dec, the same as traitscope's `topk` (the encoder weight is W_encᵀ). `cfg.json` holds
the SparseCoderConfig fields and `d_in`. Read: `activation: topk` (multi_topk changes training only);
refused: `groupmax`, transcoders (`transcode`) and skip connections (`W_skip`). A sparsify folder of
several hookpoints (one subfolder each) needs the subfolder. Export writes traitscope's `topk` SAEs
(sparsify has no other activation).
"""

from pathlib import Path

from traitscope.errors import TraitscopeError
from traitscope.files import atomic_save_safetensors, atomic_write_json
from traitscope.interop.foreign import ForeignSAE
from traitscope.interop.tensors import build_foreign, load_safetensors, need, read_json_file, topk_at_inference
from traitscope.sae import SAE

CFG_FNAME, WEIGHTS_FNAME = "cfg.json", "sae.safetensors"


def read_sparsify(dpath: Path) -> ForeignSAE:
    if not (dpath / CFG_FNAME).is_file():
        subs = sorted(p.name for p in dpath.iterdir() if (p / CFG_FNAME).is_file()) if dpath.is_dir() else []
        if subs:
            raise TraitscopeError(f"{dpath} holds SAEs for several hookpoints ({', '.join(subs[:8])}"
                                  f"{', ...' if len(subs) > 8 else ''}); give one, e.g. sparsify:{dpath / subs[0]}")
        raise TraitscopeError(f"{dpath}: not a sparsify SAE folder (needs {CFG_FNAME} and {WEIGHTS_FNAME})")
    cfg = read_json_file(dpath / CFG_FNAME)
    tensors = load_safetensors(dpath / WEIGHTS_FNAME)
    where = str(dpath)
    if cfg.get("activation", "topk") != "topk":
        raise TraitscopeError(f"{where}: sparsify activation {cfg['activation']!r} is not read (only topk)")
    if cfg.get("transcode") or cfg.get("skip_connection") or "W_skip" in tensors:
        raise TraitscopeError(f"{where}: a sparsify transcoder or skip connection is not an SAE traitscope reads")
    enc_sd, b_enc, W_dec, b_dec = need(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), where)
    if "d_in" in cfg and int(cfg["d_in"]) != enc_sd.shape[1]:
        raise TraitscopeError(f"{where}: cfg.json says d_in={cfg['d_in']} but encoder.weight is {tuple(enc_sd.shape)}")
    if "k" not in cfg:
        raise TraitscopeError(f"{where}: cfg.json has no k")
    sae = build_foreign("topk", enc_sd.T, b_enc, W_dec, b_dec, where, k=int(cfg["k"]))
    source = {"format": "sparsify", "path": str(dpath.resolve()), "cfg": cfg}
    meta = cfg.get("traitscope") if isinstance(cfg.get("traitscope"), dict) else {}  # written by our export
    layer = meta.get("hook_layer")
    return ForeignSAE(sae, source, model=meta.get("model_name"), layer=layer if isinstance(layer, int) else None,
                      token_kind=meta.get("token_kind"), model_sha256=meta.get("weights_sha256"))


def write_sparsify(sae: SAE, dpath: Path, metadata: dict | None = None) -> None:
    """Write a TopK SAE as a sparsify folder (sparsify's `SparseCoder.load_from_disk` reads it; it drops
    the `traitscope` key of cfg.json, which says where the SAE belongs)."""
    if not topk_at_inference(sae):
        raise TraitscopeError(f"sparsify SAEs are TopK only; this is a {sae.cfg.variant} SAE (export it to saelens)")
    tensors = {"encoder.weight": sae.W_enc.T, "encoder.bias": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    tensors = {k: v.detach().float().cpu().contiguous().clone() for k, v in tensors.items()}
    cfg = {"activation": "topk", "expansion_factor": max(1, sae.d_sae // sae.d_model),
           "normalize_decoder": sae.unit_norm_decoder,
           "num_latents": sae.d_sae, "k": int(sae.params.k), "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": sae.d_model}
    if metadata:
        cfg["traitscope"] = metadata
    dpath.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(dpath / WEIGHTS_FNAME, tensors)
    atomic_write_json(dpath / CFG_FNAME, cfg)
