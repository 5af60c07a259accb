"""The evidence cube: one Zarr v3 store, (band, y, x) float32, all bands in every chunk.

Layout of the store (an ``xarray.Dataset``)::

    evidence   (band, y, x) float32   transformed evidence (log / CLR applied), NaN = no data
    valid      (y, x)       uint8     1 inside the study area where every band has data
    band       (band)       str       band names, in model order
    source     (band)       str       source group (geochemistry, geophysics, geology, ...)
    kind, transform, scaling, file (band) str   provenance of each band
    center, scale (band)    float64   normalisation statistics over valid pixels
    spatial_ref             CRS (CF grid mapping, read by rioxarray and odc-geo)

The model sees ``(evidence - center) / scale`` (see :func:`normalised`); the statistics travel
with the cube and, later, inside every checkpoint. Deposits never enter these statistics.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import odc.geo.xr  # noqa: F401  (registers the .odc accessor)
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from pipeline import storage
from pipeline.errors import CubeError, LayerError
from pipeline.io import atomic_path

CUBE_VERSION = 1
BAND_COORDS = ("source", "kind", "transform", "scaling", "file")
STAT_COORDS = ("center", "scale")
# Exact statistics up to this many valid pixels per band; a regular subsample beyond it (a median and
# IQR from 2^20 pixels of a grid are as good as from all of them, and the sample of every band fits in
# a few tens of MB whatever the province's size).
MAX_STAT_PIXELS = 2**20

__all__ = [
    "CUBE_VERSION",
    "from_arrays",
    "write_cube",
    "open_cube",
    "validate_cube",
    "normalised",
    "compute_stats",
    "source_groups",
]


def from_arrays(
    evidence: np.ndarray,
    *,
    bands: list[str],
    sources: list[str],
    x: np.ndarray,
    y: np.ndarray,
    crs: str,
    valid: np.ndarray | None = None,
    kinds: list[str] | None = None,
    transforms: list[str] | None = None,
    scalings: list[str] | None = None,
    files: list[str] | None = None,
    chunk: int = 512,
    name: str = "cube",
) -> xr.Dataset:
    """Assemble an (unwritten) cube Dataset from arrays, e.g. for tests or custom ingest.

    ``evidence`` is [C, H, W] (numpy or dask); ``x``/``y`` are pixel-centre coordinates.
    """
    import dask.array as da

    c = len(bands)
    ev = evidence if isinstance(evidence, da.Array) else da.from_array(np.asarray(evidence, dtype="float32"))
    ev = ev.astype("float32").rechunk((c, chunk, chunk))
    if valid is None:
        valid = da.isfinite(ev).all(axis=0)
    valid = (valid if isinstance(valid, da.Array) else da.from_array(np.asarray(valid))).astype("uint8")
    ds = xr.Dataset(
        {
            "evidence": (("band", "y", "x"), ev),
            "valid": (("y", "x"), valid.rechunk((chunk, chunk))),
        },
        coords={
            "band": np.asarray(bands, dtype=object),
            "y": np.asarray(y, dtype="float64"),
            "x": np.asarray(x, dtype="float64"),
            "source": ("band", np.asarray(sources, dtype=object)),
            "kind": ("band", np.asarray(kinds or ["continuous"] * c, dtype=object)),
            "transform": ("band", np.asarray(transforms or ["none"] * c, dtype=object)),
            "scaling": ("band", np.asarray(scalings or ["robust"] * c, dtype=object)),
            "file": ("band", np.asarray(files or [""] * c, dtype=object)),
        },
        attrs={"mpm_cube_version": CUBE_VERSION, "name": name},
    )
    ds = ds.rio.write_crs(crs)
    for v in ("evidence", "valid"):
        ds[v] = ds[v].rio.write_grid_mapping("spatial_ref")
    return ds


def source_groups(ds: xr.Dataset) -> dict[str, list[str]]:
    """Ordered mapping source group -> band names (first appearance order)."""
    groups: dict[str, list[str]] = {}
    for band, src in zip(ds["band"].values.tolist(), ds["source"].values.tolist()):
        groups.setdefault(str(src), []).append(str(band))
    return groups


def _valid_sample(evidence, valid) -> np.ndarray:
    """Values [band, n] of the pixels where ``valid``, read chunk by chunk into one preallocated array.

    Only valid pixels are kept (a strided read of a sparse study area would hold mostly NaN), each chunk
    is freed once copied, and the whole cube is read once for all bands. Threads in this process: with a
    distributed client active the filled array would be a copy on a worker.
    """
    import dask.array as dsa

    if not hasattr(valid, "map_blocks"):
        return np.asarray(evidence)[:, np.asarray(valid, dtype=bool)].astype("float32")
    evidence = evidence.rechunk({0: -1, 1: valid.chunks[0], 2: valid.chunks[1]})
    counts = valid.map_blocks(
        lambda b: np.array([[int(np.count_nonzero(b))]]),
        dtype="int64",
        chunks=((1,) * len(valid.chunks[0]), (1,) * len(valid.chunks[1])),
    )
    counts = counts.compute(scheduler="threads")
    offsets = np.concatenate([[0], np.cumsum(counts.ravel())])
    out = np.empty((evidence.shape[0], int(offsets[-1])), dtype="float32")
    ncols = counts.shape[1]

    def put(e, v, block_info=None):
        i, j = block_info[None]["chunk-location"]
        a = int(offsets[i * ncols + j])
        out[:, a : a + int(counts[i, j])] = e[:, v.astype(bool)]
        return np.zeros((1, 1), dtype="int8")

    dsa.map_blocks(
        put,
        evidence,
        valid,
        drop_axis=0,
        dtype="int8",
        chunks=((1,) * len(valid.chunks[0]), (1,) * len(valid.chunks[1])),
    ).compute(scheduler="threads")
    return out


def compute_stats(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Per-band (center, scale) over valid pixels, from each band's ``scaling``.

    robust: median and IQR/1.349 (falls back to std, then 1); standard: mean and std; none: 0 and 1.
    Beyond :data:`MAX_STAT_PIXELS` valid pixels, over a regular subsample (every step-th row and column).
    Raises LayerError for a band with no valid pixel or no variation (it carries no evidence).
    """
    valid = ds["valid"].data
    n_valid = int(valid.sum().compute(scheduler="threads") if hasattr(valid, "compute") else np.sum(valid))
    if n_valid == 0:
        coverage = {}
        for i, band in enumerate(ds["band"].values.tolist()):
            frac = float(np.isfinite(ds["evidence"].isel(band=i).values).mean())
            if frac == 0:
                raise LayerError(
                    band, "has no data on the grid (every pixel is nodata)", "check its nodata value, CRS and extent"
                )
            coverage[band] = round(frac, 3)
        raise CubeError(
            f"the cube has no valid pixel (band coverage of the grid: {coverage}): no pixel lies inside the "
            "study area with data in every band. Fix: check the grid bounds and mask, and that the layers overlap"
        )
    step = max(1, int(np.ceil(np.sqrt(n_valid / MAX_STAT_PIXELS))))
    sample = _valid_sample(ds["evidence"].data[:, ::step, ::step], valid[::step, ::step])
    centers, scales = [], []
    for i, band in enumerate(ds["band"].values.tolist()):
        vals = sample[i].astype("float64")
        scaling = str(ds["scaling"].values[i])
        if vals.size == 0 or not np.isfinite(vals).any():
            raise LayerError(band, "has no data inside the study area", "check its nodata value and its extent")
        if np.nanmax(vals) == np.nanmin(vals):
            raise LayerError(
                band,
                f"is constant ({vals[0]:g}) over the study area and carries no evidence",
                "remove it from 'layers' or check its source file",
            )
        if scaling == "robust":
            q25, med, q75 = np.nanpercentile(vals, [25, 50, 75])
            scale = (q75 - q25) / 1.349
            if not scale > 0:
                scale = float(np.nanstd(vals)) or 1.0
            center = med
        elif scaling == "standard":
            center, scale = float(np.nanmean(vals)), float(np.nanstd(vals)) or 1.0
        else:
            center, scale = 0.0, 1.0
        centers.append(float(center))
        scales.append(float(scale))
    return np.asarray(centers), np.asarray(scales)


def normalised(ds: xr.Dataset, fill: float = 0.0) -> xr.DataArray:
    """Lazily normalised evidence, ``(evidence - center) / scale``, invalid pixels set to ``fill``.

    Returns a DataArray [band, y, x] float32 with the cube's CRS.
    """
    for c in STAT_COORDS:
        if c not in ds.coords:
            raise CubeError(f"cube has no '{c}' statistics; it was not written by write_cube. Fix: rebuild it")
    z = (ds["evidence"] - ds["center"]) / ds["scale"]
    z = z.where(ds["valid"].astype(bool) & np.isfinite(z), fill).astype("float32")
    return z.rio.write_crs(ds.rio.crs)


def write_cube(ds: xr.Dataset, path: str | Path, *, progress: bool = False, provenance: dict | None = None) -> Path:
    """Compute and write a cube atomically: write ``<path>.tmp-*``, add statistics, then rename.

    A failure at any point leaves no store at ``path`` (and removes the temporary one).
    ``path`` may be a URL (``s3://bucket/run/cube.zarr``): object storage cannot rename a folder, so the
    store is written in place (an old one removed first) and is a cube only once its statistics, written
    last, are there (:func:`open_cube` refuses it before). Returns the path.
    """

    path = storage.location(path)
    ds = ds.copy()
    ds.attrs = {**ds.attrs, "mpm_cube_version": CUBE_VERSION}
    if provenance is not None:
        ds.attrs["provenance"] = json.dumps(provenance, default=str)
    for c in STAT_COORDS:
        if c in ds.coords:
            ds = ds.drop_vars(c)
    for var in ds.variables.values():
        var.encoding.pop("chunks", None)
        var.encoding.pop("preferred_chunks", None)
    # atomic_path: written under <path>.tmp-*, renamed onto path when complete (an existing cube is moved
    # aside first, then removed); on any failure, Ctrl-C included, the temporary is removed.
    with _cube_target(path) as tmp:
        delayed = ds.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False, compute=False)
        if progress:
            from dask.diagnostics import ProgressBar

            with ProgressBar():
                delayed.compute()
        else:
            delayed.compute()
        written = xr.open_zarr(tmp, zarr_format=3, consolidated=False, decode_coords="all")
        center, scale = compute_stats(written)
        # mode="a" rewrites the group attributes, so carry them along.
        stats = xr.Dataset(coords={"center": ("band", center), "scale": ("band", scale)}, attrs=ds.attrs)
        stats.to_zarr(tmp, mode="a", zarr_format=3, consolidated=False)
        _consolidate(tmp)
    return path


@contextmanager
def _cube_target(path):
    """Where :func:`write_cube` writes: a temporary beside a local ``path``; a URL itself, emptied first."""
    if not storage.is_url(path):
        with atomic_path(path) as tmp:
            yield tmp
        return
    storage.remove(path)
    try:
        yield path
    except BaseException:
        storage.remove(path)  # as locally: a failed write leaves no store
        raise


def _consolidate(path: Path) -> None:
    import warnings

    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))


def open_cube(path: str | Path, *, validate: bool = True) -> xr.Dataset:
    """Open a cube lazily (dask-backed) and check that it is complete and consistent. ``path`` may be a URL."""
    if storage.is_url(path):
        return _open_remote_cube(str(path), validate)
    path = Path(path)
    if not path.exists():
        raise CubeError(f"cube {str(path)!r} does not exist. Fix: build it with `mpm cube CONFIG --out DIR`")
    if path.is_file():
        raise CubeError(
            f"cube {str(path)!r} is a file, not a Zarr store (a folder such as DIR/cube.zarr). "
            "Fix: pass the cube.zarr folder written by `mpm cube CONFIG --out DIR`"
        )
    _not_a_cube(path)
    missing = [v for v in ("", "evidence", "valid") if path.is_dir() and not (path / v / "zarr.json").exists()]
    if missing:
        raise CubeError(
            f"cube {str(path)!r} is incomplete: no metadata for {[m or '<root>' for m in missing]}. "
            "Fix: rebuild it with `mpm cube CONFIG --out DIR`"
        )
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = xr.open_zarr(path, zarr_format=3, decode_coords="all")
    except Exception as exc:  # zarr raises many types for a broken store
        raise CubeError(
            f"cube {str(path)!r} cannot be opened as a Zarr v3 store ({type(exc).__name__}: {exc}). "
            "Fix: rebuild it with `mpm cube`"
        ) from None
    # Per-band metadata is tiny: hold it in memory so that .values never triggers a dask compute.
    small = [c for c in ("band", *BAND_COORDS, *STAT_COORDS) if c in ds.coords]
    ds = ds.assign_coords({c: ds[c].load() for c in small})
    ds = _guard_reads(ds, path)
    if validate:
        validate_cube(ds, str(path))
        _check_chunks(path, ds)
    return ds


def _open_remote_cube(url: str, validate: bool) -> xr.Dataset:
    """:func:`open_cube` for a store on object storage (fsspec reads it; the same checks, by listing keys)."""
    import warnings

    shown = storage.redact(url)
    if not storage.exists(storage.join(url, "zarr.json")):
        raise CubeError(
            f"cube {shown!r} does not exist or has no root metadata. Fix: build it with "
            "`mpm cube CONFIG --out URL`, and check the URL and the credentials in the environment"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = xr.open_zarr(url, zarr_format=3, decode_coords="all")
    except Exception as exc:
        raise CubeError(
            f"cube {shown!r} cannot be opened as a Zarr v3 store ({type(exc).__name__}: {str(exc)[:200]}). "
            "Fix: rebuild it with `mpm cube`"
        ) from None
    small = [c for c in ("band", *BAND_COORDS, *STAT_COORDS) if c in ds.coords]
    ds = ds.assign_coords({c: ds[c].load() for c in small})
    ds = _guard_reads(ds, url)
    if validate:
        validate_cube(ds, shown)
        _check_chunks(url, ds)
    return ds


class _GuardedArray:
    """A cube array read chunk by chunk (as xarray would) whose read errors become one CubeError.

    A truncated or overwritten chunk file opens fine and fails only when read, deep inside a dask compute
    (training, scoring), as a codec error that names neither the store nor the fix.
    """

    def __init__(self, array, store: str, name: str):
        self.array, self.store, self.name = array, store, name
        self.shape, self.dtype, self.ndim = tuple(array.shape), np.dtype(array.dtype), len(array.shape)

    def __getitem__(self, key):
        try:
            return self.array[key]
        except Exception as exc:
            first = next((l.strip() for l in str(exc).splitlines() if l.strip()), "")
            where = ", ".join(
                f"{k.start or 0}:{k.stop}" if isinstance(k, slice) else str(k)
                for k in (key if isinstance(key, tuple) else (key,))
            )
            raise CubeError(
                f"cube {self.store!r} is damaged: its '{self.name}' data [{where}] cannot be read "
                f"({type(exc).__name__}: {first[:120]}), a truncated or overwritten chunk file. "
                "Fix: rebuild it with `mpm cube CONFIG --out DIR --force`, or copy the whole store again"
            ) from None


def _guard_reads(ds: xr.Dataset, path: Path) -> xr.Dataset:
    """``evidence`` and ``valid`` read through :class:`_GuardedArray` (same chunks, same values)."""
    import dask.array as dsa
    import zarr

    for name in ("evidence", "valid"):
        if name not in ds or ds[name].chunks is None:
            continue
        var = ds[name]
        try:
            arr = zarr.open_array(store=str(storage.join(path, name)), mode="r", zarr_format=3)
        except Exception:  # an unusual layout: keep xarray's reader
            continue
        if tuple(arr.shape) != var.shape or np.dtype(arr.dtype) != var.dtype:
            continue  # xarray decoded it (e.g. a fill value to NaN): keep xarray's reader
        data = dsa.from_array(
            _GuardedArray(arr, storage.redact(path), name),
            chunks=var.data.chunks,
            lock=False,
            name=f"mpm-cube-{var.data.name}",
            meta=np.empty((0,) * var.ndim, dtype=var.dtype),
        )
        ds[name] = var.copy(data=data)
    return ds


def _not_a_cube(path: Path) -> None:
    """A folder that is some other store (a prospectivity map, a foreign Zarr): say what it is."""
    root = path / "zarr.json"
    if (path / "evidence").exists():
        return
    try:
        meta = json.loads(root.read_text()) if root.exists() else None
    except (OSError, ValueError):
        meta = None
    if meta is None and not (path / ".zgroup").exists():
        if not any(path.iterdir()):
            raise CubeError(
                f"cube {str(path)!r} is an empty folder. Fix: build the cube with `mpm cube CONFIG --out DIR`"
            )
        return  # a half-deleted cube: reported as incomplete below
    attrs = (meta or {}).get("attributes", {})
    if "mpm_cube_version" in attrs:
        return  # a cube that lost its evidence array: reported as incomplete below
    product = attrs.get("mpm_product")
    kind = f"a {product} store (written by `mpm score`)" if product else "a Zarr store but not an evidence cube"
    names = sorted(p.name for p in path.iterdir() if p.is_dir())
    raise CubeError(
        f"{str(path)!r} is {kind}: it has no 'evidence' or 'valid' array (it holds {names[:12]}). "
        "Fix: pass the cube.zarr written by `mpm cube CONFIG --out DIR` (in the same output folder)"
    )


def _check_chunks(path: Path, ds: xr.Dataset) -> None:
    """Raise CubeError when a chunk file of ``evidence`` is missing where ``valid`` says there is data.

    Zarr reads a missing chunk as its fill value (NaN) without an error, so a deleted or never-copied chunk
    file would silently become a hole, or zeros after normalisation. Chunks that are all NaN are
    legitimately not written; they lie where ``valid`` is 0, which is what is checked (only ``valid`` of the
    regions whose evidence chunk is absent is read).
    """
    import itertools
    import math

    arr = storage.join(path, "evidence")
    try:
        meta = json.loads(storage.read_text(storage.join(arr, "zarr.json")))
        enc = meta.get("chunk_key_encoding", {})
        shape = meta["shape"]
        chunk_shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if enc.get("name") != "default" or meta.get("chunk_grid", {}).get("name") != "regular":
        return
    sep = enc.get("configuration", {}).get("separator", "/")
    grid = [range(math.ceil(n / c)) for n, c in zip(shape, chunk_shape)]
    if storage.is_url(path):  # one listing, not a request per chunk
        fs, key = storage.filesystem(arr)
        there = {k[len(key.rstrip("/")) + 1 :] for k in fs.find(key)}
        exists = lambda rel: rel in there
    else:
        exists = lambda rel: (arr / rel).exists()
    absent = [idx for idx in itertools.product(*grid) if not exists("c" + sep + sep.join(map(str, idx)))]
    if not absent:
        return
    _, cy, cx = chunk_shape
    lost = []
    for ib, iy, ix in absent:
        region = ds["valid"][iy * cy : (iy + 1) * cy, ix * cx : (ix + 1) * cx]
        if bool(region.any().compute()):
            lost.append("evidence/c" + sep + sep.join(map(str, (ib, iy, ix))))
    if lost:
        raise CubeError(
            f"cube {storage.redact(path)!r} is damaged: chunk file(s) {lost[:5]}{' ...' if len(lost) > 5 else ''} of 'evidence' "
            f"are missing ({len(lost)} of {math.prod(len(g) for g in grid)}), where the cube has valid pixels (an "
            "interrupted copy or a deleted file). Fix: rebuild it with `mpm cube CONFIG --out DIR --force`, or copy "
            "the whole store again"
        )


def validate_cube(ds: xr.Dataset, where: str = "cube") -> None:
    """Raise CubeError unless ``ds`` has the layout documented in this module."""
    problems = []
    for v, dims in (("evidence", ("band", "y", "x")), ("valid", ("y", "x"))):
        if v not in ds:
            problems.append(f"variable '{v}' is missing")
        elif ds[v].dims != dims:
            problems.append(f"variable '{v}' has dims {ds[v].dims}, expected {dims}")
    for c in ("band", *BAND_COORDS, *STAT_COORDS):
        if c not in ds.coords:
            problems.append(f"coordinate '{c}' is missing")
    if ds.attrs.get("mpm_cube_version") != CUBE_VERSION:
        problems.append(f"mpm_cube_version is {ds.attrs.get('mpm_cube_version')!r}, expected {CUBE_VERSION}")
    if not problems:
        if ds.rio.crs is None:
            problems.append("it has no CRS")
        if "evidence" in ds and ds["evidence"].dtype != np.float32:
            problems.append(f"evidence dtype is {ds['evidence'].dtype}, expected float32")
        if not (np.all(np.isfinite(ds["center"].values)) and np.all(ds["scale"].values > 0)):
            problems.append("normalisation statistics are not finite and positive")
        chunks = ds["evidence"].chunks
        if chunks is not None and len(chunks[0]) != 1:
            problems.append("bands are split across chunks (all bands must be in one chunk)")
    if problems:
        raise CubeError(
            f"{where} is not a valid cube: "
            + "; ".join(problems)
            + ". Fix: rebuild it with `mpm cube CONFIG --out DIR`"
        )
