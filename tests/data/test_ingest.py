"""Alignment, rasterisation, gridding and laziness of the ingest stage (real files, real CRSs)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import RES, UTM, X0, Y0, H, W, smooth_field, write_raster
from rasterio.transform import from_origin

from pipeline.config import RunConfig
from pipeline.data.grid import geobox_coords
from pipeline.data.ingest import build_cube, target_geobox
from pipeline.data.points import idw_block


def _cfg(tmp_path, layers: str, grid: str | None = None) -> RunConfig:
    grid = (
        grid or f'{{crs: "{UTM}", resolution: {RES}, bounds: [{X0}, {Y0 - H * RES}, {X0 + W * RES}, {Y0}], chunk: 16}}'
    )
    p = tmp_path / "c.yaml"
    p.write_text(f"name: t\ngrid: {grid}\nlayers:\n{layers}")
    return RunConfig.from_yaml(p)


def _truth_on_grid(cfg):
    x, y = geobox_coords(target_geobox(cfg))
    gx, gy = np.meshgrid(x, y)
    return smooth_field(gx, gy)


def test_shifted_raster_aligns_to_truth(tmp_path):
    # source: 37 m offset, 60 m cells; target: 100 m cells
    t = from_origin(X0 - 337, Y0 + 263, 60, 60)
    cols, rows = np.meshgrid(np.arange(90), np.arange(70))
    xs, ys = t @ (cols + 0.5, rows + 0.5)
    write_raster(tmp_path / "f.tif", smooth_field(xs, ys), transform=t)
    cfg = _cfg(tmp_path, "  - {name: f, path: f.tif}\n")
    ds = build_cube(cfg)
    got = ds.evidence.sel(band="f").values
    truth = _truth_on_grid(cfg)
    assert np.isfinite(got).all()
    # bilinear resampling of a smooth field: error far below the field's range (~40)
    assert np.abs(got - truth).max() < 0.3


def test_raster_in_other_crs_aligns_to_truth(tmp_path):
    from pyproj import Transformer

    to_utm = Transformer.from_crs("EPSG:4326", UTM, always_xy=True)
    to_ll = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    lon0, lat1 = to_ll.transform(X0 - 800, Y0 + 800)
    res = 0.0004
    t = from_origin(lon0, lat1, res, res)
    cols, rows = np.meshgrid(np.arange(140), np.arange(110))
    lon, lat = t @ (cols + 0.5, rows + 0.5)
    ux, uy = to_utm.transform(lon, lat)
    write_raster(tmp_path / "ll.tif", smooth_field(np.asarray(ux), np.asarray(uy)), crs="EPSG:4326", transform=t)
    cfg = _cfg(tmp_path, "  - {name: ll, path: ll.tif}\n")
    got = build_cube(cfg).evidence.sel(band="ll").values
    truth = _truth_on_grid(cfg)
    assert np.isfinite(got).all()
    assert np.abs(got - truth).max() < 0.5


def test_distance_band_matches_analytic_distance(mini_inputs):
    cfg = RunConfig.from_yaml(mini_inputs / "run.yaml")
    ds = build_cube(cfg)
    dist = ds.evidence.sel(band="fault_distance").values
    x, y = geobox_coords(target_geobox(cfg))
    analytic = np.abs(y - (Y0 - 1450))[:, None] * np.ones((1, len(x)))
    # the line is rasterised on the grid: distances agree within one pixel
    assert np.abs(dist - analytic).max() <= RES
    assert dist.min() == 0


def test_categorical_polygons_give_one_band_per_class(mini_inputs):
    ds = build_cube(RunConfig.from_yaml(mini_inputs / "run.yaml"))
    um = ds.evidence.sel(band="lith_ultramafic").values
    gb = ds.evidence.sel(band="lith_gabbro").values
    assert set(np.unique(um)) == {0.0, 1.0}
    assert um[:, :15].all() and not um[:, 15:].any()
    assert gb[:, 15:30].all() and not gb[:, :15].any() and not gb[:, 30:].any()


def test_idw_reproduces_samples_at_sample_locations():
    rng = np.random.default_rng(1)
    xs = np.arange(20) * 10.0 + 5
    ys = np.arange(15) * -10.0 - 5
    pick = rng.choice(20 * 15, 30, replace=False)
    px, py = xs[pick % 20], ys[pick // 20]
    vals = rng.normal(size=30)
    grid = idw_block(px, py, vals, xs, ys, power=2, k=8)
    np.testing.assert_allclose(grid[pick // 20, pick % 20], vals, rtol=0, atol=1e-6)
    # between samples IDW stays within the sample range
    assert grid.min() >= vals.min() - 1e-6 and grid.max() <= vals.max() + 1e-6


def test_idw_radius_leaves_far_pixels_empty():
    grid = idw_block(np.array([0.0]), np.array([0.0]), np.array([5.0]), np.arange(10) * 100.0, np.zeros(1), radius=250)
    assert np.isfinite(grid[0, :3]).all() and np.isnan(grid[0, 3:]).all()


def test_points_clr_and_sentinels(mini_inputs):
    ds = build_cube(RunConfig.from_yaml(mini_inputs / "run.yaml"))
    clr = ds.evidence.sel(band=["ss_Cr", "ss_Ni", "ss_Co"]).values
    ok = np.isfinite(clr).all(axis=0)
    assert ok.mean() > 0.9
    # IDW of CLR coordinates keeps their zero sum (a linear operation on complete compositions)
    np.testing.assert_allclose(clr[:, ok].sum(axis=0), 0, atol=1e-4)


def test_build_cube_stays_lazy(mini_inputs, no_dask_compute):
    ds = build_cube(RunConfig.from_yaml(mini_inputs / "run.yaml"))
    assert ds.evidence.chunks is not None
    assert ds.evidence.data.chunksize[0] == ds.sizes["band"]  # all bands in one chunk


def test_grid_from_like_raster(tmp_path):
    t = from_origin(X0, Y0, 250, 250)
    write_raster(tmp_path / "base.tif", np.ones((8, 12)), transform=t)
    cfg = _cfg(tmp_path, "  - {name: b, path: base.tif}\n", grid="{like: base.tif}")
    gb = target_geobox(cfg)
    assert tuple(gb.shape) == (8, 12) and gb.transform == t
    cfg2 = _cfg(tmp_path, "  - {name: b, path: base.tif}\n", grid="{like: base.tif, resolution: 125}")
    assert tuple(target_geobox(cfg2).shape) == (16, 24)


def test_bounds_default_to_union_of_layers(tmp_path):
    write_raster(tmp_path / "a.tif", np.ones((4, 4)), transform=from_origin(X0, Y0, 100, 100))
    write_raster(tmp_path / "b.tif", np.ones((4, 4)), transform=from_origin(X0 + 1000, Y0 - 600, 100, 100))
    cfg = _cfg(
        tmp_path, "  - {name: a, path: a.tif}\n  - {name: b, path: b.tif}\n", grid=f'{{crs: "{UTM}", resolution: 100}}'
    )
    gb = target_geobox(cfg)
    b = gb.extent.boundingbox
    assert (b.left, b.top, b.right, b.bottom) == pytest.approx((X0, Y0, X0 + 1400, Y0 - 1000))


def test_idw_columns_share_the_tree_and_skip_missing_values():
    px = np.array([0.0, 100.0, 200.0])
    py = np.zeros(3)
    vals = np.array([[1.0, 10.0], [np.nan, 20.0], [3.0, 30.0]])
    grid = idw_block(px, py, vals, np.array([0.0, 100.0, 150.0]), np.zeros(1), k=3)
    assert grid.shape == (2, 1, 3)
    # at the middle sample column 0 has no value: equal-distance neighbours average to 2
    assert grid[0, 0, 1] == pytest.approx(2.0)
    assert grid[1, 0, 1] == pytest.approx(20.0)
    assert grid[0, 0, 0] == pytest.approx(1.0) and grid[1, 0, 0] == pytest.approx(10.0)
    # the single-column result is the same as the column of the multi-column one
    single = idw_block(px, py, vals[:, 1], np.array([0.0, 100.0, 150.0]), np.zeros(1), k=3)
    np.testing.assert_allclose(single, grid[1])


def test_points_read_in_blocks_equal_a_whole_read(mini_inputs, monkeypatch):
    """The CSV reader parses blocks of rows into preallocated arrays: the result does not depend on the
    block size, a query applies across blocks, and a bad value deep in the file names its data row."""
    import pandas as pd

    from pipeline.data import points

    cfg = RunConfig.from_yaml(mini_inputs / "run.yaml")
    layer = next(l for l in cfg.layers if l.kind == "points")
    geobox = target_geobox(cfg)
    whole = points._read_point_arrays(layer, cfg, geobox.crs)
    monkeypatch.setattr(points, "CSV_ROWS_PER_BLOCK", 7)
    blocks = points._read_point_arrays(layer, cfg, geobox.crs)
    for a, b in zip(whole, blocks):
        np.testing.assert_array_equal(a, b)
    assert len(whole[0]) == 150 and whole[2].flags.writeable

    df = pd.read_csv(mini_inputs / "samples.csv")
    queried = layer.model_copy(update={"query": "Cr > 150"})
    px, py, v = points._read_point_arrays(queried, cfg, geobox.crs)
    assert len(px) == int((df["Cr"] > 150).sum()) > 0
    np.testing.assert_allclose(np.sort(v[:, 0]), np.sort(df.loc[df["Cr"] > 150, "Cr"].to_numpy()))

    df["Co"] = df["Co"].astype(object)
    df.loc[131, "Co"] = "bdl"
    df.to_csv(mini_inputs / "samples.csv", index=False)
    with pytest.raises(Exception, match=r"'Co'.*'bdl'.*data row 131"):
        points._read_point_arrays(layer, cfg, geobox.crs)


def test_cube_on_a_lonlat_grid_end_to_end(mini_inputs, tmp_path, capsys):
    """`mpm cube` with grid {crs: EPSG:4326, ...}: every layer kind aligns onto the lon/lat grid (odc-geo names
    its dims latitude/longitude; the cube's are y/x), a projected raster matches its analytic field, and the
    lon/lat raster aligned onto its own grid (grid.like) keeps its values bitwise."""
    import rasterio
    import yaml
    from pyproj import Transformer

    from pipeline import open_cube
    from pipeline.run.cli import main

    to_ll = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    lon0, lat1 = to_ll.transform(X0 + 300, Y0 - 300)
    lon1, lat0 = to_ll.transform(X0 + W * RES - 300, Y0 - H * RES + 300)
    base = yaml.safe_load((mini_inputs / "run.yaml").read_text())
    grids = {
        "bounds": {"crs": "EPSG:4326", "resolution": 0.001, "bounds": [lon0, lat0, lon1, lat1], "chunk": 16},
        "like": {"like": "grav.tif", "chunk": 16},
    }
    for how, grid in grids.items():
        (mini_inputs / f"ll-{how}.yaml").write_text(yaml.safe_dump({**base, "grid": grid}))
        rc = main(["cube", str(mini_inputs / f"ll-{how}.yaml"), "--out", str(tmp_path / how), "--quiet"])
        assert rc == 0, capsys.readouterr().err
        ds = open_cube(tmp_path / how / "cube.zarr")
        assert ds["evidence"].dims == ("band", "y", "x") and ds.rio.crs.to_epsg() == 4326
        ev = ds["evidence"].values
        assert all(np.isfinite(ev[i]).any() for i in range(ev.shape[0])), list(ds.band.values)
        if how == "bounds":
            x, y = ds["x"].values, ds["y"].values
            np.testing.assert_allclose(x, lon0 + 0.001 * (np.arange(len(x)) + 0.5), rtol=0, atol=1e-9)
            assert np.all(np.diff(y) < 0) and abs(y[0] - (lat1 - 0.0005)) < 1e-9
            # the UTM magnetics raster against its analytic field at the lon/lat pixel centres
            gx, gy = np.meshgrid(x, y)
            ux, uy = Transformer.from_crs("EPSG:4326", UTM, always_xy=True).transform(gx, gy)
            mag = ds["evidence"].sel(band="mag").values
            assert np.isfinite(mag).all()
            assert np.abs(mag - smooth_field(np.asarray(ux), np.asarray(uy))).max() < 0.5
        else:
            with rasterio.open(mini_inputs / "grav.tif") as src:
                raw = src.read(1)
            got = ds["evidence"].sel(band="grav").values
            assert got.shape == raw.shape and np.array_equal(got, raw.astype("float32"))


def test_feature_pixels_in_strips_equal_the_whole_grid():
    """Distance bands find their feature (edge) pixels strip by strip: the same pixels as one
    rasterisation of the whole grid, for polygons that cross strip boundaries, lines and the grid edge.
    (A line through pixel corners exactly can touch a neighbouring pixel instead: GDAL's all-touched test
    at a corner depends on the window's origin. The coordinates here are off the pixel lattice.)"""
    from odc.geo.geobox import GeoBox
    from shapely.geometry import LineString, Point, box

    from pipeline.data.vectors import _feature_pixels

    gb = GeoBox.from_bbox((X0, Y0 - 70 * RES, X0 + 90 * RES, Y0), UTM, resolution=RES)
    geoms = [
        box(X0 + 517.3, Y0 - 5311.9, X0 + 3733.7, Y0 - 1921.1),  # spans several strips
        Point(X0 + 6013.3, Y0 - 3021.7).buffer(1500),
        box(X0 - 1000, Y0 - 7500, X0 + 1231.3, Y0 - 6411.3),  # crosses the grid's edge
        LineString([(X0 - 517.3, Y0 - 123.7), (X0 + 9431.1, Y0 - 6877.9)]),
    ]
    whole = _feature_pixels(geoms, gb, strip_pixels=10**9)
    assert len(whole) > 100
    key = lambda a: a[np.lexsort((a[:, 0], a[:, 1]))]
    for rows in (16, 20, 33):  # strips that end on, inside and across the features' edges
        np.testing.assert_array_equal(key(whole), key(_feature_pixels(geoms, gb, strip_pixels=rows * 90)))


@pytest.mark.parametrize("factor", [1, 2], ids=["on-grid", "warped"])
def test_raster_nodata_inf_and_half_min(tmp_path, factor):
    """The layer's `nodata`, +-inf and the file's nodata are no data, and zeros take half the smallest
    positive value before the log: the same rule for a raster on the grid (read as is) and for one
    warped onto it (here 2x finer, averaged: no data never enters an average)."""
    from rasterio.transform import from_origin

    rng = np.random.default_rng(5)
    h, w = H * factor, W * factor
    res = RES / factor
    cols, rows = np.meshgrid(np.arange(w), np.arange(h))
    src = smooth_field(X0 + res * (cols + 0.5), Y0 - res * (rows + 0.5)).astype("float32")
    kinds = rng.choice(5, size=(h, w), p=[0.8, 0.05, 0.05, 0.05, 0.05])
    src[kinds == 1] = 0.0  # zeros -> half the smallest positive value
    src[kinds == 2] = -5.0  # the layer's nodata
    src[kinds == 3] = np.inf
    src[kinds == 4] = -99999.0  # the file's nodata
    write_raster(tmp_path / "r.tif", src, transform=from_origin(X0, Y0, res, res), nodata=-99999)
    cfg = _cfg(
        tmp_path, "  - {name: r, path: r.tif, nodata: -5, transform: log, zeros: half_min, resampling: average}\n"
    )
    got = build_cube(cfg).evidence.sel(band="r").values

    want_src = np.where(kinds == 0, src, np.nan)
    want_src[kinds == 1] = src[kinds == 0].min() / 2
    blocks = want_src.reshape(H, factor, W, factor)
    with np.errstate(invalid="ignore"):
        mean = np.nanmean(blocks, axis=(1, 3))  # GDAL's average leaves no data out
    want = np.log(mean)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = np.isfinite(got)
    assert ok.mean() > 0.7
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-5)
