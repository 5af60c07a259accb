"""Read every layer of a run config and align it onto the target grid, lazily.

Each reader returns ``xr.DataArray`` bands (y, x) float32 on the target grid, backed by dask, NaN where
there is no data. Nothing is computed here: :func:`build_cube` returns a lazy Dataset, and the first
compute happens when :func:`pipeline.cube.write_cube` writes it.

Resampling by kind: continuous rasters use bilinear (average when the source is more than twice as fine
as the grid); categorical rasters nearest (mode when downsampling). Vectors are rasterised on the target
grid itself (distance, indicator, one band per class); point samples are gridded by IDW on it.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import dask.array as dsa
import numpy as np
import pandas as pd
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.geom import BoundingBox

from .config import LayerConfig, QueryError, RunConfig, safe_query
from .cube import from_arrays
from .errors import LayerError
from .grid import (
    _rasterize,
    _read_vector,
    check_overlap,
    check_raster_complete,
    ensure_input_exists,
    geobox_coords,
    is_raster,
    raster_footprint,
    rasterize_blocks,
    study_mask,
    target_geobox,
)

__all__ = ["build_cube", "read_layer", "open_raster_layer", "idw_block", "read_points", "provenance"]


# ----------------------------------------------------------------------------------------------
# rasters
# ----------------------------------------------------------------------------------------------
def _choose_resampling(layer: LayerConfig, src_res: float, dst_res: float) -> str:
    if layer.resampling:
        return layer.resampling
    downsampling = src_res < dst_res / 2
    if layer.kind == "categorical":
        return "mode" if downsampling else "nearest"
    return "average" if downsampling else "bilinear"


def open_raster_layer(layer: LayerConfig, cfg: RunConfig, geobox: GeoBox, chunk: int, raw: bool = False) -> xr.DataArray:
    """One raster band aligned onto ``geobox``: a lazy (y, x) float32 DataArray, NaN = nodata.

    ``raw=True`` skips the kind-specific resampling choice (used for masks).
    """
    import rasterio
    import rioxarray
    from rasterio.crs import CRS

    path = cfg.resolve(layer.path)
    ensure_input_exists(path, layer.name)
    bbox = raster_footprint(path, layer.name, layer.crs, geobox.crs)
    check_overlap(layer.name, bbox, geobox)
    with rasterio.open(path) as src:
        if layer.band > src.count:
            raise LayerError(layer.name, f"band {layer.band} requested but {str(path)!r} has {src.count}", "set 'band' to 1..count")
        dtype = src.dtypes[layer.band - 1]
        if not np.issubdtype(np.dtype(dtype), np.number):
            raise LayerError(layer.name, f"raster dtype {dtype!r} is not numeric", "convert the raster to a numeric type")
        check_raster_complete(src, path, layer.name, layer.band)
        src_res = abs(src.transform.a)
        src_crs = src.crs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        da = rioxarray.open_rasterio(path, chunks={"band": 1, "y": chunk, "x": chunk}, masked=True, lock=False)
    da = da.sel(band=layer.band, drop=True).astype("float32")
    if src_crs is None:
        da = da.rio.write_crs(layer.crs)
    # no data beyond the file's nodata: the layer's `nodata`, and +-inf in float rasters (a division by zero
    # upstream, an overflow: never evidence, and never spread into its neighbours by the resampling)
    is_float = bool(np.issubdtype(np.dtype(dtype), np.floating))
    mask = _SourceMask(layer.nodata, is_float, None)
    if layer.zeros == "half_min" and layer.transform != "none":
        # one read of the source band (not of the aligned grid) to find its smallest positive value
        masked = da.data.map_blocks(mask.applied, dtype="float32")
        min_pos = float(dsa.nanmin(dsa.where(masked > 0, masked, np.nan)).compute())
        mask = _SourceMask(layer.nodata, is_float, np.float32(min_pos / 2))
    # a rough source resolution in target units decides between bilinear and average
    if da.rio.crs.is_geographic != geobox.crs.geographic:
        src_res_dst = (bbox.right - bbox.left) / max(da.sizes["x"], 1)
    else:
        src_res_dst = src_res
    dst_res = abs(geobox.transform.a)
    resampling = "nearest" if raw else _choose_resampling(layer, src_res_dst, dst_res)
    if da.odc.geobox == geobox:
        # already on the grid: no warp (GDAL's warp of a lon/lat raster onto its own grid goes through the
        # CRS's lat/lon axis order and moves values by ~1e-11), the values stay bitwise identical
        out = da.copy(data=da.data.map_blocks(mask.applied, dtype="float32")).chunk({"y": chunk, "x": chunk})
    else:
        # each grid chunk reads and warps its own source window: no source chunk is shared between grid
        # chunks, so the scheduler never holds warped chunks that wait for the rest of their cube chunk
        template = dsa.zeros(tuple(geobox.shape), chunks=(chunk, chunk), dtype="float32")
        data = dsa.map_blocks(_warp_block, template, str(path), layer.band, (src_crs or CRS.from_user_input(layer.crs)).to_wkt(),
                              mask, geobox, resampling, dtype="float32")
        out = _grid_da(data, geobox)
    x, y = geobox_coords(geobox)
    out = out.drop_vars([c for c in out.coords if c not in ("x", "y")]).assign_coords(x=x, y=y)
    out.attrs = {}
    return out.astype("float32")


class _SourceMask:
    """What counts as no data in source pixels beyond the file's nodata (the layer's ``nodata``, +-inf
    in float rasters) and the ``half_min`` value for values <= 0: one rule for rasters read on the grid
    and for the windows that are warped onto it."""

    def __init__(self, nodata, is_float: bool, half_min):
        self.nodata, self.is_float, self.half_min = nodata, is_float, half_min

    def applied(self, a: np.ndarray) -> np.ndarray:
        """A masked float32 copy (dask chunks are not changed in place)."""
        return self(np.array(a, dtype="float32"))

    def __call__(self, a: np.ndarray) -> np.ndarray:
        """Mask ``a`` (float32) in place."""
        if self.nodata is not None:
            a[a == np.float32(self.nodata)] = np.nan
        if self.is_float:
            a[np.isinf(a)] = np.nan
        if self.half_min is not None:
            a[a <= 0] = self.half_min
        return a


def _warp_block(block, path: str, band: int, src_crs: str, mask: _SourceMask, geobox: GeoBox, resampling: str,
                block_info=None) -> np.ndarray:
    """One grid chunk of a raster: read the source window that covers it (with a margin for the
    resampling kernel), set no data to NaN, and warp it with GDAL onto the chunk."""
    import rasterio
    from rasterio.warp import Resampling, reproject, transform_bounds
    from rasterio.windows import Window

    (r0, r1), (c0, c1) = block_info[None]["array-location"]
    dst = geobox[r0:r1, c0:c1]
    out = np.full(dst.shape, np.nan, dtype="float32")
    with rasterio.open(path) as src:
        bounds = transform_bounds(dst.crs.wkt, src_crs, *dst.boundingbox, densify_pts=21)
        inv = ~src.transform
        cols, rows = zip(*(inv * (x, y) for x in bounds[0::2] for y in bounds[1::2]))
        # margin: the resampling kernel reaches a few source pixels beyond the chunk's footprint
        pad = 3
        col0, col1 = max(int(np.floor(min(cols))) - pad, 0), min(int(np.ceil(max(cols))) + pad, src.width)
        row0, row1 = max(int(np.floor(min(rows))) - pad, 0), min(int(np.ceil(max(rows))) + pad, src.height)
        if col1 <= col0 or row1 <= row0:
            return out
        win = Window(col0, row0, col1 - col0, row1 - row0)
        a = src.read(band, window=win, out_dtype="float32", masked=True).filled(np.nan)
        src_transform = src.window_transform(win)
    reproject(mask(a), out, src_transform=src_transform, src_crs=src_crs, src_nodata=np.nan,
              dst_transform=dst.affine, dst_crs=dst.crs.wkt, dst_nodata=np.nan, resampling=Resampling[resampling])
    return out


# ----------------------------------------------------------------------------------------------
# vectors
# ----------------------------------------------------------------------------------------------
def _grid_da(arr: dsa.Array, geobox: GeoBox) -> xr.DataArray:
    x, y = geobox_coords(geobox)
    return xr.DataArray(arr, dims=("y", "x"), coords={"y": y, "x": x})


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
        hit = _rasterize(geoms, geobox[a:b, :], all_touched=True)
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
        d[_rasterize(inside_geoms, sub, all_touched=True)] = 0.0
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


def _vector_bands(layer: LayerConfig, cfg: RunConfig, geobox: GeoBox, chunk: int) -> list[xr.DataArray]:
    path = cfg.resolve(layer.path)
    ensure_input_exists(path, layer.name)
    gdf = _read_vector(path, layer.layer, layer.name, layer.crs, layer.query)
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
        return [_grid_da(arr, geobox)]
    polys = gdf[gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
    if polys.empty:
        raise LayerError(layer.name, f"kind {layer.kind!r} needs polygons, {str(path)!r} has {sorted(set(gdf.geom_type))}", "use kind 'distance' for lines or points")
    if layer.kind == "indicator":
        return [_grid_da(rasterize_blocks(list(polys.geometry), geobox, chunk).astype("float32"), geobox)]
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
        bands.append(_grid_da(rasterize_blocks(geoms, geobox, chunk).astype("float32"), geobox))
    return bands


# ----------------------------------------------------------------------------------------------
# point samples
# ----------------------------------------------------------------------------------------------
def read_points(layer: LayerConfig, cfg: RunConfig, dst_crs) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Read point samples: (x [N], y [N]) in ``dst_crs`` and a numeric DataFrame of ``layer.columns``.

    Sentinels in ``layer.missing`` become NaN; negative values mean below detection ('< |v|') and are
    replaced by ``|v| / 2`` (``below_detection: half``), NaN (``nan``) or kept (``value``).
    """
    px, py, arr = _read_point_arrays(layer, cfg, dst_crs)
    return px, py, pd.DataFrame(arr, columns=list(layer.columns), copy=False)


CSV_ROWS_PER_BLOCK = 200_000  # rows parsed at a time: province-scale tables hold millions of rows


def _read_point_arrays(layer: LayerConfig, cfg: RunConfig, dst_crs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples as arrays: x [N], y [N] in ``dst_crs`` (float64) and values [N, M] (float32, writable).

    A CSV is parsed in blocks of :data:`CSV_ROWS_PER_BLOCK` rows straight into preallocated arrays, so the
    peak memory is the arrays themselves plus one block, whatever the table's size. (The cube build does
    not hold them at all: :mod:`pipeline.samples` streams the same blocks to disk.)
    """
    path = cfg.resolve(layer.path)
    cap = _count_lines(path) if path.suffix.lower() in (".csv", ".txt") and path.is_file() else 0
    px, py = np.empty(cap, dtype="float64"), np.empty(cap, dtype="float64")
    arr = np.empty((cap, len(layer.columns)), dtype="float32")  # values are gridded to float32 anyway
    n = 0
    for bx, by, bv in _point_blocks(layer, cfg, dst_crs):
        k = len(bx)
        if n + k > cap:  # a GeoPackage (one block), or a guard against odd files
            px, py = np.resize(px, n + k), np.resize(py, n + k)
            arr = np.resize(arr, (n + k, arr.shape[1]))
            cap = n + k
        px[n : n + k], py[n : n + k], arr[n : n + k] = bx, by, bv
        n += k
    if n < cap // 2:  # a selective query: give the unused rows back
        return px[:n].copy(), py[:n].copy(), arr[:n].copy()
    return px[:n], py[:n], arr[:n]


def _point_blocks(layer: LayerConfig, cfg: RunConfig, dst_crs):
    """Cleaned samples in blocks: (x [n], y [n] in ``dst_crs`` float64, values [n, M] float32).

    Raises a LayerError for a bad table, and at the end if no sample was selected or none has
    finite coordinates.
    """
    from pyproj import Transformer

    path = cfg.resolve(layer.path)
    ensure_input_exists(path, layer.name)
    dst = dst_crs.wkt if hasattr(dst_crs, "wkt") else dst_crs
    if path.suffix.lower() not in (".csv", ".txt"):
        gdf = _read_vector(path, layer.layer, layer.name, layer.crs, layer.query)
        _check_value_columns(layer, path, list(gdf.columns))
        x, y = gdf.geometry.x.to_numpy(), gdf.geometry.y.to_numpy()
        ok = np.isfinite(x) & np.isfinite(y)
        if not ok.any():
            raise LayerError(layer.name, "no sample has finite coordinates", "check the x/y columns")
        arr = np.empty((int(ok.sum()), len(layer.columns)), dtype="float32")
        for j, c in enumerate(layer.columns):
            arr[:, j] = _numeric(gdf[c], layer, c)[ok]
        tx = Transformer.from_crs(gdf.crs.to_wkt(), dst, always_xy=True)
        px, py = tx.transform(x[ok], y[ok])
        yield np.asarray(px, dtype="float64"), np.asarray(py, dtype="float64"), _clean_values(arr, layer)
        return

    try:
        header = list(pd.read_csv(path, nrows=0).columns)
    except Exception as exc:
        raise LayerError(layer.name, f"cannot read CSV {str(path)!r} ({exc})", "check that it is a comma-separated table with a header") from None
    missing = [c for c in (layer.x, layer.y) if c not in header]
    if missing:
        raise LayerError(
            layer.name,
            f"x/y column(s) {missing} not in {str(path)!r} (columns: {header[:30]})",
            "set 'x' and 'y' to the coordinate columns",
        )
    _check_value_columns(layer, path, header)
    if layer.crs is None:
        raise LayerError(layer.name, "point samples from a CSV have no CRS", "add 'crs: EPSG:4326' (or the CRS of x/y) to the layer")
    tx = Transformer.from_crs(layer.crs, dst, always_xy=True)
    # without a query only the coordinate and value columns are parsed
    wanted = None if layer.query else list(dict.fromkeys([layer.x, layer.y, *layer.columns]))
    n = 0
    selected = 0
    for df in _csv_blocks(path, layer, wanted):
        if layer.query:
            df = _query(df, layer, allow_empty=True)
        selected += len(df)
        x = _numeric(df[layer.x], layer, layer.x)
        y = _numeric(df[layer.y], layer, layer.y)
        ok = np.isfinite(x) & np.isfinite(y)
        k = int(ok.sum())
        if not k:
            continue
        bx, by = tx.transform(x[ok], y[ok])
        arr = np.empty((k, len(layer.columns)), dtype="float32")
        for j, c in enumerate(layer.columns):
            arr[:, j] = _numeric(df[c], layer, c)[ok]
        del df
        n += k
        yield np.asarray(bx, dtype="float64"), np.asarray(by, dtype="float64"), _clean_values(arr, layer)
    if layer.query and selected == 0:
        raise LayerError(layer.name, f"query {layer.query!r} selects no sample", "relax the query")
    if n == 0:
        raise LayerError(layer.name, "no sample has finite coordinates", "check the x/y columns")


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            n += block.count(b"\n")
    return n + 1


def _csv_blocks(path: Path, layer: LayerConfig, usecols):
    """Blocks of a CSV as DataFrames; a parse error becomes a LayerError naming the file."""
    try:
        with pd.read_csv(path, usecols=usecols, chunksize=CSV_ROWS_PER_BLOCK) as reader:
            yield from reader
    except Exception as exc:
        raise LayerError(layer.name, f"cannot read CSV {str(path)!r} ({exc})", "check that it is a comma-separated table with a header") from None


def _check_value_columns(layer: LayerConfig, path: Path, columns: list[str]) -> None:
    absent = [c for c in layer.columns if c not in columns]
    if absent:
        raise LayerError(layer.name, f"value column(s) {absent} not in {str(path)!r} (columns: {columns[:30]})", "fix 'columns'")


def _clean_values(arr: np.ndarray, layer: LayerConfig) -> np.ndarray:
    """+-inf and sentinels to NaN and below-detection values handled, in place."""
    for j in range(arr.shape[1]):  # column by column: temporaries of one column, not of the table
        col = arr[:, j]
        col[np.isinf(col)] = np.nan  # +-inf is missing, like the sentinels
        for sentinel in layer.missing:
            col[np.isclose(col, sentinel)] = np.nan
        neg = col < 0
        if layer.below_detection == "half":
            col[neg] = -col[neg] / 2
        elif layer.below_detection == "nan":
            col[neg] = np.nan
    return arr


def _query(df: pd.DataFrame, layer: LayerConfig, allow_empty: bool = False) -> pd.DataFrame:
    try:  # checked again here: a LayerConfig built with model_construct skips the validator
        safe_query(layer.query)
    except QueryError as exc:
        raise LayerError(layer.name, exc.problem, exc.fix) from None
    try:
        out = df.query(layer.query)
    except Exception as exc:
        raise LayerError(layer.name, f"query {layer.query!r} failed ({exc})", f"use column names among {list(df.columns)[:30]}") from None
    if out.empty and not allow_empty:
        raise LayerError(layer.name, f"query {layer.query!r} selects no sample", "relax the query")
    return out


def _numeric(series: pd.Series, layer: LayerConfig, column: str) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        return series.to_numpy(dtype="float64", na_value=np.nan)  # parsed as numbers: nothing to check
    num = pd.to_numeric(series, errors="coerce")
    maybe = num.isna() & series.notna()  # only these can be text; the string test runs on them alone
    bad = maybe.copy()
    bad[maybe] = series[maybe].astype(str).str.strip() != ""
    if bad.any():
        first = series[bad].iloc[0]
        row = series.index[bad.to_numpy()][0]  # the data row (0-based), also when read in blocks
        raise LayerError(
            layer.name,
            f"column {column!r} holds non-numeric value {first!r} (data row {row}; {int(bad.sum())} such rows in its block)",
            "clean the column, or list the sentinel under 'missing'",
        )
    return num.to_numpy(dtype="float64")


def idw_block(px, py, values, xs, ys, *, power=2.0, k=12, radius=None, max_distance=None, exact_within=None):
    """Inverse-distance weighting of samples at grid points (xs [W], ys [H]).

    ``values`` is [N] (returns [H, W]) or [N, M] for M value columns sharing the sample locations
    (returns [M, H, W]); NaN values are left out of their column's average, so every column uses the
    samples among the ``k`` nearest that have a value. A pixel centre that coincides with a sample takes
    its value exactly; pixels with no sample within ``radius`` (or farther than ``max_distance`` from the
    nearest sample) are NaN.

    ``exact_within``: the caller holds only the samples near the block, and none it left out is nearer
    than this to any pixel. Returns None when some pixel's k-th neighbour is farther than that (the
    caller must read more samples), so the result is always that of a search over every sample.
    """
    from scipy.spatial import cKDTree

    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype("float64")
    single = values.ndim == 1
    vals2 = values[:, None] if single else values
    xs, ys = np.asarray(xs, dtype="float64"), np.asarray(ys, dtype="float64")
    h, w = len(ys), len(xs)
    m = vals2.shape[1]
    bounded = exact_within is not None and np.isfinite(exact_within)
    if bounded and len(vals2) < k:
        return None  # fewer than k samples read: the k-th neighbour lies beyond them
    out = np.full((m, h * w), np.nan, dtype="float32")
    if len(vals2) == 0:
        out = out.reshape(m, h, w)
        return out[0] if single else out
    tree = cKDTree(np.column_stack([px, py]))
    k = min(k, len(vals2))
    # pixels in batches, their coordinates made per batch: the [pixels, k, columns] temporaries stay a
    # few MB whatever the block size
    step = max(1, 500_000 // (k * m))
    for i in range(0, h * w, step):
        flat = np.arange(i, min(i + step, h * w))
        q = np.column_stack([xs[flat % w], ys[flat // w]])
        part = _idw_batch(tree, vals2, q, k, power, radius, max_distance, exact_within if bounded else None)
        if part is None:
            return None
        out[:, i : i + len(flat)] = part.T
    out = out.reshape(m, h, w)
    return out[0] if single else out


def _idw_batch(tree, vals2, q, k, power, radius, max_distance, bound=None) -> np.ndarray | None:
    ub = radius if radius is not None else np.inf
    d, idx = tree.query(q, k=k, distance_upper_bound=ub)
    d = d.reshape(-1, k)
    idx = idx.reshape(-1, k)
    if bound is not None:
        lim = max_distance if max_distance is not None else radius
        sure = d[:, -1] <= bound  # nothing unread can be among these k
        if lim is not None and bound > lim:
            sure |= ~(d[:, 0] <= lim)  # the nearest is beyond the limit: NaN whatever is unread
        if not sure.all():
            return None
    found = np.isfinite(d)
    v = vals2[np.where(found, idx, 0)]  # [P, k, M]
    has = found[..., None] & np.isfinite(v)
    exact = has & (d[..., None] == 0)
    d_safe = np.where(found & (d > 0), d, 1.0)
    w = np.where(has & ~exact, (1.0 / d_safe**power)[..., None], 0.0)
    v0 = np.where(has, v, 0.0)
    wsum = w.sum(axis=1)
    res = np.where(wsum > 0, (w * v0).sum(axis=1) / np.where(wsum > 0, wsum, 1), np.nan)  # [P, M]
    has_exact = exact.any(axis=1)
    if has_exact.any():
        first = np.argmax(exact, axis=1)  # [P, M]
        hit = np.take_along_axis(v0, first[:, None, :], axis=1)[:, 0, :]
        res = np.where(has_exact, hit, res)
    lim = max_distance if max_distance is not None else radius
    if lim is not None:
        res[~(d[:, 0] <= lim)] = np.nan
    return res


def _idw_map_block(block, store, x, y, power, k, radius, max_distance, block_info=None):
    from .samples import idw_from_store

    (r0, r1), (c0, c1) = block_info[None]["array-location"][-2:]
    return idw_from_store(store, (r0, r1), (c0, c1), x[c0:c1], y[r0:r1], power=power, k=k, radius=radius, max_distance=max_distance)


def _point_bands(layer: LayerConfig, cfg: RunConfig, geobox: GeoBox, chunk: int, scratch=None) -> list[xr.DataArray]:
    from .samples import write_sample_store

    # the samples go to disk, sorted by grid block; each block's task reads back the blocks around it
    store = write_sample_store(layer, _point_blocks(layer, cfg, geobox.crs), geobox, chunk, scratch)
    xmin, ymin, xmax, ymax = store.bbox
    try:
        check_overlap(layer.name, BoundingBox(xmin, ymin, xmax + 1e-9, ymax + 1e-9, crs=geobox.crs), geobox)
    except BaseException:
        store.remove()
        raise
    x, y = geobox_coords(geobox)
    m = len(layer.columns)
    it = layer.interpolation
    k = 1 if it.method == "nearest" else it.k
    # one KD-tree query per block serves every column
    template = dsa.zeros((m, *tuple(geobox.shape)), chunks=(m, chunk, chunk), dtype="float32")
    arr = dsa.map_blocks(_idw_map_block, template, store, x, y, it.power, k, it.radius, it.max_distance,
                         dtype="float32")
    return [_grid_da(arr[i], geobox) for i in range(m)]


# ----------------------------------------------------------------------------------------------
# transforms on gridded bands
# ----------------------------------------------------------------------------------------------
def _checked_log(block: np.ndarray, name: str, base10: bool) -> np.ndarray:
    bad = np.isfinite(block) & (block <= 0)
    if bad.any():
        raise LayerError(
            name,
            f"log transform needs positive values but the layer holds {block[bad].min():g}",
            "set the layer's 'nodata' to that sentinel, or use transform 'none'",
        )
    return (np.log10(block) if base10 else np.log(block)).astype("float32")


def _apply_log(da: xr.DataArray, name: str, base10: bool) -> xr.DataArray:
    data = dsa.map_blocks(_checked_log, da.data, name, base10, dtype="float32")
    return da.copy(data=data)


def read_layer(layer: LayerConfig, cfg: RunConfig, geobox: GeoBox, chunk: int, scratch=None) -> list[xr.DataArray]:
    """All bands of one layer on the target grid (lazy), before cross-band transforms (CLR of rasters).

    Point samples are held on disk under ``scratch`` (default: the system temporary folder) until the
    bands are computed; see :mod:`pipeline.samples`.
    """
    path = cfg.resolve(layer.path)
    if layer.kind == "points":
        return _point_bands(layer, cfg, geobox, chunk, scratch)
    if layer.kind in ("distance", "indicator") or (layer.kind == "categorical" and not is_raster(path)):
        return _vector_bands(layer, cfg, geobox, chunk)
    if not is_raster(path):
        raise LayerError(
            layer.name, f"kind {layer.kind!r} expects a raster (.tif) but got {path.name!r}",
            "use kind 'distance', 'indicator' or 'categorical' for vector files",
        )
    da = open_raster_layer(layer, cfg, geobox, chunk)
    if layer.kind == "categorical":
        return [xr.where(np.isfinite(da), (da == float(c)).astype("float32"), np.nan).astype("float32") for c in layer.classes]
    if layer.transform in ("log", "log10"):
        da = _apply_log(da, layer.name, layer.transform == "log10")
    return [da]


def _raster_clr(bands: list[xr.DataArray], names: list[str]) -> list[xr.DataArray]:
    logs = [_apply_log(b, n, False) for b, n in zip(bands, names)]
    mean = sum(logs) / len(logs)
    return [(lg - mean).astype("float32") for lg in logs]


# ----------------------------------------------------------------------------------------------
# the cube
# ----------------------------------------------------------------------------------------------
def file_fingerprint(path: Path, max_hash_bytes: int = 64 * 2**20) -> str:
    """sha256 of a file (or of a folder's file list), or size+mtime for large files."""
    path = Path(path)
    if path.is_dir():
        return "dir"
    st = path.stat()
    if st.st_size > max_hash_bytes:
        return f"size={st.st_size};mtime={int(st.st_mtime)}"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for blk in iter(lambda: f.read(1 << 20), b""):
            h.update(blk)
    return "sha256:" + h.hexdigest()


def provenance(cfg: RunConfig) -> dict:
    from . import __version__

    return {
        "config_name": cfg.name,
        "mpm_version": __version__,
        "inputs": {l.name: {"path": str(cfg.resolve(l.path)), "hash": file_fingerprint(cfg.resolve(l.path))} for l in cfg.layers if cfg.resolve(l.path).exists()},
        "grid": cfg.grid.model_dump(mode="json"),
    }


def build_cube(cfg: RunConfig, scratch: str | Path | None = None) -> xr.Dataset:
    """The lazy evidence cube of a run config (nothing computed; write it with ``write_cube``).

    Point samples wait on disk in a folder under ``scratch`` (default: the system temporary folder),
    removed when the returned Dataset is garbage-collected or the process exits. Compute the cube on
    this machine (threads, or a local cluster): workers elsewhere cannot read that folder.
    """
    from .memory import bound_gdal_cache, limit_fragmentation

    limit_fragmentation()  # a cube build runs thousands of chunk-sized temporaries through this process
    bound_gdal_cache()
    geobox = target_geobox(cfg)
    chunk = cfg.grid.chunk
    bands: list[xr.DataArray] = []
    meta: list[tuple[str, LayerConfig]] = []
    for layer in cfg.layers:
        for name, da in zip(layer.band_names, read_layer(layer, cfg, geobox, chunk, scratch)):
            bands.append(da)
            meta.append((name, layer))
    # CLR across the raster bands of each source group that ask for it (point layers did theirs per sample)
    clr_groups: dict[str, list[int]] = {}
    for i, (_, layer) in enumerate(meta):
        if layer.transform == "clr" and layer.kind != "points":
            clr_groups.setdefault(layer.source, []).append(i)
    for src, idx in clr_groups.items():
        if len(idx) < 2:
            raise LayerError(meta[idx[0]][0], f"transform 'clr' needs at least two layers in source group {src!r}", "use 'log', or add the other parts of the composition")
        for i, da in zip(idx, _raster_clr([bands[i] for i in idx], [meta[i][0] for i in idx])):
            bands[i] = da
    x, y = geobox_coords(geobox)
    evidence = dsa.stack([b.data for b in bands]).astype("float32")
    valid = dsa.isfinite(evidence).all(axis=0)
    mask = study_mask(cfg, geobox, chunk)
    if mask is not None:
        valid = valid & mask.data
    for name in cfg.grid.mask_layers:
        idx = [i for i, (_, l) in enumerate(meta) if l.name == name]
        valid = valid & dsa.isfinite(evidence[idx]).all(axis=0)
    # evidence keeps each layer's own coverage (useful to see); `valid` says where all of it is usable
    return from_arrays(
        evidence,
        valid=valid,
        bands=[m[0] for m in meta],
        sources=[m[1].source for m in meta],
        kinds=[m[1].kind for m in meta],
        transforms=[m[1].transform for m in meta],
        scalings=["none" if m[1].kind in ("categorical", "indicator") and m[1].scaling == "robust" else m[1].scaling for m in meta],
        files=[str(cfg.resolve(m[1].path)) for m in meta],
        x=x,
        y=y,
        crs=geobox.crs.wkt,
        chunk=chunk,
        name=cfg.name,
    )
