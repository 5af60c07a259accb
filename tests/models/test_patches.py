"""The patch feed: regions through xbatcher, moved to the device once, windows cut there; seeded order, rank shards,
random offsets, prefetch."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
import xbatcher
from _cubes import write_test_cube
from dask.callbacks import Callback

from pipeline.data.cube import normalised, open_cube
from pipeline.errors import ConfigError
from pipeline.models.patches import WindowFeed, cut_windows, region_layout

W, S = 16, 8


@pytest.fixture(scope="module")
def cube(tmp_path_factory):
    # 64x64, chunks 16: regions of two chunks (32 px) plus a halo of 8 -> one full region, three tails
    return open_cube(write_test_cube(tmp_path_factory.mktemp("cube") / "cube.zarr", chunk=16))


class CountComputes(Callback):
    def __init__(self):
        super().__init__()
        self.n = 0

    def _start(self, dsk):
        self.n += 1


def grid_windows(cube, frac):
    valid = cube["valid"].values.astype(bool)
    out = set()
    for y in range(0, valid.shape[0] - W + 1, S):
        for x in range(0, valid.shape[1] - W + 1, S):
            if valid[y : y + W, x : x + W].mean() >= frac:
                out.add((y, x))
    return out


def positions(feed, epoch=0):
    regs, starts = feed.epoch_plan(epoch)
    return [(int(feed.all_regions[r].y0 + s[0]), int(feed.all_regions[r].x0 + s[1])) for r, s in zip(regs, starts)]


def test_region_layout_tiles_the_window_grid():
    for size, chunk in [(64, 32), (100, 32), (37, 512), (16, 8), (130, 48)]:
        r, k, segs = region_layout(size, chunk, W, S)
        starts = []
        for s0, n in segs:
            local = np.arange(0, n - W + 1, S)
            local = local[local < (k if n == r else n)]
            starts += (local + s0).tolist()
        assert starts == list(range(0, size - W + 1, S)), (size, chunk)


def test_windows_are_exact_cuts_of_the_normalised_cube(cube):
    feed = WindowFeed(cube, window=W, stride=S, batch_size=10, min_valid_fraction=0.5)
    z = normalised(cube).values
    valid = cube["valid"].values.astype(bool)
    pos = positions(feed)
    for i, (x, v) in enumerate(feed.batches(0)):
        assert x.shape == (10, 8, W, W) and x.dtype == torch.float32 and v.dtype == torch.bool
        for j in range(10):
            y0, x0 = pos[i * 10 + j]
            np.testing.assert_array_equal(x[j].numpy(), z[:, y0 : y0 + W, x0 : x0 + W])
            np.testing.assert_array_equal(v[j].numpy(), valid[y0 : y0 + W, x0 : x0 + W])


@pytest.mark.parametrize("frac", [0.0, 0.5, 0.95])
def test_each_valid_window_once_per_epoch_across_ranks(cube, frac):
    feeds = [
        WindowFeed(cube, window=W, stride=S, batch_size=4, min_valid_fraction=frac, rank=r, world_size=2)
        for r in range(2)
    ]
    p0, p1 = positions(feeds[0]), positions(feeds[1])
    assert len(set(p0)) == len(p0) and not set(p0) & set(p1)  # no duplicate, disjoint shards
    assert set(p0) | set(p1) == grid_windows(cube, frac)
    assert feeds[0].steps_per_epoch == feeds[1].steps_per_epoch == min(len(p0), len(p1)) // 4
    # the regions of a rank are its own
    assert not set(feeds[0].regions.tolist()) & set(feeds[1].regions.tolist())


def test_one_dask_compute_per_region_not_per_patch(cube):
    feed = WindowFeed(cube, window=W, stride=S, batch_size=4, min_valid_fraction=0.5)
    assert isinstance(feed.generator, xbatcher.BatchGenerator)
    assert len(feed.generator) == 1  # 40x40 full region at (0, 0); three tail regions cut by the feed
    counter = CountComputes()
    with counter:
        n = sum(len(x) for x, _ in feed.batches(0))
        n += sum(len(x) for x, _ in feed.batches(1))  # second epoch: regions come from the cache
    assert n == 2 * feed.steps_per_epoch * 4 > 40
    assert counter.n == feed.reads == len(feed.all_regions) == 4


def test_order_is_a_function_of_seed_epoch_and_step(cube):
    kw = dict(window=W, stride=S, batch_size=6, min_valid_fraction=0.5)
    a = [x for x, _ in WindowFeed(cube, seed=1, **kw).batches(0)]
    b = [x for x, _ in WindowFeed(cube, seed=1, **kw).batches(0)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert positions(WindowFeed(cube, seed=1, **kw), 0) != positions(WindowFeed(cube, seed=1, **kw), 1)
    assert positions(WindowFeed(cube, seed=1, **kw), 0) != positions(WindowFeed(cube, seed=2, **kw), 0)
    resumed = [x for x, _ in WindowFeed(cube, seed=1, **kw).batches(0, start=3)]
    assert all(torch.equal(p, q) for p, q in zip(a[3:], resumed)) and len(resumed) == len(a) - 3


def test_in_memory_and_lazy_cubes_give_the_same_batches(cube):
    kw = dict(window=W, stride=S, batch_size=8, min_valid_fraction=0.5)
    lazy = list(WindowFeed(cube, **kw).batches(0))
    eager_cube = cube.compute()
    assert eager_cube["evidence"].chunks is None
    eager = list(WindowFeed(eager_cube, **kw).batches(0))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(lazy, eager))


def test_cut_windows_is_a_strided_gather():
    region = torch.arange(3 * 20 * 24, dtype=torch.float32).reshape(3, 20, 24)
    starts = [(0, 0), (4, 8), (20 - W, 24 - W), (3, 5)]
    flat = torch.tensor([r * 24 + c for r, c in starts])
    got = cut_windows(region, flat, W)
    assert got.shape == (4, 3, W, W) and got.is_contiguous()
    for j, (r, c) in enumerate(starts):
        assert torch.equal(got[j], region[:, r : r + W, c : c + W])
    mask = region[0] > 100
    assert torch.equal(cut_windows(mask, flat, W)[1], mask[4 : 4 + W, 8 : 8 + W])


def test_regions_not_windows_cross_to_the_device(cube):
    feed = WindowFeed(cube, window=W, stride=S, batch_size=4, min_valid_fraction=0.0)
    x, v = next(iter(feed.batches(0)))
    assert x.device == v.device == torch.device("cpu") and x.is_contiguous()
    n = sum(len(x) for x, _ in feed.batches(0, start=1)) + len(x)
    assert feed.windows_served == n
    regions = sum((4 * feed.n_channels + 1) * r.ny * r.nx for r in feed.all_regions)
    assert feed.h2d_bytes == regions  # each region once, evidence and mask
    feed.windows_served = 0
    sum(len(x) for x, _ in feed.batches(1))  # a second epoch comes from the device cache
    assert feed.h2d_bytes == regions


def test_random_offsets_jitter_inside_regions_and_keep_the_valid_rule(cube):
    kw = dict(window=W, stride=S, batch_size=4, min_valid_fraction=0.5)
    grid = WindowFeed(cube, **kw)
    feed = WindowFeed(cube, random_offsets=True, **kw)
    assert feed.steps_per_epoch == grid.steps_per_epoch and feed.n_windows == grid.n_windows
    valid = cube["valid"].values.astype(bool)
    z = normalised(cube).values
    moved = 0
    for epoch in (0, 1):
        regs, starts = feed.epoch_plan(epoch)
        g_regs, g_starts = grid.epoch_plan(epoch)
        assert np.array_equal(regs, g_regs)  # same windows, same order: only their starts move
        d = starts - g_starts
        assert d.min() >= 0 and d.max() < S
        moved += int((d != 0).any(axis=1).sum())
        for r, (sy, sx) in zip(regs, starts):
            reg = feed.all_regions[r]
            assert sy + W <= reg.ny and sx + W <= reg.nx  # inside the region, halo included
            y0, x0 = reg.y0 + sy, reg.x0 + sx
            assert valid[y0 : y0 + W, x0 : x0 + W].mean() >= 0.5
    assert moved > len(regs)  # most windows move
    assert not np.array_equal(feed.epoch_plan(0)[1], feed.epoch_plan(1)[1])
    again = WindowFeed(cube, random_offsets=True, **kw)
    assert np.array_equal(again.epoch_plan(1)[1], feed.epoch_plan(1)[1])  # seeded in (seed, epoch, rank)
    pos = positions(feed, 1)
    for i, (x, v) in enumerate(feed.batches(1)):
        for j in range(len(x)):
            y0, x0 = pos[i * 4 + j]
            np.testing.assert_array_equal(x[j].numpy(), z[:, y0 : y0 + W, x0 : x0 + W])
            np.testing.assert_array_equal(v[j].numpy(), valid[y0 : y0 + W, x0 : x0 + W])


def test_the_cube_valid_variable_is_used_as_given(cube):
    held_out = cube.copy()
    valid = cube["valid"].values.astype(bool).copy()
    valid[:, :32] = False  # a held-out block
    held_out["valid"] = (cube["valid"].dims, valid)
    feed = WindowFeed(held_out, window=W, stride=S, batch_size=2, min_valid_fraction=0.5, random_offsets=True)
    for epoch in (0, 1):
        for y0, x0 in positions(feed, epoch):
            assert valid[y0 : y0 + W, x0 : x0 + W].mean() >= 0.5 and x0 + W > 32


def test_prefetch_reads_ahead_and_releases_regions(cube):
    feed = WindowFeed(cube, window=W, stride=S, batch_size=4, min_valid_fraction=0.0, regions_per_pool=1)
    it = feed.batches(0)
    next(it)
    deadline = time.monotonic() + 10
    while feed.reads < 2 and time.monotonic() < deadline:  # the next pool's region, read on the thread
        time.sleep(0.01)
    assert 2 <= feed.reads < len(feed.all_regions)
    it.close()  # stops the prefetch thread
    assert not any(t.name.startswith("mpm-feed") and t.is_alive() for t in threading.enumerate())


def test_too_few_windows_says_what_to_lower(cube):
    with pytest.raises(ConfigError, match="fewer than one batch of 1000.*batch_size"):
        WindowFeed(cube, window=W, stride=S, batch_size=1000)


def test_small_cube_shrinks_regions_for_ranks(tmp_path):
    small = open_cube(write_test_cube(tmp_path / "c.zarr", size=48, chunk=512))
    feeds = [WindowFeed(small, window=W, stride=S, batch_size=2, rank=r, world_size=3) for r in range(3)]
    assert len(feeds[0].all_regions) >= 3
    assert all(f.n_windows > 0 for f in feeds)
