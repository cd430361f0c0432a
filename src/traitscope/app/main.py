"""The feature explorer, a Streamlit script started by `traitscope app` (see cli.py).

Pages: Features (browse one run's features), Compare runs (two side by side), Image (which features
fire where in a dataset image or an uploaded one) and Blind test. Data access lives in data.py;
pictures come from traitscope.viz, so the app shows exactly what the reports show.
Arguments follow `--` on the streamlit command line, or come as a JSON list in TRAITSCOPE_APP_ARGS
(how tests pass them to Streamlit's AppTest).
"""

import argparse
import base64
import html
import io
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlencode

import numpy as np
import pandas as pd
import streamlit as st

from traitscope.app import atlas, blind
from traitscope.app.cli import images_roots
from traitscope.app.data import (MIN_SUPPORT, Dataset, FeatureData, InferenceView, LabelCooccurrence, Run, dense_top_images,
                                 _cache_dpath, find_run_folders, label_cooccurrence, open_image_file, parse_int,
                                 sae_top_rows)
from traitscope.errors import TraitscopeError
from traitscope.features.alignment import COLUMNS, alignment_markdown, read_alignment
from traitscope.features.ranking import RANKINGS, grid_ranking
from traitscope.viz import image_grid, overlay_heatmap

PAGES = ("Atlas", "Feature", "Compare runs", "Run plots", "Image", "Blind test")
PAGE_ALIASES = {"Features": "Feature"}  # older page names in links and bookmarks
THUMB_SIDE = 256  # longer side of a heatmap thumbnail, in pixels
BROWSE_LIST = 500  # at most this many features in a browse list
STRIP_TILES, STRIP_SIDE = 6, 104
TILE_SIDE = {1: 900, 2: 520, 3: 400, 4: 300, 5: 240, 6: 200}  # feature-page tile side (pixels) by tiles per row  # tiles per atlas strip, and their side in pixels


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="traitscope app (streamlit script)")
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--shards", type=Path, nargs="+", required=True)
    parser.add_argument("--ratings", type=Path, default=Path("ratings"))
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--max-on-the-fly", type=int, default=5000)
    parser.add_argument("--images-root", nargs="+", default=None)
    env = os.environ.get("TRAITSCOPE_APP_ARGS")
    return parser.parse_args(json.loads(env) if env else sys.argv[1:])


# ---------------------------------------------------------------------------------------------
# Cached access: opened once per server process, memory-mapped


def get_dataset(dpath: str) -> Dataset:
    roots = dict(zip([p.resolve() for p in ARGS.shards], images_roots(ARGS.shards, ARGS.images_root)))
    root = roots.get(Path(dpath).resolve())
    return open_dataset(dpath, None if root is None else str(root))


@st.cache_resource(show_spinner=False)
def open_dataset(dpath: str, images_root: str | None) -> Dataset:
    return Dataset(dpath, images_root)


@st.cache_resource(show_spinner=False, ttl=30)
def get_runs(runs_dpath: str) -> tuple[list[Run], list[tuple[str, str]]]:
    return find_run_folders(runs_dpath)


@st.cache_resource(show_spinner=False)
def get_inference(dpath: str, mtime: float) -> InferenceView:
    return InferenceView(dpath)


def inference_of(run: Run, dataset: Dataset) -> InferenceView | None:
    if not run.has_inference(dataset.hash):
        return None
    dpath = run.inference_dpath(dataset.hash)
    return get_inference(str(dpath), (dpath / "manifest.json").stat().st_mtime)


@st.cache_resource(show_spinner="Counting labels among each feature's images ...")
def get_enrichment(inference_dpath: str, mtime: float, dataset_dpath: str, cache: str) -> LabelCooccurrence:
    return label_cooccurrence(get_inference(inference_dpath, mtime), get_dataset(dataset_dpath), Path(cache))


def enrichment_of(inference: InferenceView, dataset: Dataset) -> LabelCooccurrence | None:
    if not dataset.labels()[0]:
        return None
    mtime = (inference.dpath / "manifest.json").stat().st_mtime
    return get_enrichment(str(inference.dpath), mtime, str(dataset.dpath), str(ARGS.cache))


@st.cache_resource(show_spinner="Testing every feature-label pair for enrichment (once per run, dataset and "
                                "minimum support) ...", max_entries=8)
def get_label_tests(inference_dpath: str, mtime: float, dataset_dpath: str, cache: str, min_support: int):
    enrichment = get_enrichment(inference_dpath, mtime, dataset_dpath, cache)
    inference = get_inference(inference_dpath, mtime)
    key = {"what": "label-tests-p/1", "inference": inference_dpath, "mtime": mtime,
           "sae": inference.manifest.get("sae_sha256"), "shards": get_dataset(dataset_dpath).hash,
           "labels": enrichment.names, "min_support": min_support}
    return enrichment.tests(min_support, p_fpath=_cache_dpath(Path(cache), key) / "p.npy")


def label_tests_of(inference: InferenceView, dataset: Dataset, min_support: int = MIN_SUPPORT):
    """The hypergeometric tests of every (feature, label) pair, or None for a dataset without labels."""
    if not dataset.labels()[0]:
        return None
    mtime = (inference.dpath / "manifest.json").stat().st_mtime
    return get_label_tests(str(inference.dpath), mtime, str(dataset.dpath), str(ARGS.cache), int(min_support))


@st.cache_resource(show_spinner="Finding where each feature fires ...", max_entries=8)
def get_atlas_table(inference_dpath: str, mtime: float, dataset_dpath: str, cache: str) -> pd.DataFrame:
    inference, dataset = get_inference(inference_dpath, mtime), get_dataset(dataset_dpath)
    peaks = atlas.peak_positions(inference, Path(cache))
    tests = label_tests_of(inference, dataset)
    return atlas.feature_table(inference, peaks, tests)


@st.cache_resource(show_spinner="Laying out the dictionary (t-SNE of the decoder directions, once per run) ...",
                   max_entries=4)
def get_decoder_map(run_dpath: str, sae_sha256: str, cache: str) -> np.ndarray:
    return atlas.decoder_map(get_sae(run_dpath).W_dec.detach().numpy(), sae_sha256, Path(cache))


@st.cache_resource(show_spinner=False, max_entries=4)
def get_sae(run_dpath: str):
    from traitscope.sae import load_sae
    return load_sae(run_dpath)


@st.cache_resource(show_spinner="Loading the backbone ...", max_entries=2)
def get_backbone(dataset_dpath: str):
    from traitscope.app.encode import load_dataset_backbone
    return load_dataset_backbone(get_dataset(dataset_dpath))


def jpeg_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode()


class TileView(NamedTuple):
    """How a feature page draws its tiles (kept in the URL, so a link or a reload shows the same)."""

    alpha: float = 0.6
    """Heat opacity at the top of the scale (0: the bare image)."""
    shared: bool = True
    """One colour scale for all tiles (the feature's largest activation) rather than one per tile."""
    zoom: bool = True
    """Cut each tile to where the feature fires rather than the whole image."""
    beside: bool = False
    """The bare image beside each heatmap."""
    cols: int = 3
    """Tiles per row."""

    @classmethod
    def from_query(cls) -> "TileView":
        q, d = st.query_params, cls()
        alpha = parse_int(q.get("alpha"), 0, 101)
        cols = parse_int(q.get("cols"), 1, 7)
        return cls(d.alpha if alpha is None else alpha / 100, q.get("scale", "shared") != "tile",
                   q.get("zoom", "1") != "0", q.get("beside", "0") == "1", d.cols if cols is None else cols)

    def query(self) -> dict[str, str]:
        return {"alpha": str(round(self.alpha * 100)), "scale": "shared" if self.shared else "tile",
                "zoom": "1" if self.zoom else "0", "beside": "1" if self.beside else "0", "cols": str(self.cols)}


def image_name(dataset: Dataset, row: int) -> str:
    """An image's path, or its row where the files are unknown (saev shards without --images-root)."""
    return dataset.images[row]["path"] or f"image row {int(row)}"


@st.cache_data(show_spinner=False, max_entries=256)
def feature_tiles(inference_dpath: str, mtime: float, dataset_dpath: str, feature: int,
                  view: TileView = TileView()) -> list[dict]:
    """Heatmap tiles of a feature's top images, best first: base64 JPEG (and of the bare image when
    `view.beside`), path, row, label, value and the top of the tile's colour scale."""
    inference, dataset = get_inference(inference_dpath, mtime), get_dataset(dataset_dpath)
    fd = inference.feature(feature)
    shared_vmax = float(fd.values.max(initial=0.0)) or None
    side = TILE_SIDE[view.cols]
    tiles = []
    for row, value, acts_hw in zip(fd.rows, fd.values, fd.maps_nhw):
        vmax = shared_vmax if view.shared else (float(acts_hw.max(initial=0.0)) or None)
        tile = {"row": int(row), "value": float(value), "path": image_name(dataset, row),
                "label": dataset.images[row].get("label"), "vmax": vmax}
        try:
            tile["b64"] = jpeg_b64(atlas.tile_images(dataset, [row], [acts_hw], vmax, side, view.zoom,
                                                     view.alpha)[0])
            if view.beside and fd.has_patch_maps:
                tile["b64_bare"] = jpeg_b64(atlas.tile_images(dataset, [row], [acts_hw], vmax, side, view.zoom,
                                                              view.alpha, heat=False)[0])
        except TraitscopeError as err:
            tile["error"] = "image file unknown" if dataset.images_unknown else str(err)
        tiles.append(tile)
    return tiles


@st.cache_data(show_spinner=False, max_entries=16)
def full_resolution(inference_dpath: str, mtime: float, dataset_dpath: str, feature: int, slot: int,
                    alpha: float, shared: bool) -> tuple[bytes, bytes | None]:
    """(bare image, heatmap over it or None for image-level runs) at full resolution, as JPEG bytes."""
    inference, dataset = get_inference(inference_dpath, mtime), get_dataset(dataset_dpath)
    fd = inference.feature(feature)
    image = dataset.open_image(int(fd.rows[slot]))
    out = [image]
    if fd.has_patch_maps:
        vmax = float((fd.values if shared else fd.maps_nhw[slot]).max(initial=0.0)) or None
        out.append(overlay_heatmap(image, fd.maps_nhw[slot], dataset.preprocess, vmax=vmax, max_alpha=alpha))
    encoded = []
    for im in out:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=92)
        encoded.append(buf.getvalue())
    return encoded[0], (encoded[1] if len(encoded) > 1 else None)


@st.cache_data(show_spinner=False, max_entries=256)
def blind_grid_png(dataset_dpath: str, rows: tuple[int, ...]) -> bytes:
    """A 4x4 grid of the crops the model saw, as PNG bytes (no heatmap: the kind must not show)."""
    dataset = get_dataset(dataset_dpath)
    crops = [dataset.preprocess.crop_image(dataset.open_image(r)) for r in rows if r >= 0]
    buf = io.BytesIO()
    image_grid(crops[:16], n_cols=4, cell=180, pad=3).save(buf, format="PNG")
    return buf.getvalue()


@st.cache_data(show_spinner=False, max_entries=2048)
def strip_tiles(inference_dpath: str, mtime: float, dataset_dpath: str, feature: int, n: int,
                side: int) -> list[dict]:
    """An atlas strip: the feature's n best images zoomed to where it fires, one colour scale (its max)."""
    inference, dataset = get_inference(inference_dpath, mtime), get_dataset(dataset_dpath)
    fd = inference.feature(feature)
    rows, maps = fd.rows[:n], fd.maps_nhw[:n]
    vmax = float(fd.values.max(initial=0.0)) or None
    tiles = []
    for row, value, acts_hw in zip(rows, fd.values, maps):
        tile = {"row": int(row), "value": float(value), "path": image_name(dataset, row)}
        try:
            tile["b64"] = jpeg_b64(atlas.tile_images(dataset, [row], [acts_hw], vmax, side, zoom=True, alpha=0.6)[0])
        except TraitscopeError as err:
            tile["error"] = "image file unknown" if dataset.images_unknown else str(err)
        tiles.append(tile)
    return tiles


# ---------------------------------------------------------------------------------------------
# Small views


def tiles_html(tiles: list[dict], n_cols: int = 4, enlarge: dict | None = None) -> str:
    """A grid of images; hovering shows the path and numbers; clicking one reveals its path, or with
    `enlarge` (the page's query) opens it at full resolution."""
    cells = []
    for i, t in enumerate(tiles):
        path = html.escape(str(t["path"]))
        scale = f"; colour scale 0 to {t['vmax']:.3g}" if t.get("vmax") else ""
        caption = t.get("caption") or (f'#{i + 1} · <span title="its largest activation in this image{scale}" '
                                       f'style="border-bottom:1px dotted #999">max {t["value"]:.3g}</span>')
        if t.get("label"):
            caption += f" · {html.escape(str(t['label']))}"
        style = "width:100%;object-fit:contain;background:#f0f0f0"
        if "b64" in t:
            picture = f'<img src="data:image/jpeg;base64,{t["b64"]}" title="{path}" alt="{path}" style="{style}">'
            if "b64_bare" in t:
                picture = (f'<div style="display:flex;gap:2px"><img class="ts-bare" src="data:image/jpeg;base64,'
                           f'{t["b64_bare"]}" title="the same without heat" alt="{path}" style="width:50%">'
                           + picture.replace("width:100%", "width:50%") + "</div>")
        else:
            picture = f'<div style="padding:2em;background:#eee" title="{path}">{html.escape(t["error"])}</div>'
        if enlarge is not None:
            href = "?" + urlencode({**enlarge, "enlarge": i})
            cells.append(f'<div class="ts-tile"><a href="{href}" target="_self" title="open at full resolution">'
                         f'{picture}</a><div style="font-size:0.8em">{caption}</div>'
                         f'<code class="ts-path" style="font-size:0.7em;word-break:break-all">{path}</code></div>')
        else:
            cells.append(f'<details class="ts-tile" style="margin:0"><summary style="list-style:none;cursor:pointer">'
                         f'{picture}<div style="font-size:0.8em">{caption}</div></summary>'
                         f'<code class="ts-path" style="font-size:0.75em;word-break:break-all">{path} (row {t["row"]})'
                         f'</code></details>')
    return (f'<div class="ts-grid" style="display:grid;grid-template-columns:repeat({n_cols},1fr);gap:8px">'
            + "".join(cells) + "</div>")


def colour_bar_html(vmax: float | None, shared: bool, alpha: float, cmap: str = "inferno") -> str:
    """A horizontal colour bar of the heat colours, saying what the ends mean and which scale is used."""
    import matplotlib

    stops = ", ".join(matplotlib.colors.to_hex(matplotlib.colormaps[cmap](v)) for v in np.linspace(0, 1, 11))
    top = f"{vmax:.3g}" if shared and vmax else "each tile's own maximum"
    what = ("one scale for all tiles: the feature's largest activation" if shared
            else "per tile: each tile coloured from 0 to its own maximum")
    return (f'<div class="ts-colourbar" style="display:flex;align-items:center;gap:8px;font-size:0.8em">'
            f'<span title="no activation: the image shows through">0</span>'
            f'<div style="width:220px;height:12px;background:linear-gradient(to right, {stops})"></div>'
            f'<span>{html.escape(top)}</span><span style="color:#666">({what}; opacity grows with the activation, '
            f'up to {alpha:.0%})</span></div>')


def feature_link(run: Run, feature: int) -> str:
    return "?" + urlencode({"page": "Feature", "run": run.name, "feature": feature})


ENRICHMENT_HELP = (f"Labels carried by at least {MIN_SUPPORT} of the images where the feature fires, most "
                   "significant first. p: one-sided hypergeometric test (that many by chance?); q: "
                   "Benjamini-Hochberg over every feature-label pair tested in this run.")
ENRICHMENT_COLUMNS = {
    "images": st.column_config.NumberColumn("images", help="images where it fires that carry the label"),
    "precision": st.column_config.NumberColumn("precision", help="share of its firing images with the label",
                                               format="%.2f"),
    "recall": st.column_config.NumberColumn("recall", help="share of the label's images where it fires",
                                            format="%.2f"),
    "lift": st.column_config.NumberColumn("lift", help="precision / the label's share of all images", format="%.2f"),
    "p": st.column_config.NumberColumn("p", help="hypergeometric p-value (one-sided)", format="%.2g"),
    "q": st.column_config.NumberColumn("q", help="Benjamini-Hochberg corrected p-value", format="%.2g"),
}


def histogram_frame(fd: FeatureData) -> pd.DataFrame:
    centres = (fd.hist_edges[:-1] + fd.hist_edges[1:]) / 2
    counts = np.asarray(fd.hist_counts)
    nz = np.flatnonzero(counts)
    lo, hi = (nz[0], nz[-1] + 1) if len(nz) else (0, len(counts))
    return pd.DataFrame({"log10 activation": np.round(centres[lo:hi], 2), "count": counts[lo:hi]}).set_index(
        "log10 activation")


def tile_controls(key: str) -> TileView:
    """The feature page's drawing settings, from and back into the URL."""
    v = TileView.from_query()
    c1, c2, c3, c4, c5 = st.columns([3, 2, 3, 3, 2])
    alpha = c1.slider("Heat opacity", 0.0, 1.0, v.alpha, 0.05, key=f"{key}-alpha",
                      help="Opacity of the heat at the top of the colour scale; 0 shows the bare image, so "
                           "colours of the specimen can be judged.")
    scale = c2.radio("Colour scale", ["shared", "per tile"], index=0 if v.shared else 1, key=f"{key}-scale",
                     help="Shared: 0 to the feature's largest activation on every tile (tiles compare). "
                          "Per tile: each tile from 0 to its own maximum (weak images show their pattern).")
    zoom = c3.toggle("Zoom to where it fires", v.zoom, key=f"{key}-zoom",
                     help="Cut each tile to the patches where the feature reaches a fifth of its maximum "
                          "in that image, with a margin; off: the whole image.")
    beside = c4.toggle("Bare image beside", v.beside, key=f"{key}-beside",
                       help="Show the same cut without heat next to each heatmap.")
    cols = c5.selectbox("Tiles per row", list(TILE_SIDE), index=list(TILE_SIDE).index(v.cols), key=f"{key}-cols")
    return TileView(float(alpha), scale == "shared", bool(zoom), bool(beside), int(cols))


def feature_view(run: Run, dataset: Dataset, inference: InferenceView, feature: int, view: TileView | None = None,
                 enlarge: dict | None = None) -> None:
    fd = inference.feature(feature)
    st.subheader(f"Feature {feature}")
    st.caption(run.title(dataset.hash))
    image_level = not fd.has_patch_maps and inference.top_patch_acts is None
    n_fire = int(inference.fire_counts()[feature])
    c1, c2, c3, c4 = st.columns(4)
    c1.metric(f"images ({fd.image_freq:.1%})", f"{n_fire}",
              help=f"Images (of {inference.n_images}) where it fires: its activation is above zero"
                   + ("." if image_level else " on at least one patch."))
    if image_level:
        c2.metric("largest code", f"{float(fd.values.max(initial=0.0)):.3g}",
                  help="Its largest value on any image (an image-level SAE: one code per image, no patches).")
        c3.metric("mean code", f"{fd.mean:.3g}", help="Its mean value over all images, zeros included.")
    else:
        c2.metric("patches where it fires", f"{fd.freq:.3%}",
                  help="Share of all patch tokens (image patches, over every image) where it is above zero.")
        c3.metric("largest activation", f"{float(fd.values.max(initial=0.0)):.3g}",
                  help="Its largest activation on any patch of any image.")
        c4.metric("mean activation", f"{fd.mean:.3g}", help="Mean over every patch token, zeros included.")
    if not len(fd.rows):
        st.info("This feature never fires on this dataset (a dead feature).")
        return
    view = view or TileView()
    mtime = (inference.dpath / "manifest.json").stat().st_mtime
    tiles = feature_tiles(str(inference.dpath), mtime, str(dataset.dpath), feature, view)
    if image_level:
        st.markdown(f"**Its {len(tiles)} {RANKINGS['max']}** (image-level SAE: the feature's value for the whole "
                    "image; there is no per-patch map to draw)")
    else:
        st.markdown(f"**Its {len(tiles)} {RANKINGS['max']}** (an image's strongest patch); heat marks the patches "
                    "where it fires" + (". Click a tile for the full-resolution image." if enlarge else ""))
        st.markdown(colour_bar_html(float(fd.values.max(initial=0.0)), view.shared, view.alpha),
                    unsafe_allow_html=True)
    st.markdown(tiles_html(tiles, view.cols, enlarge), unsafe_allow_html=True)
    st.markdown("**Activation histogram**", help="Counts of its non-zero activations on "
                + ("images" if image_level else "patches") + ", on a log10 axis.")
    st.bar_chart(histogram_frame(fd), height=180)
    tests = label_tests_of(inference, dataset)
    if tests is not None:
        table = tests.for_feature(feature)
        st.markdown("**Label enrichment** over the images where it fires: hypergeometric p, BH q",
                    help=ENRICHMENT_HELP)
        if table:
            st.dataframe(pd.DataFrame(table), hide_index=True, width="stretch", column_config=ENRICHMENT_COLUMNS)
        else:
            st.caption(f"no label on at least {tests.min_support} of the images where it fires")


def show_enlarged(dataset: Dataset, inference: InferenceView, feature: int, view: TileView) -> None:
    """The `enlarge` query parameter: one top image at full resolution, bare and with its heat."""
    fd = inference.feature(feature)
    slot = parse_int(st.query_params.get("enlarge"), 0, len(fd.rows))
    if "enlarge" in st.query_params:
        del st.query_params["enlarge"]  # shown once; closing the dialog leaves the page as it was
    if slot is None:
        return

    @st.dialog(f"Feature {feature} · top image #{slot + 1}", width="large")
    def dialog():
        mtime = (inference.dpath / "manifest.json").stat().st_mtime
        bare, heat = full_resolution(str(inference.dpath), mtime, str(dataset.dpath), feature, slot, view.alpha,
                                     view.shared)
        row = int(fd.rows[slot])
        st.caption(f"{dataset.images[row]['path']} · max activation {float(fd.values[slot]):.3g} · full resolution "
                   "(open the image in a new tab to see every pixel)")
        if heat is not None:
            st.image(heat, caption=f"heat (opacity up to {view.alpha:.0%}, "
                                   f"{'shared' if view.shared else 'per-tile'} scale)")
        st.image(bare, caption="the bare image")

    dialog()


# ---------------------------------------------------------------------------------------------
# Choosing a feature


def freq_text(inference: InferenceView, f: int) -> str:
    return f"feature {f} · in {float(inference.image_freq[f]):.2%} of images"


def pick_feature(inference: InferenceView, dataset: Dataset, key: str, initial: int | None) -> int | None:
    """Browse by index range, by frequency or by label; returns the chosen feature."""
    modes = ["index", "frequency", "label"] if dataset.labels()[0] else ["index", "frequency"]
    mode = st.radio("Browse by", modes, horizontal=True, key=f"{key}-mode")
    if mode == "index":
        feature = st.number_input(f"Feature (0-{inference.d_sae - 1})", 0, inference.d_sae - 1,
                                  initial or 0, 1, key=f"{key}-index")
        with st.expander("features around it"):
            lo = max(0, int(feature) - 10)
            idx = np.arange(lo, min(inference.d_sae, lo + 50))
            st.dataframe(pd.DataFrame({"feature": idx, "image freq": np.asarray(inference.image_freq[idx]),
                                       "patch freq": np.asarray(inference.freq[idx]),
                                       "mean": np.asarray(inference.mean[idx])}), hide_index=True, height=240)
        return int(feature)
    if mode == "frequency":
        steps = [0.0, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.25, 0.5, 1.0]
        lo, hi = st.select_slider("Fires in this fraction of images", steps, value=(1e-4, 0.5),
                                  format_func=lambda v: f"{v:.3%}".rstrip("0").rstrip("."), key=f"{key}-freq")
        order = st.radio("Order", ["most frequent first", "least frequent first"], horizontal=True,
                         key=f"{key}-order")
        features = inference.features_by_frequency(lo, hi, descending=order.startswith("most"))[:BROWSE_LIST]
        if not len(features):
            st.info("no feature in that range")
            return None
        return st.selectbox(f"{len(features)} features", features.tolist(), key=f"{key}-freqpick-{lo}-{hi}-{order}",
                            format_func=lambda f: freq_text(inference, f))
    enrichment = enrichment_of(inference, dataset)
    text = st.text_input("Search labels", key=f"{key}-search", placeholder="part of a label name")
    matches = enrichment.search(text)[:BROWSE_LIST]  # a new list starts at its best entry (keys below)
    if not matches:
        st.info("no label matches")
        return None
    label = st.selectbox(f"Labels matching ({len(matches)})", matches, key=f"{key}-label",
                         format_func=lambda j: f"{enrichment.names[j]} ({enrichment.label_counts[j]} images)")
    min_count = st.number_input("at least this many labelled images where it fires", 1, 10_000, 3,
                                key=f"{key}-min")
    features, lift = enrichment.features_for_label(label, int(min_count), BROWSE_LIST)
    if not len(features):
        st.info("no feature fires on enough images with this label")
        return None
    lift_of = dict(zip(features.tolist(), lift.tolist()))
    return st.selectbox(f"{len(features)} features, most enriched first", features.tolist(), key=f"{key}-lpick-{label}-{min_count}",
                        format_func=lambda f: f"feature {f} · lift {lift_of[f]:.2f}")


def compute_on_the_fly(run: Run, dataset: Dataset) -> None:
    """Run `traitscope inference` for this run and dataset here, with a progress bar.

    `run_inference` reports progress through its tqdm bar ('inference'); it runs in a thread here and
    the page polls that bar (tqdm keeps its live bars in `tqdm._instances`).
    """
    from tqdm import tqdm
    from traitscope.features.inference import run_inference

    result: dict = {}

    def work():
        try:
            run_inference(run.dpath, dataset.dpath, top_n=16, progress=True)
        except Exception as err:  # noqa: BLE001  (shown to the user below)
            result["error"] = err

    bar = st.progress(0.0, text="computing inference ...")
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    while thread.is_alive():
        bars = [b for b in list(getattr(tqdm, "_instances", [])) if getattr(b, "desc", "") == "inference"]
        if bars and bars[0].total:
            done = min(1.0, bars[0].n / bars[0].total)
            bar.progress(done, text=f"computing inference: {bars[0].n}/{bars[0].total} images")
        time.sleep(0.2)
    bar.empty()
    if "error" in result:
        raise result["error"]


def need_inference(run: Run, dataset: Dataset, key: str) -> InferenceView | None:
    """The run's inference over the dataset; for a small dataset without one, offer to compute it."""
    inference = inference_of(run, dataset)
    if inference is not None:
        return inference
    command = f"traitscope inference --run {run.dpath} --shards {dataset.dpath}"
    if run.can_encode(dataset) and dataset.n_images <= ARGS.max_on_the_fly:
        st.info(f"{run.name} has no inference outputs for this dataset yet ({dataset.n_images} images: "
                "small enough to compute here).")
        if st.button("Compute them now", key=f"{key}-compute"):
            compute_on_the_fly(run, dataset)
            st.rerun()
    else:
        st.warning(f"{run.name} has no inference outputs for this dataset. Compute them with:")
        st.code(command, language="bash")
    return None


# ---------------------------------------------------------------------------------------------
# Pages


def alignment_view(inference: InferenceView) -> None:
    """The run's trait alignment on this dataset (`traitscope align`), when it has been computed."""
    fpath = inference.dpath / "alignment.csv"
    if fpath.is_file():
        with st.expander("Trait alignment: each label's best feature against the baselines, scored like for like"):
            st.markdown(alignment_markdown(read_alignment(fpath)))


def pick_run(runs: list[Run], key: str) -> Run:
    names = [r.name for r in runs]
    q_run = st.query_params.get("run")
    name = st.selectbox("Run", names, index=names.index(q_run) if q_run in names else 0, key=f"{key}-run",
                        help="An SAE run folder under --runs (pick more in the sidebar).")
    return runs[names.index(name)]


def num(value: float, fmt: str, tip: str) -> str:
    """A number for an HTML caption, with its meaning as a tooltip."""
    return f'<span title="{html.escape(tip)}" style="border-bottom:1px dotted #999">{format(value, fmt)}</span>'


def strip_html(run: Run, row: pd.Series, tiles: list[dict], image_level: bool) -> str:
    """One atlas row: the feature's numbers (each with a tooltip) and a strip of its best images."""
    f = int(row["feature"])
    link = feature_link(run, f)
    facts = [num(int(row["images"]), "d", "images where it fires (activation > 0 on any patch)") + " images",
             num(row["image_freq"], ".2%", "share of the dataset's images where it fires")]
    if not image_level:
        facts.append(num(row["patch_freq"], ".3%", "share of all patches (image tokens) where it fires")
                     + " of patches")
    facts.append("max " + num(row["max_act"], ".3g", "its largest activation on any image"))
    if not image_level and np.isfinite(row["x"]):
        facts.append("peaks at " + num(row["x"], ".2f", "median horizontal position of its strongest patch in "
                                       "its top images (0 = left, 1 = right of what the model saw)")
                     + ", " + num(row["y"], ".2f", "median vertical position (0 = top, 1 = bottom)"))
    if "label" in row and row["label"]:
        facts.append(f"<b>{html.escape(str(row['label']))}</b> "
                     + num(int(row["label_images"]), "d", "firing images that carry this label") + " imgs, lift "
                     + num(row["lift"], ".2f", "share of this label among its firing images / among all images")
                     + ", q " + num(row["q"], ".2g", "hypergeometric p-value, Benjamini-Hochberg corrected over "
                                    f"every feature-label pair seen on >= {MIN_SUPPORT} images"))
    cells = []
    for t in tiles:
        title = html.escape(f"{t['path']} · max activation {t['value']:.3g}")
        if "b64" in t:
            cells.append(f'<a href="{link}" target="_self"><img src="data:image/jpeg;base64,{t["b64"]}" '
                         f'title="{title}" alt="{title}" style="height:{STRIP_SIDE}px;max-width:{STRIP_SIDE * 2}px;'
                         'object-fit:contain;background:#f0f0f0;margin-right:4px"></a>')
        else:
            cells.append(f'<span title="{title}" style="display:inline-block;width:{STRIP_SIDE}px;'
                         f'background:#eee">{html.escape(t["error"])}</span>')
    return (f'<div class="ts-strip" data-feature="{f}" style="display:flex;gap:12px;align-items:center;'
            'border-bottom:1px solid #eee;padding:4px 0">'
            f'<div style="width:200px;flex:none;font-size:0.85em"><a href="{link}" target="_self" '
            f'class="ts-feature-link"><b>Feature {f}</b></a><br>' + "<br>".join(facts) + "</div>"
            '<div style="display:flex;flex-wrap:wrap;row-gap:4px">' + "".join(cells) + "</div></div>")


def atlas_filters(table: pd.DataFrame, d_sae: int, image_level: bool) -> tuple[atlas.AtlasFilter, int]:
    """The atlas controls; returns the filter and the page size."""
    sorts = [s for s in atlas.SORTS if "q" in table or "enrichment" not in s]
    if image_level:
        sorts = [s for s in sorts if "patches" not in s]
    c1, c2, c3 = st.columns([2, 1, 1])
    sort = c1.selectbox("Sort by", sorts, key="atlas-sort", help="The order of the features in the atlas.")
    min_images = c2.number_input("Fires on at least ... images", 1, 10**9, atlas.MIN_IMAGES, key="atlas-min",
                                 help="Features firing on fewer images are hidden (by default the dead ones "
                                      "and those that fire on one image only).")
    per_page = c3.selectbox("Features per page", [20, 30, 50], index=1, key="atlas-per-page")
    x_range, y_range, max_q, label = (0.0, 1.0), (0.0, 1.0), 1.0, ""
    with st.expander("Filter by where it fires" + (" and by label" if "q" in table else "")):
        if not image_level:
            a, b = st.columns(2)
            x_range = a.slider("Peaks horizontally within", 0.0, 1.0, (0.0, 1.0), 0.05, key="atlas-x",
                               help="Median position of each feature's strongest patch in its top images, "
                                    "0 = left edge of what the model saw, 1 = right edge.")
            y_range = b.slider("Peaks vertically within", 0.0, 1.0, (0.0, 1.0), 0.05, key="atlas-y",
                               help="0 = top edge, 1 = bottom edge.")
        if "q" in table:
            a, b = st.columns(2)
            label = a.text_input("Most significant label contains", key="atlas-label")
            max_q = b.select_slider("Best label's q at most", [1e-6, 1e-4, 1e-3, 0.01, 0.05, 0.1, 1.0], 1.0,
                                    key="atlas-q", help="Benjamini-Hochberg corrected hypergeometric p-value.")
    return atlas.AtlasFilter(sort, int(min_images), tuple(x_range), tuple(y_range), float(max_q), label), int(per_page)


def page_atlas(runs: list[Run], dataset: Dataset) -> None:
    run = pick_run(runs, "atlas")
    inference = need_inference(run, dataset, "atlas")
    if inference is None:
        return
    image_level = inference.top_patch_acts is None
    mtime = (inference.dpath / "manifest.json").stat().st_mtime
    table = get_atlas_table(str(inference.dpath), mtime, str(dataset.dpath), str(ARGS.cache))
    view = st.radio("View", ["strips", "map of the dictionary"], horizontal=True, key="atlas-view",
                    help="Strips: each feature's best images, many features at once. Map: every feature "
                         "placed by its decoder direction (t-SNE), similar features close together.")
    filt, per_page = atlas_filters(table, inference.d_sae, image_level)
    shown = atlas.select(table, filt)
    n_dead = int((table["images"] == 0).sum())
    n_one = int((table["images"] == 1).sum())
    st.caption(f"{len(shown)} of {inference.d_sae} features shown · {n_dead} dead (never fire on this dataset) "
               f"· {n_one} fire on one image only"
               + (" · image-level SAE: one code per image, no patches or heatmaps" if image_level else ""))
    if view == "map of the dictionary":
        atlas_map(run, inference, table, shown)
        return
    if not len(shown):
        st.info("No feature passes these filters.")
        return
    n_pages = -(-len(shown) // per_page)
    page = int(st.number_input(f"Page (1-{n_pages})", 1, n_pages, 1, key="atlas-page"))
    st.markdown(
        f"Each row: a feature's {STRIP_TILES} best images, zoomed to where it fires, heat on one scale per "
        "feature (its largest activation). Click a feature to see its evidence; hover a number for what it means.")
    rows = shown.iloc[(page - 1) * per_page: page * per_page]
    strips = [strip_html(run, row, strip_tiles(str(inference.dpath), mtime, str(dataset.dpath),
                                               int(row["feature"]), STRIP_TILES, STRIP_SIDE), image_level)
              for _, row in rows.iterrows()]
    st.markdown('<div class="ts-atlas">' + "".join(strips) + "</div>", unsafe_allow_html=True)


def atlas_map(run: Run, inference: InferenceView, table: pd.DataFrame, shown: pd.DataFrame) -> None:
    """Every shown feature at its t-SNE position of the decoder directions; click one to open it."""
    import altair as alt

    if not run.has_weights:
        st.info(f"{run.name} has no SAE weights (sae.safetensors): the map needs its decoder directions.")
        return
    xy = get_decoder_map(str(run.dpath), str(inference.manifest.get("sae_sha256")), str(ARGS.cache))
    colour_by = st.radio("Colour by", ["images where it fires (log10)"]
                         + (["enrichment significance (-log10 q)"] if "q" in table else []),
                         horizontal=True, key="atlas-map-colour")
    data = shown.assign(map_x=xy[shown["feature"], 0], map_y=xy[shown["feature"], 1],
                        log_images=np.log10(np.maximum(shown["images"], 1)))
    if "q" in data:
        data = data.assign(minus_log_q=-np.log10(np.maximum(data["q"], 1e-300)))
    colour = "log_images" if colour_by.startswith("images") else "minus_log_q"
    tooltip = ["feature", "images", "max_act"] + (["label", "q"] if "q" in data else [])
    pick = alt.selection_point(fields=["feature"], name="pick", on="click")
    chart = (alt.Chart(data[["feature", "map_x", "map_y", colour] + tooltip[1:]]).mark_circle(size=40)
             .encode(x=alt.X("map_x", axis=None, scale=alt.Scale(zero=False, nice=False)),
                     y=alt.Y("map_y", axis=None, scale=alt.Scale(zero=False, nice=False)),
                     color=alt.Color(colour, scale=alt.Scale(scheme="viridis"), title=colour_by),
                     tooltip=tooltip)
             .add_params(pick).properties(height=600))
    st.caption(f"{len(data)} features (the filters above apply). Click a point to open that feature.")
    event = st.altair_chart(chart, on_select="rerun", key="atlas-map", width="stretch")
    points = (event.selection.get("pick") if event and event.selection else None) or []
    if points:
        open_feature(run, int(points[0]["feature"]))


def open_feature(run: Run, feature: int) -> None:
    """Go to a feature's page (applied by `main` before the widgets are drawn again)."""
    st.query_params.update({"page": "Feature", "run": run.name, "feature": str(feature)})
    st.session_state["_goto"] = {"page": "Feature", "feat-run": run.name, "feat-mode": "index",
                                 "feat-index": feature}
    st.rerun()


def page_features(runs: list[Run], dataset: Dataset) -> None:
    run = pick_run(runs, "feat")
    inference = need_inference(run, dataset, "feat")
    if inference is None:
        return
    alignment_view(inference)
    initial = parse_int(st.query_params.get("feature"), 0, inference.d_sae)
    left, right = st.columns([1, 4])
    with left:
        st.markdown(f'<a href="?page=Atlas&run={html.escape(run.name)}" target="_self">Back to the atlas</a>',
                    unsafe_allow_html=True)
        feature = pick_feature(inference, dataset, "feat", initial)
    if feature is None:
        return
    with right:
        view = tile_controls("feat") if inference.top_patch_acts is not None else TileView()
        query = {"page": "Feature", "run": run.name, "feature": str(feature), **view.query()}
        st.query_params.update(query)
        show_enlarged(dataset, inference, int(feature), view)
        feature_view(run, dataset, inference, int(feature), view, enlarge=query)


def unusable_reason(run: Run, dataset: Dataset) -> str | None:
    """Why a run cannot be shown on this dataset (None: it can, or its inference can be computed)."""
    if run.has_inference(dataset.hash):
        return None
    model = run.shards.model
    if model and model != dataset.model_name:
        return f"trained on {model} activations; this dataset holds {dataset.model_name}'s"
    if not run.has_weights:
        return "no SAE weights (sae.safetensors) and no inference outputs for this dataset"
    if not run.can_encode(dataset):
        return (f"reads layer {run.layer} {run.token_kind} tokens of width {run.sae_config.get('d_model')}, "
                "which these shards do not store")
    return None


def all_runs_cached() -> list[Run]:
    return get_runs(str(ARGS.runs))[0]


def heldout_table(run: Run, dataset: Dataset) -> pd.DataFrame | None:
    """The run's held-out metrics on this dataset, next to the baselines (written by `traitscope inference`)."""
    rows = run.heldout_rows(dataset.hash)
    if rows is None:
        return None
    table = pd.DataFrame(rows).T
    return table[[c for c in ("nmse", "explained_variance", "l0", "dead_frac", "dense_frac") if c in table]]


HELDOUT_COLUMNS = {
    "nmse": st.column_config.NumberColumn("NMSE", help="reconstruction error / variance, on held-out images of "
                                          "this dataset (lower is better)", format="%.3f"),
    "explained_variance": st.column_config.NumberColumn("explained var.", format="%.3f",
                                                        help="1 - NMSE, per dimension averaged"),
    "l0": st.column_config.NumberColumn("L0", help="codes above zero per token (sparsity)", format="%.1f"),
    "dead_frac": st.column_config.NumberColumn("dead", help="share of latents that never fire on the held-out "
                                               "tokens", format="%.2f"),
    "dense_frac": st.column_config.NumberColumn("dense", help="share of latents firing on over 10% of tokens",
                                                format="%.2f"),
}


@st.cache_resource(show_spinner="Matching the two dictionaries ...", max_entries=8)
def get_matching(run_a: str, inf_a: str, mtime_a: float, run_b: str, inf_b: str, mtime_b: float,
                 min_score: float):
    from traitscope.features.matching import match_features

    return match_features(get_sae(run_a).W_dec.detach().numpy(), get_sae(run_b).W_dec.detach().numpy(),
                          get_inference(inf_a, mtime_a), get_inference(inf_b, mtime_b), min_score)


def page_compare(runs: list[Run], dataset: Dataset) -> None:
    st.markdown("Features of two SAEs on the same model and layer, **matched** one to one by decoder direction "
                "(cosine) and by the images they fire on (correlation of per-image maxima on this dataset); "
                "then what each dictionary has that the other lacks. The same table from the command line: "
                "`traitscope match RUN_A RUN_B --shards ... --out match.csv`.")
    shown = [r for r in runs if unusable_reason(r, dataset) is None]
    hidden = [(r, unusable_reason(r, dataset)) for r in runs if unusable_reason(r, dataset) is not None]
    if hidden:
        with st.expander(f"{len(hidden)} picked runs cannot be shown on this dataset"):
            for run, reason in hidden:
                st.markdown(f"- **{run.name}**: {reason}")
    if len(shown) < 2:
        st.info("Pick at least two runs in the sidebar that can be shown on this dataset.")
        return
    names = [r.name for r in shown]
    sides = []
    for side, column in zip(("a", "b"), st.columns(2)):
        with column:
            name = st.selectbox(f"Run {side.upper()}", names, index=0 if side == "a" else 1, key=f"cmp-{side}-run")
            run = shown[names.index(name)]
            st.caption(run.title())
            inference = need_inference(run, dataset, f"cmp-{side}")
            table = heldout_table(run, dataset)
            if table is not None:
                st.markdown("Held-out metrics **on this dataset**", help="From `traitscope inference` on these "
                            "shards: the SAE next to the dense, PCA and k-means baselines.")
                st.dataframe(table, column_config=HELDOUT_COLUMNS, height=180)
            elif inference is not None:
                st.caption("No held-out metrics on this dataset yet: "
                           f"`traitscope inference --run {run.dpath} --shards {dataset.dpath}` writes them.")
            sides.append((run, inference))
    (run_a, inf_a), (run_b, inf_b) = sides
    if inf_a is None or inf_b is None:
        return
    if run_a.name == run_b.name:
        st.info("Pick two different runs.")
        return
    if not (run_a.has_weights and run_b.has_weights):
        st.info("Matching needs both runs' decoders (sae.safetensors).")
        return
    if (run_a.layer, run_a.token_kind, run_a.sae_config.get("d_model")) != (
            run_b.layer, run_b.token_kind, run_b.sae_config.get("d_model")):
        st.warning(f"{run_a.name} reads layer {run_a.layer} {run_a.token_kind} tokens, {run_b.name} layer "
                   f"{run_b.layer} {run_b.token_kind}: only runs on the same model and layer can be matched.")
        return
    c1, c2 = st.columns([1, 2])
    min_score = c1.select_slider("A pair counts as matched from score", [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], 0.5,
                                 key="cmp-min-score", help="score = (decoder cosine + activation correlation) / 2")
    mt_a, mt_b = ((i.dpath / "manifest.json").stat().st_mtime for i in (inf_a, inf_b))
    matching = get_matching(str(run_a.dpath), str(inf_a.dpath), mt_a, str(run_b.dpath), str(inf_b.dpath), mt_b,
                            float(min_score))
    n_pairs = int(matching.matched.sum())
    lone_a, lone_b = np.flatnonzero(matching.feature_b < 0), np.flatnonzero(matching.feature_a < 0)
    views = {f"{n_pairs} matched pairs": np.flatnonzero(matching.matched),
             f"{len(lone_a)} only in A ({run_a.name})": lone_a,
             f"{len(lone_b)} only in B ({run_b.name})": lone_b}
    view = c2.radio("Show", list(views), horizontal=True, key="cmp-view",
                    help="Features firing on at least 2 images of this dataset take part. An unmatched "
                         "feature is shown with its closest feature on the other side.")
    idx = views[view]
    if not len(idx):
        st.info("Nothing to show.")
        return
    per_page = 10
    n_pages = -(-len(idx) // per_page)
    page = int(st.number_input(f"Page (1-{n_pages})", 1, n_pages, 1, key="cmp-page"))
    tables = [get_atlas_table(str(i.dpath), m, str(dataset.dpath), str(ARGS.cache))
              for i, m in ((inf_a, mt_a), (inf_b, mt_b))]
    blocks = []
    for i in idx[(page - 1) * per_page: page * per_page]:
        fa, fb = int(matching.feature_a[i]), int(matching.feature_b[i])
        if fa < 0:
            fa_shown, fb_shown = int(matching.partner[i]), fb
        elif fb < 0:
            fa_shown, fb_shown = fa, int(matching.partner[i])
        else:
            fa_shown, fb_shown = fa, fb
        kind = "matched" if matching.matched[i] else "closest, not matched"
        head = (f'<div class="ts-pair-head" style="font-size:0.85em;margin-top:8px">{kind}: '
                + num(matching.score[i], ".2f", "(decoder cosine + activation correlation) / 2") + " score · cosine "
                + num(matching.decoder_cosine[i], ".2f", "cosine of the two features' decoder directions")
                + " · correlation " + num(matching.activation_corr[i], ".2f", "Pearson correlation of their "
                                          "per-image maxima over this dataset's images") + "</div>")
        cells = []
        for run, inf, mtime, table, f in ((run_a, inf_a, mt_a, tables[0], fa_shown),
                                          (run_b, inf_b, mt_b, tables[1], fb_shown)):
            if f < 0:
                cells.append("<div></div>")
                continue
            tiles = strip_tiles(str(inf.dpath), mtime, str(dataset.dpath), f, 4, STRIP_SIDE)
            cells.append(strip_html(run, table.iloc[f], tiles, inf.top_patch_acts is None))
        blocks.append(f'<div class="ts-pair">{head}<div style="display:grid;grid-template-columns:1fr 1fr;gap:16px">'
                      + "".join(cells) + "</div></div>")
    st.markdown('<div class="ts-match">' + "".join(blocks) + "</div>", unsafe_allow_html=True)


def read_curves(run: Run) -> pd.DataFrame:
    """A run's training log (metrics.jsonl) as a long frame: run, tokens, metric, value."""
    records = run.read_log()
    if not records:
        return pd.DataFrame(columns=["run", "tokens", "metric", "value"])
    frame = pd.DataFrame(records)
    keep = [c for c in ("nmse", "l0", "dead_frac", "dense_frac", "loss") if c in frame]
    if "tokens" not in frame or not keep:
        return pd.DataFrame(columns=["run", "tokens", "metric", "value"])
    return frame.melt(id_vars=["tokens"], value_vars=keep, var_name="metric").assign(run=run.name)


def page_plots(runs: list[Run], dataset: Dataset) -> None:
    import altair as alt

    from traitscope.features.pareto import mark_frontier, run_points

    st.subheader("Sparsity against reconstruction error")
    points, skipped = run_points(all_runs_cached())
    if points:
        imported = [r.name for r in all_runs_cached() if r.imported_from]  # no training data here
        frame = pd.DataFrame(mark_frontier(points), columns=points[0]._fields)
        frame["where"] = np.where(frame["run"].isin(imported), "the shards it was imported onto", "its training data")
        on_here = []
        for run in all_runs_cached():
            table = heldout_table(run, dataset)
            if table is not None and "sae" in table.index:
                row = table.loc["sae"]
                on_here.append({"run": run.name, "variant": run.sae_config.get("variant"), "l0": float(row["l0"]),
                                "nmse": float(row["nmse"]), "where": "this dataset"})
        frame = pd.concat([frame, pd.DataFrame(on_here)], ignore_index=True) if on_here else frame
        chart = (alt.Chart(frame).mark_point(filled=True, size=70)
                 .encode(x=alt.X("l0", scale=alt.Scale(type="log"), title="L0 (codes above zero per token)"),
                         y=alt.Y("nmse", title="NMSE (held out; lower is better)"), color="variant",
                         shape=alt.Shape("where", title="held out from"),
                         tooltip=["run", "variant", "setting", "d_sae", "l0", "nmse", "dead_frac", "where"]))
        frontier = frame[frame["on_frontier"] == True].sort_values("l0")  # noqa: E712 (NaN rows: this dataset)
        line = alt.Chart(frontier).mark_line(color="#999").encode(x="l0", y="nmse")
        st.altair_chart(chart + line, width="stretch")
        st.caption("Circles: each run's metrics.json (held out from the shards it was trained on, or for an SAE "
                   "imported from another library the shards it was imported onto); the grey line "
                   "joins the Pareto frontier. Other shapes: the same runs held out from this dataset, where "
                   "`traitscope inference` has written them.")
    for note in skipped:
        st.caption(f"skipped: {note}")

    st.subheader("Training curves")
    curves = pd.concat([read_curves(r) for r in runs], ignore_index=True)
    if len(curves):
        metrics = [m for m in ("nmse", "l0", "dead_frac", "dense_frac", "loss") if m in set(curves["metric"])]
        metric = st.radio("Metric", metrics, horizontal=True, key="plots-metric",
                          help="nmse: error on the training batches; l0: codes per token; dead_frac: share of "
                               "latents silent over the recent window; dense_frac: firing on > 10% of tokens.")
        st.altair_chart(alt.Chart(curves[curves["metric"] == metric]).mark_line()
                        .encode(x=alt.X("tokens", title="training tokens"), y=alt.Y("value", title=metric),
                                color="run", tooltip=["run", "tokens", "value"]), width="stretch")
    else:
        st.caption("The picked runs have no training log (metrics.jsonl).")

    ready = [r for r in runs if r.has_inference(dataset.hash)]
    if not ready:
        st.info("The rest needs a run with inference outputs for this dataset.")
        return
    names = [r.name for r in ready]
    run = ready[names.index(st.selectbox("Run", names, key="plots-run"))]
    inference = inference_of(run, dataset)
    st.subheader("Against the baselines, on this dataset")
    table = heldout_table(run, dataset)
    if table is None:
        st.caption(f"Not computed yet: `traitscope inference --run {run.dpath} --shards {dataset.dpath}`.")
    else:
        st.altair_chart(alt.Chart(table.reset_index(names="method")).mark_bar()
                        .encode(x=alt.X("nmse", title="held-out NMSE (lower is better)"), y=alt.Y("method", sort=None),
                                tooltip=["method", "nmse", "l0"]), width="stretch")
        st.dataframe(table, column_config=HELDOUT_COLUMNS)

    st.subheader("How often features fire")
    counts = inference.fire_counts()
    alive = counts[counts > 0]
    dens = pd.DataFrame({"log10 share of images": np.log10(alive / inference.n_images)})
    st.altair_chart(alt.Chart(dens).mark_bar().encode(
        x=alt.X("log10 share of images", bin=alt.Bin(maxbins=40)), y=alt.Y("count()", title="features")),
        width="stretch")
    st.caption(f"{len(alive)} of {inference.d_sae} features fire on this dataset; {inference.d_sae - len(alive)} "
               "never do (dead). Features at the right fire on most images (dense).")

    st.subheader("Alignment with the labels")
    align_fpath = inference.dpath / "alignment.csv"
    if align_fpath.is_file():
        rows = pd.read_csv(align_fpath)
        if {"level", "method", "ap", "dominant"} <= set(rows.columns):
            kept = rows[~rows["dominant"].astype(str).str.lower().isin(["true", "1"])]
            keys = ["level", "method"] + (["scoring"] if "scoring" in rows.columns else [])
            summary = kept.groupby(keys, sort=False)["ap"].mean().reset_index(name="mean AP")
            if "scoring" in keys:  # like next to like: every dense score, then every sparse one, then the sets
                order = {scoring: i for i, scoring in enumerate(COLUMNS)}
                summary = summary.sort_values("scoring", key=lambda s: s.map(order), kind="stable")
            summary["scored"] = summary["method"] + (" · " + summary["scoring"] if "scoring" in keys else "")
            st.altair_chart(alt.Chart(summary).mark_bar().encode(
                x=alt.X("mean AP", scale=alt.Scale(domain=[0, 1])), y=alt.Y("scored", sort=None, title=None),
                row="level", color=alt.Color("scoring:N") if "scoring" in keys else alt.value("steelblue"),
                tooltip=[*keys, "mean AP"]), width="stretch")
        st.dataframe(rows, hide_index=True, height=240)
        st.caption("Per label: the best single feature (scoring dense or sparse; 'set': the best few sparse features "
                   "together) chosen on training images, scored by average precision on held-out images, for the SAE "
                   "and each baseline (alignment.csv, `traitscope align`). Compare like with like: one scoring at a time.")
    elif dataset.labels()[0]:
        st.caption(f"Not computed yet: `traitscope align --run {run.dpath} --shards {dataset.dpath}`.")
    else:
        st.caption("This dataset has no labels to align with.")

    if dataset.labels()[0]:
        st.subheader("Label enrichment over firing images: hypergeometric p, BH q")
        min_support = int(st.number_input("Minimum support: firing images carrying the label", 1, 10**6,
                                           MIN_SUPPORT, key="plots-support"))
        tests = label_tests_of(inference, dataset, min_support)
        best = tests.best(inference.d_sae)
        has = np.flatnonzero(best["label"] >= 0)
        frame = pd.DataFrame({"feature": has, "label": [tests.names[j] for j in best["label"][has]],
                              "images": best["count"][has], "firing images": counts[has],
                              "lift": best["lift"][has], "p": best["p"][has], "q": best["q"][has]})
        frame = frame.sort_values(["q", "lift"], ascending=[True, False]).head(200)
        frame["open"] = [feature_link(run, int(f)) for f in frame["feature"]]
        st.dataframe(frame, hide_index=True, column_config={
            **ENRICHMENT_COLUMNS, "open": st.column_config.LinkColumn("open", display_text="feature page"),
            "firing images": st.column_config.NumberColumn("firing images", help="images where it fires")})
        st.caption(f"Each feature's most significant label among those on at least {min_support} of its firing "
                   f"images, most significant first ({int((best['q'] < 0.05).sum())} features with q < 0.05). "
                   "p: one-sided hypergeometric test (that many by chance?); q: Benjamini-Hochberg over every "
                   "feature-label pair tested.")


def page_image(runs: list[Run], dataset: Dataset) -> None:
    encodable = [r for r in runs if r.can_encode(dataset)]
    if not encodable:
        st.info("None of the picked runs can encode this dataset's images: that needs SAE weights "
                "(sae.safetensors) for a layer and token kind these shards store.")
        return
    names = [r.name for r in encodable]
    run = encodable[names.index(st.selectbox("Run", names, key="img-run"))]
    source = st.radio("Image", ["from the dataset", "upload"], horizontal=True, key="img-source")
    from traitscope.app.encode import dataset_image_codes, new_image_codes, top_features

    sae = get_sae(str(run.dpath))
    if source == "from the dataset":
        initial = parse_int(st.query_params.get("row"), 0, dataset.n_images) or 0
        row = int(st.number_input(f"Image row (0-{dataset.n_images - 1})", 0, dataset.n_images - 1, initial,
                                  key="img-row"))
        st.caption(f"{dataset.images[row]['path']}")
        image = dataset.open_image(row)
        codes = dataset_image_codes(sae, dataset, run, row)
    else:
        upload = st.file_uploader("An image", type=["png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff"],
                                  key="img-upload")
        if upload is None:
            return
        image = open_image_file(io.BytesIO(upload.getvalue()))
        backbone, weights_match = get_backbone(str(dataset.dpath))
        if not weights_match:
            st.warning(f"The loaded {dataset.model_name} weights differ from the ones the shards were made "
                       "with: codes may not match the dataset's.")
        with st.spinner("Running the backbone and the SAE ..."):
            codes = new_image_codes(backbone, sae, dataset, run, image)
    features, values = top_features(codes, n=12)
    if not len(features):
        st.info("No feature fires on this image.")
        return
    grid = dataset.grid(run.layer) if run.token_kind == "patches" else (1, 1)
    vmax = float(values.max())
    tiles = []
    for f, v in zip(features, values):
        acts_hw = codes[:, f].reshape(grid)
        drawn = overlay_heatmap(image, acts_hw, dataset.preprocess, vmax=vmax, max_side=THUMB_SIDE)
        tiles.append({"row": -1, "value": float(v), "path": f"feature {int(f)}", "b64": jpeg_b64(drawn),
                      "caption": f"feature {int(f)} · max {float(v):.3g}"})
    st.markdown(f"**The {len(tiles)} strongest features** (one colour scale for all)")
    st.markdown(tiles_html(tiles), unsafe_allow_html=True)
    st.markdown("Open a feature: " + " · ".join(f"[{int(f)}]({feature_link(run, int(f))})" for f in features))


def blind_candidates(run: Run, dataset: Dataset, inference: InferenceView) -> tuple[np.ndarray, np.ndarray]:
    """Every dense dimension, and the SAE features with a full grid of firing images."""
    d_model = dataset.shards.d_model(run.layer)
    rows = sae_rows(dataset, run, inference)
    return np.arange(d_model), np.flatnonzero(rows[:, rows.shape[1] - 1] >= 0)


def sae_rows(dataset: Dataset, run: Run, inference: InferenceView) -> np.ndarray:
    """(d_sae, <= 16) top images of the SAE features, ranked as `traitscope grids` ranks them."""
    return sae_top_rows(dataset, run, inference, min(16, inference.top_n), ARGS.cache)


def page_blind(runs: list[Run], dataset: Dataset) -> None:
    st.markdown("Each item is a grid of the 16 images that most activate one direction: either a raw "
                "dimension of the backbone or an SAE feature. You are not told which.")
    name = st.query_params.get("session")
    if not name:
        usable = [r for r in runs if inference_of(r, dataset) is not None and r.layer is not None]
        if not usable:  # checked before the form is drawn, so a form on screen is one that can start
            st.info("The blind test needs a run with inference outputs for this dataset: pick one in the sidebar, "
                    "or compute them with `traitscope inference --run RUN --shards "
                    f"{dataset.dpath}`.")
            return
        with st.form("blind-start"):
            name = st.text_input("Session name (letters, digits, - and _)", value="rater1")
            run_name = st.selectbox("SAE run", [r.name for r in usable])
            n = st.number_input("Items of each kind (N)", 1, 100, 10)
            seed = st.number_input("Seed", 0, 2**31 - 1, 0)
            started = st.form_submit_button("Start or resume")
        if not started:
            return
        try:
            fpath = blind.session_fpath(ARGS.ratings, name)
            if not fpath.exists():
                run = next(r for r in usable if r.name == run_name)
                inference = inference_of(run, dataset)
                dense, sae = blind_candidates(run, dataset, inference)
                items = blind.plan_items(int(n), int(seed), dense, sae)
                blind.create_session(fpath, items, seed=int(seed), n=int(n), run=run.name,
                                     dataset=dataset.hash, layer=run.layer, token_kind=run.token_kind)
        except TraitscopeError as err:
            st.error(str(err))
            return
        st.query_params["session"] = name
        st.rerun()
    try:
        session = blind.load_session(blind.session_fpath(ARGS.ratings, name))
    except TraitscopeError as err:
        st.error(str(err))
        if st.button("Start another session"):
            del st.query_params["session"]
            st.rerun()
        return
    header = session.header
    run = next((r for r in runs if r.name == header.get("run")), None)
    if header.get("dataset") != dataset.hash or run is None:
        st.error(f"Session {name!r} was made with run {header.get('run')!r} on dataset {header.get('dataset')!r}: "
                 "pick those in the sidebar to resume it.")
        return
    st.caption(f"session {name} · ratings saved to {session.fpath} as they are given")
    position = session.next_item
    if position is None:
        blind_summary(session)
    else:
        blind_item(session, position, run, dataset)
    if st.button("Leave this session", key="blind-leave"):
        del st.query_params["session"]
        st.rerun()


def _answer(fpath: Path, position: int, rating: int) -> None:
    blind.load_session(fpath).answer(position, rating)


def dense_rows(dataset: Dataset, run: Run) -> np.ndarray:
    """(d_model, 16) top images of the raw dimensions: one pass over the shards the first time, with
    a progress bar, then read from the cache."""
    bar = st.progress(0.0, text="Finding the top images of every dense dimension (once per dataset) ...")
    rows = dense_top_images(dataset, run.layer, run.token_kind, 16, ARGS.cache,
                            progress=lambda done, text: bar.progress(done, text=text))
    bar.empty()
    return rows


def blind_item(session: blind.Session, position: int, run: Run, dataset: Dataset) -> None:
    n_items = len(session.items)
    st.progress(position / n_items, text=f"item {position + 1} of {n_items}")
    item = session.items[position]
    if item.kind == "sae":
        rows = sae_rows(dataset, run, inference_of(run, dataset))[item.index]
    else:
        rows = dense_rows(dataset, run)[item.index]
    st.image(blind_grid_png(str(dataset.dpath), tuple(int(r) for r in rows)), width=740)
    st.caption(f"{RANKINGS[grid_ranking(run.token_kind)]}, best top-left")
    st.markdown(f"**{blind.QUESTION}**")
    for level, column in zip(blind.LEVELS, st.columns(len(blind.LEVELS))):
        column.button(str(level), key=f"rate-{position}-{level}", on_click=_answer,
                      args=(session.fpath, position, level), width="stretch")


def blind_summary(session: blind.Session) -> None:
    summary = blind.summarise(session)
    st.success(f"All {len(session.items)} items rated.")
    st.image(summary.histogram())
    st.markdown("**Ratings by kind** (pandas describe)")
    st.dataframe(summary.describe)
    st.markdown(f"**Welch's t-test** (SAE vs dense, unequal variances): t = {summary.t:.3f}, "
                f"p = {summary.p:.4g}")
    st.caption(f"The same from the command line: traitscope ratings {session.fpath}")


# ---------------------------------------------------------------------------------------------


def main() -> None:
    st.set_page_config(page_title="traitscope", layout="wide")
    datasets = [get_dataset(str(p)) for p in ARGS.shards]
    all_runs, unusable = get_runs(str(ARGS.runs))
    for key, value in st.session_state.pop("_goto", {}).items():
        st.session_state[key] = value
    with st.sidebar:
        st.title("traitscope")
        q_page = PAGE_ALIASES.get(st.query_params.get("page"), st.query_params.get("page"))
        page = st.radio("Page", PAGES, index=PAGES.index(q_page) if q_page in PAGES else 0, key="page")
        titles = [d.title() for d in datasets]
        dataset = datasets[titles.index(st.selectbox("Dataset", titles, key="dataset"))]
        ready = [r for r in all_runs if r.has_inference(dataset.hash)]
        default = [r.name for r in (ready or all_runs)[:2]]
        q_run = st.query_params.get("run")
        if q_run in [r.name for r in all_runs] and q_run not in default:
            default = [q_run] + default[:1]
        picked = st.multiselect("Runs", [r.name for r in all_runs], default=default, key="runs")
        runs = [r for r in all_runs if r.name in picked]
        for run in runs:
            mark = "✓" if run.has_inference(dataset.hash) else "·"
            st.caption(f"{mark} {run.title(dataset.hash)}")
        if unusable:
            with st.expander(f"{len(unusable)} run folder(s) cannot be used"):
                for name, why in unusable:
                    st.caption(f"✗ {name}: {why}")
    if st.query_params.get("page") != page:
        st.query_params["page"] = page
    if dataset.images_unknown:
        st.warning(dataset.images_unknown + ". Restart the app with it to see them; everything else works.")
    if not runs:
        st.info(f"Pick a run in the sidebar ({len(all_runs)} found under {ARGS.runs}).")
        return
    {"Atlas": page_atlas, "Feature": page_features, "Compare runs": page_compare, "Run plots": page_plots, "Image": page_image,
     "Blind test": page_blind}[page](runs, dataset)



ARGS = parse_args()
try:
    main()
except TraitscopeError as error:
    st.error(str(error))
except Exception as error:  # noqa: BLE001  (never a traceback in the page: one line, the traceback on the terminal)
    traceback.print_exc()
    st.error(f"unexpected {type(error).__name__}: {error} (a bug: the terminal running `traitscope app` has the "
             "traceback; please report it)")
