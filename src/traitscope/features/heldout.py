"""Training / held-out token samples, fitted baselines, and the held-out metrics table of a run.

Baselines are fitted on a sample of tokens from training images (at most `fit_tokens`, drawn with a
fixed seed) and evaluated, like the SAE, on every token of the held-out images. The fitted baselines
depend on the shards, the layer and the training images, not on the SAE, so they are cached beside the
shards and shared by every run (a sweep, or an SAE trained elsewhere applied to these shards); the
metrics table is cached in the inference folder and reused when the settings match.
"""

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from traitscope.errors import TraitscopeError
from traitscope.features.baselines import (BASELINES_FORMAT, KMEANS_EPOCHS, Baseline, fit_baselines, load_baselines,
                                           save_baselines, with_pca_k)
from traitscope.features.inference import Inference
from traitscope.features.inputs import RunInputs, split_rows
from traitscope.features.metrics import write_table
from traitscope.files import atomic_write_json
from traitscope.sae.metrics import Metrics, MetricsAccumulator
from traitscope.shards.store import content_hash

FIT_TOKENS = 50_000
"""Default cap on training tokens used to fit the baselines (and to pick alignment features)."""


def token_indices(image_rows: np.ndarray, tokens_per_image: int) -> np.ndarray:
    """Rows of the flattened token array that belong to these images, image by image."""
    rows = np.asarray(image_rows, dtype=np.int64)
    return (rows[:, None] * tokens_per_image + np.arange(tokens_per_image)).reshape(-1)


def sample_tokens(inputs: RunInputs, image_rows: np.ndarray, max_tokens: int, seed: int = 0) -> np.ndarray:
    """Sorted token rows: every token of `image_rows` (padding patches left out), or `max_tokens` of them
    drawn without replacement."""
    idx = inputs.token_rows(image_rows)
    if len(idx) > max_tokens:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=max_tokens, replace=False))
    return idx


def iter_tokens(inputs: RunInputs, token_rows: np.ndarray, chunk_tokens: int = 8192) -> Iterator[torch.Tensor]:
    """(n, d_model) float32 activations of `token_rows`, in chunks, in the order given."""
    for start in range(0, len(token_rows), chunk_tokens):
        yield torch.from_numpy(inputs.acts[token_rows[start:start + chunk_tokens]].astype(np.float32))


def baselines_fpath(inputs: RunInputs, fit: dict) -> Path:
    """Where the baselines fitted with `fit` on these shards are cached: beside the shards, named by
    layer, token kind and a hash of everything the fit depends on, so every run on the same shards,
    layer and split reuses them."""
    key = content_hash(fit)
    return inputs.shards.dpath / "baselines" / f"L{inputs.layer}-{inputs.token_kind}-{key}.safetensors"


def mean_l0(inf: Inference) -> int:
    """The SAE's mean active latents per token over the inference data set, rounded (at least 1)."""
    return max(1, int(round(float(np.asarray(inf.array("feature_freq"), np.float64).sum()))))


def baselines_for(inputs: RunInputs, inf: Inference, fit_tokens: int = FIT_TOKENS, pca_k: int | None = None,
                  n_clusters: int | None = None, progress: bool = False) -> tuple[list[Baseline], dict]:
    """The fitted baselines for this run's shards, layer and training images, and what they were
    fitted with: read from the cache beside the shards (`baselines_fpath`), or fitted now and saved
    there (in the inference folder when the shard folder cannot be written).

    Defaults: PCA reconstructs with the SAE's k (or its mean L0 over the data set, for ReLU SAEs);
    k-means has as many centroids as the SAE has latents; both shrink to what the fitting tokens allow
    (an image-level SAE on a few dozen images). A value given explicitly that does not fit is an error.
    """
    check_baseline_settings(fit_tokens, pca_k, n_clusters)
    chosen = {"pca_k": pca_k is not None, "n_clusters": n_clusters is not None}  # defaults shrink to fit
    if pca_k is None:
        k = getattr(inputs.sae.params, "k", None)  # the TopK family's active latents per token
        pca_k = int(k) if k else mean_l0(inf)
        pca_k = min(pca_k, inputs.acts.width)
    n_clusters = inputs.sae.d_sae if n_clusters is None else n_clusters
    train_rows, _ = split_rows(inputs)
    info = {"fit_tokens": int(fit_tokens), "pca_k": int(pca_k), "n_clusters": int(n_clusters),
            "train_images": int(len(train_rows)), "kmeans": f"minibatch-{KMEANS_EPOCHS}-passes"}
    fit = {"format": BASELINES_FORMAT, "shards": inputs.shards.hash, "layer": inputs.layer,
           "token_kind": inputs.token_kind, "fit_tokens": int(fit_tokens), "n_clusters": int(n_clusters),
           "kmeans_epochs": KMEANS_EPOCHS, "seed": 0,
           "train_rows": hashlib.sha256(np.asarray(train_rows, np.int64).tobytes()).hexdigest()}
    if pca_k > inputs.acts.width:
        raise TraitscopeError(f"--pca-k {pca_k} is more components than the activations' width "
                              f"({inputs.acts.width}); use at most that")
    fpath = baselines_fpath(inputs, fit)
    for cached in (fpath, inf.dpath / fpath.name):
        if cached.is_file():
            baselines, _ = load_baselines(cached)
            if progress:
                print(f"reused the baselines fitted on these shards: {cached}")
            return with_pca_k(baselines, pca_k), info
    idx = sample_tokens(inputs, train_rows, fit_tokens, seed=0)
    if progress:
        print(f"fitting the baselines on {len(idx):,} training tokens (once per shards, layer and split): "
              f"PCA, k-means with {min(n_clusters, len(idx))} centroids", flush=True)
    if chosen["pca_k"] and pca_k > len(idx):
        raise TraitscopeError(f"--pca-k {pca_k} is more components than the {len(idx):,} fitting tokens allow")
    if chosen["n_clusters"] and n_clusters > len(idx):
        raise TraitscopeError(f"--kmeans-clusters {n_clusters} is more centroids than the {len(idx):,} fitting tokens; "
                              "use fewer centroids or a larger --fit-tokens")
    x_fit = inputs.acts[idx].astype(np.float32)
    baselines = fit_baselines(x_fit, pca_k, n_clusters, seed=0, progress=progress)
    try:
        fpath.parent.mkdir(exist_ok=True)
        save_baselines(baselines, fpath, fit)
    except OSError as err:  # a read-only shard folder: keep them with this run's inference instead
        fpath = inf.dpath / fpath.name
        save_baselines(baselines, fpath, fit)
        if progress:
            print(f"note: cannot write beside the shards ({err.strerror}); saved the baselines in {fpath}")
    return baselines, info


def check_baseline_settings(fit_tokens: int, pca_k: int | None, n_clusters: int | None) -> None:
    """--fit-tokens, --pca-k and --kmeans-clusters: positive counts (None: the default)."""
    for flag, value in (("--fit-tokens", fit_tokens), ("--pca-k", pca_k), ("--kmeans-clusters", n_clusters)):
        if value is not None and value < 1:
            raise TraitscopeError(f"{flag} must be at least 1, not {value}")


@torch.no_grad()
def heldout_metrics(inputs: RunInputs, inf: Inference, baselines: list[Baseline],
                    baselines_info: dict) -> tuple[dict[str, Metrics], str]:
    """Metrics of the SAE and each baseline on every held-out token; written (and reused) as
    metrics.csv / metrics.md / metrics.json in the inference folder. Returns the rows and the markdown."""
    _, held_rows = split_rows(inputs)
    info = {"heldout_images": int(len(held_rows)), "baselines": baselines_info}
    json_fpath = inf.dpath / "metrics.json"
    if json_fpath.is_file():
        old = json.loads(json_fpath.read_text())
        if old.get("info") == info:
            rows = {name: Metrics(**m) for name, m in old["rows"].items()}
            return rows, (inf.dpath / "metrics.md").read_text()
    sae = inputs.sae
    device = sae.W_enc.device
    d_model = sae.d_model
    accs = {"sae": MetricsAccumulator(d_model, sae.d_sae)}
    named = {b.label: b for b in baselines}
    accs.update({label: MetricsAccumulator(d_model, b.n_codes) for label, b in named.items()})
    for x in iter_tokens(inputs, inputs.token_rows(held_rows)):
        codes = sae.encode(x.to(device))
        accs["sae"].add(x, sae.decode(codes).cpu(), codes.cpu())
        for label, b in named.items():
            x_hat, b_codes = b.reconstruct(x)
            accs[label].add(x, x_hat, b_codes)
    rows = {name: acc.result() for name, acc in accs.items()}
    md = write_table(rows, inf.dpath / "metrics.csv", inf.dpath / "metrics.md")
    atomic_write_json(json_fpath, {"info": info, "rows": {k: m._asdict() for k, m in rows.items()}})
    return rows, md
