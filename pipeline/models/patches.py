"""The patch feed: chunk-aligned regions moved to the device once, training windows cut there (DESIGN.md s. 4).

Never a Dask graph per patch, and never a host copy per window. The cube is split into *regions* (a core of
two chunks a side plus a halo of ``window - stride`` pixels). xbatcher's ``BatchGenerator`` enumerates and
cuts the regions lazily over the normalised cube (``input_dims`` = region size, ``input_overlap`` = halo);
each region is computed once (one dask compute), moved to the feed's device once (with its ``valid`` mask),
and windows are cut on the device by one ``index_select`` over a strided view of the region.

Window grid: windows start at every multiple of ``stride`` along y and x, ``p + window <= size``. A region with
core ``K`` (a multiple of ``stride``) starting at ``r`` holds exactly the windows starting in ``[r, r + K)``, so
regions tile the window grid with no duplicate. xbatcher 0.4 drops the trailing partial region; the feed adds
those tail regions itself (plain ``isel``), so no window of the grid is lost.

Order: a deterministic function of ``(seed, epoch, rank)``. Regions are dealt to ranks once (seeded shuffle,
round robin): each DDP rank reads only its own shard straight from the store. Per epoch, a rank's regions are
shuffled and grouped in pools of ``regions_per_pool``; the windows of a pool are shuffled together, and within
a batch grouped by region (one gather per region, written straight into the batch). Which windows exist
(valid fraction >= ``min_valid_fraction`` of the cube's ``valid`` variable, as given) is planned from the mask
alone, so every rank knows every rank's window count and all ranks agree on ``steps_per_epoch`` without
communication.

``random_offsets=True`` jitters each planned window by a seeded offset in ``[0, stride)`` per axis (a function
of ``(seed, epoch, rank)``), clamped to stay inside its region (halo included); a jittered window that falls
below the valid fraction keeps its grid position. The number of windows, and so ``steps_per_epoch``, does not
change.

Overlap: a prefetch thread reads the next regions (up to ``prefetch_regions`` ahead, default one pool) while
the current ones are cut. On CUDA the region goes through pinned host memory and is copied on a side stream;
the consumer's stream waits on the copy's event. On the CPU the same code runs, with the "copy" a no-op view.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from pipeline.data.cube import normalised, open_cube
from pipeline.errors import ConfigError, CubeError

__all__ = ["Region", "WindowFeed", "cut_windows", "window_starts", "region_layout"]


@dataclass(frozen=True)
class Region:
    """A block of the cube read in one go. ``index`` is the xbatcher batch index (-1 = a tail region)."""

    index: int
    y0: int
    x0: int
    ny: int
    nx: int
    windows: np.ndarray  # [M, 2] int32 region-local (row, col) starts of the kept windows


def window_starts(size: int, window: int, stride: int) -> np.ndarray:
    """Starts of the training-window grid along one axis: 0, stride, ... with start + window <= size."""
    return np.arange(0, size - window + 1, stride)


def region_layout(size: int, chunk: int, window: int, stride: int) -> tuple[int, int, list[tuple[int, int]]]:
    """Region geometry along one axis: (region size R, core K, [(start, length), ...]).

    Full regions have length R = K + window - stride and start at multiples of K (xbatcher's enumeration with
    ``input_overlap = window - stride``); one tail region ``[n_full * K, size)`` follows when it holds a window.
    """
    if size < window:
        raise CubeError(
            f"the cube is {size} pixels along an axis, smaller than the window {window}. Fix: use a smaller model.window"
        )
    core = max(stride, (chunk // stride) * stride)
    size_r = core + window - stride
    if size_r > size:
        core = ((size - window) // stride + 1) * stride
        size_r = core + window - stride
    starts = list(range(0, size - size_r + 1, core))
    segs = [(s, size_r) for s in starts]
    tail = len(starts) * core
    if size - tail >= window:
        segs.append((tail, size - tail))
    return size_r, core, segs


def _integral(valid: np.ndarray) -> np.ndarray:
    s = np.zeros((valid.shape[0] + 1, valid.shape[1] + 1), dtype=np.int64)
    s[1:, 1:] = valid.astype(np.int64).cumsum(0).cumsum(1)
    return s


def _window_counts(integ: np.ndarray, gy: np.ndarray, gx: np.ndarray, win: int) -> np.ndarray:
    """Valid pixels in the windows starting at (gy, gx), from an integral image."""
    return integ[gy + win, gx + win] - integ[gy, gx + win] - integ[gy + win, gx] + integ[gy, gx]


def _chunk_size(evidence: xr.DataArray) -> int:
    """The cube's chunk side (dask chunks, else the store's chunks, else 512)."""
    if evidence.chunks is not None:
        return int(max(evidence.chunks[1][0], evidence.chunks[2][0]))
    enc = evidence.encoding.get("chunks") or evidence.encoding.get("preferred_chunks")
    if isinstance(enc, dict):
        enc = [enc.get(d) for d in evidence.dims]
    if enc and len(enc) == 3 and all(enc[1:]):
        return int(max(enc[1], enc[2]))
    return 512


def cut_windows(
    region: torch.Tensor, starts: torch.Tensor, window: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Windows of ``region`` [..., ny, nx] at flat starts ``row * nx + col`` [n]: [n, ..., w, w], one gather.

    The region is viewed (no copy) as one window per pixel, ``[P, ..., w, w]`` with ``P`` the flat start, and
    ``index_select`` copies the chosen ones, a row of ``w`` contiguous values at a time; the caller keeps
    every start inside the region.
    """
    lead = region.shape[:-2]
    ny, nx = region.shape[-2:]
    region = region.contiguous()
    n_starts = (ny - window) * nx + (nx - window) + 1
    lead_strides = tuple(region.stride()[: len(lead)])
    view = region.as_strided((n_starts, *lead, window, window), (1, *lead_strides, nx, 1))
    return torch.index_select(view, 0, starts, out=out) if out is not None else torch.index_select(view, 0, starts)


class _Prefetch:
    """Loads regions on one background thread, in the order given, at most ``ahead`` beyond the last asked."""

    def __init__(self, load, order: list[int], ahead: int):
        self._load, self._order, self._ahead = load, order, max(1, ahead)
        self._pos = {rid: i for i, rid in enumerate(order)}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mpm-feed")
        self._futures: dict[int, Future] = {}
        self._submitted = 0

    def get(self, rid: int):
        upto = min(len(self._order), self._pos[rid] + 1 + self._ahead)
        while self._submitted < upto:
            nxt = self._order[self._submitted]
            self._futures[nxt] = self._pool.submit(self._load, nxt)
            self._submitted += 1
        return self._futures[rid].result()

    def release(self, rid: int) -> None:
        self._futures.pop(rid, None)

    def close(self) -> None:
        for f in self._futures.values():
            f.cancel()
        self._futures.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


class WindowFeed:
    """Batches of training windows for one rank: iterate ``(x [B, C, w, w] float32, valid [B, w, w] bool)``,
    torch tensors on ``device``.

    Args:
        cube: a cube Dataset (see :mod:`pipeline.data.cube`) or its path. Its ``valid`` variable is used as
            given (e.g. with held-out blocks removed).
        window, stride: window side and stride of the window grid (stride default: window // 2).
        batch_size: windows per batch *for this rank* (the trainer passes global batch / world size).
        min_valid_fraction: windows with a smaller fraction of valid pixels are skipped.
        seed, rank, world_size: the deterministic order and this rank's shard of regions.
        random_offsets: jitter each epoch's windows by a seeded offset in [0, stride) (module doc).
        device: where regions live and windows are cut (the training device).
        region_size: region core in pixels (default: two of the cube's chunks), shrunk when there are fewer
            regions than ranks.
        regions_per_pool: how many regions' windows are shuffled together.
        prefetch_regions: regions read ahead by the prefetch thread (default: one pool).
        cache_bytes: regions kept on the device across epochs up to this size (at least two pools' worth).
        scheduler: dask scheduler of the per-region compute ("threads": never the distributed client, so a
            training task on a Dask worker cannot deadlock on its own cluster).

    Counters: ``reads`` (region computes), ``h2d_bytes`` (bytes handed host to device: region evidence and
    mask), ``windows_served``.
    """

    def __init__(
        self,
        cube: xr.Dataset | str | Path,
        *,
        window: int,
        batch_size: int,
        stride: int | None = None,
        min_valid_fraction: float = 0.5,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        random_offsets: bool = False,
        device: str | torch.device = "cpu",
        region_size: int | None = None,
        regions_per_pool: int = 4,
        prefetch_regions: int | None = None,
        cache_bytes: int = 1 << 30,
        scheduler: str = "threads",
    ):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}")
        if batch_size < 1:
            raise ConfigError(f"batch_size {batch_size} must be >= 1")
        ds = open_cube(cube) if isinstance(cube, (str, Path)) else cube
        self.window = int(window)
        self.stride = int(stride or max(1, window // 2))
        self.batch_size = int(batch_size)
        self.min_valid_fraction = float(min_valid_fraction)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.random_offsets = bool(random_offsets)
        self.device = torch.device(device)
        self.regions_per_pool = max(1, int(regions_per_pool))
        self.prefetch_regions = int(prefetch_regions or self.regions_per_pool)
        self.scheduler = scheduler
        self.bands = [str(b) for b in ds["band"].values.tolist()]
        self.n_channels = len(self.bands)
        self.reads = 0  # region computes so far (each region is computed once while cached)
        self.h2d_bytes = 0
        self.windows_served = 0
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        # Coordinates dropped (integer pixel indices instead): xbatcher slices faster, and region starts are
        # readable back from each region to check that the plan matches xbatcher's enumeration.
        z = normalised(ds)
        z = z.drop_vars(list(z.coords)).assign_coords(y=np.arange(z.sizes["y"]), x=np.arange(z.sizes["x"]))
        self._z = z
        valid = ds["valid"].data
        valid = valid.compute(scheduler=scheduler) if hasattr(valid, "compute") else valid
        self._valid = np.asarray(valid, dtype=bool)  # [H, W]; 1/(4C) of the evidence in bytes
        h, w = self._valid.shape
        # Default core: two chunks a side. A region with its halo touches (k+1)^2 chunks for k^2 chunks of
        # windows: k=2 reads each chunk 2.25 times per epoch instead of 4 times (k=1); ~50 MB at chunk 512.
        chunk = region_size or 2 * _chunk_size(ds["evidence"])

        integ = _integral(self._valid)
        self._need = max(1, int(np.ceil(self.min_valid_fraction * self.window**2 - 1e-9)))
        while True:
            self._plan(h, w, int(chunk), integ)
            if len(self.all_regions) >= self.world_size or chunk <= self.stride:
                break
            chunk = max(self.stride, chunk // 2)
        del integ
        counts = np.array([len(r.windows) for r in self.all_regions])
        # Deal regions to ranks once per seed (round robin over a seeded shuffle).
        order = np.random.default_rng([self.seed, 7919]).permutation(len(self.all_regions))
        self.shards = [order[r :: self.world_size] for r in range(self.world_size)]
        self.windows_per_rank = [int(counts[s].sum()) for s in self.shards]
        self.regions = self.shards[self.rank]
        self.n_windows = self.windows_per_rank[self.rank]
        self.steps_per_epoch = min(self.windows_per_rank) // self.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"rank shards hold {self.windows_per_rank} training windows (window {self.window}, stride "
                f"{self.stride}, valid fraction >= {self.min_valid_fraction}), fewer than one batch of "
                f"{self.batch_size} per rank. Fix: lower train.batch_size, train.train_stride or "
                "train.min_valid_fraction, or use fewer ddp_workers"
            )
        self.window_bytes = 4 * self.n_channels * self.window**2
        region_bytes = (4 * self.n_channels + 1) * self.region_shape[0] * self.region_shape[1]
        self._cache_bytes = max(int(cache_bytes), 2 * self.regions_per_pool * region_bytes)
        self._cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    # -- planning ---------------------------------------------------------------------------------
    def _plan(self, h: int, w: int, chunk: int, integ: np.ndarray) -> None:
        ry, ky, segs_y = region_layout(h, chunk, self.window, self.stride)
        rx, kx, segs_x = region_layout(w, chunk, self.window, self.stride)
        self.region_shape = (ry, rx)
        self.halo = self.window - self.stride
        self._xbatcher_counts = (sum(1 for s in segs_y if s[1] == ry), sum(1 for s in segs_x if s[1] == rx))
        self._gen = None
        regions = []
        nfx = self._xbatcher_counts[1]
        for (iy, (y0, ny)), (ix, (x0, nx)) in itertools.product(enumerate(segs_y), enumerate(segs_x)):
            full = ny == ry and nx == rx and iy < self._xbatcher_counts[0] and ix < nfx
            index = iy * nfx + ix if full else -1  # xbatcher iterates y-major (itertools.product of dims)
            sy = window_starts(ny, self.window, self.stride)
            sx = window_starts(nx, self.window, self.stride)
            # Windows of this region: starts inside its core (the halo belongs to the next region).
            sy = sy[sy < (ky if ny == ry else ny)]
            sx = sx[sx < (kx if nx == rx else nx)]
            gy, gx = np.meshgrid(sy + y0, sx + x0, indexing="ij")
            gy, gx = gy.ravel(), gx.ravel()
            keep = _window_counts(integ, gy, gx, self.window) >= self._need
            local = np.stack([gy[keep] - y0, gx[keep] - x0], axis=1).astype(np.int32)
            if len(local):
                regions.append(Region(index, y0, x0, ny, nx, local))
        self.all_regions = regions

    @property
    def generator(self):
        """xbatcher's BatchGenerator over the normalised cube: one item per full region (lazy)."""
        if self._gen is None:
            import xbatcher

            ry, rx = self.region_shape
            self._gen = xbatcher.BatchGenerator(
                self._z,
                input_dims={"y": ry, "x": rx},
                input_overlap={"y": self.halo, "x": self.halo},
                preload_batch=False,
            )
        return self._gen

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's windows for ``epoch``, in order: (region ids [M], region-local starts [M, 2] int64).

        Within each batch the windows are grouped by region (stable), so that a batch is cut with one gather
        per region.
        """
        rng = np.random.default_rng([self.seed, int(epoch), self.rank])
        order = self.regions[rng.permutation(len(self.regions))]
        regs, wins = [], []
        for p in range(0, len(order), self.regions_per_pool):
            pool = order[p : p + self.regions_per_pool]
            r = np.concatenate([np.full(len(self.all_regions[i].windows), i) for i in pool])
            k = np.concatenate([np.arange(len(self.all_regions[i].windows)) for i in pool])
            perm = rng.permutation(len(r))
            regs.append(r[perm])
            wins.append(k[perm])
        regs, wins = np.concatenate(regs), np.concatenate(wins)
        b = self.batch_size
        for i in range(0, len(regs) - len(regs) % b, b):
            grouped = np.argsort(regs[i : i + b], kind="stable")
            regs[i : i + b], wins[i : i + b] = regs[i : i + b][grouped], wins[i : i + b][grouped]
        starts = np.empty((len(regs), 2), dtype=np.int64)
        for rid in np.unique(regs):
            sel = np.flatnonzero(regs == rid)
            starts[sel] = self.all_regions[rid].windows[wins[sel]]
        if self.random_offsets:
            self._jitter(regs, starts, np.random.default_rng([self.seed, int(epoch), self.rank, 31337]))
        return regs, starts

    def _jitter(self, regs: np.ndarray, starts: np.ndarray, rng: np.random.Generator) -> None:
        """Move each start by an offset in [0, stride) per axis, inside its region, where it stays valid."""
        offsets = rng.integers(0, self.stride, size=starts.shape)
        w = self.window
        for rid in np.unique(regs):
            sel = np.flatnonzero(regs == rid)
            reg = self.all_regions[rid]
            cand = np.minimum(starts[sel] + offsets[sel], [reg.ny - w, reg.nx - w])
            integ = _integral(self._valid[reg.y0 : reg.y0 + reg.ny, reg.x0 : reg.x0 + reg.nx])
            ok = _window_counts(integ, cand[:, 0], cand[:, 1], w) >= self._need
            starts[sel[ok]] = cand[ok]

    # -- reading ----------------------------------------------------------------------------------
    def _read_host(self, rid: int) -> np.ndarray:
        """[C, ny, nx] float32 of region ``rid`` on the host (one dask compute)."""
        reg = self.all_regions[rid]
        if reg.index >= 0:
            lazy = self.generator[reg.index]
            if int(lazy["y"][0]) != reg.y0 or int(lazy["x"][0]) != reg.x0:  # pragma: no cover - xbatcher changed
                raise RuntimeError(
                    f"xbatcher region {reg.index} starts at {(int(lazy['y'][0]), int(lazy['x'][0]))}, planned {(reg.y0, reg.x0)}"
                )
        else:
            lazy = self._z.isel(y=slice(reg.y0, reg.y0 + reg.ny), x=slice(reg.x0, reg.x0 + reg.nx))
        data = lazy.data
        if hasattr(data, "compute"):  # dask-backed: the region's single compute
            data = data.compute(scheduler=self.scheduler)
        return np.asarray(data, dtype=np.float32)

    def _load(self, rid: int):
        """(evidence [C, ny, nx], valid [ny, nx], copy event or None) of region ``rid`` on the device."""
        with self._lock:
            hit = self._cache.get(rid)
            if hit is not None:
                self._cache.move_to_end(rid)
                return (*hit, None)
        reg = self.all_regions[rid]
        host = self._read_host(rid)
        vhost = self._valid[reg.y0 : reg.y0 + reg.ny, reg.x0 : reg.x0 + reg.nx]
        event = None
        if self._stream is not None:
            # pinned staging (the caching host allocator reuses it once the copy is done), then an async copy
            # on the side stream; the consumer's stream waits on ``event``
            pinned = torch.empty(host.shape, dtype=torch.float32, pin_memory=True)
            np.copyto(pinned.numpy(), host)
            vpinned = torch.empty(vhost.shape, dtype=torch.bool, pin_memory=True)
            np.copyto(vpinned.numpy(), vhost)
            with torch.cuda.stream(self._stream):
                x = pinned.to(self.device, non_blocking=True)
                v = vpinned.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
        else:
            x = torch.from_numpy(np.ascontiguousarray(host)).to(self.device)
            v = torch.from_numpy(np.ascontiguousarray(vhost)).to(self.device)
        nbytes = x.nbytes + v.nbytes
        with self._lock:
            self.reads += 1
            self.h2d_bytes += nbytes
            self._cache[rid] = (x, v)
            self._cached_bytes += nbytes
            while self._cached_bytes > self._cache_bytes and len(self._cache) > 1:
                _, (ox, ov) = self._cache.popitem(last=False)
                self._cached_bytes -= ox.nbytes + ov.nbytes
        return x, v, event

    def _ready(self, loaded):
        x, v, event = loaded
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            x.record_stream(stream)
            v.record_stream(stream)
        return x, v

    def batches(
        self, epoch: int = 0, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start .. stop-1`` of ``epoch`` (stop default: steps_per_epoch). Resuming = a later start."""
        stop = self.steps_per_epoch if stop is None else min(stop, self.steps_per_epoch)
        regs, starts = self.epoch_plan(epoch)
        b, w = self.batch_size, self.window
        span = regs[start * b : stop * b]
        order = list(dict.fromkeys(span.tolist()))
        last_use = {int(r): i // b for i, r in enumerate(span.tolist())}
        prefetch = _Prefetch(self._load, order, self.prefetch_regions)
        try:
            for i in range(start, stop):
                r, s = regs[i * b : (i + 1) * b], starts[i * b : (i + 1) * b]
                x = torch.empty((b, self.n_channels, w, w), dtype=torch.float32, device=self.device)
                v = torch.empty((b, w, w), dtype=torch.bool, device=self.device)
                bounds = np.flatnonzero(np.diff(r)) + 1
                for a, e in zip([0, *bounds.tolist()], [*bounds.tolist(), len(r)]):
                    rid = int(r[a])
                    rx, rv = self._ready(prefetch.get(rid))
                    flat = torch.from_numpy(s[a:e, 0] * rx.shape[-1] + s[a:e, 1]).to(self.device, non_blocking=True)
                    cut_windows(rx, flat, w, out=x[a:e])
                    cut_windows(rv, flat, w, out=v[a:e])
                    if last_use[rid] == i - start:
                        prefetch.release(rid)
                self.windows_served += b
                yield x, v
        finally:
            prefetch.close()

    def __iter__(self):
        return self.batches(0)

    def __len__(self) -> int:
        return self.steps_per_epoch
