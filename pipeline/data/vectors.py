"""Vector layers on the target grid: reading, rasterising (indicator, one band per class) and distance.

Features are burnt block by block on the target grid itself, so no full-grid array is ever held.
"""

from __future__ import annotations

from pathlib import Path

import dask.array as dsa
import numpy as np
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.geom import BoundingBox

from pipeline import storage
from pipeline.config import LayerConfig, QueryError, RunConfig, safe_query
from pipeline.data.grid import check_overlap, ensure_input_exists, grid_da
from pipeline.errors import LayerError

__all__ = ["read_vector", "rasterize_blocks", "rasterize_geometries", "vector_bands"]


def rasterize_blocks(geoms, geobox: GeoBox, chunk: int, all_touched: bool = False):
    """Geometries burnt into a lazy bool (y, x) dask array, one block at a time.

    Each block rasterises only the geometries whose bounds meet it, on its own window of the grid: no
    full-grid array is ever held (a full-grid task split into chunks keeps the whole grid alive, and makes
    the scheduler run ahead on every piece of it).
    """
    import dask.array as dsa
    import shapely

    geoms = np.asarray([g for g in geoms if g is not None and not g.is_empty], dtype=object)
    bounds = shapely.bounds(geoms) if len(geoms) else np.zeros((0, 4))
    template = dsa.zeros(tuple(geobox.shape), chunks=chunk, dtype=bool)
    return dsa.map_blocks(_rasterize_block, template, geoms, bounds, geobox, all_touched, dtype=bool)


def _rasterize_block(block, geoms, bounds, geobox: GeoBox, all_touched: bool, block_info=None) -> np.ndarray:
    (r0, r1), (c0, c1) = block_info[None]["array-location"]
    sub = geobox[r0:r1, c0:c1]
    bb = sub.boundingbox
    near = (
        (bounds[:, 0] <= bb.right) & (bounds[:, 2] >= bb.left) & (bounds[:, 1] <= bb.top) & (bounds[:, 3] >= bb.bottom)
    )
    return rasterize_geometries(geoms[near], sub, all_touched)


def rasterize_geometries(geoms, geobox: GeoBox, all_touched: bool, values=None) -> np.ndarray:
    """Geometries burnt into a (y, x) array on ``geobox``: bool, or ``values`` (uint8) when given."""
    from rasterio.features import rasterize

    shapes = list(geoms) if values is None else list(zip(geoms, values))
    if not shapes:
        return np.zeros(tuple(geobox.shape), dtype=bool)
    out = rasterize(
        shapes,
        out_shape=tuple(geobox.shape),
        transform=geobox.transform,
        fill=0,
        all_touched=all_touched,
        dtype="uint8",
        default_value=1,
    )
    return out.astype(bool) if values is None else out


def read_vector(path: Path, layer: str | None, name: str, crs: str | None, query: str | None = None):
    import geopandas as gpd

    if query:  # before any use (the config validates it too; a model_construct'ed one does not)
        try:
            safe_query(query)
        except QueryError as exc:
            raise LayerError(name, exc.problem, exc.fix) from None
    ensure_input_exists(path, name)
    try:
        gdf = gpd.read_file(storage.gdal_path(path), layer=layer)
    except Exception as exc:
        hint = ""
        try:
            import pyogrio

            hint = f"; layers in the file: {[l[0] for l in pyogrio.list_layers(storage.gdal_path(path))]}"
        except Exception:
            pass
        raise LayerError(
            name,
            f"cannot read vector file {storage.redact(path)!r} (layer {layer!r}): {exc}{hint}",
            "check the path and the 'layer' name",
        ) from None
    if gdf.crs is None:
        if crs is None:
            raise LayerError(
                name,
                f"vector file {str(path)!r} has no CRS",
                "add 'crs: EPSG:xxxx' to the layer (the CRS of its coordinates)",
            )
        gdf = gdf.set_crs(crs)
    if query:
        try:
            gdf = gdf.query(query)
        except Exception as exc:
            raise LayerError(
                name, f"query {query!r} failed ({exc})", f"use column names among {list(gdf.columns)}"
            ) from None
    if len(gdf) == 0:
        what = f"layer {layer!r} of {str(path)!r}" if layer else repr(str(path))
        if query:
            raise LayerError(
                name, f"query {query!r} selects no feature of {what}", "relax the query (check the values' spelling)"
            )
        raise LayerError(
            name, f"{what} has no features (0 rows)", "export the layer again, or point 'layer' at one with features"
        )
    return gdf


def _feature_pixels(geoms, geobox: GeoBox, strip_pixels: int = 2**23) -> np.ndarray:
    """Centres (x, y) [P, 2] of the pixels the features touch; for areas, only their edge pixels.

    The nearest touched pixel to any pixel outside an area lies on its edge, so edge pixels give the
    same distances as all of them, with far fewer points. The grid is rasterised in strips of rows
    (about ``strip_pixels`` pixels, plus one row above and below for the edge test), so memory does not
    grow with the grid.
    """
    from scipy.ndimage import binary_erosion

    h, w = geobox.shape
    rows_per_strip = max(16, strip_pixels // max(w, 1))
    t = geobox.transform
    parts = []
    for r0 in range(0, h, rows_per_strip):
        r1 = min(r0 + rows_per_strip, h)
        a, b = max(r0 - 1, 0), min(r1 + 1, h)  # one halo row each side (none at the grid's own edges)
        hit = rasterize_geometries(geoms, geobox[a:b, :], all_touched=True)
        edge = (hit & ~binary_erosion(hit, border_value=0))[r0 - a : r1 - a]
        rows, cols = np.nonzero(edge)
        parts.append(np.column_stack([t.c + t.a * (cols + 0.5), t.f + t.e * (rows + r0 + 0.5)]))
    return np.concatenate(parts) if parts else np.empty((0, 2))


def _distance_block(block, pts, inside_geoms, geobox: GeoBox, block_info=None) -> np.ndarray:
    """Distance from each pixel centre of one block to the nearest feature pixel centre (CRS units)."""
    from scipy.spatial import cKDTree

    (r0, r1), (c0, c1) = block_info[None]["array-location"]
    if len(pts) == 0:
        return np.full((r1 - r0, c1 - c0), np.nan, dtype="float32")
    t = geobox.transform
    xs = t.c + t.a * (np.arange(c0, c1) + 0.5)
    ys = t.f + t.e * (np.arange(r0, r1) + 0.5)
    gx, gy = np.meshgrid(xs, ys)
    d, _ = _tree_cache(pts, cKDTree).query(np.column_stack([gx.ravel(), gy.ravel()]), k=1)
    d = d.reshape(gx.shape).astype("float32")
    if inside_geoms is not None:
        sub = geobox[r0:r1, c0:c1]
        d[rasterize_geometries(inside_geoms, sub, all_touched=True)] = 0.0
    return d


_TREES: dict = {}


def _tree_cache(pts: np.ndarray, cls):
    """One KD-tree per point set per process (blocks of one band share it).

    The cache holds the array itself and checks identity, so a freed array's reused id never
    returns another band's tree.
    """
    hit = _TREES.get(id(pts))
    if hit is not None and hit[0] is pts:
        return hit[1]
    if len(_TREES) > 8:
        _TREES.clear()
    tree = cls(pts)
    _TREES[id(pts)] = (pts, tree)
    return tree


def vector_bands(layer: LayerConfig, cfg: RunConfig, geobox: GeoBox, chunk: int) -> list[xr.DataArray]:
    path = cfg.resolve(layer.path)
    ensure_input_exists(path, layer.name)
    gdf = read_vector(path, layer.layer, layer.name, layer.crs, layer.query)
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    gdf = gdf.to_crs(geobox.crs.wkt)
    b = gdf.total_bounds
    check_overlap(layer.name, BoundingBox(*b, crs=geobox.crs), geobox)
    shape = tuple(geobox.shape)
    if layer.kind == "distance":
        # exact distance to the nearest touched pixel, computed block by block from a KD-tree of the
        # feature pixels: no full-grid distance transform in memory
        pts = _feature_pixels(list(gdf.geometry), geobox)
        areas = [g for g in gdf.geometry if g.geom_type in ("Polygon", "MultiPolygon")]
        template = dsa.zeros(shape, chunks=chunk, dtype="float32")
        arr = dsa.map_blocks(_distance_block, template, pts, areas or None, geobox, dtype="float32")
        return [grid_da(arr, geobox)]
    polys = gdf[gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
    if polys.empty:
        raise LayerError(
            layer.name,
            f"kind {layer.kind!r} needs polygons, {str(path)!r} has {sorted(set(gdf.geom_type))}",
            "use kind 'distance' for lines or points",
        )
    if layer.kind == "indicator":
        return [grid_da(rasterize_blocks(list(polys.geometry), geobox, chunk).astype("float32"), geobox)]
    # categorical polygons: one 0/1 band per class
    if layer.attribute is None or layer.attribute not in polys.columns:
        cols = [c for c in polys.columns if c != "geometry"]
        raise LayerError(
            layer.name,
            f"attribute {layer.attribute!r} is not a column of {str(path)!r} (columns: {cols})",
            "set 'attribute' to the column that holds the class",
        )
    present = set(polys[layer.attribute].astype(str))
    missing = [c for c in layer.classes if str(c) not in present]
    if missing:
        raise LayerError(
            layer.name,
            f"class(es) {missing} do not occur in attribute {layer.attribute!r} (values: {sorted(present)[:20]})",
            "fix 'classes' to values of the attribute",
        )
    bands = []
    for cls in layer.classes:
        geoms = list(polys.geometry[polys[layer.attribute].astype(str) == str(cls)])
        bands.append(grid_da(rasterize_blocks(geoms, geobox, chunk).astype("float32"), geobox))
    return bands
