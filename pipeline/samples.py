"""Point samples kept on disk, sorted by grid cell, for out-of-core gridding.

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

import numpy as np
from odc.geo.geobox import GeoBox

from .errors import LayerError

__all__ = ["SampleStore", "write_sample_store", "idw_from_store"]

SCRATCH_PREFIX = "mpm-samples.tmp-"


class SampleStore:
    """Samples of one layer on disk, grouped by grid cell (row-major), with their per-cell offsets."""

    def __init__(self, name: str, folder: Path, columns: list[str], offsets: np.ndarray, cells: tuple[int, int],
                 cell: int, affine, bbox: tuple[float, float, float, float], owner: bool = False):
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
        return (SampleStore, (self.name, self.folder, self.columns, self.offsets, self.cells, self.cell, self.affine, self.bbox))

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
        spans = [(int(self.offsets[r * nb + cols[0]]), int(self.offsets[r * nb + cols[1] + 1])) for r in range(rows[0], rows[1] + 1)]
        n = sum(b - a for a, b in spans)
        m = len(self.columns)
        xy = np.empty((n, 2), dtype="float64")
        vals = np.empty((n, m), dtype="float32")
        # a file object per call: tasks on several threads read at once
        with open(self.folder / "xy.f64", "rb", buffering=0) as fxy, open(self.folder / "values.f32", "rb", buffering=0) as fv:
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
        self.bbox = [min(self.bbox[0], px.min()), min(self.bbox[1], py.min()), max(self.bbox[2], px.max()), max(self.bbox[3], py.max())]
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
    with open(folder / "runs.xy", "rb", buffering=0) as rxy, open(folder / "runs.v", "rb", buffering=0) as rv, \
            open(folder / "xy.f64", "wb") as wxy, open(folder / "values.f32", "wb") as wv:
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
        raise LayerError(f"{layer.name}.{empty[0]}", "has no valid sample (all missing or below detection)", "drop the column or check 'missing'")
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


def idw_from_store(store: SampleStore, rows: tuple[int, int], cols: tuple[int, int], xs: np.ndarray, ys: np.ndarray, *,
                   power: float, k: int, radius: float | None, max_distance: float | None) -> np.ndarray:
    """IDW [M, H, W] of the pixels ``rows`` x ``cols`` (pixel ranges of one grid block) from ``store``.

    Exact k-nearest: the cells read are widened until no unread sample can be nearer than any pixel's
    k-th neighbour (or, with ``radius``, until the radius is covered).
    """
    from .ingest import idw_block

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
        out = idw_block(px, py, vals, xs, ys, power=power, k=k, radius=None, max_distance=max_distance, exact_within=bound)
        if out is not None:
            return out
        margin *= 2
