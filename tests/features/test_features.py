"""Inference over a data set, held-out metrics and baselines, label alignment and enrichment.

Shards are written with `write_arrays`; SAEs are real registered variants with weights set by hand,
so every expectation is computed independently (brute force over all tokens) or known by design.
"""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from traitscope.backbones import Preprocess
from traitscope.cli import main
from traitscope.errors import TraitscopeError
from traitscope.features import Inference, open_inputs, run_inference, split_rows
from traitscope.features.alignment import (align, average_precision_matrix, read_alignment, sparse_average_precision,
                                          summarise, write_report)
from traitscope.features.baselines import DenseBaseline, fit_baselines
from traitscope.features.enrichment import top_label_counts
from traitscope.sae.metrics import MetricsAccumulator
from traitscope.sae import SAEConfig, build_sae
from shard_fixtures import LAYER, make_shards


def save_run(dpath, sae, shards, token_kind="patches", layer=LAYER):
    sae.save(dpath, {"shards": {"hash": shards.hash, "path": str(shards.dpath), "layer": layer,
                                "token_kind": token_kind, "model": shards.model["name"],
                                "weights_sha256": shards.model["weights_sha256"]}})
    return dpath


def topk_sae(d_model, d_sae, k, seed=0):
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig("topk", d_model, d_sae, k=k))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.normal_(std=0.5)
        sae.b_dec.normal_(std=0.1)
    return sae


def brute_force(sae, acts):
    """Codes of every token, (n_images, n_patches, d_sae)."""
    n_images, n_p, d_model = acts.shape
    x = torch.from_numpy(acts.astype(np.float16).astype(np.float32).reshape(-1, d_model))
    with torch.no_grad():
        return sae.encode(x).numpy().reshape(n_images, n_p, -1)


@pytest.fixture
def random_case(tmp_path):
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(23, 12, 8))
    shards = make_shards(tmp_path / "shards", acts, grid=(3, 4),
                         patch_labels=rng.random((23, 12, 2)) < 0.3, image_labels=rng.random((23, 3)) < 0.4)
    sae = topk_sae(8, 12, k=3)
    with torch.no_grad():  # feature 11 can never be among the top 3: dead
        sae.W_enc[:, 11] = 0
        sae.b_enc[11] = -100
    run = save_run(tmp_path / "run", sae, shards)
    return run, shards, sae, acts


def test_inference_matches_brute_force(random_case):
    run, shards, sae, acts = random_case
    top_n = 5
    inf, computed = run_inference(run, shards.dpath, top_n=top_n, chunk_tokens=30, progress=False)  # 2 images a chunk
    assert computed and inf.dpath == run / "inference" / shards.hash
    codes = brute_force(sae, acts)
    n_images, n_p, d_sae = codes.shape
    image_max = codes.max(1).clip(min=0)
    for f in range(d_sae):
        order = [int(i) for i in np.lexsort((np.arange(n_images), -image_max[:, f])) if image_max[i, f] > 0][:top_n]
        want_rows = order + [-1] * (top_n - len(order))
        assert inf.top_rows[f].tolist() == want_rows, f
        np.testing.assert_allclose(inf.top_values[f][:len(order)], image_max[order, f], rtol=1e-5)
        assert (inf.top_values[f][len(order):] == 0).all()
        for slot, row in enumerate(order):
            np.testing.assert_allclose(inf.patch_map(f, slot), codes[row, :, f].reshape(3, 4), rtol=1e-3, atol=1e-3)
    assert inf.top_rows[11].tolist() == [-1] * top_n  # the dead feature
    np.testing.assert_allclose(inf.image_max().toarray(), image_max, rtol=1e-6)
    flat = codes.reshape(-1, d_sae)
    np.testing.assert_allclose(inf.array("feature_freq"), (flat > 0).mean(0), rtol=1e-6)
    np.testing.assert_allclose(inf.array("feature_image_freq"), (image_max > 0).mean(0), rtol=1e-6)
    np.testing.assert_allclose(inf.array("feature_mean"), flat.clip(min=0).mean(0), rtol=1e-5, atol=1e-7)
    edges = inf.array("hist_edges")
    for f in range(d_sae):
        v = np.log10(flat[flat[:, f] > 0, f]).clip(edges[0], edges[-1] - 1e-9)
        assert inf.array("feature_hist")[f].tolist() == np.histogram(v, bins=edges)[0].tolist()
    manifest = inf.manifest
    assert (manifest["n_images"], manifest["n_patches"], manifest["grid"], manifest["top_n"], manifest["d_sae"]) == \
        (23, 12, [3, 4], top_n, 12)


def test_planted_tops_are_known(tmp_path):
    """Identity encoder, k=1: feature f fires on the token where dimension f is largest."""
    n_images, n_p, d = 6, 4, 3
    acts = np.zeros((n_images, n_p, d))
    acts[:, :, :] = 0.01
    for i in range(n_images):
        acts[i, i % n_p, i % d] = 1 + i  # image i peaks in dimension i % d, at patch i % n_p
    shards = make_shards(tmp_path / "shards", acts, grid=(2, 2))
    sae = build_sae(SAEConfig("topk", d, d, k=1))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    run = save_run(tmp_path / "run", sae, shards)
    inf, _ = run_inference(run, shards.dpath, top_n=3, progress=False)
    # dimension 0 peaks in images 0 (value 1) and 3 (value 4); ties at 0.01 elsewhere go to earlier rows
    assert inf.top_images(0)[:2] == [(3, pytest.approx(4.0, rel=1e-3)), (0, pytest.approx(1.0, rel=1e-3))]
    assert inf.top_images(2)[:2] == [(5, pytest.approx(6.0, rel=1e-3)), (2, pytest.approx(3.0, rel=1e-3))]
    peak = inf.patch_map(0, 0).reshape(-1)
    assert peak.argmax() == 3 % n_p and peak[3 % n_p] == pytest.approx(4.0, rel=1e-3)


def test_rerun_reuses_and_changes_recompute(random_case):
    run, shards, sae, _ = random_case
    inf, computed = run_inference(run, shards.dpath, top_n=4, progress=False)
    stamp = (inf.dpath / "top_rows.npy").stat().st_mtime_ns
    inf2, computed2 = run_inference(run, shards.dpath, top_n=4, progress=False)
    assert computed and not computed2 and (inf2.dpath / "top_rows.npy").stat().st_mtime_ns == stamp

    (inf.dpath / "stale.npy").write_bytes(b"from an older run")
    with torch.no_grad():
        sae.W_enc.mul_(-1)
    save_run(run, sae, shards)
    inf3, computed3 = run_inference(run, shards.dpath, top_n=4, progress=False)
    assert computed3 and inf3.manifest["sae_sha256"] != inf.manifest["sae_sha256"]
    assert not (inf3.dpath / "stale.npy").exists()  # replaced whole, never mixed
    assert not inf3.dpath.with_name(inf3.dpath.name + ".partial").exists()
    np.testing.assert_allclose(inf3.image_max().toarray(), brute_force(sae, random_case[3]).max(1).clip(min=0),
                               rtol=1e-6)

    _, computed4 = run_inference(run, shards.dpath, top_n=5, progress=False)
    assert computed4  # other settings: recomputed
    manifest = json.loads((inf3.dpath / "manifest.json").read_text())
    manifest["format"] = manifest["settings"]["format"] = "traitscope-inference/0"
    (inf3.dpath / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TraitscopeError, match="format"):
        Inference(inf3.dpath)
    inf5, computed5 = run_inference(run, shards.dpath, top_n=5, progress=False)
    assert computed5 and inf5.manifest["format"] == "traitscope-inference/1"


def test_sae_and_shards_must_match(tmp_path, capsys):
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(4, 3, 8))
    shards = make_shards(tmp_path / "a", acts)
    run = save_run(tmp_path / "run", topk_sae(8, 6, 2), shards)

    other_model = make_shards(tmp_path / "b", acts, weights="cd" * 32)
    with pytest.raises(TraitscopeError, match="weights sha256"):
        open_inputs(run, other_model.dpath)
    other_layer = make_shards(tmp_path / "c", acts, layer=3)
    with pytest.raises(TraitscopeError, match="layer 2"):
        open_inputs(run, other_layer.dpath)
    other_width = make_shards(tmp_path / "d", rng.normal(size=(4, 3, 6)))
    with pytest.raises(TraitscopeError, match="width"):
        open_inputs(run, other_width.dpath)
    # the same model and layer on another data set is allowed
    new_data = make_shards(tmp_path / "e", rng.normal(size=(5, 3, 8)), tag="new data")
    assert new_data.hash != shards.hash
    inf, _ = run_inference(run, new_data.dpath, progress=False)
    assert inf.n_images == 5 and inf.dpath.name == new_data.hash

    assert main(["inference", "--run", str(run), "--shards", str(other_model.dpath), "--quiet"]) == 2
    assert "weights sha256" in capsys.readouterr().err


def test_cls_sae_writes_codes_and_tops(tmp_path):
    rng = np.random.default_rng(2)
    acts, cls = rng.normal(size=(9, 4, 8)), rng.normal(size=(9, 8))
    shards = make_shards(tmp_path / "shards", acts, cls=cls, patch_labels=rng.random((9, 4, 1)) < 0.5,
                         image_labels=(cls[:, :1] > 0))
    sae = topk_sae(8, 10, 3)
    run = save_run(tmp_path / "run", sae, shards, token_kind="cls")
    inf, _ = run_inference(run, shards.dpath, top_n=4, chunk_tokens=2, progress=False)
    codes = brute_force(sae, cls[:, None, :])[:, 0]
    np.testing.assert_allclose(inf.array("cls_codes"), codes, rtol=1e-6)
    assert not (inf.dpath / "top_patch_acts.npy").exists()
    for f in range(10):
        order = [int(i) for i in np.lexsort((np.arange(9), -codes[:, f])) if codes[i, f] > 0][:4]
        assert inf.top_rows[f].tolist() == order + [-1] * (4 - len(order))
    assert inf.manifest["token_kind"] == "cls" and inf.manifest["n_patches"] == 1
    # image labels align at image level; patch labels do not apply to an image-level SAE
    inputs = open_inputs(run, shards.dpath)
    rows = align(inputs, inf, fit_baselines(cls.astype(np.float32), pca_k=2, n_clusters=4))
    assert {r.level for r in rows} == {"image"}
    assert by_method(rows, "image", "i0")["dense"].feature == "0"  # the label is dimension 0 > 0


def by_method(rows, level, label, scoring="dense"):
    return {r.method: r for r in rows if r.level == level and r.label == label and r.scoring == scoring}


def test_metrics_formulas_and_baselines():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(200, 5)) * [1, 2, 3, 4, 5] + 7).float()
    x_hat = x + torch.from_numpy(rng.normal(size=(200, 5)) * 0.3 + 0.5).float()
    codes = torch.zeros(200, 4)
    codes[:30, 0] = 1   # 15%: dense
    codes[:10, 1] = 2   # 5%
    acc = MetricsAccumulator(5, 4)
    for s in range(0, 200, 64):
        acc.add(x[s:s + 64], x_hat[s:s + 64], codes[s:s + 64])
    m = acc.result()
    xn, rn = x.double().numpy(), (x - x_hat).double().numpy()
    assert m.nmse == pytest.approx((rn ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum(), rel=1e-9)
    assert m.explained_variance == pytest.approx(1 - rn.var(0).sum() / xn.var(0).sum(), rel=1e-9)
    assert (m.l0, m.dead_frac, m.dense_frac, m.n_tokens) == (pytest.approx(0.2), 0.5, 0.25, 200)

    pca_full, kmeans = fit_baselines(x.numpy(), pca_k=5, n_clusters=3)[1:]
    x_hat_pca, pca_codes = pca_full.reconstruct(x)
    assert torch.allclose(x_hat_pca, x, atol=1e-4) and pca_codes.shape == (200, 5)
    x_hat_km, km_codes = kmeans.reconstruct(x)
    assert (km_codes.sum(1) == 1).all() and km_codes.shape == (200, 3)
    dist = torch.cdist(x, kmeans.centers_cd)
    assert torch.allclose(x_hat_km, kmeans.centers_cd[dist.argmin(1)])
    assert torch.allclose(kmeans.scores(x), -dist, atol=1e-3)
    assert torch.equal(DenseBaseline(5).reconstruct(x)[0], x)


def test_average_precision_matches_sklearn():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(4)
    scores = rng.integers(0, 4, size=(300, 7)).astype(np.float32) * (rng.random((300, 7)) < 0.3)  # ties, zeros
    scores[:, 0] = rng.normal(size=300)
    scores[:, 1] = 0
    scores[:, 2] = rng.random(300) + 0.1  # positive everywhere
    y = (rng.random((300, 3)) < 0.25).astype(np.float32)
    want = [[average_precision_score(y[:, j], scores[:, f]) for j in range(3)] for f in range(7)]
    got = average_precision_matrix(torch.from_numpy(scores), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9)
    items, feats = np.nonzero(scores[:, 1:] > 0)  # the non-negative columns, given sparsely
    sparse = sparse_average_precision(torch.from_numpy(items), torch.from_numpy(feats),
                                      torch.from_numpy(scores[:, 1:][items, feats]), 6, torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(sparse, np.array(want)[1:], rtol=1e-9)


def planted_case(tmp_path, n_images=60, n_p=16, d=16, seed=5):
    """Noise activations; a 'trait' planted on ~15% of patches along direction v, and a dominant
    'background' label; the SAE's feature 0 reads v (fires only on the trait), the others are noise."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=d)
    v /= np.linalg.norm(v)
    trait = rng.random((n_images, n_p)) < 0.15
    acts = rng.normal(size=(n_images, n_p, d)) + 6 * trait[..., None] * v
    background = ~trait & (rng.random((n_images, n_p)) < 0.9)
    patch_labels = np.stack([trait, background], -1)
    image_labels = np.stack([trait.sum(1) >= 3], -1)
    shards = make_shards(tmp_path / "shards", acts, grid=(4, 4), patch_labels=patch_labels, image_labels=image_labels,
                         label_names={"patch": ["trait", "background"], "image": ["many_traits"]})
    sae = topk_sae(d, 24, k=2, seed=seed)
    with torch.no_grad():
        sae.W_enc.mul_(0.05)
        sae.W_enc[:, 0] = torch.from_numpy(v).float()
        sae.b_enc.zero_()
        sae.b_enc[0] = -3
        sae.b_dec.zero_()
    return save_run(tmp_path / "run", sae, shards), shards


def test_alignment_finds_the_planted_feature(tmp_path):
    run, shards = planted_case(tmp_path)
    inputs = open_inputs(run, shards.dpath)
    inf, _ = run_inference(run, shards.dpath, progress=False, inputs=inputs)
    baselines = fit_baselines(inputs.acts[:].astype(np.float32), pca_k=2, n_clusters=24)
    rows = align(inputs, inf, baselines)
    by = {(r.level, r.label, r.method, r.scoring): r for r in rows}
    for scoring in ("sparse", "dense"):  # the planted latent wins as codes and as pre-activations
        sae_trait = by["patch", "trait", "sae", scoring]
        assert sae_trait.feature == "0" and sae_trait.ap > 0.95
        assert sae_trait.purity == min(16, sae_trait.n_pos) / 16  # every top patch is a trait patch
    assert {(m, s) for (_, label, m, s) in by if label == "trait"} == {
        (m, s) for m in ("sae", "dense", "pca", "kmeans") for s in ("dense", "sparse", "set")} | {("probe", "dense")}
    assert by["patch", "trait", "probe", "dense"].ap > 0.9
    assert by["patch", "background", "sae", "sparse"].dominant and not sae_trait.dominant
    summary = {(s.level, s.method, s.scoring): s for s in summarise(rows)}
    assert summary["patch", "sae", "sparse"].n_labels == 1 and summary["patch", "sae", "sparse"].coverage == 1.0
    assert by["image", "many_traits", "sae", "sparse"].feature == "0"
    assert by["image", "many_traits", "sae", "dense"].feature == "0"
    train, held = split_rows(inputs)
    assert len(held) == 6 and len(np.intersect1d(train, held)) == 0


def test_a_trait_split_over_two_features_is_found_by_their_set(tmp_path):
    """A trait carried by two directions (half its patches each: 'red circles' and 'red squares' for
    'red'), one SAE latent per direction: either latent alone finds half the trait; the set of the two
    finds all of it, and the set grows no further (the other latents are noise)."""
    rng = np.random.default_rng(0)
    n_images, n_p, d = 80, 16, 16
    v, w = np.linalg.qr(rng.normal(size=(d, 2)))[0].T
    kind = rng.choice(3, size=(n_images, n_p), p=[0.7, 0.15, 0.15])  # 0: none, 1: along v, 2: along w
    acts = rng.normal(size=(n_images, n_p, d)) + 6 * (kind == 1)[..., None] * v + 6 * (kind == 2)[..., None] * w
    shards = make_shards(tmp_path / "shards", acts, grid=(4, 4), patch_labels=(kind > 0)[..., None],
                         label_names={"patch": ["trait"]})
    sae = topk_sae(d, 24, k=2, seed=0)
    with torch.no_grad():
        sae.W_enc.mul_(0.05)
        sae.W_enc[:, 0], sae.W_enc[:, 1] = torch.from_numpy(v).float(), torch.from_numpy(w).float()
        sae.b_enc.zero_()
        sae.b_enc[:2] = -3
        sae.b_dec.zero_()
    run = save_run(tmp_path / "run", sae, shards)
    inputs = open_inputs(run, shards.dpath)
    inf, _ = run_inference(run, shards.dpath, progress=False, inputs=inputs)
    rows = align(inputs, inf, fit_baselines(inputs.acts[:].astype(np.float32), pca_k=2, n_clusters=24))
    by = {(r.method, r.scoring): r for r in rows if r.label == "trait"}
    single, joint = by["sae", "sparse"], by["sae", "set"]
    assert single.feature in ("0", "1") and single.ap < 0.8
    assert sorted(joint.feature.split("+")) == ["0", "1"] and joint.ap > 0.95 and joint.train_ap > single.train_ap
    summary = {(s.method, s.scoring): s for s in summarise(rows)}
    assert summary["sae", "set"].mean_ap > summary["sae", "sparse"].mean_ap + 0.2


def test_enrichment_counts(random_case):
    run, shards, _, _ = random_case
    inf, _ = run_inference(run, shards.dpath, top_n=4, progress=False)
    image_enr, patch_enr = top_label_counts(inf, shards)
    image_labels, patch_labels = shards.image_labels(), shards.patch_labels()[:]
    maps = np.asarray(inf.array("top_patch_acts"))
    for f in range(inf.d_sae):
        top = [r for r in inf.top_rows[f] if r >= 0]
        assert image_enr.counts[f].tolist() == image_labels[top].sum(0).tolist()
        peaks = [r * 12 + int(maps[f, s].argmax()) for s, r in enumerate(top)]
        assert patch_enr.counts[f].tolist() == patch_labels[peaks].sum(0).tolist()
        assert image_enr.n_top[f] == len(top)


def test_align_cli_end_to_end(tmp_path, capsys):
    run, shards = planted_case(tmp_path)
    args = ["--run", str(run), "--shards", str(shards.dpath), "--quiet", "--fit-tokens", "500"]
    assert main(["inference", *args]) == 0
    out = capsys.readouterr().out
    assert "| sae |" in out and "| dense |" in out and "kmeans (24)" in out
    assert main(["align", *args]) == 0
    out = capsys.readouterr().out
    assert "reused" in out and "| trait |" in out and "Dominant labels" in out
    dpath = run / "inference" / shards.hash
    for name in ("metrics.csv", "alignment.csv", "alignment.md", "enrichment.csv"):
        assert (dpath / name).is_file(), name
    # the baselines were fitted once, beside the shards; another SAE on the same shards and split reuses them
    (cached,) = (shards.dpath / "baselines").glob("L2-patches-*.safetensors")
    fitted_at = cached.stat().st_mtime_ns
    other = save_run(tmp_path / "other", topk_sae(16, 24, k=4, seed=1), shards)
    assert main(["inference", "--run", str(other), "--shards", str(shards.dpath), "--fit-tokens", "500"]) == 0
    out = capsys.readouterr().out
    assert f"reused the baselines fitted on these shards: {cached}" in out and "kmeans (24)" in out
    assert cached.stat().st_mtime_ns == fitted_at
    # other settings fit anew, beside the first
    assert main(["inference", *args, "--kmeans-clusters", "5"]) == 0
    assert "kmeans (5)" in capsys.readouterr().out
    assert len(list((shards.dpath / "baselines").glob("*.safetensors"))) == 2


def test_align_rejects_missing_or_mismatched_labels(tmp_path, capsys):
    rng = np.random.default_rng(6)
    acts = rng.normal(size=(8, 4, 8))
    unlabelled = make_shards(tmp_path / "a", acts)
    run = save_run(tmp_path / "run", topk_sae(8, 6, 2), unlabelled)
    assert main(["align", "--run", str(run), "--shards", str(unlabelled.dpath), "--quiet"]) == 2
    assert "no labels" in capsys.readouterr().err
    # the manifest names two patch labels, the arrays hold three
    mismatched = make_shards(tmp_path / "b", acts, patch_labels=rng.random((8, 4, 3)) < 0.5,
                             label_names={"patch": ["x", "y"]}, tag="mismatch")
    run2 = save_run(tmp_path / "run2", topk_sae(8, 6, 2), mismatched)
    assert main(["align", "--run", str(run2), "--shards", str(mismatched.dpath), "--quiet"]) == 2
    err = capsys.readouterr().err  # the damaged file is named, with the way to repair it
    assert "labels/patch" in err and "rerun `traitscope shards`" in err


def test_trained_runs_end_to_end(tmp_path, capsys):
    """`traitscope train` -> pareto, inference (held-out = the run's validation images) and align."""
    _, shards = planted_case(tmp_path, n_images=80)
    runs = tmp_path / "runs"
    assert main(["train", "--shards", str(shards.dpath), "--sae", "topk", "--k", "2,4", "--d-sae", "32",
                 "--tokens", "6000", "--batch-size", "256", "--val-frac", "0.2", "--out", str(runs), "--quiet"]) == 0
    run_dpaths = sorted(p.parent for p in runs.rglob("sae.safetensors"))
    assert len(run_dpaths) == 2
    capsys.readouterr()

    assert main(["pareto", "--runs", str(runs)]) == 0
    assert "2 runs" in capsys.readouterr().out and (runs / "pareto.csv").is_file()

    run = run_dpaths[0]
    args = ["--run", str(run), "--shards", str(shards.dpath), "--quiet", "--fit-tokens", "1000"]
    assert main(["align", *args]) == 0
    assert "| trait |" in capsys.readouterr().out
    inputs = open_inputs(run, shards.dpath)
    config = json.loads((run / "config.json").read_text())
    assert split_rows(inputs)[1].tolist() == config["train"]["val_rows"]
    # the same split and the same metric code as the trainer: the SAE row equals its metrics.json
    with open(run / "inference" / shards.hash / "metrics.json") as f:
        sae_row = json.load(f)["rows"]["sae"]
    trained = json.loads((run / "metrics.json").read_text())
    assert sae_row["nmse"] == pytest.approx(trained["nmse"], rel=1e-4)
    assert sae_row["l0"] == pytest.approx(trained["l0"], rel=1e-6)
    assert main(["inference", *args]) == 0
    assert "reused" in capsys.readouterr().out


def test_export_features_matches_brute_force(tmp_path, capsys):
    """Per-image max, mean, firing share and peak patch of chosen features, with the peak's position in
    the original image; CSV and Parquet hold the same table."""
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(9, 12, 8))
    # 80x40 photos under the grid geometry into a 42x56 input (3x4 patches of 14 px): resized to 56x28,
    # 7 px of padding above and below, so the input spans x 0..80 and y -10..50 of the original
    pre = Preprocess(crop=48, resize=48, mode="grid", size=(42, 56))
    shards = make_shards(tmp_path / "shards", acts, grid=(3, 4), image_labels=rng.random((9, 2)) < 0.5,
                         preprocess=json.loads(json.dumps(dataclasses.asdict(pre))), image_size=(80, 40))
    sae = topk_sae(8, 12, k=3)
    with torch.no_grad():  # feature 11 never fires
        sae.W_enc[:, 11] = 0
        sae.b_enc[11] = -100
    run = save_run(tmp_path / "run", sae, shards)
    args = ["export-features", "--run", str(run), "--shards", str(shards.dpath), "--features", "0-2,11", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "t.csv")]) == 0
    assert "9 images x 4 features = 36 rows" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "t.csv")
    features = [0, 1, 2, 11]
    codes = brute_force(sae, acts)[:, :, features].clip(min=0)  # (image, patch, feature)
    assert table["image"].tolist() == [f"{i}.png" for i in range(9) for _ in features]
    assert table["feature"].tolist() == features * 9
    labels = shards.image_labels()
    assert table["label_i1"].tolist() == np.repeat(labels[:, 1], 4).tolist()
    np.testing.assert_allclose(table["max"], codes.max(1).reshape(-1), rtol=1e-5)
    np.testing.assert_allclose(table["mean"], codes.mean(1).reshape(-1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(table["frac_patches"], (codes > 0).mean(1).reshape(-1), rtol=1e-6)
    fired = codes.max(1).reshape(-1) > 0
    assert fired.any() and not fired[3::4].any()  # feature 11 never fires: no peak
    peak = codes.argmax(1).reshape(-1)
    assert table["peak_patch"][fired].tolist() == peak[fired].tolist() and table["peak_patch"][~fired].isna().all()
    row, col = peak // 4, peak % 4
    np.testing.assert_allclose(table["peak_x"][fired], ((col + 0.5) / 4)[fired], rtol=1e-6)
    np.testing.assert_allclose(table["peak_y"][fired], ((-10 + (row + 0.5) * 20) / 40)[fired], rtol=1e-6)
    assert table["peak_x"][~fired].isna().all()

    assert main([*args, "--out", str(tmp_path / "t.parquet")]) == 0
    parquet = pd.read_parquet(tmp_path / "t.parquet")
    assert parquet["label"].isna().all() and table["label"].isna().all()  # no image has a class label
    pd.testing.assert_frame_equal(parquet.drop(columns="label"), table.drop(columns="label"), check_dtype=False)
    assert main([*args, "--features", "12", "--out", str(tmp_path / "x.csv")]) == 2
    assert "not a feature of this SAE (0..11)" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "t.xlsx")]) == 2
    assert ".csv or .parquet" in capsys.readouterr().err


def test_sparse_baseline_scores_keep_the_saes_l0():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    dense, pca, kmeans = fit_baselines(x, pca_k=2, n_clusters=5)
    xt = torch.from_numpy(x[:50])
    for b in (dense, pca):  # each token keeps its 3 largest of +s and -s: its 3 largest |s|, with their sign
        s = b.sparse_scores(xt, 3)
        assert s.shape == (50, 2 * b.n_features) and ((s > 0).sum(1) == 3).all() and (s >= 0).all()
        top = b.scores(xt).abs().topk(3, dim=1).values
        assert torch.allclose(s.topk(3, dim=1).values, top)
    hard = kmeans.sparse_scores(xt, 3)  # k-means: the hard assignment, one 1 per token at its nearest centroid
    assert (hard.sum(1) == 1).all() and (hard.argmax(1) == kmeans.scores(xt).argmax(1)).all()


def test_alignment_csv_written_before_the_scoring_column_still_reads(tmp_path):
    old = tmp_path / "alignment.csv"  # the columns of an alignment.csv written before dense/sparse scoring
    old.write_text("level,label,dominant,base_rate,n_pos,method,feature,train_ap,ap,purity\n"
                   "patch,stripes,False,0.1,40,sae,12,0.7,0.65,0.5\n"
                   "patch,stripes,False,0.1,40,kmeans,3,0.6,0.55,0.4\n"
                   "patch,stripes,False,0.1,40,probe,,nan,0.9,1.0\n")
    rows = read_alignment(old)
    assert [(r.method, r.scoring) for r in rows] == [("sae", "sparse"), ("kmeans", "dense"), ("probe", "dense")]
    assert rows[0].ap == 0.65 and rows[0].feature == "12" and not rows[0].dominant and np.isnan(rows[2].train_ap)
    write_report(rows, tmp_path / "new.csv", tmp_path / "new.md")
    assert repr(read_alignment(tmp_path / "new.csv")) == repr(rows)  # (NaN != NaN: compare the text)
