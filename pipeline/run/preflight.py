"""Checks before any work: what can be known from the config and the inputs' headers is checked before the cube
is built or a model trained, so that a typo fails in a second with one line, not after an hour or a
MemoryError.

- every layer path that is a folder (not a file) is named;
- the grid's bounds lie where its CRS is defined (its area of use), and bounds in degrees under a projected
  CRS (or metres under a geographic one) are named as such;
- the grid's pixel count and the cube's size (pixels x bands x 4 bytes) are estimated and refused over
  ``grid.max_pixels`` / ``grid.max_cube_gib``, with the figure and the fix;
- the model window fits in the grid (when train or score will run).

The grid is known here without reading any data when ``grid.bounds`` or ``grid.like`` is given; otherwise the
estimate uses the raster layers' footprints (their headers), a lower bound of the grid the cube stage builds.
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.errors import ConfigError, LayerError

__all__ = ["preflight", "grid_shape", "check_bounds_in_crs", "check_layer_paths"]

LOWER_BOUND = "the raster layers' extent / grid.resolution"  # a grid at least this large: vectors may widen it
_RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".nc", ".asc", ".jp2")


def check_layer_paths(cfg: RunConfig) -> None:
    """A layer (or the deposits, or grid.like/mask) whose path is a folder: name it and the fix."""
    items = [(f"layer {l.name!r}", "path", l.path) for l in cfg.layers]
    if cfg.deposits is not None:
        items.append(("deposits", "deposits.path", cfg.deposits.path))
    items += [(f"grid.{k}", f"grid.{k}", getattr(cfg.grid, k)) for k in ("like", "mask") if getattr(cfg.grid, k)]
    for what, key, p in items:
        path = cfg.resolve(p)
        if isinstance(path, Path) and path.is_dir() and path.suffix.lower() not in (".zarr", ".gdb"):
            fix = "point it at a file inside it (a GeoTIFF, GeoPackage, shapefile or CSV)"
            if what.startswith("layer "):
                raise LayerError(what.split(" ", 1)[1].strip("'"), f"its path {str(p)!r} is a folder, not a file", fix)
            raise ConfigError(f"{what}: {key} {str(p)!r} is a folder, not a file. Fix: {fix}")


def _crs(value: str):
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        return CRS.from_user_input(value)
    except CRSError:
        raise ConfigError(
            f"grid.crs: {str(value)[:80]!r} is not a CRS that PROJ understands. Fix: use an EPSG code such as "
            "'EPSG:32650'"
        ) from None


def check_bounds_in_crs(crs_value: str, bounds: tuple[float, float, float, float]) -> None:
    """``bounds`` (xmin, ymin, xmax, ymax in ``crs_value``) must lie in the CRS's domain: degrees within
    +-180/+-90 for a geographic CRS, and inside the area of use for a projected one."""
    crs = _crs(crs_value)
    x0, y0, x1, y1 = bounds
    b = f"[{x0:.10g}, {y0:.10g}, {x1:.10g}, {y1:.10g}]"
    label = f"{crs_value}" if len(str(crs_value)) <= 40 else (crs.name or "the grid CRS")
    if crs.is_geographic:
        if not (-180 <= x0 and x1 <= 360 and -90 <= y0 and y1 <= 90):
            raise ConfigError(
                f"grid.bounds {b} are not longitude/latitude, but grid.crs {label} is geographic (degrees). Fix: "
                "give the bounds in degrees, or set grid.crs to the projected CRS they are in (e.g. 'EPSG:32646')"
            )
        return
    aou = crs.area_of_use
    unit = (crs.axis_info[0].unit_name if crs.axis_info else "") or "units"
    looks_degrees = -180 <= x0 and x1 <= 180 and -90 <= y0 and y1 <= 90 and "metre" in unit
    if looks_degrees and (x1 - x0) < 10_000 and (y1 - y0) < 10_000:
        raise ConfigError(
            f"grid.bounds {b} look like longitude/latitude degrees, but grid.crs {label} is in {unit}s. Fix: give "
            f"the bounds in {label} coordinates ({unit}s), or set grid.crs to 'EPSG:4326' for a grid in degrees"
        )
    if aou is None:
        return
    from pyproj import Transformer

    try:
        lon0, lat0, lon1, lat1 = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform_bounds(
            x0, y0, x1, y1, densify_pts=21
        )
    except Exception:  # the projection cannot invert these coordinates: they are far outside its domain
        lon0 = lat0 = lon1 = lat1 = math.inf
    finite = all(math.isfinite(v) for v in (lon0, lat0, lon1, lat1))
    crosses = finite and lon0 > lon1  # the antimeridian: transform_bounds returns lon0 > lon1
    inside = finite and (
        (crosses or (lon0 <= aou.east and lon1 >= aou.west)) and lat0 <= aou.north and lat1 >= aou.south
    )
    if not inside:
        where = f"lon {lon0:.4g}..{lon1:.4g}, lat {lat0:.4g}..{lat1:.4g}" if finite else "not a place on Earth"
        raise ConfigError(
            f"grid.bounds {b} lie outside where grid.crs {label} is defined (its area of use is lon "
            f"{aou.west:g}..{aou.east:g}, lat {aou.south:g}..{aou.north:g}; the bounds are {where}). Fix: check that "
            "the bounds are in the grid CRS's coordinates (not degrees, not another zone), or set grid.crs to the CRS "
            "they are in"
        )


def grid_shape(cfg: RunConfig) -> tuple[int, int, str] | None:
    """(height, width, how it was known) of the grid, without reading data; None when unknown here."""
    g = cfg.grid
    res = g.resolution
    rx, ry = (res, res) if isinstance(res, (int, float)) else (res or (None, None))
    if g.bounds is not None and rx is not None:
        x0, y0, x1, y1 = g.bounds
        return math.ceil((y1 - y0) / ry), math.ceil((x1 - x0) / rx), "grid.bounds / grid.resolution"
    if g.like is not None or rx is None:
        return _like_shape(cfg)
    boxes = []
    for layer in cfg.layers:  # rasters only: their headers are cheap; vectors and points are read by the cube
        path = cfg.resolve(layer.path)
        if isinstance(path, Path) and path.suffix.lower() in _RASTER_SUFFIXES and path.is_file():
            box = _raster_box(path, layer.crs, g.crs)
            if box is not None:
                boxes.append(box)
    if not boxes:
        return None
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    return math.ceil((y1 - y0) / ry), math.ceil((x1 - x0) / rx), LOWER_BOUND


def _raster_box(path: Path, layer_crs: str | None, grid_crs: str):
    import rasterio
    from rasterio.warp import transform_bounds

    try:
        with rasterio.open(path) as src:
            crs = src.crs or layer_crs
            if crs is None:
                return None
            return transform_bounds(crs, grid_crs, *src.bounds, densify_pts=21)
    except Exception:  # the cube stage names what is wrong with the file
        return None


def _like_shape(cfg: RunConfig):
    import rasterio

    g = cfg.grid
    like = cfg.resolve(g.like) if g.like is not None else None
    if not isinstance(like, Path) or not like.is_file():
        return None
    try:
        with rasterio.open(like) as src:
            if g.resolution is None and g.bounds is None and (g.crs is None or src.crs == g.crs):
                return src.height, src.width, "grid.like"
            if g.resolution is not None and (g.crs is None or src.crs == g.crs):
                res = g.resolution
                rx, ry = (res, res) if isinstance(res, (int, float)) else res
                x0, y0, x1, y1 = g.bounds or tuple(src.bounds)
                return math.ceil((y1 - y0) / ry), math.ceil((x1 - x0) / rx), "grid.like / grid.resolution"
    except Exception:
        return None
    return None


def check_size(cfg: RunConfig, shape: tuple[int, int, str]) -> None:
    """Refuse a grid over ``grid.max_pixels`` or a cube over ``grid.max_cube_gib``."""
    h, w, how = shape
    pixels = h * w
    n_bands = len(cfg.band_names)
    gib = pixels * (4 * n_bands + 1) / 2**30  # float32 bands and the valid mask
    g = cfg.grid
    if pixels > g.max_pixels or gib > g.max_cube_gib:
        over = (
            f"{pixels:,} pixels, over grid.max_pixels {g.max_pixels:,}"
            if pixels > g.max_pixels
            else f"a cube of {gib:,.1f} GiB, over grid.max_cube_gib {g.max_cube_gib:g}"
        )
        raise ConfigError(
            f"the grid would be {w:,} x {h:,} pixels ({how}) with {n_bands} bands: {over}. Fix: check "
            "grid.resolution and grid.bounds (and their units: metres vs degrees); if the size is meant, raise "
            "grid.max_pixels / grid.max_cube_gib"
        )


def check_window(cfg: RunConfig, shape: tuple[int, int, str]) -> None:
    h, w, how = shape
    if min(h, w) < cfg.model.window:
        raise ConfigError(
            f"the grid is {w} x {h} pixels ({how}), smaller than model.window {cfg.model.window} along an axis. "
            f"Fix: use a model.window of at most {min(h, w)} (a multiple of model.patch {cfg.model.patch}), or a "
            "finer grid.resolution"
        )


def preflight(cfg: RunConfig, stages: tuple[str, ...] = ("cube", "train", "score")) -> None:
    """Every check of this module that applies to ``stages``; raises a ConfigError or LayerError (one line)."""
    check_layer_paths(cfg)
    g = cfg.grid
    if g.bounds is not None and g.crs is not None:
        check_bounds_in_crs(g.crs, g.bounds)
    shape = grid_shape(cfg)
    if shape is None:
        return
    if "cube" in stages:
        check_size(cfg, shape)
    if shape[2] != LOWER_BOUND and any(s in stages for s in ("train", "score", "compare", "reliability")):
        check_window(cfg, shape)
