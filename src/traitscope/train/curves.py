"""Training curves of one run as a PNG: loss and NMSE, L0, dead and dense fractions, throughput."""

from pathlib import Path

from traitscope.files import atomic_open


def plot_curves(records: list[dict], fpath: Path, title: str = "") -> None:
    """Four panels against tokens from metrics.jsonl records (a bare Figure: no pyplot, no display)."""
    from matplotlib.figure import Figure  # here: drawn once at the end of a run, and half a second to import

    fig = Figure(figsize=(10, 6.5))
    axes = fig.subplots(2, 2, sharex=True).ravel()
    tokens = [r["tokens"] for r in records]
    panels = [
        ("loss and NMSE (batch)", ("loss", "nmse", "auxk"), True),
        ("L0 (active latents per token)", ("l0",), False),
        ("dead / dense latents (fraction)", ("dead_frac", "dense_frac"), False),
        ("tokens per second", ("tokens_per_s",), False),
    ]
    for ax, (label, keys, log_y) in zip(axes, panels):
        for key in keys:
            points = [(t, r[key]) for t, r in zip(tokens, records) if r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=key, linewidth=1.2)
        if log_y and any(r.get("loss", 0) > 0 for r in records):
            ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in axes[2:]:
        ax.set_xlabel("training tokens")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_open(fpath, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
