"""Train one or more SAEs in one pass over stored activations.

Read top to bottom, `train` is: setup (shards, split by image, run folders, checkpoints), start-up
from the data (input scale, decoder bias), the loop (one batch; every SAE takes an Adam step on it;
metrics; checkpoints), and the end (validation metrics, the saved SAE, curves). Helpers below it do
one thing each.

Inputs are scaled to unit mean squared norm for training; the scale is folded back into the weights
on save, so a saved SAE (`traitscope.sae.load_sae`) takes raw activations. A run folder holds:
config.json, sae.safetensors, metrics.jsonl, metrics.json, curves.png and checkpoint/ (weights in
training units, Adam state, loader position, counters) from which a killed run continues.

Under torchrun (a process group joined with `traitscope.dist.session`), `cfg.dist_mode` 'data' trains
every SAE data-parallel (`traitscope.train.parallel`: each rank steps on its share of every batch,
rank 0 writes the run folders), and 'sweep' trains SAE i on rank i mod N, which writes its folder.
Checkpoints hold global state only, so a run resumes on any number of processes.
"""

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from traitscope import dist
from traitscope.errors import TraitscopeError
from traitscope.runs import (CURVES_FNAME, FORMAT as RUN_FORMAT, LOG_FNAME, METRICS_FNAME, WEIGHTS_FNAME, RunFolder,
                            shards_ref)
from traitscope.sae import SAE, SAEConfig, build_sae
from traitscope.sae.metrics import MetricsAccumulator
from traitscope.files import (atomic_write_json, check_out_dpath, file_sha256, folder_lock, load_safetensors, read_json,
                              truncate_log)
from traitscope.shards.store import Shards
from traitscope.train.config import RunSettings, TrainConfig, identity_hash, run_identity
from traitscope.train.curves import plot_curves
from traitscope.train.loader import LoaderState, ShuffledLoader, TokenSplit
from traitscope.train.parallel import DataParallel

INIT_TOKENS = 65_536
"""Tokens sampled before training to set the input scale and the decoder bias."""


class RunResult(NamedTuple):
    """How one SAE of a `train` call ended."""

    dpath: Path
    """Its run folder."""
    status: str
    """'trained', 'already trained', 'stopped' (checkpoint kept, rerun to go on) or 'failed'."""
    metrics: dict | None
    """Final validation metrics (metrics.json) when trained."""
    message: str = ""
    """Why it failed, if it did."""


@dataclasses.dataclass
class Run:
    """One SAE being trained: folder, model, optimiser, counters."""

    dpath: Path
    settings: RunSettings
    identity: dict
    sae: SAE
    opt: torch.optim.Adam
    since_fired_s: torch.Tensor
    """Tokens since each latent last fired (dead after settings.dead_tokens)."""
    step: int = 0
    scale: float = 1.0
    loader_state: LoaderState = LoaderState()
    done: bool = False
    failed: str | None = None
    window: dict = dataclasses.field(default_factory=lambda: defaultdict(float))
    """Sums of the loss parts since the last metrics line."""
    fired_window_s: torch.Tensor | None = None
    """Firing counts per latent since the last metrics line."""
    last_record: dict | None = None
    """The last metrics line written."""
    writes: bool = True
    """Whether this process writes the run folder (False on the other ranks of a data-parallel job)."""

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.dpath)


def train(cfg: TrainConfig, settings: list[RunSettings], echo=print) -> list[RunResult]:
    """Train every SAE in `settings` on the data of `cfg`, sharing one pass over the data."""
    n_threads = torch.get_num_threads()
    check_shared(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with contextlib.ExitStack() as locks:  # one writer per run folder, until the pass ends
            return _train(cfg, settings, echo, locks)
    finally:
        torch.set_num_threads(n_threads)


def _train(cfg: TrainConfig, settings: list[RunSettings], echo, locks: contextlib.ExitStack) -> list[RunResult]:
    # --- setup ---
    device = resolve_device(cfg.device)
    check_shared(cfg)
    dist.check_joined()
    world = dist.world()
    sweep = world.distributed and cfg.dist_mode == "sweep"
    dp = DataParallel(world, cfg.batch_size, device) if world.distributed and not sweep else None
    say = echo if world.is_main else _quiet  # the job's lines: rank 0
    echo = echo if world.is_main or sweep else _quiet  # a run's lines: the process that trains it
    shards = Shards(cfg.shards)
    layer = cfg.layer if cfg.layer is not None else shards.layers[-1]
    split = TokenSplit(shards, layer, cfg.token_kind, cfg.val_frac, cfg.seed, cfg.val_split)
    resolved = [s.resolved(split.d_model, cfg.batch_size) for s in settings]  # refuses impossible settings up front
    identities = [run_identity(cfg, s, shards.hash, split.layer) for s in resolved]
    dpaths = [Path(cfg.out) / (cfg.name or f"{s.label()}-{identity_hash(i)}") for s, i in zip(resolved, identities)]
    if len(set(dpaths)) != len(dpaths):
        raise TraitscopeError("two of the requested runs are identical (or share --name); each SAE of a pass "
                              "needs its own settings and folder")
    # This process's SAEs: all of them, or (sweep) SAE i on rank i mod N. In a data-parallel job rank 0
    # creates or checks the folders first and alone writes them; the others read them.
    mine = [i for i in range(len(resolved)) if not sweep or i % world.size == world.rank]
    with dist.main_first():
        if sweep or world.is_main:
            for i in mine:
                locks.enter_context(folder_lock(dpaths[i], "traitscope train"))
        runs = [open_run(cfg, resolved[i], identities[i], dpaths[i], shards, split, device,
                         writes=sweep or world.is_main) for i in mine]
    if dp is not None:
        for run in runs:
            dp.global_batch_selection(run.sae)
    results = {r.dpath: RunResult(r.dpath, "already trained", r.folder.read_metrics())
               for r in runs if r.done}
    pending = [r for r in runs if not r.done]
    n_steps = -(-cfg.tokens // cfg.batch_size)
    how = "" if not world.distributed else \
        f" on {world.size} processes, {'one SAE each' if sweep else 'each a share of every batch'}"
    say(f"{len(resolved)} SAE(s) on {shards.dpath} layer {split.layer} ({cfg.token_kind}, d_model {split.d_model}), "
        f"{n_steps * cfg.batch_size:,} tokens in {n_steps:,} steps of {cfg.batch_size}{how}; "
        f"{split.n_train_tokens:,} training tokens, {len(split.val_rows)} validation images")
    lines = [(i, f"  {run.dpath}  ({run_state(run)}{f', rank {world.rank}' if sweep else ''})  "
                 f"lr {run.settings.lr:.2g}") for i, run in zip(mine, runs)]
    for _, line in sorted(sum(dist.all_gather(lines) if sweep else [lines], [])):  # in the order asked for
        say(line)
    if sweep and world.size > len(resolved):
        say(f"  note: {world.size} processes for {len(resolved)} SAE(s): ranks {len(resolved)} and up have "
            "nothing to do; use --dist-mode data")
    if dist.any_true(bool(pending)):
        if cfg.tokens > split.n_train_tokens:
            say(f"  note: the budget is {cfg.tokens / split.n_train_tokens:.1f} epochs of the training tokens")
        no_auxk = [s for s in resolved if s.params.uses_dead_latents and s.dead_tokens >= cfg.tokens]
        if no_auxk:
            say(f"  note: AuxK stays off in {len(no_auxk)} SAE(s): --dead-tokens is not shorter than the budget "
                "(docs/training.md)")

    # Runs resumed from different checkpoints cannot share a pass: each group gets its own.
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for run in pending:
        groups[(run.step, tuple(run.loader_state))].append(run)
    stop = _InterruptFlag()
    with stop:
        for (start_step, _), group in sorted(groups.items(), key=lambda kv: kv[0][0]):
            status = train_pass(cfg, group, split, shards, start_step, n_steps, device, stop, echo, dp)
            if dp is not None:
                dist.barrier()  # rank 0 has written metrics.json
            for run in group:
                if run.failed:
                    results[run.dpath] = RunResult(run.dpath, "failed", None, run.failed)
                elif status == "stopped":
                    results[run.dpath] = RunResult(run.dpath, "stopped", None)
                else:
                    results[run.dpath] = RunResult(run.dpath, "trained", run.folder.read_metrics())
    return [results[r.dpath] for r in runs]


def run_state(run: Run) -> str:
    return "already trained" if run.done else f"resuming at step {run.step:,}" if run.step else "new"


def _quiet(*args, **kwargs) -> None:
    pass


def train_pass(cfg: TrainConfig, runs: list[Run], split: TokenSplit, shards: Shards, start_step: int,
               n_steps: int, device: torch.device, stop: "_InterruptFlag", echo,
               dp: DataParallel | None = None) -> str:
    """One pass over the data for runs that start at the same step. Returns 'done' or 'stopped'.

    With `dp` this process trains on its rows of every batch, in step with the other ranks."""
    if start_step == 0:
        init_from_data(cfg, runs, split, device)
    # batches in pinned memory on CUDA: the copy to the GPU below does not stall this thread
    # and as stored (float16: half the bytes over PCIe), made float32 on the GPU
    loader = ShuffledLoader(split, cfg.batch_size, cfg.seed, cfg.chunk_rows, cfg.buffer_mb,
                            state=runs[0].loader_state, rows=dp.rows if dp else None,
                            pin_memory=device.type == "cuda", as_stored=device.type == "cuda")
    loggers = [make_logger(cfg.log_to, run) if run.writes else None for run in runs]
    bar = progress_bar(cfg, start_step, n_steps) if dist.world().is_main else None
    t_window, tokens_window = time.perf_counter(), 0
    status = "done"
    try:
        with loader:
            for step in range(start_step, n_steps):
                # --- one batch, one step of every SAE ---
                x_bd = next(loader).to(device, non_blocking=True).float()
                if dp is not None:
                    dp.begin_step(x_bd, stop.is_set())  # this share's weight; whether any rank must stop
                for run in runs:
                    if not run.failed:
                        train_step(run, x_bd, step, n_steps, bf16=cfg.dtype == "bfloat16", dp=dp)
                        if run.failed:
                            echo(f"\n{run.dpath}: {run.failed}; stopped this run, its last good checkpoint is kept")
                tokens_window += cfg.batch_size
                tokens = (step + 1) * cfg.batch_size
                if bar is not None:
                    bar.update(cfg.batch_size)
                # --- metrics ---
                if (step + 1) % cfg.log_every == 0 or step + 1 == n_steps:
                    seconds = time.perf_counter() - t_window
                    for run, logger in zip(runs, loggers):
                        if not run.failed:
                            record = log_window(run, step + 1, tokens, tokens_window / max(seconds, 1e-9),
                                                split.n_train_tokens)
                            if logger is not None:
                                logger(record)
                    if bar is not None:
                        bar.set_postfix_str(postfix(runs), refresh=False)
                    t_window, tokens_window = time.perf_counter(), 0
                if all(run.failed for run in runs):
                    break
                # --- checkpoints, a requested stop, Ctrl-C ---
                crossed = tokens // cfg.checkpoint_every > (tokens - cfg.batch_size) // cfg.checkpoint_every
                stop_now = (cfg.stop_after is not None and tokens >= cfg.stop_after and step + 1 < n_steps)
                interrupted = dp.stop if dp is not None else stop.is_set()  # every rank stops at the same step
                if crossed or stop_now or interrupted or step + 1 == n_steps:
                    for run in runs:
                        if not run.failed:
                            save_checkpoint(run, step + 1, loader.state)
                if interrupted:
                    raise KeyboardInterrupt
                if stop_now:
                    echo(f"\nstopped after {tokens:,} tokens as asked (--stop-after); rerun without it to continue")
                    status = "stopped"
                    break
    finally:
        if bar is not None:
            bar.close()
        for logger in loggers:
            if logger is not None:
                logger(None)
    if status == "done":
        for run in runs:
            if not run.failed and run.writes:
                finish_run(cfg, run, split, shards)
    return status


# --- one step ---

def train_step(run: Run, x_raw_bd: torch.Tensor, step: int, n_steps: int, bf16: bool = False,
               dp: DataParallel | None = None) -> None:
    """Forward, backward and Adam step of one SAE on one batch (raw activations).

    With `bf16` the forward's matrix products run in bfloat16 (weights, gradients and Adam stay float32).
    With `dp`, `x_raw_bd` is this rank's share of the global batch: the gradients, the loss parts and
    the firing counts are summed over ranks before anything uses them, so every rank takes the step a
    single process would take on the whole batch.
    """
    s = run.settings
    sae = run.sae
    x_bd = x_raw_bd * run.scale
    dead_s = run.since_fired_s >= s.dead_tokens if s.params.uses_dead_latents else None
    with torch.autocast(x_bd.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = sae(x_bd, dead_s=dead_s, progress=(step + 1) / n_steps)
    if dp is None and not torch.isfinite(out.loss):
        run.failed = f"the loss became {float(out.loss.detach())} at step {step + 1}"
        return
    for group in run.opt.param_groups:
        group["lr"] = lr_at(s, step, n_steps)
    run.opt.zero_grad(set_to_none=True)
    if dp is None:
        out.loss.backward()
    else:
        (out.loss * dp.loss_weight(sae)).backward()
        out = dp.reduce(sae, out)  # the whole batch's gradients, loss, parts and firing counts
        if not torch.isfinite(out.loss):
            run.failed = f"the loss became {float(out.loss)} at step {step + 1}"
            return
    n_tokens = dp.batch_size if dp is not None else len(x_bd)
    sae.remove_parallel_grads_()
    grad_norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), s.grad_clip if s.grad_clip > 0 else math.inf)
    if not torch.isfinite(grad_norm):
        run.failed = f"the gradient became {float(grad_norm)} at step {step + 1}"
        return
    run.opt.step()
    sae.normalize_decoder_()
    run.step = step + 1
    # counters for dead latents and the logging window
    fired_s = out.n_fired_s > 0
    run.since_fired_s.add_(n_tokens).masked_fill_(fired_s, 0)
    run.fired_window_s = out.n_fired_s if run.fired_window_s is None else run.fired_window_s + out.n_fired_s
    w = run.window
    w["n"] += 1
    w["tokens"] += n_tokens
    w["loss"] += out.loss.detach()
    for name, value in out.parts.items():
        w[name] += value


def lr_at(s: RunSettings, step: int, n_steps: int) -> float:
    """Linear warm-up, then constant, then decay to zero over the last (1 − decay_start) of training."""
    warmup = min(s.lr_warmup, n_steps // 10)
    factor = (step + 1) / warmup if step < warmup else 1.0
    start = int(s.decay_start * n_steps)
    if s.lr_decay != "none" and step >= start and n_steps > start:
        p = (step - start) / (n_steps - start)
        factor *= (1 - p) if s.lr_decay == "linear" else 0.5 * (1 + math.cos(math.pi * p))
    return s.lr * factor


def log_window(run: Run, step: int, tokens: int, tokens_per_s: float, epoch_tokens: int) -> dict:
    """Append the logging window's means to metrics.jsonl and start a new window."""
    w = run.window
    n = max(w.pop("n", 1), 1)
    window_tokens = w.pop("tokens", 0)
    record = {"step": step, "tokens": tokens}
    record.update({name: round(float(value) / n, 6) for name, value in w.items()})
    record["dead_frac"] = round(dead_frac(run, tokens, epoch_tokens), 6)
    if run.fired_window_s is not None and window_tokens:
        record["dense_frac"] = round(float((run.fired_window_s.float() / window_tokens > 0.1).float().mean()), 6)
    record["lr"] = run.opt.param_groups[0]["lr"]
    record["tokens_per_s"] = round(tokens_per_s, 1)
    if run.writes:
        with open(run.folder.log_fpath, "a") as f:
            f.write(json.dumps(record) + "\n")
    run.window = defaultdict(float)
    run.fired_window_s = None
    run.last_record = record
    return record


# --- start-up from the data ---

@torch.no_grad()
def init_from_data(cfg: TrainConfig, runs: list[Run], split: TokenSplit, device: torch.device) -> None:
    """Input scale (unit mean squared norm) and decoder bias (mean or geometric median), from a sample."""
    n = min(INIT_TOKENS, split.n_train_tokens)
    with ShuffledLoader(split, n, cfg.seed, cfg.chunk_rows, cfg.buffer_mb, prefetch=False, stream=1) as sample_loader:
        sample_nd = next(sample_loader).to(device)
    mean_sq = float((sample_nd.double() ** 2).sum(1).mean())
    if not mean_sq > 0:
        raise TraitscopeError("the activations are all zero: nothing to train on")
    scale = 1 / math.sqrt(mean_sq)
    sample_nd = sample_nd * scale
    centres = {}
    for run in runs:
        how = run.settings.b_dec_init
        if how not in centres:
            centres[how] = sample_nd.mean(0) if how == "mean" else geometric_median(sample_nd)
        run.scale = scale
        run.sae.init_b_dec_(centres[how])
        run.sae.init_from_data_(sample_nd)


def geometric_median(x_nd: torch.Tensor, n_iter: int = 100, tol: float = 1e-7) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distances to the rows."""
    x = x_nd.double()
    m = x.mean(0)
    for _ in range(n_iter):
        w = 1 / (x - m).norm(dim=1).clamp_min(1e-12)
        m_next = (w[:, None] * x).sum(0) / w.sum()
        if (m_next - m).norm() <= tol * m.norm().clamp_min(1e-12):
            m = m_next
            break
        m = m_next
    return m.to(x_nd.dtype)


# --- run folders and checkpoints ---

def open_run(cfg: TrainConfig, s: RunSettings, identity: dict, dpath: Path, shards: Shards, split: TokenSplit,
             device: torch.device, writes: bool = True) -> Run:
    """Create a run's folder, or reopen it: finished, resumable from its checkpoint, or refused.

    Without `writes` (the other ranks of a data-parallel job) the folder is only read."""
    d_model = split.d_model
    if cfg.restart and dpath.is_dir() and writes:
        for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp", LOG_FNAME, METRICS_FNAME, WEIGHTS_FNAME,
                     CURVES_FNAME):
            p = dpath / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    torch.manual_seed(cfg.seed)
    sae = build_sae(s.sae_config(d_model)).to(device)
    sae.training_form_()
    opt = torch.optim.Adam(sae.parameters(), lr=s.lr, betas=(s.beta1, s.beta2), **adam_impl(device))
    run = Run(dpath, s, identity, sae, opt, torch.zeros(s.d_sae, dtype=torch.long, device=device), writes=writes)
    if run.folder.is_run:
        config = run.folder.read_config("rerun with --restart to train this run afresh, or use another --out")
        check_same_run(dpath, config, identity, shards, split)
        run.done = run.folder.is_finished
        if not run.done:
            load_checkpoint(run, device)
    else:
        run.folder.write_config(run_config(cfg, run, shards, split))
    return run


def run_config(cfg: TrainConfig, run: Run, shards: Shards, split: TokenSplit) -> dict:
    """config.json: the SAE's architecture, how it was trained, and on which shards."""
    return {
        "sae": run.sae.cfg.to_dict(),
        "format": RUN_FORMAT,
        "train": {**{f: getattr(cfg, f) for f in ("tokens", "batch_size", "seed", "val_frac", "val_split", "dtype",
                                                  "chunk_rows", "buffer_mb")},
                  **{k: v for k, v in dataclasses.asdict(run.settings).items() if k not in ("variant", "d_sae", "params")},
                  "input_scale": run.scale, "identity": identity_hash(run.identity),
                  "n_train_tokens": split.n_train_tokens, "val_rows": split.val_rows.tolist()},
        "shards": {"hash": shards.hash, "path": str(shards.dpath.resolve()), "layer": split.layer,
                   "token_kind": split.token_kind, "model": shards.model.get("name"),
                   "weights_sha256": shards.model.get("weights_sha256"), "d_model": split.d_model},
    }


def check_same_run(dpath: Path, config: dict, identity: dict, shards: Shards, split: TokenSplit) -> None:
    """Refuse to resume into a folder made from other shards or with other settings."""
    old = shards_ref(config)
    if old.hash != shards.hash or (old.d_model or split.d_model) != split.d_model:
        raise TraitscopeError(
            f"{dpath} was trained on shards {old.hash} (model {old.model!r}, d_model "
            f"{old.d_model}, layer {old.layer}), not on {shards.hash} (model "
            f"{shards.model.get('name')!r}, d_model {split.d_model}, layer {split.layer}); "
            "use another --out or --name, or --restart to overwrite it")
    if config.get("train", {}).get("identity") != identity_hash(identity):
        raise TraitscopeError(f"{dpath} holds a run with other settings; use another --name, or --restart to "
                              "overwrite it")


def save_checkpoint(run: Run, step: int, loader_state: LoaderState) -> None:
    """Write checkpoint/ (atomically: a new folder is renamed into place) and the current SAE."""
    if not run.writes:  # another rank writes this run's folder
        run.loader_state = loader_state
        return
    tensors = {f"sae.{k}": v.detach().cpu().contiguous() for k, v in run.sae.state_dict().items()}
    names = {id(p): n for n, p in run.sae.named_parameters()}
    for group in run.opt.param_groups:
        for p in group["params"]:
            for key, value in run.opt.state.get(p, {}).items():
                tensors[f"adam.{names[id(p)]}.{key}"] = value.detach().cpu().contiguous()
    tensors["since_fired"] = run.since_fired_s.cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    state = {"step": step, "loader": loader_state._asdict(), "input_scale": run.scale,
             "identity": identity_hash(run.identity)}
    tmp, final, old = run.dpath / "checkpoint.tmp", run.dpath / "checkpoint", run.dpath / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / "state.safetensors"))
    state["sha256"] = file_sha256(tmp / "state.safetensors")
    atomic_write_json(tmp / "state.json", state)
    # The previous checkpoint stays (as checkpoint.old) until the next one is whole: a damaged
    # checkpoint falls back to it.
    shutil.rmtree(old, ignore_errors=True)
    if final.is_dir():
        os.replace(final, old)
    os.replace(tmp, final)
    run.loader_state = loader_state
    save_folded(run)


def load_checkpoint(run: Run, device: torch.device) -> None:
    """Restore weights, Adam state, counters and the loader position (no checkpoint: start afresh).
    A damaged checkpoint falls back to the previous one (checkpoint.old), with a line saying so."""
    found = [p for p in (run.dpath / "checkpoint", run.dpath / "checkpoint.old") if p.is_dir()]
    if not found:  # killed before its first checkpoint: it starts again from step 0
        if run.writes:
            truncate_log(run.folder.log_fpath, 0)
        return
    problems = []
    for ckpt in found:
        try:
            state, tensors = read_checkpoint(run, ckpt)
            break
        except TraitscopeError as err:
            problems.append(str(err))
    else:
        raise TraitscopeError(f"{problems[0]}{f' and {problems[1]}' if len(problems) > 1 else ''}; no whole "
                              f"checkpoint is left: rerun with --restart to train {run.dpath.name} from the start")
    if problems:
        sys.stderr.write(f"traitscope train: warning: {problems[0]}; resuming from the previous checkpoint, "
                         f"{ckpt} (step {int(state['step']):,})\n")
    run.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    params = dict(run.sae.named_parameters())
    for name, p in params.items():
        # moments take the parameter's memory layout (fused Adam walks them in storage order)
        entry = {key.rsplit(".", 1)[1]: torch.empty_like(p).copy_(v) if v.shape == p.shape else v.to(device)
                 for key, v in tensors.items() if key.startswith(f"adam.{name}.")}
        if entry:
            run.opt.state[p] = entry
    run.since_fired_s = tensors["since_fired"].to(device)
    torch.set_rng_state(tensors["rng.torch"])
    run.step = int(state["step"])
    run.scale = float(state["input_scale"])
    run.loader_state = LoaderState(**state["loader"])
    if run.writes:
        truncate_log(run.folder.log_fpath, run.step)  # keeps only what the checkpoint had seen


def read_checkpoint(run: Run, ckpt: Path) -> tuple[dict, dict]:
    """(state.json, the tensors) of a checkpoint folder, checked: the tensors' sha256 (when recorded),
    the SAE's tensor shapes, and the counters; TraitscopeError naming the damaged file otherwise."""
    state = read_json(ckpt / "state.json")
    tensors_fpath = ckpt / "state.safetensors"
    if "sha256" in state and tensors_fpath.is_file() and file_sha256(tensors_fpath) != state["sha256"]:
        raise TraitscopeError(f"{tensors_fpath} is damaged (it does not match its sha256 in state.json)")
    tensors = load_safetensors(tensors_fpath, {f"sae.{k}": v for k, v in run.sae.state_dict().items()})
    if not all(key in state for key in ("step", "loader", "input_scale")) or "since_fired" not in tensors:
        raise TraitscopeError(f"{ckpt / 'state.json'} is damaged (no step, loader position or input scale)")
    return state, tensors


def folded_sae(run: Run) -> SAE:
    """A plain copy of the SAE that takes raw activations (input scale folded in; unit-norm decoder rows
    unless the variant keeps its atoms' norms)."""
    sae = build_sae(SAEConfig(**run.sae.cfg.to_dict())).to(run.since_fired_s.device)
    sae.training_form_()
    sae.load_state_dict(run.sae.state_dict())
    sae.fold_input_scale_(run.scale)
    if not sae.unit_norm_decoder:
        sae.unit_decoder_rows_()
    return sae.eval()


def save_folded(run: Run) -> None:
    """sae.safetensors: the SAE that takes raw activations; config.json records the input scale folded in."""
    run.folder.write_weights(folded_sae(run).state_dict())
    config = run.folder.read_config()
    if config["train"].get("input_scale") != run.scale:
        config["train"]["input_scale"] = run.scale
        run.folder.write_config(config)


# --- the end ---

@torch.inference_mode()
def evaluate(sae: SAE, split: TokenSplit, batch_size: int, max_tokens: int) -> dict:
    """Validation metrics on raw activations of held-out images."""
    device = sae.W_enc.device
    acc = MetricsAccumulator(sae.d_model, sae.d_sae)
    for x_bd in split.val_batches(batch_size, max_tokens):
        x_bd = x_bd.to(device)
        codes_bs = sae.encode(x_bd)
        acc.add(x_bd, sae.decode(codes_bs), codes_bs)
    m = acc.result()
    return {"nmse": m.nmse, "l0": m.l0, "dead_frac": m.dead_frac, "dense_frac": m.dense_frac,
            "explained_variance": m.explained_variance, "n_tokens": m.n_tokens}


def finish_run(cfg: TrainConfig, run: Run, split: TokenSplit, shards: Shards) -> None:
    """Validation metrics, metrics.json and curves.png (the SAE was saved with the last checkpoint); the
    previous checkpoint, kept only in case the last was damaged, goes."""
    metrics = evaluate(folded_sae(run), split, cfg.batch_size, cfg.val_tokens)
    metrics["tokens_trained"] = run.step * cfg.batch_size
    metrics["dead_frac_train"] = dead_frac(run, metrics["tokens_trained"], split.n_train_tokens)
    plot_curves(run.folder.read_log(), run.folder.curves_fpath, title=run.dpath.name)
    run.folder.write_metrics(metrics)
    shutil.rmtree(run.dpath / "checkpoint.old", ignore_errors=True)


# --- small helpers ---

def dead_frac(run: Run, tokens: int, epoch_tokens: int) -> float:
    """Share of latents silent for the last dead_tokens training tokens, or for one pass over the training
    tokens (`epoch_tokens`) or the whole run (`tokens` so far) when either is shorter."""
    return float((run.since_fired_s >= min(run.settings.dead_tokens, epoch_tokens, tokens)).float().mean())


def resolve_device(name: str) -> torch.device:
    """auto: cuda (the GPU of this process's LOCAL_RANK under torchrun), else mps, else cpu."""
    return dist.pick_device(name)


def adam_impl(device: torch.device) -> dict:
    """The fused Adam kernel (one pass over each tensor) where this torch has it for the device."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


def check_shared(cfg: TrainConfig) -> None:
    cfg.validate()
    check_out_dpath(cfg.out)
    if cfg.log_to != "none" and importlib.util.find_spec(cfg.log_to) is None:
        raise TraitscopeError(f"--log-to {cfg.log_to} needs the {cfg.log_to} package (pip install {cfg.log_to})")


def progress_bar(cfg: TrainConfig, start_step: int, n_steps: int):
    if cfg.quiet:
        return None
    from tqdm import tqdm

    return tqdm(total=n_steps * cfg.batch_size, initial=start_step * cfg.batch_size, unit="tok", unit_scale=True,
                dynamic_ncols=True, smoothing=0.1, mininterval=1.0)


def postfix(runs: list[Run]) -> str:
    """loss, L0 and NMSE of the latest logging window of each SAE (compact for several)."""
    records = [run.last_record or {} for run in runs]
    if len(runs) == 1:
        r = records[0]
        return "failed" if runs[0].failed else f"loss {r.get('loss', 0):.4g} L0 {r.get('l0', 0):.1f} nmse {r.get('nmse', 0):.3f}"
    nmse = ",".join("failed" if run.failed else f"{r.get('nmse', 0):.3f}" for run, r in zip(runs, records))
    l0 = ",".join(f"{r.get('l0', 0):.1f}" for r in records)
    return f"nmse {nmse} L0 {l0}"


def make_logger(log_to: str, run: Run):
    """A function taking metric records (None closes it), or None: TensorBoard / W&B only when asked."""
    if log_to == "none":
        return None
    if log_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run.dpath / "tensorboard"))

        def log_tb(record):
            if record is None:
                writer.close()
                return
            for key, value in record.items():
                if key not in ("step",) and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, record["step"])
        return log_tb
    import wandb

    wb = wandb.init(project="traitscope", name=run.dpath.name, dir=str(run.dpath), reinit=True,
                    config=run.settings.flat())

    def log_wandb(record):
        if record is None:
            wb.finish()
        else:
            wb.log(record, step=record["step"])
    return log_wandb


class _InterruptFlag:
    """Ctrl-C during training finishes the current step and checkpoints; a second Ctrl-C stops at once."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def is_set(self) -> bool:
        return self._event.is_set()

    def _handler(self, signum, frame):
        if self._event.is_set():
            raise KeyboardInterrupt
        self._event.set()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
