"""Paired tests on known truth: DeLong against a bootstrap, the spatial block bootstrap, the rigid null."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import rioxarray  # noqa: F401
import xarray as xr

from pipeline.evaluation import evaluate as ev
from pipeline.evaluation import paired as pr
from pipeline.evaluation.deposits import EvaluationError

CRS = "EPSG:32650"
X0, Y0, RES = 500_000.0, 2_600_000.0, 100.0


def _map(values: np.ndarray) -> xr.DataArray:
    h, w = values.shape
    da = xr.DataArray(
        np.asarray(values, dtype="float32"),
        dims=("y", "x"),
        coords={"y": Y0 - RES * (np.arange(h) + 0.5), "x": X0 + RES * (np.arange(w) + 0.5)},
    )
    return da.rio.write_crs(CRS)


def _points(da, rows, cols) -> gpd.GeoDataFrame:
    x, y = da["x"].values[np.asarray(cols)], da["y"].values[np.asarray(rows)]
    return gpd.GeoDataFrame(geometry=gpd.points_from_xy(x, y), crs=CRS)


def test_placement_values_give_the_auc():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 30).round(1), rng.normal(0, 1, 300).round(1)  # rounded: ties
    v10, v01 = pr.placement_values(pos, neg)
    auc = roc_auc_score(np.r_[np.ones(30), np.zeros(300)], np.r_[pos, neg])
    assert v10.mean() == pytest.approx(auc) and v01.mean() == pytest.approx(auc)


def test_delong_agrees_with_a_bootstrap():
    """Correlated scores of the same cells: DeLong's SE of the AUC difference matches a case bootstrap."""
    rng = np.random.default_rng(1)
    p_, n_ = 40, 2000
    shared_p, shared_n = rng.normal(size=p_), rng.normal(size=n_)
    pos_a, neg_a = 1.0 + shared_p + 0.6 * rng.normal(size=p_), shared_n + 0.6 * rng.normal(size=n_)
    pos_b, neg_b = 0.6 + shared_p + 0.6 * rng.normal(size=p_), shared_n + 0.6 * rng.normal(size=n_)
    d = pr.delong_test(pos_a, neg_a, pos_b, neg_b)
    diffs = []
    for _ in range(2000):
        i, j = rng.integers(0, p_, p_), rng.integers(0, n_, n_)
        va, _ = pr.placement_values(pos_a[i], neg_a[j])
        vb, _ = pr.placement_values(pos_b[i], neg_b[j])
        diffs.append(va.mean() - vb.mean())
    boot_se = float(np.std(diffs, ddof=1))
    assert d["diff"] > 0.05
    assert d["se"] == pytest.approx(boot_se, rel=0.2)
    # the correlation matters: an unpaired SE (sum of the two variances) would be much larger
    va, wa = pr.placement_values(pos_a, neg_a)
    vb, wb = pr.placement_values(pos_b, neg_b)
    unpaired = np.sqrt(va.var(ddof=1) / p_ + wa.var(ddof=1) / n_ + vb.var(ddof=1) / p_ + wb.var(ddof=1) / n_)
    assert d["se"] < 0.8 * unpaired


def test_delong_size_under_the_null():
    """Two equally good, correlated scores: p < 0.05 about 5 % of the time (200 replications)."""
    rng = np.random.default_rng(2)
    rejections = 0
    for _ in range(200):
        sp, sn = rng.normal(size=25), rng.normal(size=500)
        pa, na = 0.8 + sp + rng.normal(size=25), sn + rng.normal(size=500)
        pb, nb = 0.8 + sp + rng.normal(size=25), sn + rng.normal(size=500)
        rejections += pr.delong_test(pa, na, pb, nb)["p_value"] < 0.05
    assert 2 <= rejections <= 22  # binomial(200, 0.05): 10 +- 3.1


def test_delong_detects_a_real_difference_and_checks_pairing():
    rng = np.random.default_rng(3)
    pos, neg = rng.normal(size=40), rng.normal(size=1000)
    d = pr.delong_test(pos + 1.5, neg, pos, neg)
    assert d["p_value"] < 1e-4 and d["ci_low"] > 0
    with pytest.raises(EvaluationError, match="same cells"):
        pr.delong_test(pos, neg, pos[:-1], neg)


def _smooth_field(rng, h, w, scale):
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.normal(size=(h, w)), scale)
    return f / f.std()


def test_block_bootstrap_wider_than_cellwise_on_correlated_maps():
    """Spatially smooth noise: cell-wise resampling understates the uncertainty; blocks of the
    correlation length widen the CI; both agree with DeLong when blocks are single cells."""
    rng = np.random.default_rng(4)
    h, w = 96, 96
    truth = _smooth_field(rng, h, w, 4)
    a = _map(truth + 0.5 * _smooth_field(rng, h, w, 4))
    b = _map(truth + 0.5 * _smooth_field(rng, h, w, 4))
    idx = np.argsort(truth.ravel())[-200:]
    idx = rng.choice(idx, 30, replace=False)
    pts = _points(a, idx // w, idx % w)
    one = pr.block_bootstrap_auc_diff(a, b, pts, block=1, n_boot=400, seed=0)
    big = pr.block_bootstrap_auc_diff(a, b, pts, block=16, n_boot=400, seed=0)
    dl = pr.delong_maps(a, b, pts)
    assert one["diff"] == pytest.approx(dl["diff"]) == pytest.approx(big["diff"])
    assert one["se"] == pytest.approx(dl["se"], rel=0.3)
    assert big["se"] > 1.3 * one["se"]
    assert big["ci_low"] <= big["diff"] <= big["ci_high"]


def test_block_bootstrap_finds_a_better_map():
    rng = np.random.default_rng(5)
    h, w = 64, 64
    base = rng.normal(size=(h, w))
    idx = rng.choice(h * w, 25, replace=False)
    good = base.copy()
    good.flat[idx] += 3.0
    a, b = _map(good), _map(base)
    pts = _points(a, idx // w, idx % w)
    res = pr.block_bootstrap_auc_diff(a, b, pts, block=8, n_boot=300, seed=1)
    assert res["ci_low"] > 0.2 and res["p_value"] < 0.01
    # the same blocks for both maps: a map against itself has a zero-width CI
    same = pr.block_bootstrap_auc_diff(a, a, pts, block=8, n_boot=50, seed=1)
    assert same["ci_low"] == same["ci_high"] == 0.0


def test_rigid_placements_keep_the_nearest_neighbour_distances():
    rng = np.random.default_rng(6)
    h, w = 120, 150
    vals = rng.random((h, w))
    vals[:10] = np.nan  # an irregular valid area
    da = _map(vals)
    # a clustered set: three tight clusters
    centres = np.array([[60, 40], [70, 50], [40, 90]])
    cells = np.vstack([c + rng.integers(-2, 3, (6, 2)) for c in centres])
    xy = np.column_stack([da["x"].values[cells[:, 1]], da["y"].values[cells[:, 0]]])
    placements, info = pr.rigid_placements(da, xy, 50, seed=0)
    observed = pr.nearest_neighbour_distances(xy)
    assert info["min_inside"] == 1.0 and len(placements) == 50
    for p in placements:
        assert len(p) == len(xy)
        np.testing.assert_allclose(pr.nearest_neighbour_distances(p), observed, rtol=1e-9)
        r, c = ev.rows_cols(da, p)
        assert (r >= 0).all() and np.isfinite(vals[r, c]).all()
    # the sets move: centroids spread over the area
    centroids = np.array([p.mean(axis=0) for p in placements])
    assert centroids.std(axis=0).min() > 10 * RES
    # independent uniform placement does not keep the clustering (why it is anti-conservative)
    flat = rng.choice(np.flatnonzero(np.isfinite(vals)), len(xy), replace=False)
    uni = np.column_stack([da["x"].values[flat % w], da["y"].values[flat // w]])
    assert np.median(pr.nearest_neighbour_distances(uni)) > 3 * np.median(observed)


def test_rigid_null_is_more_conservative_for_clustered_deposits():
    """Deposits in one cluster on a smooth map: the uniform null calls a chance hot spot significant,
    the rigid null (which moves the cluster as a whole) does not."""
    rng = np.random.default_rng(7)
    h, w = 100, 100
    vals = _smooth_field(rng, h, w, 6)
    da = _map(vals)
    # a cluster around a moderately high spot of a random map: no relation to the evidence built in
    r0, c0 = np.unravel_index(np.argsort(vals.ravel())[int(0.85 * vals.size)], vals.shape)
    r0, c0 = int(np.clip(r0, 5, h - 6)), int(np.clip(c0, 5, w - 6))
    cells = np.array([r0, c0]) + rng.integers(-3, 4, (12, 2))
    pts = _points(da, cells[:, 0], cells[:, 1])
    uni = ev.random_placement_test(da, pts, n=199, seed=0, null="uniform")
    rig = ev.random_placement_test(da, pts, n=199, seed=0, null="rigid")
    assert rig["null_std"] > 2 * uni["null_std"]
    assert rig["p_value"] > uni["p_value"]
    with pytest.raises(EvaluationError, match="Fix"):
        ev.random_placement_test(da, pts, n=9, null="bogus")


def test_point_paired_on_samples():
    """Point protocol: a score that falls with the distance to the deposits beats noise, paired."""
    rng = np.random.default_rng(8)
    sxy = rng.uniform(0, 40_000, (1500, 2))
    dxy = rng.uniform(5_000, 35_000, (12, 2))
    from scipy.spatial import cKDTree

    d, _ = cKDTree(dxy).query(sxy)
    good = -d / 1000 + rng.normal(size=len(sxy))
    noise = rng.normal(size=len(sxy))
    res = pr.point_paired(good, noise, sxy, dxy, min_dist_km=2, block=4000, n_boot=300, seed=0)
    assert res["auc_a"] > 0.9 and abs(res["auc_b"] - 0.5) < 0.25
    assert res["ci_low"] > 0 and res["p_value"] < 0.01 and res["n_blocks"] > 50
    same = pr.point_paired(good, good, sxy, dxy, min_dist_km=2, block=4000, n_boot=50)
    assert same["diff"] == 0 and same["ci_low"] == same["ci_high"] == 0
    # unpaired inputs are refused
    with pytest.raises(EvaluationError, match="Fix"):
        pr.point_paired(good[:3], noise[:3], sxy[:3], dxy[:1], block=4000)


def test_rigid_null_falls_back_to_uniform_when_the_set_does_not_fit():
    vals = np.full((10, 10), np.nan)
    vals[0, :] = np.arange(10)
    vals[:, 0] = np.arange(10)  # an L-shaped valid area
    da = _map(vals)
    pts = _points(da, [0, 9], [9, 0])  # its two ends: no rotation + shift keeps both on the L
    with pytest.raises(EvaluationError, match="rigid placements"):
        pr.rigid_placements(da, np.column_stack([da["x"].values[[9, 0]], da["y"].values[[0, 9]]]), 20, max_tries=5)
    res = ev.random_placement_test(da, pts, n=19, seed=0)
    assert res["null"] == "uniform (fallback)" and 0 < res["p_value"] <= 1
