"""SAEs on the Hugging Face hub: `hf:<owner>/<repo>[/<subfolder>]`, through `huggingface_hub`.

`pull` downloads a repository (or one subfolder) into the hub cache (`HF_HOME`; `HF_HUB_OFFLINE=1`
uses what is cached) and says which layout it holds: a traitscope run (config.json with an `sae`
entry + sae.safetensors), SAELens (cfg.json + sae_weights.safetensors), sparsify (cfg.json +
sae.safetensors) or saev (sae.pt). `push` uploads a run folder with a model card (model, layer,
data, metrics) and a SAELens copy of the SAE in `saelens/`.
"""

import shutil
from pathlib import Path
from typing import NamedTuple

from traitscope.errors import TraitscopeError
from traitscope.files import atomic_folder
from traitscope.interop.tensors import read_json_file
from traitscope.runs import CONFIG_FNAME, CURVES_FNAME, METRICS_FNAME, WEIGHTS_FNAME, RunFolder

PREFIX = "hf:"
RUN_FILES = (CONFIG_FNAME, WEIGHTS_FNAME, METRICS_FNAME, CURVES_FNAME)
"""What a pushed run folder holds (besides README.md and saelens/)."""


class HubSpec(NamedTuple):
    repo_id: str
    """owner/name"""
    subfolder: str | None
    """Folder inside the repository, if any."""


def parse_spec(spec: str) -> HubSpec:
    if not spec.startswith(PREFIX):
        raise TraitscopeError(f"{spec!r}: give a hub repository as hf:<owner>/<repo>[/<subfolder>]")
    parts = [p for p in spec[len(PREFIX):].strip("/").split("/") if p]
    if len(parts) < 2 or any(p in (".", "..") for p in parts):
        raise TraitscopeError(f"{spec!r}: give a hub repository as hf:<owner>/<repo>[/<subfolder>]")
    return HubSpec("/".join(parts[:2]), "/".join(parts[2:]) or None)


def hub_error(err: Exception, spec: str) -> TraitscopeError:
    """One line for what huggingface_hub raised."""
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if isinstance(err, GatedRepoError):
        return TraitscopeError(f"{spec}: the repository is gated; accept its terms and log in (hf auth login)")
    if isinstance(err, RepositoryNotFoundError):
        return TraitscopeError(f"{spec}: no such repository, or it is private and you are not logged in")
    if isinstance(err, RevisionNotFoundError):
        return TraitscopeError(f"{spec}: no such revision")
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return TraitscopeError(f"{spec}: the hub cannot be reached and the hub cache ({cache_dpath()}) does not hold "
                               f"it ({first})")
    if isinstance(err, HFValidationError):
        return TraitscopeError(f"{spec}: not a valid repository name ({first})")
    return TraitscopeError(f"{spec}: the hub failed: {type(err).__name__}: {first}")


def transport_errors() -> tuple[type[Exception], ...]:
    """No network, DNS failure, timeout: what the HTTP client under huggingface_hub raises."""
    import importlib

    errors: list[type[Exception]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def cache_dpath() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def download(spec: str, revision: str | None = None) -> Path:
    """The local folder (in the hub cache) holding `spec`'s files."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    repo_id, sub = parse_spec(spec)
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[f"{sub}/*"] if sub else None))
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, HFValidationError, OSError) as err:
        raise hub_error(err, spec) from None
    dpath = snapshot / sub if sub else snapshot
    if not dpath.is_dir():
        raise TraitscopeError(f"{spec}: the repository has no folder {sub!r}")
    return dpath


def detect_layout(dpath: Path) -> str:
    """'traitscope', 'saelens', 'sparsify' or 'saev': which files the folder holds."""
    run = RunFolder(dpath)
    if run.is_run and run.has_weights:
        if "sae" in read_json_file(run.config_fpath):
            return "traitscope"
    if (dpath / "cfg.json").is_file() and (dpath / "sae_weights.safetensors").is_file():
        return "saelens"
    if (dpath / "cfg.json").is_file() and (dpath / "sae.safetensors").is_file():
        return "sparsify"
    if (dpath / "sae.pt").is_file() or (dpath / "checkpoint" / "sae.pt").is_file():
        return "saev"
    inside = sorted(p.name for p in dpath.iterdir() if p.is_dir() and not p.name.startswith("."))
    hint = f"; its folders: {', '.join(inside[:10])} (give one as hf:<owner>/<repo>/<folder>)" if inside else ""
    raise TraitscopeError(f"{dpath}: no traitscope, SAELens, sparsify or saev SAE here{hint}")


def copy_run(src: Path, out: Path, note: dict) -> None:
    """A pulled traitscope run folder into `out` (built as `<out>.partial`, renamed when complete)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TraitscopeError(f"{out} exists and is not an empty folder; choose another --out or remove it")
    with atomic_folder(out) as part:
        part.mkdir(parents=True)
        for name in (*RUN_FILES, "README.md"):
            if (src / name).is_file():
                shutil.copyfile(src / name, part / name)
        run = RunFolder(part)
        run.write_config({**run.read_config(), "pulled_from": note})


# --- push ---

def model_card(run_dpath: Path, repo_id: str) -> str:
    """README.md for a pushed run: what the SAE reads (model, layer, tokens), its data and its metrics."""
    from huggingface_hub import ModelCardData

    run = RunFolder(run_dpath)
    config, metrics = run.read_config(), run.read_metrics() or {}
    sae, shards, train = config["sae"], run.shards, config.get("train", {})
    manifest = _shards_manifest(shards.path)
    model = manifest.get("model") or {"name": shards.model, "weights_sha256": shards.weights_sha256}
    data = manifest.get("source", {}).get("spec") or "(not recorded)"
    front = ModelCardData(library_name="traitscope", tags=["sparse-autoencoder", "interpretability", "vision",
                                                           "traitscope"]).to_yaml()
    rows = [("backbone", f"`{model.get('name')}`" + (f" ({model['family']})" if model.get("family") else "")),
            ("backbone weights sha256", f"`{model.get('weights_sha256') or 'not recorded'}`"),
            ("layer", str(shards.layer)), ("tokens", shards.token_kind),
            ("d_model", str(sae.get("d_model"))), ("SAE", f"{sae.get('variant')}, d_sae {sae.get('d_sae')}"
                                                   + (f", k {sae['k']}" if sae.get("k") else "")),
            ("data", f"`{data}`, {manifest.get('n_images', '?')} images (shards `{shards.hash}`)"),
            ("training tokens", str(train.get("n_train_tokens", metrics.get("tokens_trained", "not recorded"))))]
    if "imported" in train:
        rows.append(("imported from", f"{train['imported'].get('format')} ({train['imported'].get('path')})"))
    mrows = [(k, f"{metrics[k]:.4g}" if isinstance(metrics[k], float) else str(metrics[k]))
             for k in ("nmse", "explained_variance", "l0", "dead_frac", "dense_frac", "n_tokens") if k in metrics]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    mtable = "\n".join(f"| {k} | {v} |" for k, v in mrows) or "| (no metrics.json) | |"
    return f"""---
{front}
---

# Sparse autoencoder: {model.get('name')}, layer {shards.layer}

A sparse autoencoder on the activations of a vision model, made with
[traitscope](https://pypi.org/project/traitscope/). It reads raw activations of the layer below
(any training scale is folded into the weights): codes = act(W_encᵀ(x − b_dec) + b_enc),
reconstruction = codes · W_dec + b_dec.

| | |
| --- | --- |
{table}

Held-out metrics (tokens of images not trained on):

| metric | value |
| --- | --- |
{mtable}

## Use

```
traitscope pull hf:{repo_id} --out runs/{repo_id.split('/')[-1]} --shards <your shards of the same model and layer>
```

`saelens/` holds the same SAE for SAELens (`SAE.load_from_disk("<snapshot>/saelens")`); the files
are described in traitscope's docs/formats.md and docs/interop.md.
"""


def _shards_manifest(path: str | None) -> dict:
    """The shard folder's manifest when it is on this machine (for the model card), else {}."""
    if not path:
        return {}
    try:
        from traitscope.shards import Shards

        return dict(Shards(path).manifest)
    except (TraitscopeError, OSError, ValueError):
        return {}


def stage_push(run_dpath: Path, repo_id: str, dpath: Path) -> list[str]:
    """Write what `push` uploads into `dpath`: the run's files, README.md and saelens/. Returns the names."""
    from traitscope.interop.export_cli import provenance
    from traitscope.interop.saelens import write_saelens
    from traitscope.sae import load_sae

    sae = load_sae(run_dpath)  # refuses a folder that is not a run
    names = []
    for name in RUN_FILES:
        if (run_dpath / name).is_file():
            shutil.copyfile(run_dpath / name, dpath / name)
            names.append(name)
    (dpath / "README.md").write_text(model_card(run_dpath, repo_id))
    write_saelens(sae, dpath / "saelens", provenance(RunFolder(run_dpath).read_config()))
    return [*names, "README.md", "saelens/"]


def push(run_dpath: Path, spec: str, private: bool = False, message: str | None = None) -> str:
    """Upload a run folder to `spec`; returns the repository's URL."""
    import tempfile

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    repo_id, sub = parse_spec(spec)
    with tempfile.TemporaryDirectory(prefix="traitscope-push-") as tmp:
        stage_push(run_dpath, repo_id, Path(tmp))
        api = HfApi()
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=tmp, path_in_repo=sub,
                              commit_message=message or f"traitscope push {run_dpath.name}")
        except (OfflineModeIsEnabled, *transport_errors()) as err:
            raise TraitscopeError(f"{spec}: the hub cannot be reached ({type(err).__name__}); nothing was "
                                  "uploaded") from None
        except (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError, OSError) as err:
            raise hub_error(err, spec) from None
    return str(url)
