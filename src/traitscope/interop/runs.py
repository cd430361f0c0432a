"""Turn a foreign SAE into a traitscope run folder tied to a shard folder.

The folder is what `traitscope train` writes (config.json, sae.safetensors, metrics.json; see
docs/formats.md), so `inference`, `align`, `pareto` and the app use it unchanged. It is built under
`<out>.partial/` and renamed into place when complete: bad input writes nothing.
"""

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from traitscope.errors import TraitscopeError
from traitscope.features.heldout import iter_tokens, sample_tokens
from traitscope.features.inputs import open_inputs, split_rows
from traitscope.files import atomic_folder
from traitscope.interop.foreign import ForeignSAE
from traitscope.runs import FORMAT as RUN_FORMAT, RunFolder
from traitscope.sae.metrics import MetricsAccumulator
from traitscope.shards import Shards

METRIC_TOKENS = 200_000
"""Held-out tokens the imported SAE's metrics.json is computed on, at most."""


class ImportedRun(NamedTuple):
    dpath: Path
    layer: int
    token_kind: str
    metrics: dict
    shards_model: dict
    """The shards' model entry (name, weights_sha256, ...)."""


def pick_layer(foreign: ForeignSAE, shards: Shards, layer: int | None) -> int:
    """The stored layer the SAE reads: --layer, else the one the foreign files name, else the only one stored."""
    if layer is not None:
        return shards.resolve(layer)
    if foreign.layer is not None:
        try:
            return shards.resolve(foreign.layer)
        except TraitscopeError:
            pass
    if len(shards.layers) == 1:
        return shards.layers[0]
    said = f" (its files name layer {foreign.layer})" if foreign.layer is not None else ""
    raise TraitscopeError(f"which layer does the SAE read{said}? {shards.dpath} stores {shards.layers}: give --layer")


def import_run(foreign: ForeignSAE, shards_dpath: str | Path, out_dpath: str | Path, layer: int | None = None,
               token_kind: str | None = None, metric_tokens: int = METRIC_TOKENS, device: str = "cpu") -> ImportedRun:
    """Write `out_dpath` as a traitscope run folder for `foreign` on these shards, with held-out metrics."""
    out_dpath = Path(out_dpath)
    if RunFolder(out_dpath).config_fpath.exists():
        raise TraitscopeError(f"{out_dpath} already holds a run; choose another --out or remove it")
    shards = Shards(shards_dpath)
    layer = pick_layer(foreign, shards, layer)
    kind = token_kind or foreign.token_kind or "patches"
    if kind not in shards.token_kinds:
        raise TraitscopeError(f"{shards.dpath} has no {kind!r} tokens (stored: {shards.token_kinds}); give --token-kind")
    theirs, ours = foreign.model_sha256, shards.model.get("weights_sha256")
    if theirs and ours and theirs != ours:
        raise TraitscopeError(f"the SAE was trained on model {foreign.model!r} (weights sha256 {theirs[:12]}…) but "
                              f"{shards.dpath} holds {shards.model.get('name')!r} (weights sha256 {ours[:12]}…)")
    d_model = shards.d_model(layer)
    if d_model != foreign.sae.d_model:
        raise TraitscopeError(f"the SAE reads width {foreign.sae.d_model} but layer {layer} of {shards.dpath} has "
                              f"width {d_model}: these are activations of another model or layer")
    config = {
        "format": RUN_FORMAT,
        "train": {"imported": foreign.source, "notes": list(foreign.notes)},
        "shards": {"hash": shards.hash, "path": str(shards.dpath.resolve()), "layer": layer, "token_kind": kind,
                   "d_model": d_model, "model": shards.model.get("name"),
                   "weights_sha256": shards.model.get("weights_sha256")},
    }
    with atomic_folder(out_dpath) as part_dpath:  # out_dpath is absent or empty (anything else was refused above)
        foreign.sae.save(part_dpath, extra_config=config)
        metrics = heldout_metrics(part_dpath, shards.dpath, metric_tokens, device)
        RunFolder(part_dpath).write_metrics(metrics)
    return ImportedRun(out_dpath, layer, kind, metrics, dict(shards.model))


@torch.inference_mode()
def heldout_metrics(run_dpath: Path, shards_dpath: Path, max_tokens: int, device: str = "cpu") -> dict:
    """metrics.json of a run that was not trained here: on held-out tokens of a fixed image split."""
    inputs = open_inputs(run_dpath, shards_dpath, device=device)
    _, held = split_rows(inputs)
    idx = sample_tokens(inputs, held, max_tokens, seed=0)
    acc = MetricsAccumulator(inputs.sae.d_model, inputs.sae.d_sae)
    with tqdm(total=len(idx), desc="held-out metrics", unit="tok", unit_scale=True) as bar:
        for x_bd in iter_tokens(inputs, idx):
            x_bd = x_bd.to(device)
            codes_bs = inputs.sae.encode(x_bd)
            acc.add(x_bd, inputs.sae.decode(codes_bs), codes_bs)
            bar.update(x_bd.shape[0])
    m = acc.result()
    return {"nmse": m.nmse, "l0": m.l0, "dead_frac": m.dead_frac, "dense_frac": m.dense_frac,
            "explained_variance": m.explained_variance, "n_tokens": m.n_tokens,
            "heldout_images": int(np.asarray(held).size), "imported": True}
