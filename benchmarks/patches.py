"""Patch feed throughput: the region feed vs stock lazy xbatcher over the same Zarr cube, vs training.

Baselines measured in the same run:
- stock xbatcher, lazy over the Zarr cube: BatchGenerator(input_dims=window, input_overlap=window-stride) over
  the normalised cube, one dask compute per patch (measured on --lazy-patches patches only: it is slow);
- the model's CPU training step (fwd + bwd + AdamW) of the reference model at the same window size.
Goal: feed >= 100x lazy xbatcher, and faster than training (so training never waits for data).

    python benchmarks/patches.py [--size 1024] [--bands 12] [--chunk 256] [--batches 40]
Last line: JSON with feed_patches_per_s, lazy_xbatcher_patches_per_s, train_windows_per_s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_cube(path: Path, size: int, bands: int, chunk: int) -> Path:
    from pipeline.data.cube import from_arrays, write_cube

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    ev = np.stack(
        [np.sin((3 + b) * xx) + np.cos((2 + b) * yy) + 0.1 * rng.standard_normal((size, size)) for b in range(bands)]
    ).astype("float32")
    valid = np.ones((size, size), bool)
    valid[: size // 8, : size // 8] = False
    ev[:, ~valid] = np.nan
    groups = ["geochemistry", "geophysics", "geology"]
    sources = [groups[b * 3 // bands] for b in range(bands)]
    x = 100.0 * (np.arange(size) + 0.5)
    y = 100.0 * (size - np.arange(size) - 0.5)
    ds = from_arrays(
        ev, bands=[f"b{i}" for i in range(bands)], sources=sources, x=x, y=y, crs="EPSG:32646", valid=valid, chunk=chunk
    )
    return write_cube(ds, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="cube side in pixels")
    ap.add_argument("--bands", type=int, default=12)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=40, help="feed batches timed")
    ap.add_argument("--lazy-patches", type=int, default=200, help="lazy xbatcher patches timed")
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads for the training step")
    args = ap.parse_args(argv)

    import torch
    import xbatcher

    from pipeline.config import ModelConfig
    from pipeline.data.cube import normalised, open_cube
    from pipeline.models import build_model, group_indices, masked_mse, random_token_mask
    from pipeline.models.patches import WindowFeed

    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = make_cube(Path(tmp) / "cube.zarr", args.size, args.bands, args.chunk)
        ds = open_cube(path)

        # Our feed: cold (first epoch: every region read from the store) over --batches batches.
        t = time.perf_counter()
        feed = WindowFeed(ds, window=args.window, stride=args.stride, batch_size=args.batch, min_valid_fraction=0.5)
        n = 0
        for i, (x, _v) in enumerate(feed.batches(0)):
            n += len(x)
            if i + 1 >= args.batches:
                break
        feed_rate = n / (time.perf_counter() - t)
        print(f"feed (cold, incl. setup): {n} patches, {feed.reads} region reads, {feed_rate:,.0f} patches/s")
        t = time.perf_counter()
        n_warm = sum(len(x) for i, (x, _) in zip(range(args.batches), feed.batches(0)))
        warm_rate = n_warm / (time.perf_counter() - t)
        print(f"feed (warm: regions in memory, the steady state of later epochs): {warm_rate:,.0f} patches/s")

        # Stock xbatcher, lazy: one dask compute per patch.
        z = normalised(ds)
        z = z.drop_vars([c for c in z.coords if c not in ("y", "x")])
        gen = xbatcher.BatchGenerator(
            z,
            input_dims={"y": args.window, "x": args.window},
            input_overlap={"y": args.window - args.stride, "x": args.window - args.stride},
            preload_batch=False,
        )
        t = time.perf_counter()
        m = min(args.lazy_patches, len(gen))
        for i in range(m):
            np.asarray(gen[i].values)
        lazy_rate = m / (time.perf_counter() - t)
        print(f"stock xbatcher, lazy over Zarr: {m} patches, {lazy_rate:,.0f} patches/s")

        # Training step of the reference model at this window size (CPU).
        cfg = ModelConfig(window=args.window, patch=4, dim=192, depth=6, heads=3, mask_ratio=0.5)
        model = build_model(cfg, group_indices(list(ds["source"].values)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x, v = next(iter(feed.batches(1)))
        x, v = x[: args.train_batch], v[: args.train_batch]
        mask = random_token_mask(len(x), model.n_tokens, 0.5)

        def step():
            loss = masked_mse(model(x, mask), x, v, mask, cfg.patch)
            opt.zero_grad()
            loss.backward()
            opt.step()

        step()
        t = time.perf_counter()
        for _ in range(args.train_steps):
            step()
        train_rate = args.train_steps * len(x) / (time.perf_counter() - t)
        print(f"training step (reference model, CPU, {torch.get_num_threads()} threads): {train_rate:,.0f} windows/s")

    res = {
        "feed_patches_per_s": round(feed_rate, 1),
        "lazy_xbatcher_patches_per_s": round(lazy_rate, 1),
        "train_windows_per_s": round(train_rate, 1),
        "feed_warm_patches_per_s": round(warm_rate, 1),
        "feed_vs_lazy_xbatcher": round(feed_rate / lazy_rate, 1),
        "feed_vs_train": round(feed_rate / train_rate, 1),
        "cube": [args.bands, args.size, args.size],
        "chunk": args.chunk,
        "window": args.window,
        "stride": args.stride,
    }
    print(f"feed / lazy xbatcher = {res['feed_vs_lazy_xbatcher']}x; feed / training = {res['feed_vs_train']}x")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    sys.exit(main() and 0)
