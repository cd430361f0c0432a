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
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pandas as pd
import streamlit as st

from traitscope.app import blind
from traitscope.app.data import (Dataset, Enrichment, FeatureData, InferenceView, Run, dense_top_images, find_runs,
                                 label_enrichment, open_image_file, parse_int, sae_top_rows)
from traitscope.errors import TraitscopeError
from traitscope.viz import fit_thumbnail, image_grid, overlay_heatmap

PAGES = ("Features", "Compare runs", "Image", "Blind test")
THUMB_SIDE = 256  # longer side of a heatmap thumbnail, in pixels
BROWSE_LIST = 500  # at most this many features in a browse list


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="traitscope app (streamlit script)")
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--shards", type=Path, nargs="+", required=True)
    parser.add_argument("--ratings", type=Path, default=Path("ratings"))
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--max-on-the-fly", type=int, default=5000)
    env = os.environ.get("TRAITSCOPE_APP_ARGS")
    return parser.parse_args(json.loads(env) if env else sys.argv[1:])


# ---------------------------------------------------------------------------------------------
# Cached access: opened once per server process, memory-mapped


@st.cache_resource(show_spinner=False)
def get_dataset(dpath: str) -> Dataset:
    return Dataset(dpath)


@st.cache_resource(show_spinner=False, ttl=30)
def get_runs(runs_dpath: str) -> list[Run]:
    return find_runs(runs_dpath)


@st.cache_resource(show_spinner=False)
def get_inference(dpath: str, mtime: float) -> InferenceView:
    return InferenceView(dpath)


def inference_of(run: Run, dataset: Dataset) -> InferenceView | None:
    if not run.has_inference(dataset.hash):
        return None
    dpath = run.inference_dpath(dataset.hash)
    return get_inference(str(dpath), (dpath / "manifest.json").stat().st_mtime)


@st.cache_resource(show_spinner="Counting labels among each feature's images ...")
def get_enrichment(inference_dpath: str, mtime: float, dataset_dpath: str, cache: str) -> Enrichment:
    return label_enrichment(get_inference(inference_dpath, mtime), get_dataset(dataset_dpath), Path(cache))


def enrichment_of(inference: InferenceView, dataset: Dataset) -> Enrichment | None:
    if not dataset.labels()[0]:
        return None
    mtime = (inference.dpath / "manifest.json").stat().st_mtime
    return get_enrichment(str(inference.dpath), mtime, str(dataset.dpath), str(ARGS.cache))


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


@st.cache_data(show_spinner=False, max_entries=256)
def feature_tiles(inference_dpath: str, mtime: float, dataset_dpath: str, feature: int) -> list[dict]:
    """Heatmap thumbnails of a feature's top images: base64 JPEG, path, row and value, best first."""
    inference, dataset = get_inference(inference_dpath, mtime), get_dataset(dataset_dpath)
    fd = inference.feature(feature)
    vmax = float(fd.values.max(initial=0.0)) or None
    tiles = []
    for row, value, acts_hw in zip(fd.rows, fd.values, fd.maps_nhw):
        tile = {"row": int(row), "value": float(value), "path": dataset.images[row]["path"],
                "label": dataset.images[row].get("label")}
        try:
            image = dataset.open_image(int(row))
            drawn = (overlay_heatmap(image, acts_hw, dataset.preprocess, vmax=vmax, max_side=THUMB_SIDE)
                     if fd.has_patch_maps else fit_thumbnail(image, THUMB_SIDE))
            tile["b64"] = jpeg_b64(drawn)
        except TraitscopeError as err:
            tile["error"] = str(err)
        tiles.append(tile)
    return tiles


@st.cache_data(show_spinner=False, max_entries=256)
def blind_grid_png(dataset_dpath: str, rows: tuple[int, ...]) -> bytes:
    """A 4x4 grid of the crops the model saw, as PNG bytes (no heatmap: the kind must not show)."""
    dataset = get_dataset(dataset_dpath)
    crops = [dataset.preprocess.crop_image(dataset.open_image(r)) for r in rows if r >= 0]
    buf = io.BytesIO()
    image_grid(crops[:16], n_cols=4, cell=180, pad=3).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Small views


def tiles_html(tiles: list[dict], n_cols: int = 4) -> str:
    """A grid of images; hovering shows the path, clicking one reveals it under the image."""
    cells = []
    for i, t in enumerate(tiles):
        path = html.escape(str(t["path"]))
        caption = t.get("caption") or f"#{i + 1} · {t['value']:.3g}"
        if t.get("label"):
            caption += f" · {html.escape(str(t['label']))}"
        if "b64" in t:
            picture = (f'<img src="data:image/jpeg;base64,{t["b64"]}" title="{path}" alt="{path}" '
                       'style="width:100%;aspect-ratio:1;object-fit:contain;background:#f0f0f0">')
        else:
            picture = f'<div style="padding:2em;background:#eee" title="{path}">{html.escape(t["error"])}</div>'
        cells.append(f'<details class="ts-tile" style="margin:0"><summary style="list-style:none;cursor:pointer">'
                     f'{picture}<div style="font-size:0.8em">{caption}</div></summary>'
                     f'<code class="ts-path" style="font-size:0.75em;word-break:break-all">{path} (row {t["row"]})</code>'
                     f'</details>')
    return (f'<div class="ts-grid" style="display:grid;grid-template-columns:repeat({n_cols},1fr);gap:8px">'
            + "".join(cells) + "</div>")


def feature_link(run: Run, feature: int) -> str:
    return "?" + urlencode({"page": "Features", "run": run.name, "feature": feature})


def histogram_frame(fd: FeatureData) -> pd.DataFrame:
    centres = (fd.hist_edges[:-1] + fd.hist_edges[1:]) / 2
    counts = np.asarray(fd.hist_counts)
    nz = np.flatnonzero(counts)
    lo, hi = (nz[0], nz[-1] + 1) if len(nz) else (0, len(counts))
    return pd.DataFrame({"log10 activation": np.round(centres[lo:hi], 2), "count": counts[lo:hi]}).set_index(
        "log10 activation")


def feature_view(run: Run, dataset: Dataset, inference: InferenceView, feature: int, n_cols: int = 4) -> None:
    fd = inference.feature(feature)
    st.subheader(f"Feature {feature}")
    st.caption(run.title())
    c1, c2, c3 = st.columns(3)
    c1.metric("fires on patches", f"{fd.freq:.3%}")
    c2.metric("fires in images", f"{fd.image_freq:.3%}")
    c3.metric("mean activation", f"{fd.mean:.3g}")
    if not len(fd.rows):
        st.info("This feature never fires on this dataset (a dead feature).")
        return
    mtime = (inference.dpath / "manifest.json").stat().st_mtime
    tiles = feature_tiles(str(inference.dpath), mtime, str(dataset.dpath), feature)
    st.markdown(f"**Top {len(tiles)} images** (heatmap: activation per patch; hover or click for the path)")
    st.markdown(tiles_html(tiles, n_cols), unsafe_allow_html=True)
    st.markdown("**Activation histogram** (non-zero activations, log10)")
    st.bar_chart(histogram_frame(fd), height=180)
    enrichment = enrichment_of(inference, dataset)
    if enrichment is not None:
        table = enrichment.for_feature(feature)
        st.markdown("**Label enrichment** (among images where it fires; lift = precision / base rate)")
        if table:
            st.dataframe(pd.DataFrame(table), hide_index=True, width="stretch")
        else:
            st.caption("no labelled image among those where it fires")


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


def page_features(runs: list[Run], dataset: Dataset) -> None:
    names = [r.name for r in runs]
    q_run = st.query_params.get("run")
    run_name = st.selectbox("Run", names, index=names.index(q_run) if q_run in names else 0, key="feat-run")
    run = runs[names.index(run_name)]
    inference = need_inference(run, dataset, "feat")
    if inference is None:
        return
    initial = parse_int(st.query_params.get("feature"), 0, inference.d_sae)
    left, right = st.columns([1, 3])
    with left:
        feature = pick_feature(inference, dataset, "feat", initial)
    if feature is None:
        return
    st.query_params.update({"page": "Features", "run": run.name, "feature": str(feature)})
    with right:
        feature_view(run, dataset, inference, int(feature))


def page_compare(runs: list[Run], dataset: Dataset) -> None:
    if len(runs) < 2:
        st.info("Pick at least two runs in the sidebar to compare them side by side.")
        return
    columns = st.columns(2)
    for side, column in zip(("a", "b"), columns):
        with column:
            names = [r.name for r in runs]
            name = st.selectbox("Run", names, index=0 if side == "a" else 1, key=f"cmp-{side}-run")
            run = runs[names.index(name)]
            inference = need_inference(run, dataset, f"cmp-{side}")
            if inference is None:
                continue
            feature = pick_feature(inference, dataset, f"cmp-{side}", None)
            if feature is not None:
                feature_view(run, dataset, inference, int(feature), n_cols=3)


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
        with st.form("blind-start"):
            name = st.text_input("Session name (letters, digits, - and _)", value="rater1")
            usable = [r for r in runs if inference_of(r, dataset) is not None and r.layer is not None]
            if not usable:
                st.form_submit_button("Start", disabled=True)
                st.info("The blind test needs a run with inference outputs for this dataset.")
                return
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
    all_runs = get_runs(str(ARGS.runs))
    with st.sidebar:
        st.title("traitscope")
        q_page = st.query_params.get("page")
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
            st.caption(f"{mark} {run.title()}")
    if st.query_params.get("page") != page:
        st.query_params["page"] = page
    if not runs:
        st.info(f"Pick a run in the sidebar ({len(all_runs)} found under {ARGS.runs}).")
        return
    {"Features": page_features, "Compare runs": page_compare, "Image": page_image,
     "Blind test": page_blind}[page](runs, dataset)



ARGS = parse_args()
try:
    main()
except TraitscopeError as error:
    st.error(str(error))
