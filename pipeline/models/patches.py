"""The fast patch feed: training windows cut in memory from chunk-aligned regions (DESIGN.md section 4).

Never a Dask graph per patch. The cube is split into *regions* (a core of two chunks a side plus a halo of
``window - stride`` pixels). xbatcher's ``BatchGenerator`` enumerates and cuts the regions lazily over the
normalised cube (``input_dims`` = region size, ``input_overlap`` = halo); each region is computed once (one
dask compute), held in memory, and windows are cut from it with numpy stride tricks.

Window grid: windows start at every multiple of ``stride`` along y and x, ``p + window <= size``. A region with
core ``K`` (a multiple of ``stride``) starting at ``r`` holds exactly the windows starting in ``[r, r + K)``, so
regions tile the window grid with no duplicate. xbatcher 0.4 drops the trailing partial region; the feed adds
those tail regions itself (plain ``isel``), so no window of the grid is lost.

Order: a deterministic function of ``(seed, epoch, rank)``. Regions are dealt to ranks once (seeded shuffle,
round robin): each DDP rank reads only its own shard straight from the store. Per epoch, a rank's regions are
shuffled and grouped in pools of ``regions_per_pool``; the windows of a pool are shuffled together. Which
windows exist (valid fraction >= ``min_valid_fraction``) is planned from the ``valid`` mask alone, so every
rank knows every rank's window count and all ranks agree on ``steps_per_epoch`` without communication.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from numpy.lib.stride_tricks import sliding_window_view

from pipeline.data.cube import normalised, open_cube
from pipeline.errors import ConfigError, CubeError

__all__ = ["Region", "WindowFeed", "WindowDataset", "make_loader", "window_starts", "region_layout"]


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


class WindowFeed:
    """Batches of training windows for one rank: iterate ``(x [B, C, w, w] float32, valid [B, w, w] bool)``.

    Args:
        cube: a cube Dataset (see :mod:`pipeline.data.cube`) or its path.
        window, stride: window side and stride of the window grid (stride default: window // 2).
        batch_size: windows per batch *for this rank* (the trainer passes global batch / world size).
        min_valid_fraction: windows with a smaller fraction of valid pixels are skipped.
        seed, rank, world_size: the deterministic order and this rank's shard of regions.
        region_size: region core in pixels (default: two of the cube's chunks), shrunk when there are fewer
            regions than ranks.
        regions_per_pool: how many regions' windows are shuffled together.
        cache_bytes: regions kept in memory across epochs up to this size (at least two pools' worth).
        scheduler: dask scheduler of the per-region compute ("threads": never the distributed client, so a
            training task on a Dask worker cannot deadlock on its own cluster).
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
        region_size: int | None = None,
        regions_per_pool: int = 4,
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
        self.regions_per_pool = max(1, int(regions_per_pool))
        self.scheduler = scheduler
        self.bands = [str(b) for b in ds["band"].values.tolist()]
        self.n_channels = len(self.bands)
        self.reads = 0  # region computes so far (each region is computed once while cached)

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
        need = int(np.ceil(self.min_valid_fraction * self.window**2 - 1e-9))
        while True:
            self._plan(h, w, int(chunk), integ, need)
            if len(self.all_regions) >= self.world_size or chunk <= self.stride:
                break
            chunk = max(self.stride, chunk // 2)
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
        region_bytes = 4 * self.n_channels * self.region_shape[0] * self.region_shape[1]
        self._cache_bytes = max(int(cache_bytes), 2 * self.regions_per_pool * region_bytes)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_bytes = 0

    # -- planning ---------------------------------------------------------------------------------
    def _plan(self, h: int, w: int, chunk: int, integ: np.ndarray, need: int) -> None:
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
            win = self.window
            count = integ[gy + win, gx + win] - integ[gy, gx + win] - integ[gy + win, gx] + integ[gy, gx]
            keep = count >= max(need, 1)
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

    # -- reading ----------------------------------------------------------------------------------
    def _region(self, rid: int) -> np.ndarray:
        """[C, ny, nx] float32 of region ``rid`` (one dask compute on a cache miss)."""
        arr = self._cache.get(rid)
        if arr is not None:
            self._cache.move_to_end(rid)
            return arr
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
        arr = np.ascontiguousarray(data, dtype=np.float32)
        self.reads += 1
        self._cache[rid] = arr
        self._cached_bytes += arr.nbytes
        while self._cached_bytes > self._cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.nbytes
        return arr

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's window order for ``epoch``: (region ids [M], window numbers within the region [M])."""
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
        return np.concatenate(regs), np.concatenate(wins)

    def cut(self, regs: np.ndarray, wins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cut windows in memory: ([B, C, w, w] float32, [B, w, w] bool), in the order given."""
        w = self.window
        x = np.empty((len(regs), self.n_channels, w, w), dtype=np.float32)
        v = np.empty((len(regs), w, w), dtype=bool)
        for rid in dict.fromkeys(regs.tolist()):  # first-appearance order
            sel = np.flatnonzero(regs == rid)
            reg = self.all_regions[rid]
            arr = self._region(rid)
            off = reg.windows[wins[sel]]
            views = sliding_window_view(arr, (w, w), axis=(1, 2))  # [C, ny-w+1, nx-w+1, w, w], no copy
            x[sel] = np.moveaxis(views[:, off[:, 0], off[:, 1]], 0, 1)
            vreg = self._valid[reg.y0 : reg.y0 + reg.ny, reg.x0 : reg.x0 + reg.nx]
            v[sel] = sliding_window_view(vreg, (w, w))[off[:, 0], off[:, 1]]
        return x, v

    def batches(
        self, epoch: int = 0, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start .. stop-1`` of ``epoch`` (stop default: steps_per_epoch). Resuming = a later start."""
        stop = self.steps_per_epoch if stop is None else min(stop, self.steps_per_epoch)
        regs, wins = self.epoch_plan(epoch)
        b = self.batch_size
        for i in range(start, stop):
            x, v = self.cut(regs[i * b : (i + 1) * b], wins[i * b : (i + 1) * b])
            yield torch.from_numpy(x), torch.from_numpy(v)

    def __iter__(self):
        return self.batches(0)

    def __len__(self) -> int:
        return self.steps_per_epoch


class WindowDataset(torch.utils.data.IterableDataset):
    """A torch IterableDataset of whole batches from a :class:`WindowFeed` (use ``batch_size=None``).

    With DataLoader workers, worker ``i`` of ``k`` yields batches ``i, i+k, ...``; the loader's order of
    delivery is then the same as without workers. Each worker holds its own copy of the feed (and cache).
    """

    def __init__(self, feed: WindowFeed, epoch: int = 0, start: int = 0):
        super().__init__()
        self.feed, self.epoch, self.start = feed, epoch, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is None:
            yield from self.feed.batches(self.epoch, self.start)
            return
        regs, wins = self.feed.epoch_plan(self.epoch)
        b = self.feed.batch_size
        for i in range(self.start + info.id, self.feed.steps_per_epoch, info.num_workers):
            x, v = self.feed.cut(regs[i * b : (i + 1) * b], wins[i * b : (i + 1) * b])
            yield torch.from_numpy(x), torch.from_numpy(v)

    def __len__(self) -> int:
        return self.feed.steps_per_epoch - self.start


def make_loader(
    feed: WindowFeed, epoch: int = 0, *, start: int = 0, num_workers: int = 0, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """A DataLoader over whole batches of ``feed`` (workers inside a Dask worker need
    ``distributed.worker.daemon: false``)."""
    return torch.utils.data.DataLoader(
        WindowDataset(feed, epoch, start),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
