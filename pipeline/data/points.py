"""Point samples: tables read in blocks, an on-disk store sorted by grid cell, and IDW onto the grid.

The samples are kept on disk, sorted by grid cell, for out-of-core gridding.

A province-scale survey holds millions of samples. Held in memory for the whole cube build they were the
largest single item of its peak memory (100 MB for the 4096^2 synthetic province); here they are
streamed once from the table into a scratch folder, sorted by the grid cell (a quarter of a chunk a
side) they fall in, and each IDW task reads back only the cells around its own block:

- pass 1 parses the table in blocks, cleans each block (sentinels, below detection), sorts it by cell
  and appends it to a run file, and gathers the statistics the transform needs (smallest positive
  value per column for ``zeros: half_min``; values <= 0 for the error message);
- pass 2 reads each run, applies the layer's transform (log, log10, CLR), and scatters it into the final
  files at each cell's offset.

Memory is one table block and one run whatever the survey's size. The search is exact: with a
``radius`` a task reads the cells within it; without one it reads a ring of cells and widens it until
every pixel's k-th neighbour is nearer than anything left unread, so the result is the same k-nearest
IDW as a search over all samples.

The store is a folder of plain files (``xy.f64``: x, y pairs; ``values.f32``: one row of columns per
sample) and a small index that pickles with the task, so a local process pool can read it too. It is
removed when the :class:`SampleStore` that wrote it is garbage-collected or the process exits.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import uuid
import weakref
from pathlib import Path

import dask.array as dsa
import numpy as np
import pandas as pd
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.geom import BoundingBox

from pipeline import storage
from pipeline.config import LayerConfig, QueryError, RunConfig, safe_query
from pipeline.data.grid import check_overlap, ensure_input_exists, geobox_coords, grid_da
from pipeline.data.vectors import read_vector
from pipeline.errors import LayerError

__all__ = [
    "SampleStore",
    "write_sample_store",
    "idw_from_store",
    "idw_block",
    "read_points",
    "point_blocks",
    "point_bands",
]

SCRATCH_PREFIX = "mpm-samples.tmp-"


class SampleStore:
    """Samples of one layer on disk, grouped by grid cell (row-major), with their per-cell offsets."""

    def __init__(
        self,
        name: str,
        folder: Path,
        columns: list[str],
        offsets: np.ndarray,
        cells: tuple[int, int],
        cell: int,
        affine,
        bbox: tuple[float, float, float, float],
        owner: bool = False,
    ):
        self.name = name  # the layer's
        self.folder = Path(folder)
        self.columns = list(columns)
        self.offsets = offsets  # int64 [n_cells + 1]: samples of cell b are rows offsets[b]:offsets[b+1]
        self.cells = cells  # (cell rows, cell columns) over the grid
        self.cell = cell  # cell size in pixels (a fraction of the chunk: a task reads little beyond its block)
        self.affine = affine
        self.bbox = bbox  # (xmin, ymin, xmax, ymax) of the samples, in the grid's CRS
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.folder), True) if owner else None

    def __reduce__(self):  # copies (pickled to a process) read the files; only the writer removes them
        return (
            SampleStore,
            (self.name, self.folder, self.columns, self.offsets, self.cells, self.cell, self.affine, self.bbox),
        )

    @property
    def n(self) -> int:
        return int(self.offsets[-1])

    def remove(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    def read(self, rows: tuple[int, int], cols: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Samples of cells rows[0]..rows[1] x cols[0]..cols[1] (inclusive): x, y, values [n, M]."""
        if not (self.folder / "xy.f64").exists():
            raise LayerError(
                self.name,
                f"the sample store {str(self.folder)!r} is gone (removed, or not on this machine)",
                "build the cube in the process (or on the machine) that read the samples",
            )
        nb = self.cells[1]
        spans = [
            (int(self.offsets[r * nb + cols[0]]), int(self.offsets[r * nb + cols[1] + 1]))
            for r in range(rows[0], rows[1] + 1)
        ]
        n = sum(b - a for a, b in spans)
        m = len(self.columns)
        xy = np.empty((n, 2), dtype="float64")
        vals = np.empty((n, m), dtype="float32")
        # a file object per call: tasks on several threads read at once
        with (
            open(self.folder / "xy.f64", "rb", buffering=0) as fxy,
            open(self.folder / "values.f32", "rb", buffering=0) as fv,
        ):
            i = 0
            for a, b in spans:
                if b > a:
                    _read_at(fxy, xy[i : i + b - a], a * 16)
                    _read_at(fv, vals[i : i + b - a], a * 4 * m)
                    i += b - a
        return xy[:, 0], xy[:, 1], vals


def _read_at(f, out: np.ndarray, offset: int) -> None:
    view = memoryview(out.reshape(-1).view("uint8"))
    f.seek(offset)
    done = 0
    while done < len(view):
        k = f.readinto(view[done:])
        if not k:
            raise OSError(f"short read from the sample store {f.name!r} at byte {offset + done}")
        done += k


def _write_at(f, arr: np.ndarray, offset: int) -> None:
    f.seek(offset)
    f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view("uint8")))


def _cell_of(px: np.ndarray, py: np.ndarray, affine, cell: int, cells: tuple[int, int]) -> np.ndarray:
    """Row-major cell index of each sample; samples off the grid go to the nearest edge cell."""
    inv = ~affine
    with np.errstate(invalid="ignore"):  # coordinates a CRS cannot hold are inf; the overlap check names them
        col = np.nan_to_num(np.floor((inv.a * px + inv.b * py + inv.c) / cell), nan=0.0)
        row = np.nan_to_num(np.floor((inv.d * px + inv.e * py + inv.f) / cell), nan=0.0)
    br = np.clip(row, 0, cells[0] - 1).astype("int64")
    bc = np.clip(col, 0, cells[1] - 1).astype("int64")
    return br * cells[1] + bc


class _Stats:
    """What pass 1 learns about the cleaned values, for the transform's checks and ``half_min``."""

    def __init__(self, m: int):
        self.n = 0
        self.min_pos = np.full(m, np.inf)
        self.nonpos = np.zeros(m, dtype=bool)
        self.min_nonpos = np.inf
        self.bbox = [np.inf, np.inf, -np.inf, -np.inf]

    def add(self, px, py, v) -> None:
        self.n += len(px)
        self.bbox = [
            min(self.bbox[0], px.min()),
            min(self.bbox[1], py.min()),
            max(self.bbox[2], px.max()),
            max(self.bbox[3], py.max()),
        ]
        for j in range(v.shape[1]):
            col = v[:, j]
            pos = col[col > 0]
            if pos.size:
                self.min_pos[j] = min(self.min_pos[j], float(pos.min()))
            bad = col <= 0  # NaN compares False
            if bad.any():
                self.nonpos[j] = True
                self.min_nonpos = min(self.min_nonpos, float(col[bad].min()))


def cell_size(chunk: int) -> int:
    """Store cells of a quarter chunk (at least 16 px): a block's task reads its own samples and a
    margin of at most a quarter chunk around them, not whole neighbouring blocks."""
    return max(16, chunk // 4) if chunk >= 32 else chunk


def write_sample_store(layer, blocks, geobox: GeoBox, chunk: int, scratch: str | Path | None = None) -> SampleStore:
    """Stream cleaned sample blocks ``(x, y, values)`` into a store sorted by grid cell; apply the transform.

    Raises the layer's transform errors (values <= 0 under log/CLR, a column with no valid sample)
    before anything is gridded. The folder is made under ``scratch`` (default: the system temporary
    folder) as ``mpm-samples.tmp-<hex>``.
    """
    cell = cell_size(chunk)
    cells = (math.ceil(geobox.shape[0] / cell), math.ceil(geobox.shape[1] / cell))
    base = Path(scratch) if scratch is not None else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    folder = base / f"{SCRATCH_PREFIX}{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    try:
        return _write(layer, blocks, geobox.affine, cell, cells, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _write(layer, blocks, affine, cell: int, cells: tuple[int, int], folder: Path) -> SampleStore:
    m = len(layer.columns)
    ncells = cells[0] * cells[1]
    stats = _Stats(m)
    runs: list[tuple[int, int]] = []  # (first row, rows) of each run in the run files, sorted by cell
    counts = np.zeros(ncells, dtype="int64")
    with open(folder / "runs.xy", "wb") as fxy, open(folder / "runs.v", "wb") as fv:
        for px, py, v in blocks:
            if not len(px):
                continue
            stats.add(px, py, v)
            b = _cell_of(px, py, affine, cell, cells)
            order = np.argsort(b, kind="stable")
            np.column_stack([px[order], py[order]]).tofile(fxy)
            np.ascontiguousarray(v[order]).tofile(fv)
            counts += np.bincount(b, minlength=ncells)
            runs.append((stats.n - len(px), len(px)))
            del b, order
    _check_transform(layer, stats)
    offsets = np.zeros(ncells + 1, dtype="int64")
    np.cumsum(counts, out=offsets[1:])
    del counts
    cursor = offsets[:-1].copy()
    half_min = np.where(np.isfinite(stats.min_pos), stats.min_pos / 2, np.nan) if layer.zeros == "half_min" else None
    finite = np.zeros(m, dtype=bool)
    with (
        open(folder / "runs.xy", "rb", buffering=0) as rxy,
        open(folder / "runs.v", "rb", buffering=0) as rv,
        open(folder / "xy.f64", "wb") as wxy,
        open(folder / "values.f32", "wb") as wv,
    ):
        for start, k in runs:
            xy = np.empty((k, 2), dtype="float64")
            v = np.empty((k, m), dtype="float32")
            _read_at(rxy, xy, start * 16)
            _read_at(rv, v, start * 4 * m)
            v = transform_samples(v, layer, half_min)
            finite |= np.isfinite(v).any(axis=0)
            b = _cell_of(xy[:, 0], xy[:, 1], affine, cell, cells)  # sorted: the run was written in cell order
            starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
            ends = np.r_[starts[1:], k]
            for i, j in zip(starts.tolist(), ends.tolist()):  # one slice per cell the run touches
                c = int(b[i])
                _write_at(wxy, xy[i:j], int(cursor[c]) * 16)
                _write_at(wv, v[i:j], int(cursor[c]) * 4 * m)
                cursor[c] += j - i
    (folder / "runs.xy").unlink()
    (folder / "runs.v").unlink()
    empty = [c for c, ok in zip(layer.columns, finite) if not ok]
    if empty:
        raise LayerError(
            f"{layer.name}.{empty[0]}",
            "has no valid sample (all missing or below detection)",
            "drop the column or check 'missing'",
        )
    return SampleStore(layer.name, folder, layer.columns, offsets, cells, cell, affine, tuple(stats.bbox), owner=True)


def _check_transform(layer, stats: _Stats) -> None:
    if stats.n == 0:
        raise LayerError(layer.name, "no sample has finite coordinates", "check the x/y columns")
    if layer.transform == "none":
        return
    bad = stats.nonpos.copy()
    if layer.zeros == "half_min":
        bad &= ~np.isfinite(stats.min_pos)  # zeros become half the column's smallest positive value
    if bad.any():
        cols = [c for c, hit in zip(layer.columns, bad) if hit]
        raise LayerError(
            layer.name,
            f"transform {layer.transform!r} needs positive values but column(s) {cols} hold values <= 0 "
            f"(min {stats.min_nonpos:g})",
            "set 'zeros: half_min', list sentinels under 'missing', or use transform 'none'",
        )


def transform_samples(arr: np.ndarray, layer, half_min: np.ndarray | None = None) -> np.ndarray:
    """log / log10 / CLR of sample values [N, M], in place; ``half_min`` replaces values <= 0 per column."""
    if layer.transform == "none":
        return arr
    if half_min is not None:
        for j in range(arr.shape[1]):
            col = arr[:, j]
            if np.isfinite(half_min[j]):
                col[col <= 0] = half_min[j]
    if layer.transform == "log10":
        np.log10(arr, out=arr)
    else:
        np.log(arr, out=arr)
    if layer.transform == "clr":
        # CLR needs every part of the composition: samples missing a part are left out of all bands
        arr -= np.mean(arr, axis=1, keepdims=True)
    return arr


def idw_from_store(
    store: SampleStore,
    rows: tuple[int, int],
    cols: tuple[int, int],
    xs: np.ndarray,
    ys: np.ndarray,
    *,
    power: float,
    k: int,
    radius: float | None,
    max_distance: float | None,
) -> np.ndarray:
    """IDW [M, H, W] of the pixels ``rows`` x ``cols`` (pixel ranges of one grid block) from ``store``.

    Exact k-nearest: the cells read are widened until no unread sample can be nearer than any pixel's
    k-th neighbour (or, with ``radius``, until the radius is covered).
    """

    c = store.cell
    br, bc = rows[0] // c, cols[0] // c
    br1, bc1 = (rows[1] - 1) // c, (cols[1] - 1) // c
    a = store.affine
    cell_w, cell_h = abs(a.a) * c, abs(a.e) * c
    nr, nc = store.cells
    if radius is not None:
        margin = max(math.ceil(radius / cell_w), math.ceil(radius / cell_h))
    else:
        margin = 1
    while True:
        r0, r1 = max(br - margin, 0), min(br1 + margin, nr - 1)
        c0, c1 = max(bc - margin, 0), min(bc1 + margin, nc - 1)
        px, py, vals = store.read((r0, r1), (c0, c1))
        if radius is not None:
            return idw_block(px, py, vals, xs, ys, power=power, k=k, radius=radius, max_distance=max_distance)
        # nothing unread is nearer than this to any pixel of the block (inf where the read reaches the edge)
        bound = min(
            np.inf if r0 == 0 else (br - r0) * cell_h,
            np.inf if r1 == nr - 1 else (r1 - br1) * cell_h,
            np.inf if c0 == 0 else (bc - c0) * cell_w,
            np.inf if c1 == nc - 1 else (c1 - bc1) * cell_w,
        )
        out = idw_block(
            px, py, vals, xs, ys, power=power, k=k, radius=None, max_distance=max_distance, exact_within=bound
        )
        if out is not None:
            return out
        margin *= 2


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
    not hold them at all: :mod:`pipeline.data.points` streams the same blocks to disk.)
    """
    path = cfg.resolve(layer.path)
    cap = _count_lines(path) if storage.suffix(path).lower() in (".csv", ".txt") and storage.is_file(path) else 0
    px, py = np.empty(cap, dtype="float64"), np.empty(cap, dtype="float64")
    arr = np.empty((cap, len(layer.columns)), dtype="float32")  # values are gridded to float32 anyway
    n = 0
    for bx, by, bv in point_blocks(layer, cfg, dst_crs):
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


def point_blocks(layer: LayerConfig, cfg: RunConfig, dst_crs):
    """Cleaned samples in blocks: (x [n], y [n] in ``dst_crs`` float64, values [n, M] float32).

    Raises a LayerError for a bad table, and at the end if no sample was selected or none has
    finite coordinates.
    """
    from pyproj import Transformer

    path = cfg.resolve(layer.path)
    ensure_input_exists(path, layer.name)
    dst = dst_crs.wkt if hasattr(dst_crs, "wkt") else dst_crs
    if storage.suffix(path).lower() not in (".csv", ".txt"):
        gdf = read_vector(path, layer.layer, layer.name, layer.crs, layer.query)
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
        raise LayerError(
            layer.name,
            f"cannot read CSV {str(path)!r} ({exc})",
            "check that it is a comma-separated table with a header",
        ) from None
    missing = [c for c in (layer.x, layer.y) if c not in header]
    if missing:
        raise LayerError(
            layer.name,
            f"x/y column(s) {missing} not in {str(path)!r} (columns: {header[:30]})",
            "set 'x' and 'y' to the coordinate columns",
        )
    _check_value_columns(layer, path, header)
    if layer.crs is None:
        raise LayerError(
            layer.name, "point samples from a CSV have no CRS", "add 'crs: EPSG:4326' (or the CRS of x/y) to the layer"
        )
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


def _count_lines(path: Path | str) -> int:
    n = 0
    with storage.open_file(path, "rb") as f:
        while block := f.read(1 << 24):
            n += block.count(b"\n")
    return n + 1


def _csv_blocks(path: Path, layer: LayerConfig, usecols):
    """Blocks of a CSV as DataFrames; a parse error becomes a LayerError naming the file."""
    try:
        with pd.read_csv(path, usecols=usecols, chunksize=CSV_ROWS_PER_BLOCK) as reader:
            yield from reader
    except Exception as exc:
        raise LayerError(
            layer.name,
            f"cannot read CSV {str(path)!r} ({exc})",
            "check that it is a comma-separated table with a header",
        ) from None


def _check_value_columns(layer: LayerConfig, path: Path, columns: list[str]) -> None:
    absent = [c for c in layer.columns if c not in columns]
    if absent:
        raise LayerError(
            layer.name, f"value column(s) {absent} not in {str(path)!r} (columns: {columns[:30]})", "fix 'columns'"
        )


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
        raise LayerError(
            layer.name, f"query {layer.query!r} failed ({exc})", f"use column names among {list(df.columns)[:30]}"
        ) from None
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
    (r0, r1), (c0, c1) = block_info[None]["array-location"][-2:]
    return idw_from_store(
        store, (r0, r1), (c0, c1), x[c0:c1], y[r0:r1], power=power, k=k, radius=radius, max_distance=max_distance
    )


def point_bands(layer: LayerConfig, cfg: RunConfig, geobox: GeoBox, chunk: int, scratch=None) -> list[xr.DataArray]:
    # the samples go to disk, sorted by grid block; each block's task reads back the blocks around it
    store = write_sample_store(layer, point_blocks(layer, cfg, geobox.crs), geobox, chunk, scratch)
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
    arr = dsa.map_blocks(
        _idw_map_block, template, store, x, y, it.power, k, it.radius, it.max_distance, dtype="float32"
    )
    return [grid_da(arr[i], geobox) for i in range(m)]
