"""The demo's HTML report: Pareto plot, metrics, trait alignment against baselines, feature heatmaps.

Every number is printed next to what it was measured on: the model, the data, the token budget and
the held-out images. Pictures are PNG files beside report.html, drawn with traitscope.viz.
"""

import html
from pathlib import Path

import numpy as np
from PIL import Image

from traitscope.backbones import Preprocess
from traitscope.features.alignment import COLUMNS, HEADLINE, SET_SIZE, compare, headline, summarise
from traitscope.features.ranking import RANKINGS
from traitscope.images.source import load_image
from traitscope.runs import RunFolder
from traitscope.shards import Shards
from traitscope.train.config import TrainConfig
from traitscope.viz.heatmap import image_grid, overlay_heatmap
from traitscope.files import atomic_open, atomic_write_bytes

N_GRID_IMAGES = 8
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.facts { background: #f4f4f0; padding: 0.8em 1.2em; border-left: 4px solid #b35900; }
.feature { display: inline-block; margin: 0.6em 1em 0.6em 0; vertical-align: top; }
code { background: #eee; padding: 0.1em 0.3em; }
img.plot { max-width: 640px; }
"""


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return "n/a" if np.isnan(v) else f"{v:.3f}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def feature_grid(shards: Shards, inf, feature: int, n_images: int = N_GRID_IMAGES) -> Image.Image:
    """A feature's top images with its activation map over each (one colour scale for all)."""
    preprocess = Preprocess.from_dict(shards.manifest["preprocess"])
    top = inf.top_images(feature)[:n_images]
    vmax = max((v for _, v in top), default=1.0)
    tiles = []
    for slot, (row, _) in enumerate(top):
        image = load_image(shards.image_fpath(row))  # upright, as the model saw it
        tiles.append(overlay_heatmap(image, inf.patch_map(feature, slot), preprocess, vmax=vmax, max_side=256))
    return image_grid(tiles + [None] * (n_images - len(tiles)), n_cols=n_images // 2, cell=150)


def alignment_verdict(summaries: list) -> str:
    """Plain sentences: does the SAE beat each baseline, scored the same way, in each scoring?"""
    lines = headline(summaries, "patch")
    if not lines:
        return ""
    text = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    text += "".join(f"<li>Secondary view. {html.escape(line)}</li>" for line in headline(summaries, "patch", ("set",)))
    if any(c.outcome != "beats" for c in compare(summaries) if c.level == "patch" and c.scoring in HEADLINE):
        text += ("<li>Where the SAE does not beat a baseline: the demo trains small SAEs briefly on few images; "
                 "longer training on more images, wider dictionaries and Matryoshka SAEs are the levers. "
                 "<code>python benchmarks/study_alignment.py</code> runs a larger study (1000 images) and prints "
                 "the same comparison.</li>")
    return f"<ul>{text}</ul>"


MOSTLY_DEAD = 0.5
"""Share of latents silent on the held-out images above which the report explains a run's dead share."""


def mostly_dead_note(points) -> str:
    """A paragraph on the runs of the sweep most of whose latents never fire on the held-out images."""
    dead = [p for p in points if p.dead_frac > MOSTLY_DEAD and p.d_sae]
    if not dead:
        return ""
    runs = "; ".join(f"{p.run} ({p.setting}): {round(p.dead_frac * p.d_sae):,} of {p.d_sae:,}" for p in dead)
    return (f"<p>Most latents never fire on the held-out images in {html.escape(runs)}. At a small k a dictionary "
            "can be wider than the data uses: on the synthetic set at k = 8, 768 latents reconstruct as well as "
            "3,072 (held-out NMSE 0.194 against 0.195) with 5% of them dead instead of 86%, and the 3,072-latent "
            "run, dead latents and all, covers as many traits in dense scores as the k = 16 one (64%). "
            "docs/training.md, \"Dead latents on low-dimensional data\", has the measurements.</p>")


def features_to_look_at(inf, n: int = N_GRID_IMAGES) -> np.ndarray:
    """For unlabelled images: the `n` features that fire on the most images among those that fire on
    at least 3 images and at most a quarter of them (rarer ones may be coincidences, commoner ones
    the background)."""
    n_fired = np.rint(np.asarray(inf.array("feature_image_freq"), np.float64) * inf.n_images)
    candidates = np.flatnonzero((n_fired >= 3) & (n_fired <= max(3, inf.n_images / 4)))
    return candidates[np.argsort(-n_fired[candidates], kind="stable")][:n]


def write_report(cfg, shards: Shards, train_cfg: TrainConfig, points: list, best, out: Path) -> Path:
    """report.html in `out`, for the sweep's `points` (Pareto rows) and the aligned run `best`."""
    run_config = RunFolder(best.dpath).read_config()
    n_val = len(run_config["train"]["val_rows"])
    n_train_tokens = run_config["train"]["n_train_tokens"]
    model = shards.model
    held = f"{n_val} held-out images (never trained on)"

    facts = f"""<div class="facts">
<b>Model:</b> {html.escape(model['description'])} (<code>{html.escape(model['name'])}</code>), block {shards.layers[0]}
of {model['n_layers']} (patch tokens, d_model {shards.d_model(shards.layers[0])}).<br>
<b>Data:</b> {shards.n_images} images from <code>{html.escape(cfg.images or f'synthetic:{cfg.n_images}:{cfg.seed}')}</code>
({shards.manifest['n_skipped']} skipped); {shards.n_patches(shards.layers[0])} patches per image.<br>
<b>Training:</b> {train_cfg.tokens:,} tokens per SAE ({train_cfg.tokens / n_train_tokens:.1f} epochs of
{n_train_tokens:,} training tokens), all SAEs in one pass, seed {train_cfg.seed}.<br>
<b>Held out:</b> {held}: every metric and AP below is measured on them.
</div>"""

    pareto_rows = [[p.run, p.variant, p.setting, p.l0, p.nmse, p.dead_frac,
                    p.dead_frac_train, "yes" if p.on_frontier else ""] for p in points]
    pareto = _table(["run", "variant", "sparsity", "L0", "NMSE", "dead (held-out)", "dead (training)", "frontier"],
                    pareto_rows) + mostly_dead_note(points)

    metric_rows = [[name, m.nmse, m.explained_variance, m.l0, m.dead_frac, m.dense_frac, m.n_codes]
                   for name, m in best.metrics.items()]
    metrics = _table(["method", "NMSE", "explained var.", "L0", "dead", "dense", "codes"], metric_rows)

    if not best.alignment:
        return _write(out, _page(cfg, shards, best, out, facts, pareto, metrics, held, _unlabelled(shards, best, out)))
    patch = [r for r in best.alignment if r.level == "patch"]
    summaries = summarise(patch)
    by = {(s.method, s.scoring): s for s in summaries}
    summary_rows = []
    for method in dict.fromkeys(s.method for s in summaries):
        row = [method]
        for scoring in COLUMNS:
            s = by.get((method, scoring))
            row += [s.mean_ap, "n/a" if np.isnan(s.coverage) else f"{s.coverage:.0%}"] if s else ["", ""]
        summary_rows.append(row + [next(s.n_labels for s in summaries if s.method == method)])
    summary = _table(["method", *(f"{s}: {what}" for s in COLUMNS for what in ("mean AP", "coverage")), "labels"],
                     summary_rows)
    verdict = alignment_verdict(summaries)

    columns = [(scoring, m, title) for scoring, cols in COLUMNS.items() for m, title in cols
               if any((r.method, r.scoring) == (m, scoring) for r in patch)]
    label_rows = []
    for label in dict.fromkeys(r.label for r in patch):
        cells = {(r.method, r.scoring): r for r in patch if r.label == label}
        any_row = next(iter(cells.values()))
        label_rows.append([label + (" (dominant)" if any_row.dominant else ""), any_row.base_rate]
                          + [cells[m, s].ap if (m, s) in cells else float("nan") for s, m, _ in columns])
    per_label = _table(["label", "base rate"] + [f"{title} AP" for _, _, title in columns], label_rows)

    figures_dpath = out / "figures"
    figures_dpath.mkdir(exist_ok=True)
    tiles = []
    for s in best.alignment:
        if (s.method, s.scoring) != ("sae", "sparse") or s.dominant or not s.feature or s.level != "patch":
            continue
        feature = int(s.feature)
        fpath = figures_dpath / f"feature-{feature}.png"
        with atomic_open(fpath, "wb") as f:
            feature_grid(shards, best.inference, feature).save(f, format="PNG")
        tiles.append(f"""<div class="feature"><b>{html.escape(s.label)}</b>: feature {feature},
held-out AP {s.ap:.3f}, purity@16 {s.purity:.2f}<br><img src="{fpath.relative_to(out)}"></div>""")

    alignment = f"""<h2>Trait alignment</h2>
<p>For each trait label, the single feature with the best average precision on training patches;
its AP on the {held} is reported. Coverage is the share of labels whose held-out AP is at least 0.5.
Every method is scored two ways, and only like is compared with like. <b>Dense scores</b> rank every
patch: the SAE's pre-activations, the dense dimensions, PCA projections and k-means negative distance.
<b>Sparse scores</b> rank only the patches where a feature fires and tie the rest at zero: the SAE's
codes, the dense dimensions and PCA projections keeping each patch's L0 largest signed values (L0 = the
SAE's mean active latents per patch), and the k-means hard assignment.
The probe (logistic regression on the dense activations) is a ceiling, not a competitor. Dominant labels
(background) are left out of the means: their AP is high by base rate alone. A secondary view, <b>sets</b>,
gives each label its best {SET_SIZE} sparse features together (a patch scores the largest of them, each
scaled to its training maximum; for k-means, a union of clusters), for a trait the dictionary has split
into several features.</p>
{summary}
{verdict}
<h3>Per label ({html.escape(best.dpath.name)})</h3>
{per_label}
<h2>Best-aligned features</h2>
<p>The {N_GRID_IMAGES} {RANKINGS["max"]} (an image's strongest patch) of each label's feature, with its
activation drawn over the patches the model saw (one colour scale per feature).</p>
{''.join(tiles)}
"""
    return _write(out, _page(cfg, shards, best, out, facts, pareto, metrics, held, alignment))


def _unlabelled(shards: Shards, best, out: Path) -> str:
    """The report's second half for images without labels: no alignment, the features to look at first."""
    figures_dpath = out / "figures"
    figures_dpath.mkdir(exist_ok=True)
    freq = np.asarray(best.inference.array("feature_image_freq"))
    tiles = []
    for feature in features_to_look_at(best.inference):
        fpath = figures_dpath / f"feature-{feature}.png"
        with atomic_open(fpath, "wb") as f:
            feature_grid(shards, best.inference, int(feature)).save(f, format="PNG")
        tiles.append(f"""<div class="feature"><b>feature {feature}</b>: fires on {freq[feature]:.0%} of the
images<br><img src="{fpath.relative_to(out)}"></div>""")
    return f"""<h2>Trait alignment: skipped</h2>
<p>These images have no labels (<code>{html.escape(shards.manifest["images_root"])}</code>), so no feature
can be scored against known traits and there is no alignment table. To score features, make the images'
shards with labels: a folder per class (<code>--labels folders</code>), a CSV, or segmentation masks
(<code>--masks</code>); see docs/tutorial.md.</p>
<h2>Features to look at first</h2>
<p>No labels to rank by, so these are the {len(tiles)} features that fire on the most images among those
firing on at least 3 images and at most a quarter of them (rarer ones may be coincidences, commoner
ones the background). The {N_GRID_IMAGES} {RANKINGS["max"]} (an image's strongest patch) of each, with
its activation drawn over the patches the model saw (one colour scale per feature). Judge them yourself; the app shows every feature.</p>
{''.join(tiles) or "<p>No feature fires on between 3 images and a quarter of them.</p>"}
"""


def _page(cfg, shards: Shards, best, out: Path, facts: str, pareto: str, metrics: str, held: str,
          second_half: str) -> str:
    app_cmd = f"traitscope app --runs {out / 'runs'} --shards {shards.dpath}"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>traitscope demo report</title>
<style>{STYLE}</style></head><body>
<h1>traitscope demo: traits found by sparse autoencoders</h1>
{facts}
<h2>Sparsity against reconstruction error</h2>
<p>Each SAE of the sweep on the {held}: L0 (active latents per token) against NMSE. Runs on the
frontier are not beaten on both at once.</p>
<img class="plot" src="pareto.png">
{pareto}
<h2>Held-out reconstruction: {html.escape(best.dpath.name)} against baselines</h2>
<p>The run scored from here on is the {html.escape(cfg.variant)} SAE with k = {cfg.scored_k}, chosen before looking at
any score.
Baselines need no SAE: the dense dimensions themselves, PCA and k-means fitted on training tokens.</p>
{metrics}
{second_half}<h2>Explore further</h2>
<p>Browse every feature, compare runs and take the blind test in the app:</p>
<pre>{html.escape(app_cmd)}</pre>
</body></html>
"""


def _write(out: Path, page: str) -> Path:
    report_fpath = out / "report.html"
    atomic_write_bytes(report_fpath, page.encode())
    return report_fpath
