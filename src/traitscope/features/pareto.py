"""Which SAE runs are worth keeping: the Pareto frontier of sparsity (L0) against error (NMSE).

A run is on the frontier when no other run is at least as good on both (L0 and NMSE no higher) and
strictly better on one. Reads local run folders only (config.json + metrics.json): no account, no
network.
"""

import csv
import math
from pathlib import Path
from typing import NamedTuple

from traitscope import runs
from traitscope.errors import TraitscopeError
from traitscope.files import atomic_open
from traitscope.sae import describe_params


class RunPoint(NamedTuple):
    """One run's row of the frontier table."""

    run: str
    """Run folder, relative to the folder searched."""
    variant: str
    k: int | None
    """Active latents per token (TopK family)."""
    l1_coeff: float | None
    """λ of the L1 penalty (ReLU/L1)."""
    d_sae: int | None
    l0: float
    nmse: float
    dead_frac: float
    """Latents that never fire on the held-out tokens (an overestimate when they are few)."""
    dead_frac_train: float
    """Latents silent at the end of training (the last dead_tokens tokens, at most one pass over the data)."""
    on_frontier: bool = False
    setting: str = ""
    """The sparsity setting as the variant words it (k=32, λ=5, ...)."""


def find_points(runs_dpath: str | Path) -> tuple[list[RunPoint], list[str]]:
    """Every finished run folder at any depth under `runs_dpath` (itself included; see `traitscope.runs.find_runs`).

    Returns the points and a note for each folder skipped (a run without final metrics yet).
    """
    found = runs.find_runs(runs_dpath, max_depth=None)
    points, skipped = run_points(found.runs)
    return points, [why for _, why in found.unusable] + skipped


def run_points(folders: list[runs.RunFolder]) -> tuple[list[RunPoint], list[str]]:
    """The points of the finished runs among `folders`, and a note for each one skipped."""
    points, skipped = [], []
    for run in folders:
        try:
            metrics = run.read_metrics()
        except TraitscopeError as err:
            skipped.append(str(err))
            continue
        if metrics is None:
            skipped.append(f"{run.dpath}: no {runs.METRICS_FNAME} (unfinished run?)")
            continue
        missing = [key for key in ("l0", "nmse") if key not in metrics]
        if missing:
            skipped.append(f"{run.dpath}: {runs.METRICS_FNAME} lacks {', '.join(missing)}")
            continue
        sae = run.sae_config
        points.append(RunPoint(run=run.name, variant=str(sae.get("variant", "?")), k=sae.get("k"),
                               l1_coeff=sae.get("l1_coeff"), d_sae=sae.get("d_sae"), l0=float(metrics["l0"]),
                               nmse=float(metrics["nmse"]), dead_frac=float(metrics.get("dead_frac", math.nan)),
                               dead_frac_train=float(metrics.get("dead_frac_train", math.nan)),
                               setting=describe_params(sae)))
    return points, skipped


def mark_frontier(points: list[RunPoint]) -> list[RunPoint]:
    """The points with `on_frontier` set: not dominated on (L0, NMSE), both lower-is-better."""
    def dominated(p: RunPoint) -> bool:
        return any(q.l0 <= p.l0 and q.nmse <= p.nmse and (q.l0 < p.l0 or q.nmse < p.nmse) for q in points)

    return [p._replace(on_frontier=not (math.isnan(p.l0) or math.isnan(p.nmse)) and not dominated(p))
            for p in points]


def write_csv(points: list[RunPoint], fpath: Path) -> None:
    with atomic_open(fpath, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "variant", "k", "l1_coeff", "d_sae", "l0", "nmse", "dead_frac", "dead_frac_train",
                         "on_frontier", "setting"])
        for p in points:
            writer.writerow(["" if v is None else v for v in p])


def plot(points: list[RunPoint], fpath: Path, labels: bool = False) -> None:
    """L0 (x) against NMSE (y), one colour per variant, the frontier as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    for variant in sorted({p.variant for p in points}):
        at = [p for p in points if p.variant == variant]
        ax.scatter([p.l0 for p in at], [p.nmse for p in at], label=variant, s=36, zorder=3)
    front = sorted((p for p in points if p.on_frontier), key=lambda p: p.l0)
    if front:
        ax.plot([p.l0 for p in front], [p.nmse for p in front], color="black", lw=1.2, drawstyle="steps-post",
                zorder=2, label="frontier")
        ax.scatter([p.l0 for p in front], [p.nmse for p in front], s=90, facecolors="none", edgecolors="black",
                   zorder=4)
    if labels:
        right = max((p.l0 for p in points), default=0)
        for p in points:  # the rightmost run's name goes left of its point, inside the axes
            last = p.l0 == right
            ax.annotate(p.run, (p.l0, p.nmse), fontsize=7, xytext=(-4 if last else 4, 4), textcoords="offset points",
                        ha="right" if last else "left")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("NMSE (held-out)")
    if points and min(p.l0 for p in points) > 0 and max(p.l0 for p in points) > 10 * min(p.l0 for p in points):
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Sparsity vs reconstruction error")
    fig.tight_layout()
    with atomic_open(fpath, "wb") as f:
        fig.savefig(f, format=Path(fpath).suffix.lstrip(".") or "png")
    plt.close(fig)


def frontier_table(points: list[RunPoint]) -> str:
    """Markdown table of the frontier runs, sparsest first."""
    lines = ["| run | variant | sparsity | L0 | NMSE | dead (held-out) | dead (training) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for p in sorted((p for p in points if p.on_frontier), key=lambda p: p.l0):
        lines.append(f"| {p.run} | {p.variant} | {p.setting} | {p.l0:.1f} | {p.nmse:.4f} | {p.dead_frac:.1%} | "
                     f"{p.dead_frac_train:.1%} |")
    return "\n".join(lines) + "\n"
