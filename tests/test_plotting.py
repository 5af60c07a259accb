"""Plotting: every function returns a Figure with the expected axes, without pyplot state."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from pipeline import plotting
from pipeline.cube import from_arrays, open_cube, write_cube
from pipeline.errors import CubeError


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
