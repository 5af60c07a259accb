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

from .config import GridConfig, RunConfig
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
    """Bounds of a raster in ``dst_crs``."""
    from rasterio.warp import transform_bounds

    with _open_raster_meta(path, name) as src:
        src_crs = src.crs.to_wkt() if src.crs else crs_override
        if src_crs is None:
            raise LayerError(
                name,
                f"raster {str(path)!r} has no CRS",
                "add 'crs: EPSG:xxxx' to the layer, or write one into the file (rio.write_crs / gdal_edit.py -a_srs)",
            )
        b = transform_bounds(src_crs, dst_crs.wkt, *src.bounds, densify_pts=21)
    return BoundingBox(*b, crs=dst_crs)


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
        from .ingest import read_points

        px, py, _ = read_points(layer, cfg, dst_crs)
        return BoundingBox(px.min(), py.min(), px.max(), py.max(), crs=dst_crs)
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
        import dask
        import dask.array as dsa

        gdf = _read_vector(path, None, "grid.mask", None)
        gdf = gdf.to_crs(geobox.crs.wkt)
        polys = [g for g in gdf.geometry if g is not None and g.geom_type in ("Polygon", "MultiPolygon")]
        if not polys:
            raise ConfigError(f"grid.mask: {str(path)!r} holds no polygon. Fix: give a polygon layer of the study area")
        arr = dsa.from_delayed(
            dask.delayed(_rasterize)(polys, geobox, False), shape=tuple(geobox.shape), dtype=bool
        ).rechunk(chunk)
        m = xr.DataArray(arr, dims=("y", "x"), coords={"y": y, "x": x})
    return m.assign_coords(y=y, x=x).rename("mask")


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
        raise LayerError(name, f"{str(path)!r} has no features (after query {query!r})", "check the file and the query")
    return gdf


def check_overlap(name: str, bbox: BoundingBox, geobox: GeoBox) -> None:
    ext = geobox.extent.boundingbox
    if bbox.left >= ext.right or bbox.right <= ext.left or bbox.bottom >= ext.top or bbox.top <= ext.bottom:
        raise LayerError(
            name,
            f"does not overlap the grid: its extent {tuple(round(v, 3) for v in bbox)} lies outside the grid "
            f"{tuple(round(v, 3) for v in ext)} ({geobox.crs})",
            "check the layer's CRS (a wrong or missing CRS is the usual cause) and grid.bounds",
        )


def ensure_input_exists(path: Path, name: str) -> None:
    if not path.exists():
        raise LayerError(name, f"file {str(path)!r} does not exist", "check the 'path' (relative to the config file)")
    if path.is_file() and path.stat().st_size == 0:
        raise InputDataError(f"layer {name!r}: file {str(path)!r} is empty. Fix: re-export it")
