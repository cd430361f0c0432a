"""One ranking of top images and one enrichment test, shared by the app, `traitscope grids` and `align`."""

import numpy as np
import pytest
import scipy.sparse
import scipy.stats

from traitscope.app.data import LabelCooccurrence
from traitscope.errors import TraitscopeError
from traitscope.features.enrichment import enrichment_test, top_image_enrichment
from traitscope.features.ranking import RANKINGS, TopImages, grid_ranking, rank_top_images, row_batches


def _brute_force(x_nu: np.ndarray, n: int) -> np.ndarray:
    """Rows by value, highest first, ties to the lower row."""
    return np.stack([np.lexsort((np.arange(len(x_nu)), -x_nu[:, u]))[:n] for u in range(x_nu.shape[1])])


def test_each_order_is_the_brute_force_ranking_whatever_the_batch_size():
    rng = np.random.default_rng(0)
    x_nu = rng.normal(size=(50, 5)) * rng.uniform(0.1, 10, size=(50, 1))  # very different norms
    x_nu[3, :] = x_nu[4, :]  # a tie: the lower row first
    normed = x_nu / np.linalg.norm(x_nu, axis=1, keepdims=True)
    for by, values in (("max", x_nu), ("normalised", normed)):
        top = rank_top_images(row_batches(x_nu, 50), 8, by)
        np.testing.assert_array_equal(top.rows_un, _brute_force(values, 8))
        np.testing.assert_allclose(top.values_un, np.take_along_axis(values.T, top.rows_un, 1), rtol=1e-5)
        small = rank_top_images(row_batches(x_nu, 3), 8, by)
        np.testing.assert_array_equal(small.rows_un, top.rows_un)
        assert top.by == by and top.label == RANKINGS[by]
    assert RANKINGS["max"] == "top images by max activation"
    assert (grid_ranking("cls"), grid_ranking("patches")) == ("normalised", "max")


def test_positive_only_leaves_the_places_of_images_where_a_unit_does_not_fire_empty():
    x_nu = np.array([[0.0, 2.0], [1.0, 0.0], [3.0, 0.0], [0.0, 0.0]])
    top = rank_top_images(row_batches(x_nu, 2), 6, "max", positive_only=True, kind="sae")
    np.testing.assert_array_equal(top.rows_un, [[2, 1, -1, -1, -1, -1], [0, -1, -1, -1, -1, -1]])
    assert (top.values_un[top.rows_un < 0] == 0).all()
    with pytest.raises(TraitscopeError, match="unknown ranking 'mean'"):
        rank_top_images(row_batches(x_nu, 2), 2, "mean")


def test_the_app_and_grids_give_the_same_lift_and_p_for_the_same_images():
    """The app tests a feature's firing images, `grids` a unit's top images: drawn the same images,
    they agree, and both are the one-sided hypergeometric test."""
    rng = np.random.default_rng(1)
    n_images, n_labels = 60, 4
    labels_nl = (rng.random((n_images, n_labels)) < [0.1, 0.3, 0.5, 0.05]).astype(np.int64)
    codes_nf = np.where(rng.random((n_images, 3)) < 0.25, rng.random((n_images, 3)), 0.0)
    codes_nf[:, 0] += labels_nl[:, 1] * (rng.random(n_images) < 0.8)  # feature 0 fires on label 1
    fires_nf = (codes_nf > 0).astype(np.int64)
    both_fl = scipy.sparse.csr_matrix(fires_nf.T @ labels_nl)
    app = LabelCooccurrence([f"l{j}" for j in range(n_labels)], n_images, labels_nl.sum(0), fires_nf.sum(0),
                            both_fl, both_fl.T.tocsr()).tests(min_support=1)
    # grids' view of the same sets: every firing image is a "top image"
    n_fire = int(fires_nf.sum(0).max())
    top = rank_top_images(row_batches(codes_nf, 16), n_fire, "max", positive_only=True, kind="sae")
    grids = top_image_enrichment(top, labels_nl)
    for f, j, count, lift, p in zip(app.features, app.labels, app.counts, app.lift, app.p):
        assert grids.top_count_ua[f, j] == count
        np.testing.assert_allclose([grids.lift_ua[f, j], grids.p_ua[f, j]], [lift, p], rtol=1e-9)
    # and the test is the hypergeometric tail
    test = enrichment_test(7, 10, 20, 60)
    assert test.p == pytest.approx(scipy.stats.hypergeom(60, 20, 10).sf(6))
    assert test.lift == pytest.approx((7 / 10) / (20 / 60))
    best = app.best(3)
    assert best["label"][0] == 1 and best["q"][0] < 0.05


def test_top_images_of_a_unit_that_never_fires_count_nothing():
    top = TopImages("sae", np.full((1, 4), -1), np.zeros((1, 4), np.float32), "max")
    enr = top_image_enrichment(top, np.ones((5, 2), np.int64))
    assert enr.n_top_u[0] == 0 and (enr.top_count_ua == 0).all() and np.isnan(enr.lift_ua).all()
