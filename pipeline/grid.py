"""The target grid (CRS, resolution, bounds) and the study-area mask.

The grid is an odc-geo ``GeoBox``; every layer is aligned onto it. Pixel ``(row, col)`` covers
``transform * (col, row)`` to ``transform * (col + 1, row + 1)``; coordinates are pixel centres.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr
from odc.geo import CRS as OdcCRS
from odc.geo.geobox import GeoBox
from odc.geo.geom import BoundingBox

from .config import GridConfig, QueryError, RunConfig, safe_query
from .errors import ConfigError, InputDataError, LayerError

RASTER_SUFFIXES = {".tif", ".tiff", ".vrt", ".img", ".nc", ".asc"}

__all__ = ["target_geobox", "study_mask", "raster_footprint", "is_raster", "parse_crs", "geobox_coords"]


def is_raster(path: Path) -> bool:
    return Path(path).suffix.lower() in RASTER_SUFFIXES


def parse_crs(value: str, where: str) -> OdcCRS:
    try:
        return OdcCRS(value)
    except Exception:
        raise ConfigError(
            f"{where}: {value!r} is not a CRS that PROJ understands. Fix: use an EPSG code such as 'EPSG:32650'"
        ) from None


def _open_raster_meta(path: Path, name: str):
    import rasterio

    ensure_input_exists(path, name)
    try:
        return rasterio.open(path)
    except Exception as exc:
        raise LayerError(
            name, f"file {str(path)!r} cannot be read as a raster ({exc})", "check that it is a valid GeoTIFF"
        ) from None


def raster_footprint(path: Path, name: str, crs_override: str | None, dst_crs: OdcCRS) -> BoundingBox:
    """Bounds of a raster in ``dst_crs`` (any orientation: north-up or south-up)."""
    from rasterio.warp import transform_bounds

    with _open_raster_meta(path, name) as src:
        src_crs = src.crs.to_wkt() if src.crs else crs_override
        if src_crs is None:
            raise LayerError(
                name,
                f"raster {str(path)!r} has no CRS",
                "add 'crs: EPSG:xxxx' to the layer, or write one into the file (rio.write_crs / gdal_edit.py -a_srs)",
            )
        if src.crs is None:
            parse_crs(crs_override, f"layer {name!r}: crs")
        if src.transform.is_identity:
            raise LayerError(
                name, f"raster {str(path)!r} has no georeferencing (no geotransform: pixel coordinates only)",
                "georeference it (gdal_translate -a_ullr / -a_srs) before using it",
            )
        # rasterio's bounds keep the file's orientation: bottom > top for a south-up raster
        left, bottom, right, top = src.bounds
        native = (min(left, right), min(bottom, top), max(left, right), max(bottom, top))
        where = "the file" if src.crs else "the layer's 'crs:'"
        _check_native_extent(name, path, native, OdcCRS(src_crs), where, dst_crs)
        b = transform_bounds(src_crs, dst_crs.wkt, *native, densify_pts=21)
    if not np.all(np.isfinite(b)):
        raise LayerError(
            name,
            f"its extent {_fmt_box(native)} cannot be placed in the grid's CRS {dst_crs}: those coordinates are not "
            f"valid in the CRS {where} declares ({_crs_label(OdcCRS(src_crs))})",
            "give the CRS its coordinates are really in (the 'crs:' of the layer for a file without one, "
            "or rewrite the file's CRS with gdal_edit.py -a_srs)",
        )
    return BoundingBox(*b, crs=dst_crs)


def _crs_label(crs: OdcCRS) -> str:
    epsg = crs.epsg
    return f"EPSG:{epsg}" if epsg else str(crs.to_wkt())[:60]


def _fmt_box(b) -> str:
    return "(" + ", ".join(f"{round(float(v), 3):.12g}" for v in b) + ")"


def _check_native_extent(name: str, path: Path, native, crs: OdcCRS, where: str, grid_crs: OdcCRS) -> None:
    """A geographic CRS on coordinates that are clearly not degrees (metres of a projected CRS)."""
    if not crs.geographic:
        return
    x0, y0, x1, y1 = native
    example = _crs_label(grid_crs) if not grid_crs.geographic and grid_crs.epsg else "EPSG:xxxx"
    if not (-360 <= x0 and x1 <= 360 and -90.5 <= y0 and y1 <= 90.5):
        raise LayerError(
            name,
            f"raster {str(path)!r} has extent {_fmt_box(native)}, which is not longitude/latitude, but the CRS "
            f"{where} declares is geographic ({_crs_label(crs)})",
            f"give the projected CRS the coordinates are in (e.g. 'crs: {example}' on the layer for a file without "
            f"one, or gdal_edit.py -a_srs {example} on the file)",
        )


def check_raster_complete(src, path: Path, name: str, band: int = 1) -> None:
    """Raise LayerError when a GeoTIFF is truncated: a data block lies (partly) beyond the end of the file.

    A truncated copy keeps a valid header, so it opens, and fails only when the missing blocks are read
    (inside the cube write). The block offsets and sizes are header metadata: no pixel is read here.
    """
    if src.driver != "GTiff":
        return
    import os

    size = os.path.getsize(path)
    windows = [ji for ji, _ in src.block_windows(band)]
    if len(windows) > 20_000:  # very large rasters: the last blocks (written last) and a regular sample
        windows = windows[:: len(windows) // 10_000] + windows[-256:]
    worst = None
    for row, col in windows:
        off = src.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=band)
        n = src.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=band)
        if not off or not n:
            continue  # sparse block (not written) or a driver without the metadata
        end = int(off) + int(n)
        if end > size and (worst is None or end > worst):
            worst = end
    if worst is not None:
        raise LayerError(
            name,
            f"raster {str(path)!r} is truncated: it is {size} bytes but its blocks need {worst} (an interrupted "
            "copy or download)",
            "copy or download the file again (gdalinfo -checksum reads every block to check it)",
        )


def _resolution_xy(res) -> tuple[float, float]:
    if isinstance(res, (int, float)):
        return float(res), float(res)
    return float(res[0]), float(res[1])


def target_geobox(cfg: RunConfig) -> GeoBox:
    """The GeoBox every layer is aligned onto (see :class:`pipeline.config.GridConfig`)."""
    g: GridConfig = cfg.grid
    if g.like is not None:
        like = cfg.resolve(g.like)
        with _open_raster_meta(like, "grid.like") as src:
            if src.crs is None and g.crs is None:
                raise ConfigError(f"grid.like: raster {str(like)!r} has no CRS. Fix: add 'crs: EPSG:xxxx' under grid")
            src_crs = OdcCRS(src.crs.to_wkt()) if src.crs else parse_crs(g.crs, "grid.crs")
            base = GeoBox((src.height, src.width), src.transform, src_crs)
        crs = parse_crs(g.crs, "grid.crs") if g.crs else src_crs
        if crs == src_crs and g.resolution is None and g.bounds is None:
            return base
        if g.resolution is None and crs != src_crs:
            raise ConfigError("grid: a CRS different from grid.like's needs grid.resolution. Fix: add 'resolution'")
        res = _resolution_xy(g.resolution) if g.resolution is not None else (abs(base.transform.a), abs(base.transform.e))
        bbox = BoundingBox(*g.bounds, crs=crs) if g.bounds is not None else base.extent.to_crs(crs).boundingbox
        return GeoBox.from_bbox(bbox, crs=crs, resolution=_odc_res(res), tight=True)

    crs = parse_crs(g.crs, "grid.crs")
    res = _resolution_xy(g.resolution)
    if g.bounds is not None:
        bbox = BoundingBox(*g.bounds, crs=crs)
        return GeoBox.from_bbox(bbox, crs=crs, resolution=_odc_res(res), tight=True)
    boxes = [layer_footprint(l, cfg, crs) for l in cfg.layers]
    if not boxes:
        raise ConfigError(
            "grid.bounds is not set and no layer gives an extent. "
            "Fix: add 'bounds: [xmin, ymin, xmax, ymax]' (target CRS) or 'like: <raster>' under grid"
        )
    x0 = min(b.left for b in boxes)
    y0 = min(b.bottom for b in boxes)
    x1 = max(b.right for b in boxes)
    y1 = max(b.top for b in boxes)
    return GeoBox.from_bbox(BoundingBox(x0, y0, x1, y1, crs=crs), crs=crs, resolution=_odc_res(res))


def layer_footprint(layer, cfg: RunConfig, dst_crs: OdcCRS) -> BoundingBox:
    """Extent of one layer's data in ``dst_crs`` (rasters, vector features or point samples)."""
    path = cfg.resolve(layer.path)
    ensure_input_exists(path, layer.name)
    if is_raster(path):
        return raster_footprint(path, layer.name, layer.crs, dst_crs)
    if layer.kind == "points":
        from .ingest import _point_blocks

        box = [np.inf, np.inf, -np.inf, -np.inf]  # streamed: a survey of millions of samples is never held
        for px, py, _ in _point_blocks(layer, cfg, dst_crs):
            box = [min(box[0], px.min()), min(box[1], py.min()), max(box[2], px.max()), max(box[3], py.max())]
        return BoundingBox(*box, crs=dst_crs)
    gdf = _read_vector(path, layer.layer, layer.name, layer.crs, layer.query).to_crs(dst_crs.wkt)
    return BoundingBox(*gdf.total_bounds, crs=dst_crs)


def _odc_res(res: tuple[float, float]):
    from odc.geo import resxy_

    return resxy_(res[0], -res[1])


def geobox_coords(geobox: GeoBox) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x [W], y [H]) of a north-up GeoBox."""
    t = geobox.transform
    h, w = tuple(geobox.shape)
    x = t.c + t.a * (np.arange(w) + 0.5)
    y = t.f + t.e * (np.arange(h) + 0.5)
    return x, y


def study_mask(cfg: RunConfig, geobox: GeoBox, chunk: int) -> xr.DataArray | None:
    """Study-area mask from ``grid.mask`` (polygons or a raster), as a lazy bool DataArray, or None."""
    if cfg.grid.mask is None:
        return None
    path = cfg.resolve(cfg.grid.mask)
    if not path.exists():
        raise ConfigError(f"grid.mask: file {str(path)!r} does not exist. Fix: check the path (relative to the config)")
    x, y = geobox_coords(geobox)
    if is_raster(path):
        from .ingest import open_raster_layer
        from .config import LayerConfig

        lc = LayerConfig(name="grid.mask", path=path, kind="categorical", classes=(1,), resampling="nearest")
        da = open_raster_layer(lc, cfg, geobox, chunk, raw=True)
        m = (np.isfinite(da) & (da != 0))
    else:
        gdf = _read_vector(path, None, "grid.mask", None)
        gdf = gdf.to_crs(geobox.crs.wkt)
        polys = [g for g in gdf.geometry if g is not None and g.geom_type in ("Polygon", "MultiPolygon")]
        if not polys:
            raise ConfigError(f"grid.mask: {str(path)!r} holds no polygon. Fix: give a polygon layer of the study area")
        m = xr.DataArray(rasterize_blocks(polys, geobox, chunk), dims=("y", "x"), coords={"y": y, "x": x})
    return m.assign_coords(y=y, x=x).rename("mask")


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
    near = (bounds[:, 0] <= bb.right) & (bounds[:, 2] >= bb.left) & (bounds[:, 1] <= bb.top) & (bounds[:, 3] >= bb.bottom)
    return _rasterize(geoms[near], sub, all_touched)


def _rasterize(geoms, geobox: GeoBox, all_touched: bool, values=None) -> np.ndarray:
    from rasterio.features import rasterize

    shapes = list(geoms) if values is None else list(zip(geoms, values))
    if not shapes:
        return np.zeros(tuple(geobox.shape), dtype=bool)
    out = rasterize(
        shapes, out_shape=tuple(geobox.shape), transform=geobox.transform, fill=0, all_touched=all_touched, dtype="uint8",
        default_value=1,
    )
    return out.astype(bool) if values is None else out


def _read_vector(path: Path, layer: str | None, name: str, crs: str | None, query: str | None = None):
    import geopandas as gpd

    if query:  # before any use (the config validates it too; a model_construct'ed one does not)
        try:
            safe_query(query)
        except QueryError as exc:
            raise LayerError(name, exc.problem, exc.fix) from None
    ensure_input_exists(Path(path), name)
    try:
        gdf = gpd.read_file(path, layer=layer)
    except Exception as exc:
        hint = ""
        try:
            import pyogrio

            hint = f"; layers in the file: {[l[0] for l in pyogrio.list_layers(path)]}"
        except Exception:
            pass
        raise LayerError(
            name, f"cannot read vector file {str(path)!r} (layer {layer!r}): {exc}{hint}",
            "check the path and the 'layer' name",
        ) from None
    if gdf.crs is None:
        if crs is None:
            raise LayerError(
                name, f"vector file {str(path)!r} has no CRS", "add 'crs: EPSG:xxxx' to the layer (the CRS of its coordinates)"
            )
        gdf = gdf.set_crs(crs)
    if query:
        try:
            gdf = gdf.query(query)
        except Exception as exc:
            raise LayerError(name, f"query {query!r} failed ({exc})", f"use column names among {list(gdf.columns)}") from None
    if len(gdf) == 0:
        what = f"layer {layer!r} of {str(path)!r}" if layer else repr(str(path))
        if query:
            raise LayerError(name, f"query {query!r} selects no feature of {what}", "relax the query (check the values' spelling)")
        raise LayerError(name, f"{what} has no features (0 rows)", "export the layer again, or point 'layer' at one with features")
    return gdf


def check_overlap(name: str, bbox: BoundingBox, geobox: GeoBox) -> None:
    """Raise LayerError when a layer's extent (in the grid's CRS) misses the grid, with the likely cause."""
    ext = geobox.extent.boundingbox
    box = tuple(float(v) for v in bbox)
    grid = _fmt_box(ext)
    if not np.all(np.isfinite(box)):
        raise LayerError(
            name,
            f"its coordinates cannot be placed on the grid ({geobox.crs}): they are not valid in the layer's CRS "
            "(latitudes beyond +-90 degrees: are x and y swapped?)",
            "check the layer's 'crs', and that 'x' names the easting/longitude column and 'y' the "
            "northing/latitude one (swap 'x' and 'y' if they are the other way round)",
        )
    left, bottom, right, top = box
    if left >= ext.right or right <= ext.left or bottom >= ext.top or top <= ext.bottom:
        fix = "check the layer's CRS (a wrong or missing CRS is the usual cause) and grid.bounds"
        hint = ""
        units = geobox.crs.units[0] if not geobox.crs.geographic else ""
        if units in ("metre", "meter", "m") and _mostly_overlaps(tuple(v * 1000.0 for v in box), ext):
            hint = (f"; times 1000 it would overlap: its coordinates look like kilometres, but the units of "
                    f"{geobox.crs} are metres")
            fix = "convert the coordinates to metres (multiply by 1000), or give the CRS they are really in"
        raise LayerError(
            name,
            f"does not overlap the grid: its extent {_fmt_box(box)} lies outside the grid {grid} ({geobox.crs}){hint}",
            fix,
        )


def _mostly_overlaps(box: tuple, ext) -> bool:
    """Whether ``box`` covers at least half of the grid, or the grid at least half of ``box``."""
    w = min(box[2], ext.right) - max(box[0], ext.left)
    h = min(box[3], ext.top) - max(box[1], ext.bottom)
    if w <= 0 or h <= 0:
        return False
    smaller = min((box[2] - box[0]) * (box[3] - box[1]), (ext.right - ext.left) * (ext.top - ext.bottom))
    return smaller > 0 and w * h >= 0.5 * smaller


def ensure_input_exists(path: Path, name: str) -> None:
    if not path.exists():
        raise LayerError(name, f"file {str(path)!r} does not exist", "check the 'path' (relative to the config file)")
    if path.is_file() and path.stat().st_size == 0:
        raise InputDataError(f"layer {name!r}: file {str(path)!r} is empty. Fix: re-export it")
    if path.is_file() and path.suffix.lower() in (".csv", ".txt", ".tsv"):
        with open(path, "rb") as f:
            head = [line for _, line in zip(range(2), (l for l in f if l.strip()))]
        if len(head) < 2:
            raise LayerError(
                name, f"table {str(path)!r} has a header but no data rows (0 samples)",
                "export the samples again, or remove the layer",
            )
