"""saev (OSU-NLP-Group/saev) checkpoints.

A checkpoint is one file written by saev's `nn.dump`: a UTF-8 JSON header line, then a torch state
dict (`torch.save`) with W_enc (d_model, d_sae), b_enc, W_dec (d_sae, d_model), b_dec and, for
BatchTopK, `activation.threshold`. Training runs keep it as `checkpoint/sae.pt` next to
`checkpoint/config.json` (the training config: data, layer, objective).

How saev computed codes, by header version (its `schema` key), as its sources show:

| header | saev | encoder input | activations |
| --- | --- | --- | --- |
| no `schema` (d_vit, exp_factor, …) | 2024 – mid 2025 (PyPI 0.1.0) | x − b_dec | ReLU |
| `schema` 1 | June – July 2025 | x − b_dec | ReLU, TopK, BatchTopK |
| `schema` 2 – 5 | August 2025 on | x | ReLU, TopK, BatchTopK (+ Matryoshka and AuxK objectives) |

ReLU and BatchTopK map exactly (BatchTopK at inference is a JumpReLU with one threshold: traitscope's
`batchtopk`); TopK keeps its k largest pre-activations, and saev does not clip negative ones to zero
while traitscope does, so the two differ only on a token with fewer than k positive pre-activations.
Matryoshka prefixes are drawn at random during saev training and are not part of the SAE.
"""

import io
import json
import re
from pathlib import Path

from traitscope.errors import TraitscopeError
from traitscope.interop.foreign import ForeignSAE
from traitscope.interop.tensors import build_foreign, load_torch_weights, need, read_json_file

SCHEMAS = (1, 2, 3, 4, 5)
"""saev header schema versions read (besides the header without a schema key)."""
MAX_HEADER_BYTES = 1 << 20


def find_checkpoint(path: Path) -> tuple[Path, Path | None]:
    """(the dump file, its training config.json or None) for a file, a checkpoint/ folder or a run folder."""
    if path.is_file():
        config = path.parent / "config.json"
        return path, config if config.is_file() else None
    for dpath in (path, path / "checkpoint"):
        if (dpath / "sae.pt").is_file():
            config = dpath / "config.json"
            return dpath / "sae.pt", config if config.is_file() else None
    raise TraitscopeError(f"{path}: no saev checkpoint (expected a dump file, or a folder with sae.pt or "
                          "checkpoint/sae.pt)")


def read_dump(fpath: Path) -> tuple[dict, dict]:
    """(header, state dict) of a file written by saev's `nn.dump`."""
    with open(fpath, "rb") as f:
        line = f.readline(MAX_HEADER_BYTES)
        rest = f.read()
    if not line.endswith(b"\n"):
        raise TraitscopeError(f"{fpath}: not a saev checkpoint (no JSON header line){' or truncated' if line else ''}")
    try:
        header = json.loads(line.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise TraitscopeError(f"{fpath}: not a saev checkpoint (its first line is not JSON)") from None
    if not isinstance(header, dict):
        raise TraitscopeError(f"{fpath}: not a saev checkpoint (its header is not a JSON object)")
    schema = header.get("schema")
    if schema is not None and schema not in SCHEMAS:
        raise TraitscopeError(f"{fpath}: saev checkpoint schema {schema!r} is not one traitscope reads "
                              f"(no schema, or {SCHEMAS[0]}-{SCHEMAS[-1]}); a newer saev may have changed the format")
    return header, load_torch_weights(io.BytesIO(rest), str(fpath))


def _activation(header: dict) -> tuple[str, dict]:
    """(saev activation class name, its parameters) from any header version."""
    if "schema" not in header:
        return "Relu", {}
    cfg = header.get("cfg") or {}
    act = cfg.get("activation")
    if isinstance(act, dict) and "cls" in act:
        return str(act["cls"]), dict(act.get("params") or {})
    if isinstance(act, dict):  # a bare parameter dict
        key = act.get("key") or act.get("kind") or ""
        name = {"relu": "Relu", "top-k": "TopK", "batch-top-k": "BatchTopK"}.get(key, "")
        return name, act
    name = str(header.get("cls", "Relu"))  # schema 1, earliest form: the class names the activation
    return ("Relu" if name == "SparseAutoencoderConfig" else name), {"top_k": cfg.get("top_k", 32)}


def read_saev_sae(path: Path) -> ForeignSAE:
    fpath, config_fpath = find_checkpoint(path)
    header, state = read_dump(fpath)
    where = str(fpath)
    schema = header.get("schema")
    cfg = header if schema is None else (header.get("cfg") or {})
    d_model = cfg.get("d_model", cfg.get("d_vit"))
    act_name, params = _activation(header)
    W_enc, b_enc, W_dec, b_dec = need(state, ("W_enc", "b_enc", "W_dec", "b_dec"), where)
    subtract = schema is None or schema == 1
    kwargs: dict = {}
    if act_name == "Relu":
        variant = "relu"
    elif act_name in ("TopK", "BatchTopK"):
        variant = "topk" if act_name == "TopK" else "batchtopk"
        kwargs["k"] = int(params.get("top_k", cfg.get("top_k", 32)))
        if act_name == "BatchTopK":
            kwargs["threshold"] = float(state["activation.threshold"]) if "activation.threshold" in state else 0.0
    else:
        raise TraitscopeError(f"{where}: saev activation {act_name!r} is not one traitscope reads (Relu, TopK, BatchTopK)")
    if d_model is not None and int(d_model) != W_enc.shape[0]:
        raise TraitscopeError(f"{where}: header says d_model {d_model} but W_enc is {tuple(W_enc.shape)}")
    sae = build_foreign(variant, W_enc, b_enc, W_dec, b_dec, where, subtract_b_dec=subtract, **kwargs)

    notes = []
    if variant == "topk":
        notes.append("saev's TopK keeps negative values among the k largest; traitscope zeroes them (codes differ "
                     "only on tokens with fewer than k positive pre-activations)")
    if schema is None:
        notes.append("checkpoints without a schema (saev <= 0.1) were trained on activations minus a dataset "
                     "mean, divided by a scalar, neither of which the checkpoint stores; the SAE is applied to "
                     "raw activations")
    train = read_json_file(config_fpath) if config_fpath else {}
    data = train.get("train_data") or train.get("data") or {}
    layer = data.get("layer")
    tokens = data.get("tokens", data.get("patches"))
    token_kind = {"content": "patches", "patches": "patches", "special": "cls", "cls": "cls"}.get(str(tokens))
    shards = data.get("shards", data.get("shard_root"))
    source = {"format": "saev", "path": str(fpath.resolve()), "schema": schema, "lib": header.get("lib"),
              "commit": header.get("commit"), "activation": act_name, "b_dec_subtracted": subtract,
              "sae_cfg": cfg if schema is not None else header,
              "train_config": str(config_fpath.resolve()) if config_fpath else None,
              "train_shards": str(shards) if shards else None}
    if shards and re.fullmatch(r"[0-9a-f]{8,}", Path(str(shards)).name):
        source["train_shards_hash"] = Path(str(shards)).name
    return ForeignSAE(sae, source, layer=int(layer) if isinstance(layer, int) else None,
                      token_kind=token_kind, notes=tuple(notes))
