"""App speed: how long a feature page of a 100k-image dataset takes to render from precomputed outputs.

Generates (in a temp dir) a shard folder of 100,000 images and an inference folder following
docs/formats.md with d_sae 16,384, top_n 16 and a 16x16 patch grid (tests/app_fixtures.py). The images
behind the rows are a pool of real photographs (../shared/data/fishvista_demo when present, else
generated PNGs), so opening and drawing are real work. Measured, warm caches unless said otherwise:

- floor: decode one image and draw one heatmap over it (x16: the least a page of 16 tiles costs);
- data: a feature's arrays, histogram and label-enrichment row from the memory maps;
- tiles: the page's 16 heatmap thumbnails (decode, overlay, JPEG), as the app draws them;
- page: Streamlit's AppTest running the whole script for a new feature (server side, no browser);
- cold: opening the dataset and inference folders and the one-off label co-occurrence pass;
- restart: the first page after a server restart (Streamlit's caches empty, the cache folder kept: the
  co-occurrence counts and the label tests' p-values are read back, not recomputed).

- atlas: the start page (AppTest), 30 features each with a strip of 6 zoomed tiles: its first view
  (one-off per server: the feature table, peak positions and label tests), then new pages of 30.

Targets: a feature page in under a second; an atlas page of 30 features in under two. Pages also print
their CPU seconds (the process's, all threads): on a busy machine wall time stretches, CPU time much
less; the load average is printed at the start and the end.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import app_fixtures as fx  # noqa: E402

from traitscope.app.data import Dataset, InferenceView, label_cooccurrence  # noqa: E402
from traitscope.shards.store import write_arrays  # noqa: E402
from traitscope.viz import overlay_heatmap  # noqa: E402

N_IMAGES, D_SAE, TOP_N = 100_000, 16_384, 16
N_SPECIES = 50
TARGET_S = 1.0
ATLAS_TARGET_S = 2.0
FISH = Path(__file__).parents[2] / "shared" / "data" / "fishvista_demo"
MAIN = Path(__file__).parents[1] / "src" / "traitscope" / "app" / "main.py"


def make_world(root: Path) -> tuple[Path, Path]:
    """(shard folder, runs folder) for N_IMAGES images drawn from a pool of real image files."""
    if FISH.is_dir():
        images_root = FISH
        pool = []
        from PIL import Image
        for fpath in sorted(FISH.glob("*.JPG"))[:64]:
            with Image.open(fpath) as im:
                pool.append({"path": fpath.name, "width": im.width, "height": im.height})
    else:
        images_root = root / "images"
        pool = fx.make_images(images_root, 64)
    rng = np.random.default_rng(0)
    species = [f"species_{i:02d}" for i in range(N_SPECIES)]
    listing = []
    for i in range(N_IMAGES):
        rec = pool[i % len(pool)]
        listing.append({"index": i, "path": rec["path"], "width": rec["width"], "height": rec["height"],
                        "label": species[rng.integers(N_SPECIES)], "row": i, "skipped": None})
    header = {"model": {"name": "random-dinov2", "family": "transformers", "description": "bench",
                        "d_model": 64, "n_layers": 4, "patch_size": 14, "weights_sha256": "0" * 64},
              "layers": [fx.LAYER], "token_kinds": ["cls"], "d_model": {str(fx.LAYER): 64},
              "grid": {str(fx.LAYER): list(fx.GRID)}, "layout": {"n_cls": 1, "n_registers": 0},
              "preprocess": fx.PREPROCESS.to_dict(), "dtype": "float16", "images_root": str(images_root),
              "patch_labels": [], "image_labels": ["striped", "spotted"]}
    arrays = {f"L{fx.LAYER}/cls": rng.standard_normal((N_IMAGES, 64)).astype(np.float16),
              "labels/images": (rng.random((N_IMAGES, 2)) < 0.2).astype(np.uint8)}
    shards = write_arrays(root / "shards", header, listing, arrays, images_per_shard=25_000)
    run = fx.make_run(root / "runs" / "bench-run", shards, d_sae=D_SAE, weights=False)
    fx.write_inference(run, shards.hash, N_IMAGES, D_SAE, TOP_N,
                       label_of_image=[rec["label"] for rec in listing])
    return shards.dpath, root / "runs"


def load_average() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg()) + f" ({os.cpu_count()} CPUs)"


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), result


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        shards_dpath, runs_dpath = make_world(root)
        inference_dpath = runs_dpath / "bench-run" / "inference" / shards_dpath.name
        print(f"generated {N_IMAGES} images x d_sae {D_SAE} (top_n {TOP_N}) in {time.perf_counter() - t0:.1f} s; "
              f"images from {'fishvista_demo' if FISH.is_dir() else 'generated PNGs'}")

        # cold: what the first visitor after a server start waits for (once per server process)
        t0 = time.perf_counter()
        dataset = Dataset(shards_dpath)
        inference = InferenceView(inference_dpath)
        t_open = time.perf_counter() - t0
        t0 = time.perf_counter()
        enrichment = label_cooccurrence(inference, dataset, root / "cache")
        tests = enrichment.tests()
        t_enrich = time.perf_counter() - t0
        t0 = time.perf_counter()
        label_cooccurrence(inference, dataset, root / "cache")
        t_enrich_cached = time.perf_counter() - t0

        rng = np.random.default_rng(1)
        features = rng.choice(D_SAE - 1, 40, replace=False)

        # floor: one decode + one overlay
        row0 = int(inference.feature(int(features[0])).rows[0])
        acts0 = inference.feature(int(features[0])).maps_nhw[0]
        t_floor, _ = timed(lambda: overlay_heatmap(dataset.open_image(row0), acts0, dataset.preprocess,
                                                   max_side=256), 20)

        def page_data(f):
            fd = inference.feature(int(f))
            tests.for_feature(int(f))
            return fd

        t_data = float(np.median([timed(lambda f=f: page_data(f), 1)[0] for f in features]))

        def tiles(f):
            import base64
            import io
            fd = inference.feature(int(f))
            vmax = float(fd.values.max())
            out = []
            for row, acts in zip(fd.rows, fd.maps_nhw):
                buf = io.BytesIO()
                overlay_heatmap(dataset.open_image(int(row)), acts, dataset.preprocess, vmax=vmax,
                                max_side=256).save(buf, format="JPEG", quality=85)
                out.append(base64.b64encode(buf.getvalue()))
            return out

        t_tiles = float(np.median([timed(lambda f=f: tiles(f), 1)[0] for f in features[:10]]))

        # the whole Streamlit script for a new feature (AppTest: server side, no browser)
        from streamlit.testing.v1 import AppTest

        os.environ["TRAITSCOPE_APP_ARGS"] = json.dumps(
            ["--runs", str(runs_dpath), "--shards", str(shards_dpath), "--cache", str(root / "cache"),
             "--ratings", str(root / "ratings")])
        import streamlit as st

        def open_first_feature(timeout: float) -> tuple[AppTest, float]:
            """A fresh script run on the first feature's page, and its wall-clock seconds."""
            at = AppTest.from_file(str(MAIN), default_timeout=timeout)
            at.query_params.update({"page": "Features", "run": "bench-run", "feature": str(int(features[0]))})
            t0 = time.perf_counter()
            at.run()
            assert not at.exception, at.exception
            return at, time.perf_counter() - t0

        load_before = load_average()
        at, t_first_page = open_first_feature(1800)
        st.cache_resource.clear()  # a server restart: Streamlit's caches go, the cache folder stays
        st.cache_data.clear()
        at, t_restart_page = open_first_feature(600)
        page_times, page_cpu = [], []
        for f in features[1:11]:
            t0, c0 = time.perf_counter(), time.process_time()
            at.number_input(key="feat-index").set_value(int(f)).run()
            page_times.append(time.perf_counter() - t0)
            page_cpu.append(time.process_time() - c0)
            assert not at.exception, at.exception
        t_page, c_page = float(np.median(page_times)), float(np.median(page_cpu))

        # the atlas (the start page): its first view, then new pages of 30 strips
        at = AppTest.from_file(str(MAIN), default_timeout=600)
        t0 = time.perf_counter()
        at.run()
        t_atlas_first = time.perf_counter() - t0
        assert not at.exception, at.exception
        atlas_times, atlas_cpu = [], []
        for page in range(2, 7):
            t0, c0 = time.perf_counter(), time.process_time()
            at.number_input(key="atlas-page").set_value(page).run()
            atlas_times.append(time.perf_counter() - t0)
            atlas_cpu.append(time.process_time() - c0)
            assert not at.exception, at.exception
            assert sum(m.value.count('class="ts-strip"') for m in at.markdown) == 30
        t_atlas, c_atlas = float(np.median(atlas_times)), float(np.median(atlas_cpu))

    print(f"cold: open dataset (100k-line index) + inference folder   {t_open:8.3f} s")
    print(f"cold: label co-occurrence pass ({N_SPECIES + 2} labels), cached after {t_enrich:8.3f} s "
          f"(reload from cache {t_enrich_cached:.3f} s)")
    print(f"load average before the pages {load_before}, after {load_average()}")
    print(f"cold: first page (AppTest, fresh script + caches)          {t_first_page:8.3f} s")
    print(f"restart: first page, cache folder kept (label tests read)  {t_restart_page:8.3f} s")
    print(f"floor: decode one image + draw one heatmap                 {t_floor * 1000:8.1f} ms "
          f"(x16 = {t_floor * 16 * 1000:.0f} ms)")
    print(f"feature data (arrays, histogram, enrichment row)            {t_data * 1000:8.2f} ms")
    print(f"16 heatmap tiles (decode, overlay, JPEG)                    {t_tiles * 1000:8.1f} ms "
          f"({t_tiles / (16 * t_floor):.2f}x the floor)")
    print(f"feature page, whole script (AppTest, median of 10 features) {t_page * 1000:8.1f} ms "
          f"({t_page / (16 * t_floor):.2f}x the floor; target < {TARGET_S * 1000:.0f} ms: "
          f"{'met' if t_page < TARGET_S else 'NOT met'}; CPU {c_page * 1000:.0f} ms)")
    print(f"atlas, first view (feature table, peaks, label tests)        {t_atlas_first:8.3f} s")
    print(f"atlas page of 30 strips x 6 tiles (median of 5 new pages)   {t_atlas * 1000:8.1f} ms "
          f"({t_atlas / (180 * t_floor):.2f}x the floor of 180 tiles; target < {ATLAS_TARGET_S * 1000:.0f} ms: "
          f"{'met' if t_atlas < ATLAS_TARGET_S else 'NOT met'}; CPU {c_atlas * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
