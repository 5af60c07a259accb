"""Plotting: every function returns a Figure with the expected axes, without pyplot state."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from pipeline.data.cube import from_arrays, open_cube, write_cube
from pipeline.errors import CubeError
from pipeline.evaluation import plotting


def _cube(tmp_path, c=5, h=40, w=48, seed=0):
    rng = np.random.default_rng(seed)
    ev = rng.normal(size=(c, h, w)).astype("float32")
    valid = np.ones((h, w), bool)
    valid[:5, :7] = False
    ev[:, ~valid] = np.nan
    ds = from_arrays(
        ev,
        bands=[f"b{i}" for i in range(c)],
        sources=["geochemistry"] * (c - 2) + ["geology"] * 2,
        x=500_000 + 100 * np.arange(w) + 50,
        y=4_000_000 - 100 * np.arange(h) - 50,
        crs="EPSG:32650",
        valid=valid,
        chunk=16,
    )
    return open_cube(write_cube(ds, tmp_path / "cube.zarr"))


def test_plot_bands_grid_and_mask(tmp_path):
    cube = _cube(tmp_path)
    fig = plotting.plot_bands(cube, ncols=3, title="quick look")
    assert isinstance(fig, Figure)
    images = [ax for ax in fig.axes if ax.images]
    # 5 bands + the valid mask; each band has a colour bar axes too
    assert len(images) == 6
    assert len(fig.axes) == 6 + 5
    assert images[-1].get_title().startswith("valid mask")
    # pixels outside the valid area are blank (NaN) in the band panels
    arr = images[0].images[0].get_array()
    assert np.ma.getmaskarray(arr)[0, 0] or np.isnan(np.ma.getdata(arr)[0, 0])
    fig.savefig(tmp_path / "bands.png")
    assert (tmp_path / "bands.png").stat().st_size > 1000


def test_plot_bands_subset_normalised_and_decimated(tmp_path):
    cube = _cube(tmp_path)
    fig = plotting.plot_bands(cube, bands=["b1", "b3"], normalise=True, max_pixels=16)
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 3
    assert max(images[0].images[0].get_array().shape) <= 16


def test_plot_bands_unknown_band_names_it(tmp_path):
    cube = _cube(tmp_path)
    with pytest.raises(CubeError, match="nope"):
        plotting.plot_bands(cube, bands=["nope"])


# -- score maps and evaluation curves ------------------------------------------------------------

import geopandas as gpd  # noqa: E402
import pandas as pd  # noqa: E402
import xarray as xr  # noqa: E402

from pipeline.evaluation import evaluate as ev  # noqa: E402


@pytest.fixture(scope="module")
def scored():
    """Two score maps (one informative, one noise) and deposits on a UTM grid."""
    rng = np.random.default_rng(0)
    h, w = 50, 60
    good = rng.random((h, w))
    idx = rng.choice(h * w, 25, replace=False)
    good.flat[idx] += 0.8
    good[:4, :4] = np.nan
    coords = {"y": 2_600_000 - 100 * (np.arange(h) + 0.5), "x": 500_000 + 100 * (np.arange(w) + 0.5)}
    mk = lambda v, n: xr.DataArray(v.astype("float32"), dims=("y", "x"), coords=coords, name=n).rio.write_crs(  # noqa: E731
        "EPSG:32650"
    )
    a, b = mk(good, "vit"), mk(rng.random((h, w)), "noise")
    dep = gpd.GeoDataFrame(geometry=gpd.points_from_xy(coords["x"][idx % w], coords["y"][idx // w]), crs="EPSG:32650")
    return a, b, dep.to_crs("EPSG:4326")


def test_plot_map_with_deposits(scored, tmp_path):
    a, _, dep = scored
    fig = plotting.plot_map(a, dep, title="ViT")
    assert isinstance(fig, Figure) and len(fig.axes) == 2  # map + colour bar
    ax = fig.axes[0]
    assert ax.get_title() == "ViT"
    offsets = ax.collections[0].get_offsets()  # deposits reprojected back onto the UTM map
    assert len(offsets) == 25 and offsets[:, 0].min() > 500_000
    fig.savefig(tmp_path / "map.png")


def test_plot_roc_and_success_rate(scored):
    a, b, dep = scored
    fig = plotting.plot_roc({"vit": a, "noise": b}, dep)
    assert len(fig.axes) == 1
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0].startswith("vit (AUC") and len(labels) == 3
    fig = plotting.plot_success_rate(a, dep)
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) == 2
    # precomputed curves need no deposits
    fig = plotting.plot_roc({"x": ev.roc_curve(a, dep)})
    assert len(fig.axes[0].lines) == 2


def test_plot_prediction_area(scored):
    a, _, dep = scored
    pa = ev.prediction_area(a, dep)
    fig = plotting.plot_prediction_area(pa)
    assert len(fig.axes) == 2
    assert fig.axes[1].get_ylim()[0] > fig.axes[1].get_ylim()[1]  # occupied area axis is reversed
    fig = plotting.plot_prediction_area(a, dep, x="score")
    assert len(fig.axes) == 2


def test_plot_comparison_bars(scored):
    table = pd.DataFrame(
        {
            "auc": [0.9, 0.7, 0.5],
            "auc_buffered_mean": [0.88, 0.69, 0.5],
            "auc_buffered_std": [0.02, 0.03, 0.05],
        },
        index=["vit", "pca", "rx"],
    )
    fig = plotting.plot_comparison_bars(table, highlight="vit")
    assert len(fig.axes) == 2  # auc and the buffered auc: the success-rate area is the AUC again
    fig = plotting.plot_comparison_bars({"vit": {"auc": 0.9}, "rx": {"auc": 0.6}}, metrics=["auc", "nope"])
    assert len(fig.axes) == 1
    with pytest.raises(ValueError, match="none of the metrics"):
        plotting.plot_comparison_bars(table, metrics=["nope"])


def test_plot_auc_differences():
    table = pd.DataFrame(
        {
            "method": ["pca", "rx", "vit"],
            "d_auc": [-0.2, 0.01, float("nan")],
            "ci_low": [-0.3, -0.05, float("nan")],
            "ci_high": [-0.1, 0.06, float("nan")],
            "p_delong": [0.001, 0.7, float("nan")],
        }
    )
    fig = plotting.plot_auc_differences(table)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["pca", "rx"]  # the reference has no row
    filled, hollow = ax.collections[1], ax.collections[2]
    assert filled.get_offsets().shape[0] == 1 and hollow.get_offsets().shape[0] == 1
    with pytest.raises(ValueError, match="ci_low"):
        plotting.plot_auc_differences(table.drop(columns="ci_low"))
