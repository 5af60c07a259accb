"""Target polygons: the top 2, 5 and 10 % of the valid area of a prospectivity map, ranked.

For each level ``f`` the ``round(f * N)`` highest-scoring valid cells (``N`` valid cells; ties at the
threshold broken by position, so the area is exact to the cell) are grouped into 4-connected regions,
each region polygonised with :func:`rasterio.features.shapes` on the map's grid, and the regions are
ranked by their mean score (rank 1 = highest). Levels nest: every top-2 % cell is also a top-5 % cell.

Areas are in km2: from the CRS's linear unit for a projected CRS, geodesic (WGS84) for a geographic one.
Deposits, when given, are counted per polygon by the cell that contains them (as in
:mod:`pipeline.evaluation.evaluate`), so a deposit counts in exactly one polygon per level or in none.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from pipeline.errors import MPMError
from pipeline.evaluation.evaluate import deposit_xy, rows_cols
from pipeline.io import temporary_name

__all__ = ["DEFAULT_LEVELS", "TargetsError", "target_polygons", "write_targets", "read_targets"]

DEFAULT_LEVELS = (0.02, 0.05, 0.10)
LAYER = "targets"
COLUMNS = ["level", "rank", "mean_score", "max_score", "area_km2", "n_cells", "n_deposits", "threshold"]


class TargetsError(MPMError, ValueError):
    """Target polygons cannot be derived from this map (the message names the value and the fix)."""


def _check_levels(levels) -> tuple[float, ...]:
    levels = tuple(float(v) for v in levels)
    bad = [v for v in levels if not 0 < v <= 1]
    if not levels or bad:
        raise TargetsError(
            f"target levels {list(levels)} must be fractions of the valid area in (0, 1]. "
            "Fix: e.g. levels=(0.02, 0.05, 0.10) for the top 2, 5 and 10 %"
        )
    return tuple(sorted(set(levels)))


def _row_cell_area_km2(score: xr.DataArray) -> np.ndarray:
    """Area (km2) of one cell of each row [H]; geodesic for a geographic CRS."""
    crs = score.rio.crs
    rx, ry = score.rio.resolution(recalc=True)
    if crs is None:
        raise TargetsError(
            "the score map has no CRS, so target areas and polygons cannot be georeferenced. "
            "Fix: set it with score.rio.write_crs(...)"
        )
    if crs.is_geographic:
        from pyproj import Geod

        t = score.rio.transform(recalc=True)
        y_top = t.f + t.e * np.arange(score.sizes["y"])
        y_bot = y_top + t.e
        geod = Geod(ellps="WGS84")
        # area of a lon/lat cell: exact on the ellipsoid up to polygon densification (cells are small)
        lons = [0.0, abs(rx), abs(rx), 0.0]
        return np.array([abs(geod.polygon_area_perimeter(lons, [a, a, b, b])[0]) for a, b in zip(y_top, y_bot)]) / 1e6
    factor = crs.linear_units_factor[1] if crs.linear_units_factor else 1.0
    return np.full(score.sizes["y"], abs(rx * ry) * factor * factor / 1e6)


def target_polygons(score: xr.DataArray, deposits=None, levels=DEFAULT_LEVELS):
    """Ranked target polygons of a score map (y, x) for each level (fraction of the valid area).

    ``score``: DataArray (y, x) with a CRS, NaN outside the valid area, higher = more prospective.
    ``deposits``: optional GeoDataFrame of points (any CRS). Returns a GeoDataFrame in the map's CRS
    with one row per polygon and the columns ``level`` (fraction), ``rank`` (1 = highest mean score
    within the level), ``mean_score``, ``max_score``, ``area_km2``, ``n_cells``, ``n_deposits``,
    ``threshold`` (the lowest score kept at that level) and ``geometry``, sorted by level then rank.
    """
    import geopandas as gpd
    from rasterio.features import shapes
    from scipy import ndimage
    from shapely.geometry import shape

    levels = _check_levels(levels)
    if set(score.dims) != {"y", "x"}:
        raise TargetsError(
            f"score map must have dims ('y', 'x'), got {score.dims}. Fix: select one map, e.g. ds['prospectivity']"
        )
    score = score.transpose("y", "x")
    values = np.asarray(score.values, dtype="float64")  # [H, W]
    transform = score.rio.transform(recalc=True)
    valid = np.isfinite(values)
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise TargetsError("the score map has no finite value, so it has no targets. Fix: check the scoring stage")
    flat_valid = np.flatnonzero(valid)
    # descending by score; a stable sort breaks ties by position, so the top k is well defined
    order = flat_valid[np.argsort(-values.ravel()[flat_valid], kind="stable")]

    dep_rows = dep_cols = None
    if deposits is not None and len(deposits):
        dep_rows, dep_cols = rows_cols(score, deposit_xy(score, deposits))
        inside = dep_rows >= 0
        dep_rows, dep_cols = dep_rows[inside], dep_cols[inside]

    row_km2 = _row_cell_area_km2(score)
    records = []
    for level in levels:
        k = max(1, int(round(level * n_valid)))
        top = np.zeros(values.size, dtype=bool)
        top[order[:k]] = True
        top = top.reshape(values.shape)
        labels, n = ndimage.label(top)  # 4-connected, as rasterio.features.shapes(connectivity=4)
        if n == 0:
            continue
        idx = np.arange(1, n + 1)
        means = ndimage.mean(values, labels, idx)
        maxes = ndimage.maximum(values, labels, idx)
        counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        r, _ = np.nonzero(top)
        area = np.bincount(labels[top], weights=row_km2[r], minlength=n + 1)[1:]
        ndep = np.zeros(n, dtype=int)
        if dep_rows is not None and dep_rows.size:
            lab = labels[dep_rows, dep_cols]
            ndep = np.bincount(lab[lab > 0], minlength=n + 1)[1:]
        geoms: dict[int, list] = {}
        for geom, value in shapes(labels.astype("int32"), mask=top, transform=transform, connectivity=4):
            geoms.setdefault(int(value), []).append(shape(geom))
        rank_of = np.empty(n, dtype=int)
        rank_of[np.argsort(-means, kind="stable")] = np.arange(1, n + 1)
        threshold = float(values.ravel()[order[k - 1]])
        for i in range(n):
            parts = geoms[i + 1]
            geom = parts[0] if len(parts) == 1 else _union(parts)
            records.append(
                {
                    "level": level,
                    "rank": int(rank_of[i]),
                    "mean_score": float(means[i]),
                    "max_score": float(maxes[i]),
                    "area_km2": float(area[i]),
                    "n_cells": int(counts[i]),
                    "n_deposits": int(ndep[i]),
                    "threshold": threshold,
                    "geometry": geom,
                }
            )
    gdf = gpd.GeoDataFrame(records, columns=[*COLUMNS, "geometry"], geometry="geometry", crs=score.rio.crs)
    return gdf.sort_values(["level", "rank"]).reset_index(drop=True)


def _union(parts):
    from shapely.ops import unary_union

    return unary_union(parts)


def write_targets(gdf, path: str | Path, layer: str = LAYER) -> Path:
    """Write target polygons to a GeoPackage atomically (``<path>.tmp-*.gpkg``, then ``os.replace``; see :mod:`pipeline.io`).

    One layer (``layer``, default 'targets') with the ``level`` column: filter by level in QGIS or
    ``geopandas.read_file(path, where="level = 0.05")``. Returns ``path``.
    """

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path, keep_suffix=True)
    try:
        gdf.to_file(tmp, layer=layer, driver="GPKG", engine="pyogrio")
        os.replace(tmp, path)
    finally:  # SQLite's side files too
        for p in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
            p.unlink(missing_ok=True)
    return path


def read_targets(path: str | Path, layer: str = LAYER):
    """Read target polygons written by :func:`write_targets` (a GeoDataFrame with its CRS)."""
    import geopandas as gpd

    return gpd.read_file(path, layer=layer, engine="pyogrio")
