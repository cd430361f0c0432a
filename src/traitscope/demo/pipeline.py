"""The demo, read top to bottom: data, shards, a sweep, the Pareto plot, inference, alignment, report.

Every step reuses what an earlier run of the demo finished (content-addressed shards, finished SAE
runs, inference folders keyed by weights and shards), so a rerun or a resumed run is quick.
"""

import dataclasses
import time
from pathlib import Path
from typing import NamedTuple

from simple_parsing import field

from traitscope.backbones import load_backbone
from traitscope.cli_config import Count, comma_list
from traitscope.demo.report import write_report as write_html
from traitscope.features.alignment import LabelScore, align, write_report
from traitscope.features.enrichment import top_label_counts, write_enrichment
from traitscope.files import check_out_dpath
from traitscope.errors import TraitscopeError
from traitscope.features.heldout import baselines_for, heldout_metrics
from traitscope.features.inference import Inference, run_inference
from traitscope.features.inputs import open_inputs
from traitscope.features.pareto import RunPoint, find_points, mark_frontier, plot, write_csv
from traitscope.images import open_source
from traitscope.sae.metrics import Metrics
from traitscope.shards.build import build_shards, use_geometry
from traitscope.train.config import DEFAULT_VARIANT, RunSettings, TrainConfig, variant_fields
from traitscope.train.trainer import train

OFFLINE_MODEL = "dinov2-vits14-saliency-offline"


@dataclasses.dataclass
class DemoConfig:
    """What the demo runs on; every default works offline on a laptop-class CPU."""

    out: str = "demo-out"
    """Folder for everything the demo writes (data, shards, runs, report)."""
    images: str | None = None
    """A folder of your own images instead of the synthetic trait set (unlabelled photos work: alignment
    is skipped and the report shows the features to look at first). They are shown whole, in the 'grid'
    geometry `traitscope shards` uses by default; the synthetic set keeps the model's centre crop, which
    its objects are drawn to stay inside."""
    n_images: int = 300
    """Images of the synthetic trait set."""
    seed: int = 0
    """Seed of the synthetic set, the split and the training."""
    model: str = OFFLINE_MODEL
    """Backbone (the offline saliency-fine-tuned DINOv2 ViT-S/14 needs no model hub)."""
    layer: int = -2
    """Layer whose patch tokens are stored and modelled."""
    tokens: Count = 400_000
    """Training tokens per SAE (one pass over the data shared by the whole sweep)."""
    expansion: int = 8
    """Latents per input dimension."""
    batch_size: int = 1024
    """Tokens per optimiser step (1024: ~390 steps at half the rate for batches of 4096, held-out NMSE of k = 16
    0.160 with 12% of latents dead; at 4096, 0.165 with 18%: docs/training.md)."""
    variant: str = DEFAULT_VARIANT
    """SAE variant of the sweep, one run per k of --ks (`traitscope train`'s default, Matryoshka: on the
    synthetic traits its k = 16 run beats TopK's in both scorings, and in reconstruction; its k = 32 run
    finds more traits still: docs/alignment.md)."""
    ks: tuple[int, ...] = field(default=(8, 16, 32), type=comma_list(int))
    """Sparsities (k) of the sweep."""
    l1: float | None = None
    """λ of a ReLU/L1 SAE to add to the sweep for comparison on the Pareto plot (e.g. 5, trained at lr 5e-4:
    L1 SAEs need more steps than small data gives). Off by default: on the synthetic set it lands far
    off the frontier (held-out NMSE 0.27 at L0 151, against Matryoshka's 0.12 at L0 34) and costs about
    30% of the demo's training time (docs/alignment.md)."""
    align_k: int | None = None
    """The run of the sweep (by k) whose features are scored against the traits and drawn in the report
    (default: the largest of --ks, 32 for the default sweep: on the synthetic traits it covers 64% at
    seeds 0 and 1, as k = 16 does, with the higher mean AP in sparse scores over the two, 0.558 against
    0.527; docs/alignment.md)."""
    val_frac: float = 0.2
    """Share of images held out: every reported metric and AP is measured on them."""

    @property
    def scored_k(self) -> int:
        """k of the run whose features are scored."""
        return self.align_k if self.align_k is not None else max(self.ks)

    def validate(self) -> None:
        """Raise TraitscopeError naming the first impossible setting."""
        k_variants = variant_fields()["k"][1]  # the registered variants that take a k
        checks = [(self.n_images >= 10, f"--n-images must be at least 10, not {self.n_images}"),
                  (0 < self.val_frac < 1, f"--val-frac must lie between 0 and 1 (exclusive), not {self.val_frac:g}"),
                  (self.variant in k_variants, f"--variant must be one of {', '.join(k_variants)} (the variants "
                                               f"with a k), not {self.variant!r}"),
                  (self.ks and all(k >= 1 for k in self.ks), f"--ks must be positive counts, not {self.ks}"),
                  (self.align_k in (None, *self.ks), f"--align-k {self.align_k} is not one of --ks "
                                                      f"{','.join(map(str, self.ks))}"),
                  (self.batch_size >= 1 and self.tokens >= 1, "--batch-size and --tokens must be at least 1"),
                  (self.l1 is None or self.l1 > 0, f"--l1 must be positive, not {self.l1}")]
        for ok, message in checks:
            if not ok:
                raise TraitscopeError(message)


class RunOutcome(NamedTuple):
    """The SAE of the sweep that is scored against the traits."""

    dpath: Path
    point: RunPoint
    inference: Inference
    metrics: dict[str, Metrics]
    alignment: list[LabelScore]
    """Scores against the data set's labels; empty for unlabelled images (alignment skipped)."""


class DemoResult(NamedTuple):
    shards_dpath: Path
    runs_dpath: Path
    aligned: RunOutcome
    """The run scored against the traits."""
    report_fpath: Path


def run_demo(cfg: DemoConfig, echo=print) -> DemoResult:
    out = check_out_dpath(cfg.out)
    cfg.validate()
    out.mkdir(parents=True, exist_ok=True)
    n_steps = 5
    t0 = time.perf_counter()

    def step(i: int, what: str) -> None:
        echo(f"\n[{i}/{n_steps}] {what}  ({time.perf_counter() - t0:.0f} s so far)")

    step(1, "images and activations")
    spec = cfg.images or f"synthetic:{cfg.n_images}:{cfg.seed}"
    source = open_source(spec, cache_dpath=out / "data")
    backbone = load_backbone(cfg.model)
    if cfg.images:  # your photos: the whole of each, as `traitscope shards` shows them by default
        use_geometry(backbone, source)
    echo(f"model: {backbone.description}")
    shards = build_shards(source, backbone, [cfg.layer], out / "shards")
    del backbone
    echo(f"shards: {shards.dpath}")

    step(2, "a sweep of SAEs in one pass over the data")
    runs_dpath = out / "runs"
    train_cfg = TrainConfig(shards=str(shards.dpath), layer=cfg.layer, token_kind="patches", tokens=cfg.tokens,
                            batch_size=cfg.batch_size, seed=cfg.seed, val_frac=cfg.val_frac, out=str(runs_dpath),
                            checkpoint_every=cfg.tokens // 4)
    settings = [RunSettings(variant=cfg.variant, k=k, expansion=cfg.expansion) for k in cfg.ks]
    if cfg.l1 is not None:
        settings.append(RunSettings(variant="relu", l1_coeff=cfg.l1, expansion=cfg.expansion, lr=5e-4))
    results = train(train_cfg, settings, echo=echo)
    failed = [r for r in results if r.status not in ("trained", "already trained")]
    if failed:
        raise RuntimeError(f"{len(failed)} SAE run(s) did not finish: {failed[0].dpath}: {failed[0].message}")

    step(3, "Pareto frontier: sparsity against reconstruction error")
    points, _ = find_points(runs_dpath)
    points = mark_frontier(points)
    write_csv(points, out / "pareto.csv")
    plot(points, out / "pareto.png", labels=True)
    by_dpath = {(runs_dpath / p.run).resolve(): p for p in points}

    step(4, "inference for every run; held-out metrics and trait alignment next to the baselines")
    inferences = {r.dpath: run_inference(r.dpath, shards.dpath)[0] for r in results}
    chosen = results[cfg.ks.index(cfg.scored_k)]
    inputs = open_inputs(chosen.dpath, shards.dpath)
    inf = inferences[chosen.dpath]
    baselines, info = baselines_for(inputs, inf, progress=True)
    metrics, _ = heldout_metrics(inputs, inf, baselines, info)
    if shards.patch_label_names or shards.image_label_names:
        rows = align(inputs, inf, baselines, progress=True)
        write_report(rows, inf.dpath / "alignment.csv", inf.dpath / "alignment.md")
        write_enrichment(top_label_counts(inf, shards), inf.dpath / "enrichment.csv")
    else:
        rows = []
        echo(f"alignment skipped: {spec} has no labels; the report shows the features to look at first instead")
    aligned = RunOutcome(chosen.dpath, by_dpath[chosen.dpath.resolve()], inf, metrics, rows)

    step(5, "report")
    report_fpath = write_html(cfg, shards, train_cfg, points, aligned, out)
    echo(f"\ndone in {time.perf_counter() - t0:.0f} s")
    return DemoResult(shards.dpath, runs_dpath, aligned, report_fpath)

