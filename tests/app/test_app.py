"""The app's logic through Streamlit's AppTest, its data layer, the ratings file and the two CLIs.

The world: 48 real PNGs with a planted red patch, a shard folder of real random-dinov2 activations,
two SAE runs with generated inference folders (docs/formats.md) and one run without, computed on the
fly with `traitscope.features.run_inference`.
"""

import html
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

import app_fixtures as fx
from traitscope.app import blind
from traitscope.app.data import (Dataset, InferenceView, find_run_folders, load_npy, open_image_file, parse_int,
                                 safe_child)
from traitscope.cli import main as traitscope_main
from traitscope.errors import TraitscopeError
from locations import APP_MAIN

MAIN = APP_MAIN
N_IMAGES, D_SAE = 48, 128


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return fx.make_world(tmp_path_factory.mktemp("app"), N_IMAGES, D_SAE, fresh_run=True)


def app(world, monkeypatch, **query) -> AppTest:
    args = ["--runs", str(world["root"] / "runs"), "--shards", str(world["shards"].dpath),
            "--ratings", str(world["ratings"]), "--cache", str(world["cache"])]
    monkeypatch.setenv("TRAITSCOPE_APP_ARGS", json.dumps(args))
    at = AppTest.from_file(str(MAIN), default_timeout=120)
    for key, value in query.items():
        at.query_params[key] = value
    return at.run()


def ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def grid_titles(at: AppTest) -> list[str]:
    blocks = [m.value for m in at.markdown if 'class="ts-grid"' in m.value]
    return [html.unescape(t) for block in blocks for t in re.findall(r'<img [^>]*title="([^"]*)"', block)]


def inference(world, run: str = "topk-a") -> InferenceView:
    return InferenceView(world["root"] / "runs" / run / "inference" / world["shards"].hash)


# --- feature pages -------------------------------------------------------------------------------


def test_feature_page_shows_top_images_histogram_frequency_and_enrichment(world, monkeypatch):
    at = ok(app(world, monkeypatch, page="Features", run="topk-a", feature="5"))
    fd = inference(world).feature(5)
    images = world["shards"].images
    assert grid_titles(at) == [images[r]["path"] for r in fd.rows], "the top images, best first, path on hover"
    n_fire = int(inference(world).fire_counts()[5])
    assert [m.value for m in at.metric][:2] == [f"{n_fire}", f"{fd.freq:.3%}"]
    assert all(m.help for m in at.metric), "every number says what it means"
    assert at.query_params["scale"] == "shared" and "colour scale" not in at.markdown[0].value
    assert any('class="ts-colourbar"' in m.value and str(f"{fd.values.max():.3g}") in m.value for m in at.markdown)
    assert len(at.get("vega_lite_chart")) == 1  # the histogram
    assert at.query_params["feature"] == "5"  # the URL names the page: a link or a reload shows it again

    at = ok(app(world, monkeypatch, page="Features", run="topk-a", feature="0"))
    table = at.dataframe[-1].value
    assert table.iloc[0]["label"] == "species_a" and table.iloc[0]["lift"] == pytest.approx(3.0)


def test_feature_page_shows_the_runs_alignment_table_scored_both_ways(world, monkeypatch):
    # an alignment.csv as `traitscope align` wrote it before it scored every method both ways
    fpath = world["root"] / "runs" / "topk-b" / "inference" / world["shards"].hash / "alignment.csv"
    fpath.write_text("level,label,dominant,base_rate,n_pos,method,feature,train_ap,ap,purity\n"
                     "patch,red,False,0.1,40,sae,12,0.7,0.65,0.5\npatch,red,False,0.1,40,dense,-3,0.6,0.55,0.4\n"
                     "patch,red,False,0.1,40,kmeans,3,0.6,0.75,0.4\npatch,red,False,0.1,40,probe,,nan,0.9,1.0\n")
    try:
        at = ok(app(world, monkeypatch, page="Features", run="topk-b", feature="1"))
        (expander,) = [e for e in at.expander if e.label.startswith("Trait alignment")]
        text = "\n".join(m.value for m in expander.markdown)
        dense, sparse = text.split("sparse scores (SAE codes")
        assert "| label | base rate | dense | kmeans −dist | probe |" in dense  # the old file's methods, as they were
        assert "| red | 0.100 | 0.550 / 0.40 [-3] | 0.750 / 0.40 [3] | 0.900 / 1.00 |" in dense
        assert "| red | 0.100 | 0.650 / 0.50 [12] |" in sparse  # the old SAE row: its codes, a sparse score
        other = ok(app(world, monkeypatch, page="Features", run="topk-a", feature="1"))  # no alignment.csv: no table
        assert not [e for e in other.expander if e.label.startswith("Trait alignment")]
    finally:
        fpath.unlink()


def test_dead_feature_says_so(world, monkeypatch):
    at = ok(app(world, monkeypatch, page="Features", run="topk-a", feature=str(D_SAE - 1)))
    assert any("never fires" in i.value for i in at.info)
    assert grid_titles(at) == []


@pytest.mark.parametrize("bad", ["../../etc/passwd", "-1", "1e9", str(D_SAE), "5; rm -rf /", ""])
def test_untrusted_query_parameters_fall_back_safely(world, monkeypatch, bad):
    at = ok(app(world, monkeypatch, page=bad, run=bad, feature=bad, row=bad))
    assert at.radio(key="page").value == "Atlas" and len(atlas_features(at)) == 30
    at = ok(app(world, monkeypatch, page="Feature", run=bad, feature=bad, row=bad))
    assert at.number_input(key="feat-index").value == 0


# --- the atlas -------------------------------------------------------------------------------------


def atlas_features(at: AppTest) -> list[int]:
    blocks = [m.value for m in at.markdown if 'class="ts-atlas"' in m.value]
    return [int(f) for block in blocks for f in re.findall(r'class="ts-strip" data-feature="(\d+)"', block)]


def test_atlas_starts_the_app_sorted_filtered_and_paged(world, monkeypatch):
    at = ok(app(world, monkeypatch))
    inf = inference(world)
    counts = inf.fire_counts()
    alive = np.flatnonzero(counts >= 2)
    by_count = sorted(alive, key=lambda f: (-counts[f], f))
    assert atlas_features(at) == by_count[:30], "start page: the most widespread features, dead ones hidden"
    n_pages = -(-len(alive) // 30)
    seen = []
    for page in range(1, n_pages + 1):  # every feature can be reached: no cap
        at.number_input(key="atlas-page").set_value(page).run()
        seen += atlas_features(ok(at))
    assert seen == by_count

    at.selectbox(key="atlas-sort").set_value("largest activation").run()
    at.number_input(key="atlas-page").set_value(1).run()
    top = np.asarray(inf.top_values[:, 0])
    assert atlas_features(ok(at)) == sorted(alive, key=lambda f: (-top[f], f))[:30]

    at.selectbox(key="atlas-sort").set_value("enrichment significance (q)").run()
    assert atlas_features(ok(at))[0] == 0, "feature 0 fires exactly on species_a images"
    at.text_input(key="atlas-label").input("species_a").run()
    assert 0 in atlas_features(ok(at))
    at.select_slider(key="atlas-q").set_value(0.001).run()
    assert atlas_features(ok(at)) == [0], "only feature 0 is significantly enriched"

    # where it fires: the median position of each top image's strongest patch
    at.select_slider(key="atlas-q").set_value(1.0).run()
    at.text_input(key="atlas-label").input("").run()
    at.selectbox(key="atlas-sort").set_value("images where it fires").run()
    at.slider(key="atlas-x").set_value((0.0, 0.45)).run()
    shown = atlas_features(ok(at))
    maps = np.asarray(inf.array("top_patch_acts"), dtype=np.float32)
    peak_x = [np.median((maps[f].argmax(axis=1)[np.asarray(inf.top_rows[f]) >= 0] % fx.GRID[1] + 0.5) / fx.GRID[1])
              for f in alive]
    assert shown == [f for f in sorted(alive, key=lambda f: (-counts[f], f))
                     if peak_x[list(alive).index(f)] <= 0.45][:30]
    assert 0 < len(shown) < 30


def test_atlas_map_of_the_dictionary(world, monkeypatch):
    at = ok(app(world, monkeypatch))
    at.radio(key="atlas-view").set_value("map of the dictionary").run()
    ok(at)
    assert len(at.get("vega_lite_chart")) == 1
    assert any("Click a point" in c.value for c in at.caption)


def test_browse_by_frequency_and_by_label(world, monkeypatch):
    at = ok(app(world, monkeypatch, page="Features", run="topk-a"))
    at.radio(key="feat-mode").set_value("frequency").run()
    ok(at)
    inf = inference(world)
    picked = next(s for s in at.selectbox if s.key.startswith("feat-freqpick")).value
    freq = np.asarray(inf.image_freq)
    assert freq[picked] == freq[(freq >= 1e-4) & (freq <= 0.5)].max(), "most frequent first"

    at.radio(key="feat-mode").set_value("label").run()
    at.text_input(key="feat-search").input("SPECIES_A").run()
    ok(at)
    picked = next(s for s in at.selectbox if s.key.startswith("feat-lpick")).value
    assert picked == 0, "feature 0 fires exactly on species_a images: most enriched"
    assert "Feature 0" in [h.value for h in at.subheader]


def test_compare_runs_shows_matched_features_side_by_side(world, monkeypatch):
    from traitscope.features.matching import match_features
    from traitscope.sae import load_sae

    at = ok(app(world, monkeypatch, page="Compare runs"))
    runs = world["root"] / "runs"
    matching = match_features(load_sae(runs / "topk-a").W_dec.detach().numpy(),
                              load_sae(runs / "topk-b").W_dec.detach().numpy(),
                              inference(world, "topk-a"), inference(world, "topk-b"))
    n_pairs = int(matching.matched.sum())
    assert n_pairs > 0
    assert f"{n_pairs} matched pairs" in at.radio(key="cmp-view").options
    pairs = [m.value for m in at.markdown if 'class="ts-match"' in m.value][0]
    shown = [int(f) for f in re.findall(r'class="ts-strip" data-feature="(\d+)"', pairs)]
    expected = np.stack([matching.feature_a[matching.matched], matching.feature_b[matching.matched]], 1).ravel()
    assert shown == expected[:len(shown)].tolist() and len(shown) == 2 * min(10, n_pairs)

    only_a = next(o for o in at.radio(key="cmp-view").options if o.split()[1:3] == ["only", "in"])
    at.radio(key="cmp-view").set_value(only_a).run()
    ok(at)


def test_compare_runs_explains_runs_it_cannot_show(world, monkeypatch, tmp_path):
    other = fx.make_run(world["root"] / "runs" / "other-model", world["shards"], d_sae=D_SAE, weights=False)
    config = json.loads((other / "config.json").read_text())
    config["shards"]["model"] = "bioclip"
    (other / "config.json").write_text(json.dumps(config))
    try:
        import streamlit

        streamlit.cache_resource.clear()  # the run list is cached for 30 s
        at = app(world, monkeypatch, page="Compare runs")
        at.multiselect(key="runs").set_value(["topk-a", "topk-b", "other-model"]).run()
        ok(at)
        assert any("trained on bioclip activations" in m.value for m in at.markdown)
        assert "other-model" not in at.selectbox(key="cmp-a-run").options
    finally:
        import shutil
        shutil.rmtree(other)
        streamlit.cache_resource.clear()


def test_run_plots_page(world, monkeypatch):
    run_dpath = world["root"] / "runs" / "topk-a"
    (run_dpath / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "tokens": 1000 * s, "nmse": 1 / s, "l0": 8.0, "dead_frac": 0.1}) + "\n"
        for s in range(1, 6)) + '{"step": 6, "tok')  # a line torn by a kill is skipped
    try:
        at = ok(app(world, monkeypatch, page="Run plots"))
        assert [h.value for h in at.subheader][:2] == ["Sparsity against reconstruction error", "Training curves"]
        assert at.radio(key="plots-metric").value == "nmse"
        assert len(at.get("vega_lite_chart")) >= 3  # Pareto, curves, feature density
        table = at.dataframe[-1].value
        assert table.iloc[0]["feature"] == 0 and table.iloc[0]["label"] == "species_a" and table.iloc[0]["q"] < 1e-6
        at.number_input(key="plots-support").set_value(20).run()
        assert ok(at).dataframe[-1].value.empty, "no label is on 20 of a feature's 16-odd images"
    finally:
        (run_dpath / "metrics.jsonl").unlink()


def test_small_dataset_without_inference_is_computed_on_the_fly(world, monkeypatch):
    at = ok(app(world, monkeypatch, page="Features", run="fresh"))
    assert any("no inference outputs" in i.value for i in at.info)
    at.button(key="feat-compute").click().run()
    ok(at)
    computed = InferenceView(world["root"] / "runs" / "fresh" / "inference" / world["shards"].hash)
    feature = int(np.argmax(np.asarray(computed.image_freq)))
    at.number_input(key="feat-index").set_value(feature).run()
    ok(at)
    images = world["shards"].images
    assert grid_titles(at) == [images[r]["path"] for r in computed.feature(feature).rows]


# --- which features fire where in one image --------------------------------------------------------


def test_image_page_shows_the_strongest_features_of_a_dataset_image(world, monkeypatch):
    at = ok(app(world, monkeypatch, page="Image", row="7"))
    at.selectbox(key="img-run").set_value("topk-a").run()
    ok(at)
    import torch

    from traitscope.sae import load_sae

    sae = load_sae(world["root"] / "runs" / "topk-a")
    acts = world["shards"].acts(fx.LAYER, "patches")
    with torch.no_grad():
        codes = sae.encode(torch.from_numpy(acts.read(7 * 256, 8 * 256).astype(np.float32))).numpy()
    expected = np.argsort(-codes.max(axis=0), kind="stable")[:12]
    expected = expected[codes.max(axis=0)[expected] > 0]
    assert grid_titles(at) == [f"feature {f}" for f in expected]


def test_a_new_image_goes_through_the_manifests_backbone_and_preprocessing(world):
    """An 'uploaded' copy of a dataset image gets the codes the stored activations give."""
    from traitscope.app.data import open_image_file
    from traitscope.app.encode import (dataset_image_codes, load_dataset_backbone, load_run_sae,
                                       new_image_codes)

    dataset = Dataset(world["shards"].dpath)
    run = next(r for r in find_run_folders(world["root"] / "runs")[0] if r.name == "topk-a")
    backbone, weights_match = load_dataset_backbone(dataset)
    assert weights_match
    sae = load_run_sae(run)
    with open(dataset.image_fpath(11), "rb") as f:
        uploaded = open_image_file(f)
    new = new_image_codes(backbone, sae, dataset, run, uploaded)
    stored = dataset_image_codes(sae, dataset, run, 11)
    assert new.shape == stored.shape == (256, D_SAE)
    np.testing.assert_allclose(new, stored, atol=0.05 * float(np.abs(stored).max()))


# --- blind test ------------------------------------------------------------------------------------


def test_too_few_blind_test_candidates_says_what_to_change():
    with pytest.raises(TraitscopeError) as err:
        blind.plan_items(10, 0, np.arange(32), np.arange(4))
    message = str(err.value)
    assert "4 SAE features that fire on at least 16 images" in message and "lower N to 4" in message
    assert "--l1" in message and "--expansion" in message and "docs/faces.md" in message
    with pytest.raises(TraitscopeError, match="N=10 of each kind: 32 dense dimensions, 0 SAE") as err:
        blind.plan_items(10, 0, np.arange(32), np.arange(0))
    assert "lower N" not in str(err.value)  # no N would do
    assert len(blind.plan_items(4, 0, np.arange(32), np.arange(4))) == 8


def rate_next(at: AppTest, rating: int) -> AppTest:
    position = next(int(b.key.split("-")[1]) for b in at.button if b.key and b.key.startswith("rate-"))
    at.button(key=f"rate-{position}-{rating}").click().run()
    return ok(at)


def test_blind_test_saves_each_rating_at_once_and_resumes_after_a_reload(world, monkeypatch):
    at = ok(app(world, monkeypatch, page="Blind test"))
    at.text_input[0].input("rater-7")
    at.number_input[0].set_value(3)
    at.number_input[1].set_value(11)
    at.button[0].click().run()
    ok(at)
    fpath = world["ratings"] / "rater-7.jsonl"
    session = blind.load_session(fpath)
    assert sorted(i.kind for i in session.items) == ["dense"] * 3 + ["sae"] * 3
    assert session.items == blind.load_session(fpath).items  # the plan is in the file
    shown = " ".join(m.value for m in at.markdown)
    assert "dense" not in shown.replace("dense dimension", "")  # the kind is never shown
    for rating in (2, 6, 4):
        at = rate_next(at, rating)
    assert blind.load_session(fpath).ratings == {0: 2, 1: 6, 2: 4}, "each rating is on disk as given"

    # a reload: a new browser session with only the URL's query parameters
    at = ok(app(world, monkeypatch, page="Blind test", session="rater-7"))
    assert "item 4 of 6" in at.get("progress")[0].proto.text
    for rating in (7, 1, 5):
        at = rate_next(at, rating)
    assert any("All 6 items rated" in s.value for s in at.success)
    assert any("Welch" in m.value for m in at.markdown)
    describe = at.dataframe[-1].value
    assert list(describe.index) == ["dense", "sae"] and describe["count"].sum() == 6
    assert len(at.get("image")) == 1  # the histogram


def test_label_tests_keep_their_p_values_for_the_next_server_start(world, tmp_path):
    """The hypergeometric p-values take minutes on a large dictionary: kept in the cache folder, read back
    by the next server; a file of the wrong length is recomputed."""
    from traitscope.app.data import label_cooccurrence

    counts = label_cooccurrence(inference(world), Dataset(world["shards"].dpath), tmp_path)
    fresh = counts.tests(3, p_fpath=tmp_path / "p.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), fresh.p)
    assert fresh.p.max() <= 1 and (fresh.p < 0.05).any()
    np.save(tmp_path / "p.npy", np.full_like(fresh.p, 0.5))  # marked: read back, not recomputed
    assert (counts.tests(3, p_fpath=tmp_path / "p.npy").p == 0.5).all()
    np.save(tmp_path / "p.npy", np.full(3, 0.5))
    np.testing.assert_array_equal(counts.tests(3, p_fpath=tmp_path / "p.npy").p, fresh.p)


def test_blind_test_without_a_usable_run_draws_no_form(world, monkeypatch, tmp_path):
    """The check comes first: no start form to fill in when no run can start a test."""
    fx.make_run(tmp_path / "runs" / "bare", world["shards"], weights=False)  # no inference outputs
    monkeypatch.setenv("TRAITSCOPE_APP_ARGS", json.dumps([
        "--runs", str(tmp_path / "runs"), "--shards", str(world["shards"].dpath), "--ratings", str(tmp_path),
        "--cache", str(world["cache"])]))
    at = AppTest.from_file(str(MAIN), default_timeout=120)
    at.query_params["page"] = "Blind test"
    at = ok(at.run())
    assert not at.text_input and not at.button and not at.get("form")
    assert any("needs a run with inference outputs" in i.value for i in at.info)


@pytest.mark.parametrize("name", ["../../escape", "a/b", ".hidden", "x" * 65, "naïve"])
def test_session_names_cannot_leave_the_ratings_folder(world, monkeypatch, name):
    at = app(world, monkeypatch, page="Blind test", session=name)
    assert not at.exception
    assert any("session name" in e.value for e in at.error)
    with pytest.raises(TraitscopeError):
        blind.session_fpath(world["ratings"], name)
    assert not (world["root"] / "escape.jsonl").exists()


def write_ratings(tmp_path: Path, ratings: dict[int, int]) -> Path:
    items = [blind.Item("dense", 1), blind.Item("sae", 2), blind.Item("dense", 3), blind.Item("sae", 4)]
    session = blind.create_session(tmp_path / "s.jsonl", items, seed=0)
    for position, rating in ratings.items():
        session = session.rate(position, rating)
    return session.fpath


def test_ratings_file_survives_a_torn_last_line_and_refuses_garbage(tmp_path):
    fpath = write_ratings(tmp_path, {0: 3, 1: 6})
    with open(fpath, "ab") as f:
        f.write(b'{"type": "rating", "item": 2, "rat')  # a crash mid-write
    session = blind.load_session(fpath)
    assert session.ratings == {0: 3, 1: 6} and session.next_item == 2
    with pytest.raises(TraitscopeError):
        session.rate(2, 8)
    with pytest.raises(TraitscopeError):
        blind.create_session(fpath, session.items)  # never overwrites
    (tmp_path / "bad.jsonl").write_text('{"type": "rating", "item": 0, "rating": 3}\n')
    with pytest.raises(TraitscopeError):
        blind.load_session(tmp_path / "bad.jsonl")


def test_a_stale_click_never_changes_an_earlier_rating(tmp_path):
    fpath = write_ratings(tmp_path, {0: 3})
    session = blind.load_session(fpath).answer(0, 7)  # the previous page's button, clicked late
    session = session.answer(1, 5)
    assert blind.load_session(fpath).ratings == {0: 3, 1: 5} == session.ratings


def test_ratings_cli_prints_the_summary_and_saves_the_histogram(tmp_path, capsys):
    fpath = write_ratings(tmp_path, {0: 2, 1: 6, 2: 3, 3: 7})
    png = tmp_path / "hist.png"
    assert traitscope_main(["ratings", str(fpath), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "4 of 4 items rated" in out and "Welch" in out
    t = float(re.search(r"t = (-?[\d.]+)", out).group(1))
    import scipy.stats

    assert t == pytest.approx(scipy.stats.ttest_ind([6, 7], [2, 3], equal_var=False).statistic, abs=1e-3)
    assert Image.open(png).size[0] > 200
    assert traitscope_main(["ratings", str(tmp_path / "missing.jsonl")]) == 2


# --- safety of the data layer and the launcher ---------------------------------------------------------


def test_paths_outside_the_images_root_are_refused(world, tmp_path):
    root = world["shards"].manifest["images_root"]
    assert safe_child(Path(root), "a/img_0000.png").is_file()
    for bad in ["../secret.png", "/etc/passwd", "a/../../x.png"]:
        with pytest.raises(TraitscopeError):
            safe_child(Path(root), bad)
    # links are followed as `shards` followed them: images linked in from another folder are viewable,
    # and a link to something that is not an image is still not shown
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (40, 30), "red").save(tmp_path / "elsewhere" / "real.png")
    (Path(root) / "link.png").symlink_to(tmp_path / "elsewhere" / "real.png")
    assert open_image_file(safe_child(Path(root), "link.png")).size == (40, 30)
    (Path(root) / "text-link.png").symlink_to("/etc/hostname")
    with pytest.raises(TraitscopeError):
        open_image_file(safe_child(Path(root), "text-link.png"))

    # a shard folder whose image index points outside its root
    dataset = Dataset(world["shards"].dpath)
    dataset.images = [dict(rec, path="../../../../etc/passwd") for rec in dataset.images]
    with pytest.raises(TraitscopeError):
        dataset.open_image(0)
    for bad_row in (-1, N_IMAGES):
        with pytest.raises(TraitscopeError):
            dataset.image_fpath(bad_row)


def test_untrusted_numbers_and_pickles_are_refused(tmp_path):
    assert parse_int("12", 0, 20) == 12
    for bad in ["-1", "20", "1e3", "0x10", " ", None, "9" * 30, "3.5"]:
        assert parse_int(bad, 0, 20) is None
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(TraitscopeError, match="obj.npy cannot be read"):
        load_npy(tmp_path / "obj.npy")


def test_inference_folders_with_wrong_shapes_are_refused(world, tmp_path):
    import shutil

    src = world["root"] / "runs" / "topk-a" / "inference" / world["shards"].hash
    bad = tmp_path / "inference"
    shutil.copytree(src, bad)
    np.save(bad / "top_rows.npy", np.zeros((3, 3), np.int64))
    with pytest.raises(TraitscopeError, match="top_rows"):
        InferenceView(bad)


def test_app_cli_validates_its_inputs_and_binds_to_localhost(world, tmp_path, capsys):
    assert traitscope_main(["app", "--runs", str(tmp_path / "none"), "--shards", str(world["shards"].dpath)]) == 2
    assert traitscope_main(["app", "--runs", str(world["root"] / "runs"), "--shards", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err
    # --images-root: where the photos lie now, checked against the first image before anything starts
    assert traitscope_main(["app", "--runs", str(world["root"] / "runs"), "--shards", str(world["shards"].dpath),
                            "--images-root", str(tmp_path)]) == 2
    assert f"no {world['shards'].images[0]['path']} there" in capsys.readouterr().err
    from traitscope.app.cli import is_loopback, streamlit_command

    cmd = streamlit_command("127.0.0.1", 8600, ["--runs", "r"])
    flags = dict(zip(cmd[cmd.index("run") + 2::2], cmd[cmd.index("run") + 3::2]))
    assert flags["--server.address"] == "127.0.0.1" and flags["--browser.gatherUsageStats"] == "false"
    assert flags["--server.headless"] == "true"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")


def test_runs_are_found_and_described(world):
    runs = {r.name: r for r in find_run_folders(world["root"] / "runs")[0]}
    assert set(runs) == {"topk-a", "topk-b", "fresh"}
    assert runs["topk-a"].has_inference(world["shards"].hash)
    assert "d_sae=128" in runs["topk-a"].title() and "k=8" in runs["topk-a"].title()
    with pytest.raises(TraitscopeError):
        runs["topk-a"].inference_dpath("../../etc")
    assert os.path.basename(runs["fresh"].dpath) == "fresh"
