"""Sinks: where lazy results are computed and written.

- :func:`write_zarr_resumable` writes a lazy Dataset to a Zarr v3 store region by region, recording
  finished regions in a manifest inside the store, so a rerun after a crash writes only what is missing.
- :func:`write_cog` writes a lazy (y, x) DataArray as a Cloud-Optimized GeoTIFF with overviews computed
  by odc-geo from Dask (rioxarray's COG driver from Dask gave all-zero overviews, DESIGN.md section 4).

Neither imports ``distributed``: pass ``scheduler=`` (a name, a callable or a Client) or rely on the
default scheduler (a running Client becomes the default).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from pipeline import storage
from pipeline.errors import MPMError
from pipeline.io import atomic_path

__all__ = ["OutputError", "write_zarr_resumable", "write_cog", "zarr_regions", "is_complete"]

MANIFEST_DIR = ".mpm_regions"  # one empty file per finished region; removed once the store is complete
FINGERPRINT_ATTR = "mpm_write_fingerprint"
COMPLETE_ATTR = "mpm_complete"


class OutputError(MPMError, ValueError):
    """An output path cannot be written as asked (exists with foreign content, bad layout)."""


# -- Zarr ------------------------------------------------------------------------------------------


def zarr_regions(ds: xr.Dataset, dims: tuple[str, str] = ("y", "x")) -> list[dict[str, slice]]:
    """The chunk regions of ``ds`` along ``dims``, row-major: ``[{'y': slice, 'x': slice}, ...]``."""
    chunks = ds.chunks
    bounds = []
    for d in dims:
        if d not in chunks:
            raise OutputError(
                f"dataset has no chunked dimension {d!r} (dims {dict(ds.sizes)}); "
                "Fix: pass a dask-backed Dataset with y and x dimensions"
            )
        edges = np.cumsum((0, *chunks[d])).tolist()
        bounds.append([slice(a, b) for a, b in itertools.pairwise(edges)])
    return [dict(zip(dims, combo)) for combo in itertools.product(*bounds)]


def _region_key(region: dict[str, slice]) -> str:
    return "_".join(f"{d}{s.start}-{s.stop}" for d, s in region.items())


def _fingerprint(ds: xr.Dataset, extra: str | None) -> str:
    """Structure of ``ds`` (variables, shapes, chunks, dtypes, grid) + a caller's token, hashed."""
    desc: dict[str, Any] = {"extra": extra or ""}
    for name, var in sorted(ds.variables.items()):
        desc[str(name)] = [list(var.dims), list(var.shape), str(var.dtype), str(var.chunks)]
    for d in ("y", "x"):
        if d in ds.coords:
            desc[f"coord_{d}"] = hashlib.sha1(np.ascontiguousarray(ds[d].values).tobytes()).hexdigest()
    return hashlib.sha1(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


def _group_attrs(path: Path | str) -> dict | None:
    """Attributes of the Zarr group at ``path`` (a folder or a URL), or None when it is not a readable Zarr v3
    group."""
    try:
        return json.loads(storage.read_text(storage.join(path, "zarr.json"))).get("attributes", {})
    except (OSError, ValueError):
        return None


def is_complete(path: str | Path) -> bool:
    """True when ``path`` is a store that :func:`write_zarr_resumable` finished."""
    attrs = _group_attrs(storage.location(path))
    return bool(attrs and attrs.get(COMPLETE_ATTR))


def _regular(ds: xr.Dataset, dims: tuple[str, ...]) -> xr.Dataset:
    """Rechunk to regular chunks along ``dims`` (Zarr chunks must be equal but for the last)."""
    chunks = ds.chunks
    fix = {}
    for d in dims:
        c = chunks[d]
        if len(c) > 1 and (len(set(c[:-1])) > 1 or c[-1] > c[0]):
            fix[d] = max(c)
    return ds.chunk(fix) if fix else ds


def _write_region(path: str, names: list[str], dims: list[tuple[str, ...]], blocks: list, region: dict, marker: str):
    """Task: write one region of every variable into the store, then record it in the manifest."""
    import zarr

    group = zarr.open_group(path, mode="r+")
    for name, vdims, block in zip(names, dims, blocks):
        arr = group[name]
        index = tuple(region.get(d, slice(None)) for d in vdims)
        arr[index] = np.asarray(block).astype(arr.dtype, copy=False)
    # The marker is written only after every variable of the region is on disk.
    storage.write_bytes(marker, b"")
    return 1


def write_zarr_resumable(
    ds: xr.Dataset,
    path: str | Path,
    *,
    fingerprint: str | None = None,
    regions_per_batch: int = 32,
    scheduler: Any = None,
    on_batch: Callable[[list[str]], None] | None = None,
    dims: tuple[str, str] = ("y", "x"),
) -> Path:
    """Compute and write a lazy Dataset to a Zarr v3 store, resumably, one chunk region at a time.

    1. The store's metadata and the eager (non-dask) variables are written first
       (``to_zarr(compute=False)``), with the group attribute ``mpm_complete: false`` and a fingerprint
       of the Dataset's structure plus ``fingerprint`` (a caller's token naming the inputs).
    2. Each chunk region of the dask variables along ``dims`` is written by one task, which then
       touches ``<path>/.mpm_regions/<region>``. Regions go in batches of ``regions_per_batch`` per
       ``dask.compute`` (the graph stays small; all workers stay busy within a batch).
    3. When all regions are recorded, ``mpm_complete`` becomes true and metadata is consolidated.

    Rerunning on the same ``path`` with the same Dataset and ``fingerprint`` after an interruption
    writes only the regions without a marker; the result equals an uninterrupted run's. A store with
    another fingerprint (written for other inputs) is replaced. A path that holds anything else raises
    :class:`OutputError`. ``on_batch(keys)`` is called on the client after each batch (progress, tests).

    Data variables must be plain numeric or bool arrays (no CF scale/offset encoding): regions are
    written straight into the Zarr arrays. Returns ``path``.
    """
    import dask

    path = storage.location(path)  # a folder, or a URL: markers are then objects under the store's prefix
    lazy = [n for n, v in ds.data_vars.items() if v.chunks is not None and set(dims) <= set(v.dims)]
    if not lazy:
        raise OutputError(
            f"nothing to write lazily to {str(path)!r}: no dask-backed data variable with dims {dims}. "
            "Fix: pass the lazy Dataset (e.g. from score_cube), not a computed one"
        )
    ds = _regular(ds, dims)
    ds = ds.copy()
    for var in ds.variables.values():  # the store's chunks are the dask chunks: regions map to chunks
        var.encoding.pop("chunks", None)
        var.encoding.pop("preferred_chunks", None)
    fp = _fingerprint(ds, fingerprint)

    there = storage.exists(path)
    attrs = _group_attrs(path) if there else None
    if there and (attrs is None or FINGERPRINT_ATTR not in attrs):
        raise OutputError(
            f"{storage.redact(path)!r} exists and was not written by write_zarr_resumable; refusing to overwrite it. "
            "Fix: remove it or choose another output path"
        )
    if attrs is not None and attrs.get(FINGERPRINT_ATTR) == fp and attrs.get(COMPLETE_ATTR):
        return path
    if attrs is None or attrs.get(FINGERPRINT_ATTR) != fp:
        if there:  # an output of ours for other inputs: start over
            storage.remove(path)
        template = ds.copy()
        template.attrs = {**ds.attrs, FINGERPRINT_ATTR: fp, COMPLETE_ATTR: False}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            template.to_zarr(str(path), mode="w", compute=False, zarr_format=3, consolidated=False)
    manifest = storage.join(path, MANIFEST_DIR)
    done = _recorded(manifest)

    names = lazy
    vdims = [ds[n].dims for n in names]
    # One Delayed per block. optimize_graph=False keeps the keys the variables share (e.g. one scoring
    # task feeding prospectivity, anomalies and contribution): optimising each variable's graph apart
    # would fuse and rename them, and the shared task would run once per variable.
    blocks = {n: ds[n].data.to_delayed(optimize_graph=False) for n in names}
    chunk_index = {d: np.cumsum((0, *ds.chunks[d])).tolist() for d in dims}

    todo = []
    for region in zarr_regions(ds, dims):
        key = _region_key(region)
        if key in done:
            continue
        idx = {d: chunk_index[d].index(region[d].start) for d in dims}
        per_var = []
        for n, vd in zip(names, vdims):
            # all non-region dims are one chunk (e.g. band): block index 0 there
            bi = tuple(idx[d] if d in idx else 0 for d in vd)
            per_var.append(blocks[n][bi])
        todo.append((key, region, per_var))

    write = dask.delayed(_write_region, pure=False)
    for start in range(0, len(todo), max(1, regions_per_batch)):
        batch = todo[start : start + regions_per_batch]
        tasks = [
            write(
                str(path),
                names,
                vdims,
                per_var,
                region,
                str(storage.join(manifest, key)),
                dask_key_name=f"write-region-{key}-{uuid.uuid4().hex[:6]}",
            )
            for key, region, per_var in batch
        ]
        dask.compute(*tasks, scheduler=scheduler)
        if on_batch is not None:
            on_batch([k for k, _, _ in batch])

    recorded = _recorded(manifest)
    missing = [k for k in (_region_key(r) for r in zarr_regions(ds, dims)) if k not in recorded]
    if missing:  # pragma: no cover - a task that returned without its marker
        raise OutputError(
            f"{len(missing)} region(s) of {storage.redact(path)!r} were not recorded (first: {missing[0]}). Fix: rerun"
        )
    _finish(path)
    return path


def _recorded(manifest: Path | str) -> set[str]:
    """Names of the region markers under ``manifest`` (one listing; none when it is not there)."""
    if not storage.is_url(manifest):
        Path(manifest).mkdir(exist_ok=True)
        return {p.name for p in Path(manifest).iterdir()}
    fs, key = storage.filesystem(manifest)
    try:
        return {storage.name_of(k) for k in fs.ls(key, detail=False, refresh=True)}
    except FileNotFoundError:
        return set()


def _finish(path: Path | str) -> None:
    import zarr

    # The manifest has served its purpose; zarr would warn about the foreign folder on every listing.
    storage.remove(storage.join(path, MANIFEST_DIR))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        group = zarr.open_group(str(path), mode="r+")
        group.attrs.update({COMPLETE_ATTR: True})
        zarr.consolidate_metadata(str(path))


# -- COG -------------------------------------------------------------------------------------------


def write_cog(
    da: xr.DataArray,
    path: str | Path,
    blocksize: int = 256,
    *,
    overview_resampling: str = "average",
    compression: str = "deflate",
    scheduler: Any = None,
) -> Path:
    """Write a (y, x) DataArray with a CRS as a Cloud-Optimized GeoTIFF with overviews, atomically.

    Uses odc-geo's ``save_cog_with_dask`` (overviews computed from the dask graph; tiles of
    ``blocksize`` pixels), writes ``<path>.tmp-*`` and renames it onto ``path``. NaN is the nodata
    value of float data. odc-geo pads the raster on the right and bottom to a multiple of
    ``2**n_overviews`` pixels so that every overview level halves exactly: the GeoTIFF has the
    DataArray's origin and resolution, and up to ``2**n - 1`` extra nodata rows/columns. Returns ``path``.
    """
    import dask
    import odc.geo.xr  # noqa: F401  (registers the .odc accessor)
    from odc.geo.cog import save_cog_with_dask

    path = storage.location(path)
    if da.ndim != 2 or da.dims != ("y", "x"):
        raise OutputError(
            f"write_cog needs a (y, x) DataArray, got dims {da.dims} for {da.name!r}; "
            "Fix: select one band first, e.g. ds['contribution'].sel(band='Cr')"
        )
    if da.rio.crs is None:
        raise OutputError(
            f"{da.name!r} has no CRS, so the GeoTIFF would not be georeferenced. Fix: da.rio.write_crs(...)"
        )
    if blocksize % 16:
        raise OutputError(f"COG blocksize must be a multiple of 16, got {blocksize}; Fix: use e.g. 256 or 512")
    da = da.copy()
    # Dask chunks as whole multiples of the tile size keep every tile inside one task.
    if da.chunks is None:
        da = da.chunk({"y": blocksize, "x": blocksize})
    else:
        ch = [max(1, round(max(c) / blocksize)) * blocksize for c in da.chunks]
        da = da.chunk(dict(zip(da.dims, ch)))
    if np.issubdtype(da.dtype, np.floating):
        da.attrs["nodata"] = np.nan
        da.encoding.pop("_FillValue", None)
    # to object storage: written here first, then one upload (one object appears whole or not at all)
    local = Path(tempfile.mkdtemp(prefix="mpm-cog-")) / storage.name_of(path) if storage.is_url(path) else path
    try:
        with atomic_path(local, keep_suffix=True) as tmp:
            task = save_cog_with_dask(
                da, str(tmp), blocksize=blocksize, compression=compression, overview_resampling=overview_resampling
            )
            dask.compute(task, scheduler=scheduler)
        if local != path:
            storage.upload(local, path)
    finally:
        if local != path:
            shutil.rmtree(local.parent, ignore_errors=True)
    return path
