"""Grid geometry: CRS parsing, pixel-centre coordinates, extents and overlap checks.

No file is read here: the grid of a run (:func:`pipeline.data.ingest.target_geobox`) and the study-area
mask are built in :mod:`pipeline.data.ingest` from the layers.

The grid is an odc-geo ``GeoBox``; every layer is aligned onto it. Pixel ``(row, col)`` covers
``transform * (col, row)`` to ``transform * (col + 1, row + 1)``; coordinates are pixel centres.
"""

from __future__ import annotations

from pathlib import Path

import dask.array as dsa
import numpy as np
import xarray as xr
from odc.geo import CRS as OdcCRS
from odc.geo.geobox import GeoBox
from odc.geo.geom import BoundingBox

from pipeline import storage
from pipeline.errors import ConfigError, InputDataError, LayerError

RASTER_SUFFIXES = {".tif", ".tiff", ".vrt", ".img", ".nc", ".asc"}

__all__ = ["is_raster", "parse_crs", "geobox_coords", "grid_da", "check_overlap", "ensure_input_exists"]


def is_raster(path: Path | str) -> bool:
    return storage.suffix(path).lower() in RASTER_SUFFIXES


def parse_crs(value: str, where: str) -> OdcCRS:
    try:
        return OdcCRS(value)
    except Exception:
        raise ConfigError(
            f"{where}: {value!r} is not a CRS that PROJ understands. Fix: use an EPSG code such as 'EPSG:32650'"
        ) from None


def crs_label(crs: OdcCRS) -> str:
    epsg = crs.epsg
    return f"EPSG:{epsg}" if epsg else str(crs.to_wkt())[:60]


def fmt_box(b) -> str:
    return "(" + ", ".join(f"{round(float(v), 3):.12g}" for v in b) + ")"


def resolution_xy(res) -> tuple[float, float]:
    if isinstance(res, (int, float)):
        return float(res), float(res)
    return float(res[0]), float(res[1])


def odc_res(res: tuple[float, float]):
    from odc.geo import resxy_

    return resxy_(res[0], -res[1])


def geobox_coords(geobox: GeoBox) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x [W], y [H]) of a north-up GeoBox."""
    t = geobox.transform
    h, w = tuple(geobox.shape)
    x = t.c + t.a * (np.arange(w) + 0.5)
    y = t.f + t.e * (np.arange(h) + 0.5)
    return x, y


def check_overlap(name: str, bbox: BoundingBox, geobox: GeoBox) -> None:
    """Raise LayerError when a layer's extent (in the grid's CRS) misses the grid, with the likely cause."""
    ext = geobox.extent.boundingbox
    box = tuple(float(v) for v in bbox)
    grid = fmt_box(ext)
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
            hint = (
                f"; times 1000 it would overlap: its coordinates look like kilometres, but the units of "
                f"{geobox.crs} are metres"
            )
            fix = "convert the coordinates to metres (multiply by 1000), or give the CRS they are really in"
        raise LayerError(
            name,
            f"does not overlap the grid: its extent {fmt_box(box)} lies outside the grid {grid} ({geobox.crs}){hint}",
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
    if not storage.exists(path):
        where = "check the URL and the credentials in the environment" if storage.is_url(path) else "check the 'path'"
        raise LayerError(
            name, f"file {storage.redact(path)!r} does not exist", f"{where} (relative to the config file)"
        )
    if storage.is_file(path) and storage.size(path) == 0:
        raise InputDataError(f"layer {name!r}: file {storage.redact(path)!r} is empty. Fix: re-export it")
    if storage.is_file(path) and storage.suffix(path).lower() in (".csv", ".txt", ".tsv"):
        with storage.open_file(path, "rb") as f:
            head = [line for _, line in zip(range(2), (l for l in f if l.strip()))]
        if len(head) < 2:
            raise LayerError(
                name,
                f"table {str(path)!r} has a header but no data rows (0 samples)",
                "export the samples again, or remove the layer",
            )


def grid_da(arr: dsa.Array, geobox: GeoBox) -> xr.DataArray:
    """A (y, x) array on ``geobox`` as a DataArray with pixel-centre coordinates."""
    x, y = geobox_coords(geobox)
    return xr.DataArray(arr, dims=("y", "x"), coords={"y": y, "x": x})
