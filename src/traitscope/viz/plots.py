"""Small matplotlib charts rendered to PIL images (a bare Figure: no pyplot, no display, no global state)."""

import io
from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image


def figure_to_image(fig: Figure) -> Image.Image:
    """Render a matplotlib figure to an RGB PIL image."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def ratings_histogram(ratings_by_kind: Mapping[str, np.ndarray], levels: range = range(1, 8),
                      title: str = "Ratings by kind") -> Image.Image:
    """Grouped bar chart: how often each rating level was given, one bar colour per kind."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    kinds = list(ratings_by_kind)
    width = 0.8 / max(1, len(kinds))
    levels_l = np.array(list(levels))
    for i, kind in enumerate(kinds):
        values = np.asarray(ratings_by_kind[kind])
        counts = [int((values == level).sum()) for level in levels_l]
        label = f"{kind} (n={len(values)}, mean={values.mean():.2f})" if len(values) else f"{kind} (n=0)"
        ax.bar(levels_l + (i - (len(kinds) - 1) / 2) * width, counts, width, label=label)
    ax.set_xticks(levels_l)
    ax.set_xlabel("rating (1 = not consistent, 7 = very consistent)")
    ax.set_ylabel("count")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    if kinds:
        ax.legend()
    return figure_to_image(fig)
