"""Read every layer of a run config and align it onto the target grid, lazily; rasters are read here.

The grid itself (:func:`target_geobox`), the layers' footprints and the study-area mask are also built here,
since they read the inputs. Vectors are in :mod:`pipeline.data.vectors`, point samples in
:mod:`pipeline.data.points`.

Each reader returns ``xr.DataArray`` bands (y, x) float32 on the target grid, backed by dask, NaN where
there is no data. Nothing is computed here: :func:`build_cube` returns a lazy Dataset, and the first
compute happens when :func:`pipeline.data.cube.write_cube` writes it.

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
import xarray as xr
from odc.geo import CRS as OdcCRS
from odc.geo.geobox import GeoBox
from odc.geo.geom import BoundingBox

from pipeline import __version__, storage
from pipeline.config import GridConfig, LayerConfig, RunConfig
from pipeline.data.cube import from_arrays
from pipeline.data.grid import (
    check_overlap,
    crs_label,
    ensure_input_exists,
    fmt_box,
    geobox_coords,
    grid_da,
    is_raster,
    odc_res,
    parse_crs,
    resolution_xy,
)
from pipeline.data.points import point_bands, point_blocks
from pipeline.data.vectors import rasterize_blocks, read_vector, vector_bands
from pipeline.errors import ConfigError, LayerError
from pipeline.memory import bound_gdal_cache, limit_fragmentation

__all__ = [
    "build_cube",
    "read_layer",
    "open_raster_layer",
    "target_geobox",
    "study_mask",
    "raster_footprint",
    "layer_footprint",
    "provenance",
    "file_fingerprint",
]


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


def open_raster_layer(
    layer: LayerConfig, cfg: RunConfig, geobox: GeoBox, chunk: int, raw: bool = False
) -> xr.DataArray:
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
    src_name = storage.gdal_path(path)  # /vsis3/... for s3://, /vsicurl/... for https://
    with rasterio.open(src_name) as src:
        if layer.band > src.count:
            raise LayerError(
                layer.name, f"band {layer.band} requested but {str(path)!r} has {src.count}", "set 'band' to 1..count"
            )
        dtype = src.dtypes[layer.band - 1]
        if not np.issubdtype(np.dtype(dtype), np.number):
            raise LayerError(
                layer.name, f"raster dtype {dtype!r} is not numeric", "convert the raster to a numeric type"
            )
        check_raster_complete(src, path, layer.name, layer.band)
        src_res = abs(src.transform.a)
        src_crs = src.crs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        da = rioxarray.open_rasterio(src_name, chunks={"band": 1, "y": chunk, "x": chunk}, masked=True, lock=False)
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
        data = dsa.map_blocks(
            _warp_block,
            template,
            src_name,
            layer.band,
            (src_crs or CRS.from_user_input(layer.crs)).to_wkt(),
            mask,
            geobox,
            resampling,
            dtype="float32",
        )
        out = grid_da(data, geobox)
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


def _warp_block(
    block, path: str, band: int, src_crs: str, mask: _SourceMask, geobox: GeoBox, resampling: str, block_info=None
) -> np.ndarray:
    """One grid chunk of a raster: read the source window that covers it (with a margin for the
    resampling kernel), set no data to NaN, and warp it with GDAL onto the chunk."""
    import rasterio
    from rasterio.warp import Resampling, reproject, transform_bounds
    from rasterio.windows import Window

    (r0, r1), (c0, c1) = block_info[None]["array-location"]
    dst = geobox[r0:r1, c0:c1]
    out = np.full(dst.shape, np.nan, dtype="float32")
    storage.use_endpoint()  # a worker process started before AWS_ENDPOINT_URL was read
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
    reproject(
        mask(a),
        out,
        src_transform=src_transform,
        src_crs=src_crs,
        src_nodata=np.nan,
        dst_transform=dst.affine,
        dst_crs=dst.crs.wkt,
        dst_nodata=np.nan,
        resampling=Resampling[resampling],
    )
    return out


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
    bands are computed; see :mod:`pipeline.data.points`.
    """
    path = cfg.resolve(layer.path)
    if layer.kind == "points":
        return point_bands(layer, cfg, geobox, chunk, scratch)
    if layer.kind in ("distance", "indicator") or (layer.kind == "categorical" and not is_raster(path)):
        return vector_bands(layer, cfg, geobox, chunk)
    if not is_raster(path):
        raise LayerError(
            layer.name,
            f"kind {layer.kind!r} expects a raster (.tif) but got {storage.name_of(path)!r}",
            "use kind 'distance', 'indicator' or 'categorical' for vector files",
        )
    da = open_raster_layer(layer, cfg, geobox, chunk)
    if layer.kind == "categorical":
        return [
            xr.where(np.isfinite(da), (da == float(c)).astype("float32"), np.nan).astype("float32")
            for c in layer.classes
        ]
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
def file_fingerprint(path: Path | str, max_hash_bytes: int = 64 * 2**20) -> str:
    """sha256 of a file (or of a folder's file list), or size+mtime for large files; an object's ETag."""
    if storage.is_url(path):
        fs, key = storage.filesystem(path)
        info = fs.info(key)
        return f"etag={str(info.get('ETag', '')).strip(chr(34))};size={info.get('size')}"
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
    return {
        "config_name": cfg.name,
        "mpm_version": __version__,
        "inputs": {
            l.name: {"path": storage.redact(cfg.resolve(l.path)), "hash": file_fingerprint(cfg.resolve(l.path))}
            for l in cfg.layers
            if storage.exists(cfg.resolve(l.path))
        },
        "grid": cfg.grid.model_dump(mode="json"),
    }


def build_cube(cfg: RunConfig, scratch: str | Path | None = None) -> xr.Dataset:
    """The lazy evidence cube of a run config (nothing computed; write it with ``write_cube``).

    Point samples wait on disk in a folder under ``scratch`` (default: the system temporary folder),
    removed when the returned Dataset is garbage-collected or the process exits. Compute the cube on
    this machine (threads, or a local cluster): workers elsewhere cannot read that folder.
    """

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
            raise LayerError(
                meta[idx[0]][0],
                f"transform 'clr' needs at least two layers in source group {src!r}",
                "use 'log', or add the other parts of the composition",
            )
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
        scalings=[
            "none" if m[1].kind in ("categorical", "indicator") and m[1].scaling == "robust" else m[1].scaling
            for m in meta
        ],
        files=[storage.redact(cfg.resolve(m[1].path)) for m in meta],
        x=x,
        y=y,
        crs=geobox.crs.wkt,
        chunk=chunk,
        name=cfg.name,
    )


def _open_raster_meta(path: Path, name: str):
    import rasterio

    ensure_input_exists(path, name)
    try:
        return rasterio.open(storage.gdal_path(path))
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
                name,
                f"raster {str(path)!r} has no georeferencing (no geotransform: pixel coordinates only)",
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
            f"its extent {fmt_box(native)} cannot be placed in the grid's CRS {dst_crs}: those coordinates are not "
            f"valid in the CRS {where} declares ({crs_label(OdcCRS(src_crs))})",
            "give the CRS its coordinates are really in (the 'crs:' of the layer for a file without one, "
            "or rewrite the file's CRS with gdal_edit.py -a_srs)",
        )
    return BoundingBox(*b, crs=dst_crs)


def _check_native_extent(name: str, path: Path, native, crs: OdcCRS, where: str, grid_crs: OdcCRS) -> None:
    """A geographic CRS on coordinates that are clearly not degrees (metres of a projected CRS)."""
    if not crs.geographic:
        return
    x0, y0, x1, y1 = native
    example = crs_label(grid_crs) if not grid_crs.geographic and grid_crs.epsg else "EPSG:xxxx"
    if not (-360 <= x0 and x1 <= 360 and -90.5 <= y0 and y1 <= 90.5):
        raise LayerError(
            name,
            f"raster {str(path)!r} has extent {fmt_box(native)}, which is not longitude/latitude, but the CRS "
            f"{where} declares is geographic ({crs_label(crs)})",
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
    size = storage.size(path)
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
        res = (
            resolution_xy(g.resolution) if g.resolution is not None else (abs(base.transform.a), abs(base.transform.e))
        )
        bbox = BoundingBox(*g.bounds, crs=crs) if g.bounds is not None else base.extent.to_crs(crs).boundingbox
        return GeoBox.from_bbox(bbox, crs=crs, resolution=odc_res(res), tight=True)

    crs = parse_crs(g.crs, "grid.crs")
    res = resolution_xy(g.resolution)
    if g.bounds is not None:
        bbox = BoundingBox(*g.bounds, crs=crs)
        return GeoBox.from_bbox(bbox, crs=crs, resolution=odc_res(res), tight=True)
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
    return GeoBox.from_bbox(BoundingBox(x0, y0, x1, y1, crs=crs), crs=crs, resolution=odc_res(res))


def layer_footprint(layer, cfg: RunConfig, dst_crs: OdcCRS) -> BoundingBox:
    """Extent of one layer's data in ``dst_crs`` (rasters, vector features or point samples)."""
    path = cfg.resolve(layer.path)
    ensure_input_exists(path, layer.name)
    if is_raster(path):
        return raster_footprint(path, layer.name, layer.crs, dst_crs)
    if layer.kind == "points":
        box = [np.inf, np.inf, -np.inf, -np.inf]  # streamed: a survey of millions of samples is never held
        for px, py, _ in point_blocks(layer, cfg, dst_crs):
            box = [min(box[0], px.min()), min(box[1], py.min()), max(box[2], px.max()), max(box[3], py.max())]
        return BoundingBox(*box, crs=dst_crs)
    gdf = read_vector(path, layer.layer, layer.name, layer.crs, layer.query).to_crs(dst_crs.wkt)
    return BoundingBox(*gdf.total_bounds, crs=dst_crs)


def study_mask(cfg: RunConfig, geobox: GeoBox, chunk: int) -> xr.DataArray | None:
    """Study-area mask from ``grid.mask`` (polygons or a raster), as a lazy bool DataArray, or None."""
    if cfg.grid.mask is None:
        return None
    path = cfg.resolve(cfg.grid.mask)
    if not storage.exists(path):
        raise ConfigError(f"grid.mask: file {str(path)!r} does not exist. Fix: check the path (relative to the config)")
    x, y = geobox_coords(geobox)
    if is_raster(path):
        lc = LayerConfig(name="grid.mask", path=path, kind="categorical", classes=(1,), resampling="nearest")
        da = open_raster_layer(lc, cfg, geobox, chunk, raw=True)
        m = np.isfinite(da) & (da != 0)
    else:
        gdf = read_vector(path, None, "grid.mask", None)
        gdf = gdf.to_crs(geobox.crs.wkt)
        polys = [g for g in gdf.geometry if g is not None and g.geom_type in ("Polygon", "MultiPolygon")]
        if not polys:
            raise ConfigError(f"grid.mask: {str(path)!r} holds no polygon. Fix: give a polygon layer of the study area")
        m = xr.DataArray(rasterize_blocks(polys, geobox, chunk), dims=("y", "x"), coords={"y": y, "x": x})
    return m.assign_coords(y=y, x=x).rename("mask")
