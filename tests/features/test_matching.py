"""Matching the features of two SAEs (traitscope.features.matching and `traitscope match`)."""

import csv

import numpy as np
import pytest

import app_fixtures as fx
from traitscope.cli import main as traitscope_main

D_SAE = 64


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("match")
    shards = fx.make_shards(root / "shards", root / "images", 24)
    run_a = fx.make_run(root / "runs" / "a", shards, d_sae=D_SAE, k=8)
    perm = np.random.default_rng(3).permutation(D_SAE)
    run_b = fx.permuted_run(run_a, root / "runs" / "b", perm)
    return root, shards, run_a, run_b, perm


def test_match_pairs_a_reordered_copy_feature_by_feature(runs, capsys):
    root, shards, run_a, run_b, perm = runs
    out = root / "match.csv"
    assert traitscope_main(["match", str(run_a), str(run_b), "--shards", str(shards.dpath), "--out", str(out),
                            "--quiet"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert "matched pairs" in capsys.readouterr().out
    matched = [r for r in rows if r["matched"] == "True"]
    assert matched and len(matched) == len(rows), "every feature that fires has its twin"
    b_of_a = {int(r["feature_a"]): int(r["feature_b"]) for r in matched}
    assert all(perm[b] == a for a, b in b_of_a.items()), "B's feature j is A's feature perm[j]"
    assert all(float(r["decoder_cosine"]) > 0.999 and float(r["activation_corr"]) > 0.999 for r in matched)
    assert [int(r["images_a"]) for r in matched] == [int(r["images_b"]) for r in matched]


def test_match_lists_what_only_one_run_has(runs):
    from traitscope.features import Inference
    from traitscope.features.matching import match_features
    from traitscope.sae import load_sae

    root, shards, run_a, run_b, perm = runs
    inf_a = Inference(run_a / "inference" / shards.hash)
    inf_b = Inference(run_b / "inference" / shards.hash)
    W_a = load_sae(run_a).W_dec.detach().numpy()
    W_b = load_sae(run_b).W_dec.detach().numpy()
    m = match_features(W_a, W_b, inf_a, inf_b, min_images=1)
    assert m.matched.all()
    # nothing reaches the bar: every feature of each run is listed once, unmatched, with its twin as partner
    none = match_features(W_a, W_b, inf_a, inf_b, min_score=1.01, min_images=1)
    assert not none.matched.any()
    lone_a, lone_b = none.feature_b < 0, none.feature_a < 0
    assert sorted(none.feature_a[lone_a]) == sorted(m.feature_a) and sorted(none.feature_b[lone_b]) == sorted(m.feature_b)
    assert all(perm[b] == a for a, b in zip(none.feature_a[lone_a], none.partner[lone_a]))
    assert all(perm[b] == a for a, b in zip(none.partner[lone_b], none.feature_b[lone_b]))


def test_match_refuses_bad_input_in_one_line(runs, capsys):
    root, shards, run_a, run_b, perm = runs
    assert traitscope_main(["match", str(run_a), str(run_b), "--shards", str(shards.dpath), "--out",
                            str(root / "nowhere" / "m.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
