"""A fine-tuned backbone: a base backbone plus an optional linear embedding head.

The embedding e(x) that the losses shape is the pooled / CLS output of the base's last block, passed
through the head when there is one. A CNN's pooled features come after a ReLU, so they are never
negative and e(x) = −e(rot180 x) could only hold at zero; the linear head (on by default) gives a
signed space where it can. To `shards` the head is one more layer after the last block: its CLS row
is e(x) and its patch rows are the head applied to each position of the last block (for a CNN the
mean of those is exactly e(x), since the head is linear).

On disk (a `traitscope finetune` output folder, loaded by the registry as `finetuned:<dir>`):

    finetune.json        manifest: base model (how to rebuild it without downloading), head, preprocess,
                         training config and results; written last
    model.safetensors    every weight of the fine-tuned backbone (base and head)
"""

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from traitscope.backbones.base import Backbone, LayerActs, Preprocess
from traitscope.backbones.efficientnet import EfficientNetBackbone
from traitscope.backbones.registry import load_backbone, register
from traitscope.backbones.resnet import new_resnet, wrap_resnet
from traitscope.errors import TraitscopeError

FORMAT = "traitscope-finetuned/1"
MANIFEST_FNAME = "finetune.json"
MODEL_FNAME = "model.safetensors"
PREFIX = "finetuned:"


def _undecorated_record(backbone: Backbone):
    """`backbone.record` without its inference-mode decorator, so gradients flow through it."""
    fn = getattr(type(backbone).record, "__wrapped__", type(backbone).record)
    return lambda pixels_bchw, layers: fn(backbone, pixels_bchw, layers)


class FinetunedBackbone(Backbone):
    """A base backbone and an optional linear head that is recorded as one extra, last layer."""

    family = "finetuned"

    def __init__(self, base: Backbone, head_dim: int, name: str, description: str):
        super().__init__()
        self.base = base
        last = base.n_layers - 1
        self.head = torch.nn.Linear(base.d_model_at(last), head_dim) if head_dim else None
        self.name = name
        self.description = description
        self.n_layers = base.n_layers + (1 if self.head is not None else 0)
        self.d_model = head_dim if self.head is not None else base.d_model_at(last)
        self.patch_size = base.patch_size
        self.preprocess = base.preprocess
        self.layout = base.layout

    @property
    def embed_layer(self) -> int:
        """The layer whose CLS / pooled row is the embedding e(x): the head, or the base's last block."""
        return self.n_layers - 1

    def d_model_at(self, layer: int) -> int:
        return self.d_model if layer == self.embed_layer else self.base.d_model_at(layer)

    def grid_at(self, layer: int) -> tuple[int, int]:
        return self.base.grid_at(min(layer, self.base.n_layers - 1))

    def set_preprocess(self, preprocess: Preprocess) -> None:
        self.base.set_preprocess(preprocess)
        self.preprocess, self.layout = self.base.preprocess, self.base.layout

    def _record(self, pixels_bchw: torch.Tensor, layers: list[int], base_record) -> dict[int, LayerActs]:
        last = self.base.n_layers - 1
        acts = base_record(pixels_bchw, sorted({min(layer, last) for layer in layers}))
        out = {layer: acts[layer] for layer in layers if layer <= last}
        if self.head is not None and self.embed_layer in layers:
            top = acts[last]
            out[self.embed_layer] = LayerActs(cls_bd=self.head(top.cls_bd), patches_bpd=self.head(top.patches_bpd))
        return out

    @torch.inference_mode()
    def record(self, pixels_bchw: torch.Tensor, layers: list[int]) -> dict[int, LayerActs]:
        return self._record(pixels_bchw, layers, self.base.record)

    def embed(self, pixels_bchw: torch.Tensor) -> torch.Tensor:
        """e(x), shape (batch, d_model), with gradients (the training forward pass)."""
        e_bd = self._record(pixels_bchw, [self.embed_layer], _undecorated_record(self.base))[self.embed_layer].cls_bd
        if not e_bd.requires_grad and torch.is_grad_enabled():
            raise TraitscopeError(f"{self.base.name} cannot be fine-tuned: its forward pass is not differentiable")
        return e_bd


# ---------------------------------------------------------------------------------------------
# Rebuilding a base model without downloading its weights (they come from model.safetensors).


def base_spec(base: Backbone) -> dict:
    """How to rebuild the base's architecture offline: recorded in the manifest."""
    from traitscope.backbones.hf_vit import HFViTBackbone

    if isinstance(base, HFViTBackbone):
        return {"kind": "transformers", "class": type(base.model).__name__, "config": base.model.config.to_dict()}
    if getattr(base, "arch", None):
        return {"kind": "torchvision", "arch": base.arch, "num_classes": base.model.fc.out_features}
    return {"kind": "registry", "name": base.name}


def rewrap(base: Backbone, preprocess: Preprocess) -> Backbone:
    """The same network behind a different preprocessing (image size), with its token layout redone."""
    from traitscope.backbones.hf_vit import HFViTBackbone

    if preprocess == base.preprocess:
        return base
    if isinstance(base, HFViTBackbone):
        if preprocess.crop % base.patch_size:
            raise TraitscopeError(f"image size {preprocess.crop} is not a multiple of {base.name}'s patch size {base.patch_size}")
        return HFViTBackbone(base.model, base.name, base.description, preprocess)
    if getattr(base, "arch", None):
        return wrap_resnet(base.model, base.arch, base.name, preprocess, base.description)
    if isinstance(base, EfficientNetBackbone):
        return EfficientNetBackbone(base.model, base.name, base.description, preprocess)
    raise TraitscopeError(f"the image size of {base.name} ({base.family}) cannot be changed")


def build_from_spec(spec: dict, name: str, description: str, preprocess: Preprocess) -> Backbone:
    """An untrained base of the recorded architecture (weights to be loaded next)."""
    if spec["kind"] == "transformers":
        import transformers

        from traitscope.backbones.hf_vit import HFViTBackbone

        model_class = getattr(transformers, spec["class"])
        model = model_class(model_class.config_class.from_dict(spec["config"])).eval()
        return HFViTBackbone(model, name, description, preprocess)
    if spec["kind"] == "torchvision":
        return wrap_resnet(new_resnet(spec["arch"], spec["num_classes"]), spec["arch"], name, preprocess, description)
    return rewrap(load_backbone(spec["name"]), preprocess)


# ---------------------------------------------------------------------------------------------
# Save and load.


def save_finetuned(model: FinetunedBackbone, dpath: Path) -> None:
    """model.safetensors (atomically replaced) with every weight of base and head."""
    dpath.mkdir(parents=True, exist_ok=True)
    tmp_fpath = dpath / (MODEL_FNAME + ".tmp")
    save_model(model, str(tmp_fpath))
    tmp_fpath.replace(dpath / MODEL_FNAME)


def skeleton(manifest: dict, name: str) -> FinetunedBackbone:
    """The fine-tuned model's architecture, with untrained weights, from its manifest."""
    backbone = manifest["backbone"]
    preprocess = Preprocess.from_dict(backbone["preprocess"])
    base = build_from_spec(backbone["base"], backbone["base_name"], backbone["base_description"], preprocess)
    return FinetunedBackbone(base, backbone["head_dim"], name, backbone["description"])


def load_finetuned(dpath: str | Path) -> FinetunedBackbone:
    """A `traitscope finetune` output folder as a backbone (the registry's `finetuned:<dir>`)."""
    dpath = Path(dpath).expanduser().resolve()
    manifest_fpath = dpath / MANIFEST_FNAME
    if not manifest_fpath.is_file():
        hint = " (still training or interrupted? rerun `traitscope finetune` to finish)" if (dpath / "checkpoint").is_dir() else ""
        raise TraitscopeError(f"{dpath} is not a finished `traitscope finetune` folder: no {MANIFEST_FNAME}{hint}")
    manifest = json.loads(manifest_fpath.read_text())
    if manifest.get("format") != FORMAT:
        raise TraitscopeError(f"{manifest_fpath}: unknown format {manifest.get('format')!r}, expected {FORMAT}")
    model = skeleton(manifest, PREFIX + str(dpath))
    load_model(model, str(dpath / MODEL_FNAME))
    return model.eval()


def backbone_record(model: FinetunedBackbone) -> dict:
    """The manifest's `backbone` section: enough to rebuild the model offline."""
    return {
        "base": base_spec(model.base),
        "base_name": model.base.name,
        "base_description": model.base.description,
        "head_dim": model.head.out_features if model.head is not None else 0,
        "preprocess": dataclasses.asdict(model.preprocess),
        "description": model.description,
    }


register(PREFIX, load_finetuned, "a `traitscope finetune` output folder: finetuned:<dir>")
