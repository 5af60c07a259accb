"""Target polygons: exact areas per level, ranking, deposit counts, GeoPackage output."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from pipeline.evaluation.targets import TargetsError, read_targets, target_polygons, write_targets

UTM = "EPSG:32646"
RES = 100.0
X0, Y0 = 500_000.0, 4_000_000.0


def _map(values: np.ndarray, crs: str = UTM, res: float = RES, x0: float = X0, y0: float = Y0) -> xr.DataArray:
    h, w = values.shape
    da = xr.DataArray(
        values.astype("float32"),
        dims=("y", "x"),
        coords={"y": y0 - res * (np.arange(h) + 0.5), "x": x0 + res * (np.arange(w) + 0.5)},
        name="prospectivity",
    )
    return da.rio.write_crs(crs)


def _cell_centre(row: int, col: int) -> tuple[float, float]:
    return X0 + RES * (col + 0.5), Y0 - RES * (row + 0.5)


def _points(xy, crs=UTM):
    import geopandas as gpd

    xy = np.asarray(xy, dtype=float)
    return gpd.GeoDataFrame(geometry=gpd.points_from_xy(xy[:, 0], xy[:, 1]), crs=crs)


@pytest.fixture
def two_blobs() -> xr.DataArray:
    """40 x 50 map: low noise, a strong 5x5 blob (score ~10) and a weaker 4x6 blob (~5), a NaN corner."""
    rng = np.random.default_rng(0)
    v = rng.uniform(0, 1, (40, 50))
    v[4:11, 4:11] = 0  # a low ring around each blob keeps noise cells out of the blob's polygon
    v[24:30, 29:37] = 0
    v[5:10, 5:10] = 10 + rng.uniform(0, 0.1, (5, 5))
    v[25:29, 30:36] = 5 + rng.uniform(0, 0.1, (4, 6))
    v[:8, 40:] = np.nan  # outside the study area
    return _map(v)


def test_areas_match_requested_fractions(two_blobs):
    levels = (0.02, 0.05, 0.10)
    gdf = target_polygons(two_blobs, levels=levels)
    n_valid = int(np.isfinite(two_blobs.values).sum())
    cell_km2 = RES * RES / 1e6
    for level in levels:
        sub = gdf[gdf["level"] == level]
        assert sub["n_cells"].sum() == round(level * n_valid)  # exact to the cell
        assert sub["area_km2"].sum() == pytest.approx(round(level * n_valid) * cell_km2)
        # the polygons themselves cover that area too
        assert sub.geometry.area.sum() / 1e6 == pytest.approx(sub["area_km2"].sum())
        assert sub.geometry.is_valid.all()
    # levels nest: the top 2 % lies inside the top 5 %
    top2 = gdf[gdf["level"] == 0.02].union_all()
    top5 = gdf[gdf["level"] == 0.05].union_all()
    assert top2.difference(top5).area == pytest.approx(0.0)


def test_ranked_by_mean_score_and_blobs_found(two_blobs):
    gdf = target_polygons(two_blobs, levels=(0.05,))  # 0.05 * 1936 = 97 cells: both blobs (49) + noise
    assert list(gdf["rank"]) == list(range(1, len(gdf) + 1))
    assert np.all(np.diff(gdf["mean_score"].to_numpy()) <= 0)
    first, second = gdf.iloc[0], gdf.iloc[1]
    assert first["n_cells"] == 25 and first["mean_score"] > 10
    assert second["n_cells"] == 24 and 5 < second["mean_score"] < 5.1
    x0, y0 = _cell_centre(5, 5)
    assert first.geometry.bounds == pytest.approx((x0 - RES / 2, y0 - 4.5 * RES, x0 + 4.5 * RES, y0 + RES / 2))
    assert (gdf["max_score"] >= gdf["mean_score"]).all()
    assert (gdf["threshold"] <= gdf["mean_score"]).all()


def test_deposit_counts(two_blobs):
    deps = _points(
        [
            _cell_centre(6, 6),
            _cell_centre(7, 8),
            _cell_centre(9, 9),  # three in the strong blob
            _cell_centre(26, 31),  # one in the weak blob
            _cell_centre(35, 2),  # one in the background
            _cell_centre(2, 45),  # one on a NaN cell
            (X0 - 5000, Y0),  # one outside the grid
        ]
    )
    # deposits in another CRS are reprojected onto the map
    gdf = target_polygons(two_blobs, deps.to_crs("EPSG:4326"), levels=(0.02, 0.05))
    top2 = gdf[gdf["level"] == 0.02]  # 39 cells: the strong blob and most of the weak one
    top5 = gdf[gdf["level"] == 0.05]
    assert top2.iloc[0]["n_deposits"] == 3
    assert top5.iloc[0]["n_deposits"] == 3 and top5.iloc[1]["n_deposits"] == 1
    assert top5["n_deposits"].sum() == 4


def test_geographic_crs_area_is_geodesic():
    v = np.arange(100, dtype=float).reshape(10, 10)
    da = _map(v, crs="EPSG:4326", res=0.01, x0=100.0, y0=45.0)
    gdf = target_polygons(da, levels=(0.1,))
    # 10 cells of 0.01 deg at 45 N: ~0.786 km (E-W) x ~1.111 km (N-S) each
    assert gdf["area_km2"].sum() == pytest.approx(10 * 0.786 * 1.111, rel=0.01)


def test_bad_inputs_name_the_fix(two_blobs):
    with pytest.raises(TargetsError, match="Fix"):
        target_polygons(two_blobs, levels=(0.0, 0.05))
    with pytest.raises(TargetsError, match="no finite value"):
        target_polygons(two_blobs * np.nan)


def test_gpkg_opens_with_pyogrio_and_keeps_crs(two_blobs, tmp_path):
    import pyogrio

    gdf = target_polygons(two_blobs, _points([_cell_centre(6, 6)]))
    path = write_targets(gdf, tmp_path / "targets.gpkg")
    assert [p.name for p in tmp_path.iterdir()] == ["targets.gpkg"]  # no temporary left behind
    info = pyogrio.read_info(path, layer="targets")
    assert info["geometry_type"] in ("Polygon", "MultiPolygon")
    assert "32646" in info["crs"]
    back = read_targets(path)
    assert back.crs == gdf.crs
    assert len(back) == len(gdf)
    assert set(["level", "rank", "mean_score", "max_score", "area_km2", "n_deposits"]) <= set(back.columns)
    np.testing.assert_allclose(back["mean_score"], gdf["mean_score"])
    # rewriting replaces the file
    write_targets(gdf[gdf["level"] == 0.02], path)
    assert len(read_targets(path)) == int((gdf["level"] == 0.02).sum())
