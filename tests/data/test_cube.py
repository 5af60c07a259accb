"""The Zarr cube: round trip, statistics over valid pixels only, validation, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from pipeline.config import RunConfig
from pipeline.data.cube import from_arrays, normalised, open_cube, write_cube
from pipeline.data.ingest import build_cube
from pipeline.errors import CubeError


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    ev = rng.normal(5, 2, size=(3, 40, 50)).astype("float32")
    valid = np.ones((40, 50), bool)
    valid[:5] = False
    ev[:, :5] = 1e6  # junk outside the study area must not move the statistics
    return ev, valid


def _ds(ev, valid, chunk=16):
    return from_arrays(
        ev,
        valid=valid,
        bands=["a", "b", "c"],
        sources=["geochemistry", "geochemistry", "geophysics"],
        x=np.arange(50) * 10.0 + 5,
        y=1000 - np.arange(40) * 10.0 - 5,
        crs="EPSG:32646",
        chunk=chunk,
    )


def test_round_trip_keeps_values_crs_and_metadata(tmp_path):
    ev, valid = _arrays()
    path = write_cube(_ds(ev, valid), tmp_path / "cube.zarr")
    ds = open_cube(path)
    np.testing.assert_array_equal(ds.evidence.values, ev)
    np.testing.assert_array_equal(ds.valid.values.astype(bool), valid)
    assert ds.rio.crs.to_epsg() == 32646
    assert ds.odc.geobox.resolution.x == 10
    assert list(ds.band.values) == ["a", "b", "c"]
    assert list(ds.source.values) == ["geochemistry", "geochemistry", "geophysics"]
    assert ds.evidence.data.chunksize == (3, 16, 16)


def test_statistics_use_valid_pixels_only(tmp_path):
    ev, valid = _arrays()
    ds = open_cube(write_cube(_ds(ev, valid), tmp_path / "cube.zarr"))
    for i in range(3):
        v = ev[i][valid]
        assert ds.center.values[i] == pytest.approx(np.median(v), rel=1e-6)
        q = np.percentile(v, [25, 75])
        assert ds.scale.values[i] == pytest.approx((q[1] - q[0]) / 1.349, rel=1e-6)
    z = normalised(ds).values
    assert np.abs(np.median(z[:, valid], axis=1)).max() < 1e-5
    assert (z[:, ~valid] == 0).all()


def test_written_cube_equals_lazy_cube(mini_inputs, tmp_path):
    cfg = RunConfig.from_yaml(mini_inputs / "run.yaml")
    lazy = build_cube(cfg)
    ds = open_cube(write_cube(lazy, tmp_path / "cube.zarr"))
    xr.testing.assert_equal(ds.evidence.reset_coords(drop=True), lazy.evidence.reset_coords(drop=True))


def test_open_cube_rejects_incomplete_store(tmp_path):
    ev, valid = _arrays()
    path = write_cube(_ds(ev, valid), tmp_path / "cube.zarr")
    import shutil

    shutil.rmtree(path / "valid")
    with pytest.raises(CubeError, match="valid"):
        open_cube(path)
    with pytest.raises(CubeError, match="does not exist"):
        open_cube(tmp_path / "nope.zarr")


def test_failed_write_leaves_nothing_and_keeps_previous(tmp_path):
    ev, valid = _arrays()
    path = write_cube(_ds(ev, valid), tmp_path / "cube.zarr")
    before = open_cube(path).evidence.values.copy()
    bad = ev.copy()
    bad[1] = 7.0  # a constant band is refused after writing the temporary store
    with pytest.raises(Exception, match="constant"):
        write_cube(_ds(bad, valid), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.zarr"]
    np.testing.assert_array_equal(open_cube(path).evidence.values, before)


def test_statistics_are_read_in_this_process_under_a_distributed_client(tmp_path):
    """compute_stats fills its sample array in place: with a distributed Client active (a notebook's usual
    state), it must still be filled here, not in copies on the workers; it holds exactly the valid pixels."""
    import dask.array as dsa
    import distributed

    from pipeline.data.cube import _valid_sample

    a = dsa.from_array(np.arange(6 * 40 * 50, dtype="float32").reshape(6, 40, 50), chunks=(6, 16, 16))
    v = dsa.from_array(np.random.default_rng(0).random((40, 50)) < 0.4, chunks=(16, 16))
    with (
        distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as c,
        distributed.Client(c),
    ):
        got = _valid_sample(a[:, ::3, ::2], v[::3, ::2])
    want = a.compute()[:, ::3, ::2][:, v.compute()[::3, ::2]]
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(want, axis=1))
