"""An SAE run folder: what `traitscope train` and `traitscope import` write and every later stage reads.

    <run>/config.json              format, sae (architecture), train (settings), shards (what it read)
    <run>/sae.safetensors          the weights; take raw activations
    <run>/metrics.jsonl            the training log, one line per logging step
    <run>/metrics.json             final held-out metrics (a run without it is unfinished)
    <run>/curves.png               training curves
    <run>/checkpoint/              resume state (the trainer's own)
    <run>/inference/<shards-hash>/ inference outputs over one shard folder

`RunFolder` names these files, reads them (checked, with one-line errors) and is the one writer of
config.json; `find_runs` is the one way to find run folders under a folder. The SAE itself is built
from the folder by `traitscope.sae.load_sae`. docs/formats.md describes every field.
"""

import json
import re
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from traitscope.errors import TraitscopeError
from traitscope.files import atomic_save_safetensors, atomic_write_json, file_sha256, load_safetensors, read_json

FORMAT = "traitscope-sae-run/1"
CONFIG_FNAME = "config.json"
WEIGHTS_FNAME = "sae.safetensors"
LOG_FNAME = "metrics.jsonl"
METRICS_FNAME = "metrics.json"
CURVES_FNAME = "curves.png"
CHECKPOINT_DNAME = "checkpoint"
INFERENCE_DNAME = "inference"
MAX_RUN_DEPTH = 3
"""How deep under the folder searched `find_runs` looks by default (the folder itself is depth 0)."""


class ShardsRef(NamedTuple):
    """What a run was trained on: config.json's `shards` entry, with the defaults of older folders."""

    hash: str | None
    """Content hash of the shard folder."""
    path: str | None
    """Where the shard folder was when the run was made."""
    layer: int | None
    """Stored block index the SAE reads; None when the folder does not say (some hand-made folders)."""
    token_kind: str
    """'patches', 'cls' or 'all' (patch and CLS tokens), as trained; 'patches' when not recorded."""
    d_model: int | None
    """Width of the activations."""
    model: str | None
    """The backbone's name."""
    weights_sha256: str | None
    """sha256 of the backbone's weights."""

    @property
    def view_kind(self) -> str:
        """The token kind its features are looked at on: a run trained on all tokens is read on patches."""
        return "patches" if self.token_kind == "all" else self.token_kind


class RunFolder:
    """One SAE run folder, opened lazily: nothing is read until asked for."""

    def __init__(self, dpath: str | Path, name: str | None = None):
        self.dpath = Path(dpath)
        self.name = name or self.dpath.name
        """How the run is shown: its folder relative to the folder searched (see `find_runs`)."""

    def __repr__(self) -> str:
        return f"RunFolder({str(self.dpath)!r})"

    # --- file names ---
    @property
    def config_fpath(self) -> Path:
        return self.dpath / CONFIG_FNAME

    @property
    def weights_fpath(self) -> Path:
        return self.dpath / WEIGHTS_FNAME

    @property
    def log_fpath(self) -> Path:
        return self.dpath / LOG_FNAME

    @property
    def metrics_fpath(self) -> Path:
        return self.dpath / METRICS_FNAME

    @property
    def curves_fpath(self) -> Path:
        return self.dpath / CURVES_FNAME

    def inference_dpath(self, shards_hash: str) -> Path:
        """Where the run's inference outputs over the shard folder with this hash go."""
        if not re.fullmatch(r"[0-9A-Za-z_-]{1,128}", shards_hash):
            raise TraitscopeError(f"invalid shards hash {shards_hash!r}")
        return self.dpath / INFERENCE_DNAME / shards_hash

    # --- what is there ---
    @property
    def is_run(self) -> bool:
        """Whether the folder holds a config.json (it may still be damaged or another tool's)."""
        return self.config_fpath.is_file()

    @property
    def has_weights(self) -> bool:
        return self.weights_fpath.is_file()

    @property
    def is_finished(self) -> bool:
        """Trained to the end (or imported): metrics.json is written last."""
        return self.metrics_fpath.is_file()

    def has_inference(self, shards_hash: str) -> bool:
        return (self.inference_dpath(shards_hash) / "manifest.json").is_file()

    # --- config.json ---
    def read_config(self, fix: str = "") -> dict:
        """config.json, checked to describe an SAE (an `sae` entry); TraitscopeError naming the file and
        saying `fix` otherwise."""
        if not self.config_fpath.exists():
            raise TraitscopeError(f"{self.dpath} is not an SAE run folder (no {CONFIG_FNAME})")
        config = read_json(self.config_fpath, fix)
        if not isinstance(config.get("sae"), dict):
            fix = f"; {fix}" if fix else ""
            raise TraitscopeError(f"{self.config_fpath} has no 'sae' entry (damaged, or not an SAE run's){fix}")
        return config

    def write_config(self, config: dict) -> None:
        """Write config.json whole (the only place it is written)."""
        if not isinstance(config.get("sae"), dict):
            raise ValueError("a run's config needs its 'sae' entry")
        self.dpath.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.config_fpath, config)

    @cached_property
    def config(self) -> dict:
        """config.json, read once (see `read_config`)."""
        return self.read_config()

    @property
    def sae_config(self) -> dict:
        """config.json's `sae` entry: variant, d_model, d_sae and the variant's settings."""
        return self.config["sae"]

    @property
    def shards(self) -> ShardsRef:
        return shards_ref(self.config)

    # --- metrics.json, metrics.jsonl ---
    def read_metrics(self) -> dict | None:
        """metrics.json, or None while the run is unfinished."""
        return read_json(self.metrics_fpath) if self.metrics_fpath.is_file() else None

    def write_metrics(self, metrics: dict) -> None:
        atomic_write_json(self.metrics_fpath, metrics)

    @cached_property
    def metrics(self) -> dict:
        """metrics.json, read once; {} while the run is unfinished."""
        return self.read_metrics() or {}

    def read_log(self) -> list[dict]:
        """The training log's records (metrics.jsonl); [] without one. A line torn by a kill is skipped."""
        if not self.log_fpath.is_file():
            return []
        records = []
        for line in self.log_fpath.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    # --- sae.safetensors ---
    def write_weights(self, tensors: dict) -> None:
        """Write sae.safetensors whole (a state dict: tensors on any device)."""
        self.dpath.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(self.weights_fpath, {k: v.detach().cpu().contiguous() for k, v in tensors.items()})

    def read_weights(self, like: dict, fix: str = "") -> dict:
        """The weight tensors, each of `like` (a state dict) checked to be there with its shape and dtype."""
        return load_safetensors(self.weights_fpath, like, fix)

    def weights_sha256(self) -> str:
        """Names the weights an inference folder was made from."""
        return file_sha256(self.weights_fpath)


def shards_ref(config: dict) -> ShardsRef:
    """The `shards` entry of a run's config, with the defaults of folders that leave fields out."""
    entry = config.get("shards")
    entry = entry if isinstance(entry, dict) else {}
    layer = entry.get("layer")
    return ShardsRef(hash=entry.get("hash"), path=entry.get("path"), layer=None if layer is None else int(layer),
                     token_kind=entry.get("token_kind") or "patches", d_model=entry.get("d_model"),
                     model=entry.get("model"), weights_sha256=entry.get("weights_sha256"))


class FoundRuns(NamedTuple):
    """What `find_runs` found."""

    runs: list[RunFolder]
    """Run folders whose config.json describes an SAE (finished or not), by name."""
    unusable: list[tuple[str, str]]
    """(name, why) for each folder with a config.json that cannot be read as a run."""


def find_runs(root_dpath: str | Path, max_depth: int | None = MAX_RUN_DEPTH) -> FoundRuns:
    """The run folders at or under `root_dpath`, at most `max_depth` folders down (None: any depth).

    A folder holding config.json is a run and is not searched further (its checkpoint/ and inference/
    belong to it); hidden folders, folders still being built (`*.partial`) and links leading outside
    `root_dpath` are passed over. A run is named by its path relative to `root_dpath` (the folder's own
    name when `root_dpath` is the run)."""
    root = Path(root_dpath).expanduser().resolve()
    if not root.is_dir():
        raise TraitscopeError(f"--runs {root_dpath}: not a folder")
    runs: list[RunFolder] = []
    unusable: list[tuple[str, str]] = []

    def visit(dpath: Path, depth: int) -> None:
        run = RunFolder(dpath, str(dpath.relative_to(root)) if dpath != root else root.name)
        if run.is_run:
            try:
                run.config
            except TraitscopeError as err:
                unusable.append((run.name, str(err)))
            else:
                runs.append(run)
            return
        if max_depth is not None and depth >= max_depth:
            return
        for child in sorted(dpath.iterdir()):
            if (child.is_dir() and not child.name.startswith(".") and not child.name.endswith(".partial")
                    and child.resolve().is_relative_to(root)):
                visit(child, depth + 1)

    visit(root, 0)
    return FoundRuns(runs, unusable)
