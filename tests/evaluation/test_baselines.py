"""The seven comparison methods: one interface, georeferenced output, better than random, seeded."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from pipeline.data.cube import from_arrays, open_cube, write_cube
from pipeline.errors import ConfigError
from pipeline.evaluation import baselines as bl
from pipeline.evaluation.evaluate import roc_auc_all

CRS = "EPSG:32646"


def _planted_cube(path, size=64, c=6, n_dep=12, seed=0, chunk=32):
    """Smooth correlated background + multivariate anomalies (3x3 blobs) at 'deposit' cells.

    The anomalies break the background correlation (some bands up, others down) with a moderate
    amplitude, so no single band's extremes reveal them. Returns (cube, deposits GeoDataFrame).
    """
    rng = np.random.default_rng(seed)
    latent = np.stack([gaussian_filter(rng.normal(size=(size, size)), 3) for _ in range(2)])
    latent /= latent.std(axis=(1, 2), keepdims=True)
    mix = rng.normal(size=(c, 2))
    ev = np.einsum("cl,lhw->chw", mix, latent) + 0.15 * rng.normal(size=(c, size, size))
    valid = np.ones((size, size), bool)
    valid[:6, :10] = False  # a corner outside the study area
    rows = rng.integers(5, size - 5, n_dep)
    cols = rng.integers(12, size - 5, n_dep)
    direction = np.where(np.arange(c) % 2 == 0, 1.0, -1.0) * 1.8
    for r, cc in zip(rows, cols):
        ev[:, r - 1 : r + 2, cc - 1 : cc + 2] += direction[:, None, None]
    ev[:, ~valid] = np.nan
    x = 300_000 + 100 * np.arange(size) + 50
    y = 4_800_000 - 100 * np.arange(size) - 50
    ds = from_arrays(
        ev.astype("float32"),
        bands=[f"b{i}" for i in range(c)],
        sources=["geochemistry"] * (c - 2) + ["geophysics"] * 2,
        x=x,
        y=y,
        crs=CRS,
        valid=valid,
        chunk=chunk,
    )
    cube = open_cube(write_cube(ds, path))
    deposits = gpd.GeoDataFrame(geometry=gpd.points_from_xy(x[cols], y[rows]), crs=CRS)
    return cube, deposits


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return _planted_cube(tmp_path_factory.mktemp("cube") / "cube.zarr")


FAST = {
    "dense_ae": {"steps": 300},
    "vae": {"steps": 300},
    "conv_ae": {"steps": 100},
    "rx_focal": {"window": 3},  # the planted blobs are 3 x 3
    "iforest_focal": {"window": 3},
}


@pytest.mark.parametrize("name", bl.list_baselines(include_alternatives=True))
def test_baseline_map_is_georeferenced_and_beats_random(planted, name):
    cube, deposits = planted
    score = bl.score_baseline(name, cube, seed=0, max_train_pixels=3000, block=24, **FAST.get(name, {}))
    assert score.dims == ("y", "x")
    assert score.shape == (cube.sizes["y"], cube.sizes["x"])
    assert score.rio.crs == cube.rio.crs
    np.testing.assert_array_equal(score["x"].values, cube["x"].values)
    assert score.rio.transform() == cube.rio.transform()
    valid = cube["valid"].values.astype(bool)
    assert np.isnan(score.values[~valid]).all()
    assert np.isfinite(score.values[valid]).all()
    auc = roc_auc_all(score, deposits)
    assert auc > 0.6, f"{name}: AUC {auc:.3f} on planted anomalies"
    assert score.attrs["baseline"] == name


def test_list_and_unknown_name(planted):
    assert bl.list_baselines() == ["pca", "rx", "iforest", "lof", "dense_ae", "conv_ae", "vae"]
    assert bl.list_baselines(focal=True)[-2:] == ["rx_focal", "iforest_focal"]
    assert set(bl.list_baselines(True)) == set(bl.BASELINES)
    with pytest.raises(ConfigError, match="unknown baseline 'nope'.*pca"):
        bl.score_baseline("nope", planted[0])
    with pytest.raises(ConfigError, match="unknown option.*nonsense.*variance"):
        bl.score_baseline("pca", planted[0], nonsense=1)


@pytest.mark.parametrize("name", ["pca", "iforest", "dense_ae", "vae", "conv_ae"])
def test_seeded_determinism_and_block_independence(planted, name):
    cube, _ = planted
    kw = {"steps": 40} if name in FAST else {}
    a = bl.score_baseline(name, cube, seed=3, max_train_pixels=1500, block=64, **kw)
    b = bl.score_baseline(name, cube, seed=3, max_train_pixels=1500, block=20, **kw)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-4, atol=1e-5, equal_nan=True)
    if name != "pca":  # PCA on 1500 of ~4000 pixels: a new seed changes the map
        c = bl.score_baseline(name, cube, seed=4, max_train_pixels=1500, block=64, **kw)
        assert not np.allclose(a.values, c.values, equal_nan=True)


def test_train_sample_is_seeded_valid_and_capped(planted):
    cube, _ = planted
    a = bl.train_sample(cube, 500, seed=1, block=64)
    b = bl.train_sample(cube, 500, seed=1, block=7)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (500, cube.sizes["band"]) and np.isfinite(a).all()
    n_valid = int(cube["valid"].values.sum())
    assert bl.train_sample(cube, 10**7, seed=0).shape[0] == n_valid


def test_pca_keeps_a_residual_and_reports_k(planted):
    cube, _ = planted
    s = bl.score_baseline("pca", cube, variance=0.999)
    assert s.attrs["n_components"] <= cube.sizes["band"] - 1
    assert np.nanmax(s.values) > 0


def test_rx_robust_option(planted):
    cube, deposits = planted
    s = bl.score_baseline("rx", cube, robust=True, max_train_pixels=2000)
    assert s.attrs["robust"] is True and roc_auc_all(s, deposits) > 0.6


def test_focal_stack_known_values():
    z = np.arange(25, dtype="float32").reshape(1, 5, 5)
    valid = np.ones((5, 5), bool)
    valid[0, 0] = False
    f = bl.focal_stack(z, valid, 3)
    assert f.shape == (2, 5, 5)
    corner = z[0, 0:3, 0:3].ravel()[1:]  # (0, 0) is invalid: left out of every neighbourhood
    assert f[0, 2, 2] == pytest.approx(z[0, 1:4, 1:4].mean())
    assert f[1, 2, 2] == pytest.approx(z[0, 1:4, 1:4].std(), rel=1e-5)
    assert f[0, 1, 1] == pytest.approx(corner.mean())


def test_focal_control_sees_a_texture_that_pixel_rx_misses(tmp_path):
    """A checkerboard patch (values +-1.2 around the band mean) is ordinary pixel by pixel but has
    an unusual local spread: rx_focal finds it, rx does not."""
    rng = np.random.default_rng(1)
    size, c = 64, 3
    ev = np.stack([gaussian_filter(rng.normal(size=(size, size)), 2) for _ in range(c)])
    ev /= ev.std(axis=(1, 2), keepdims=True)
    patches = [(10, 10), (40, 45), (20, 50), (50, 15)]
    checker = np.where((np.indices((6, 6)).sum(axis=0) % 2) == 0, 1.2, -1.2)
    for r, cc in patches:
        ev[:, r : r + 6, cc : cc + 6] = checker
    x = 300_000 + 100 * np.arange(size) + 50
    y = 4_800_000 - 100 * np.arange(size) - 50
    ds = from_arrays(ev.astype("float32"), bands=["a", "b", "c"], sources=["g"] * c, x=x, y=y, crs=CRS, chunk=32)
    cube = open_cube(write_cube(ds, tmp_path / "tex.zarr"))
    pts = gpd.GeoDataFrame(
        geometry=gpd.points_from_xy([x[cc + 3] for _, cc in patches], [y[r + 3] for r, _ in patches]), crs=CRS
    )
    focal = roc_auc_all(bl.score_baseline("rx_focal", cube, window=5, max_train_pixels=4000), pts)
    pixel = roc_auc_all(bl.score_baseline("rx", cube, max_train_pixels=4000), pts)
    assert focal > 0.95 and pixel < 0.8, (focal, pixel)
    a = bl.score_baseline("iforest_focal", cube, window=5, max_train_pixels=1500, block=64, seed=2)
    b = bl.score_baseline("iforest_focal", cube, window=5, max_train_pixels=1500, block=13, seed=2)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-5)


def test_pca_enrichment_ranks_an_enrichment_above_an_equal_depletion(tmp_path):
    """Pathfinder 'Au' follows band 'Fe' (what the other bands predict); +2.5 over the prediction at
    one set of cells, -2.5 at another: the target-aware PCA ranks only the first; generic PCA both."""
    rng = np.random.default_rng(2)
    size = 48
    fe = gaussian_filter(rng.normal(size=(size, size)), 2)
    fe /= fe.std()
    mg = gaussian_filter(rng.normal(size=(size, size)), 2)
    mg /= mg.std()
    au = fe + 0.2 * rng.normal(size=(size, size))
    up = rng.choice(size * size, 20, replace=False)
    down = rng.choice(np.setdiff1d(np.arange(size * size), up), 20, replace=False)
    au.flat[up] += 2.5
    au.flat[down] -= 2.5
    x = 300_000 + 100 * np.arange(size) + 50
    y = 4_800_000 - 100 * np.arange(size) - 50
    ev = np.stack([au, fe, mg]).astype("float32")
    ds = from_arrays(ev, bands=["Au_ppb", "Fe", "Mg"], sources=["g"] * 3, x=x, y=y, crs=CRS, chunk=24)
    cube = open_cube(write_cube(ds, tmp_path / "enr.zarr"))

    def pts(idx):
        return gpd.GeoDataFrame(geometry=gpd.points_from_xy(x[idx % size], y[idx // size]), crs=CRS)

    target = bl.pca_enrichment(cube, ["Au_ppb"], max_train_pixels=2000, block=20)
    generic = bl.score_baseline("pca", cube, max_train_pixels=2000)
    assert roc_auc_all(target, pts(up)) > 0.95
    assert roc_auc_all(target, pts(down)) < 0.5  # a depletion scores at or below the background
    assert roc_auc_all(generic, pts(up)) > 0.9 and roc_auc_all(generic, pts(down)) > 0.9
    assert target.attrs["pathfinders"] == ["Au_ppb"] and np.isnan(target.values).sum() == 0
    with pytest.raises(ConfigError, match="Cu"):
        bl.pca_enrichment(cube, ["Cu"])
