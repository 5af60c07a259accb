"""Patch feed throughput: the device-side region feed vs a plain copy, vs stock lazy xbatcher, vs training.

Measured in the same run:
- the feed cold (first epoch: every region read from the Zarr store, incl. setup) and warm (regions already
  on the device: the steady state, since on a GPU the next regions' reads overlap the steps);
- the device-side cut alone (``device_feed_windows_per_s``: warm epochs, windows cut on ``--device``) beside a
  plain contiguous copy of the same window bytes on that device (``copy_windows_per_s``: ``clone`` of
  contiguous [B, C, w, w] batches, cycling over sources as large as the regions, so neither sits in cache):
  the memory-bandwidth limit. Goal: >= 50 % of it. Rounds alternate between the two; the best round of each
  counts (the box is shared);
- bytes moved host to device per window over one cold epoch (regions with halo and their masks, not windows).
  Goal: <= 1/3 of a window's own bytes (``window_bytes``);
- stock xbatcher, lazy over the Zarr cube: BatchGenerator(input_dims=window, input_overlap=window-stride) over
  the normalised cube, one dask compute per patch (measured on --lazy-patches patches only: it is slow);
- the reference model's training step (fwd + bwd + AdamW) at the same window size (CPU here).
Goal: feed >= 100x lazy xbatcher, and faster than training (so training never waits for data).

    python benchmarks/patches.py [--size 1024] [--bands 12] [--chunk 256] [--batches 40] [--device cpu]
Last line: JSON with feed_patches_per_s, lazy_xbatcher_patches_per_s, train_windows_per_s,
device_feed_windows_per_s, copy_windows_per_s, h2d_bytes_per_window, window_bytes (and ratios).
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
    ap.add_argument("--device", default="cpu", help="where the feed cuts windows (cpu, cuda)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of device feed vs plain copy")
    ap.add_argument("--skip-train", action="store_true", help="no training-step baseline (gpu_check times it)")
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

        device = torch.device(args.device)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        # Our feed: cold (first epoch: every region read from the store) over --batches batches.
        t = time.perf_counter()
        feed = WindowFeed(
            ds, window=args.window, stride=args.stride, batch_size=args.batch, min_valid_fraction=0.5, device=device
        )
        n = 0
        for i, (x, _v) in enumerate(feed.batches(0)):
            n += len(x)
            if i + 1 >= args.batches:
                break
        sync()
        feed_rate = n / (time.perf_counter() - t)
        print(f"feed (cold, incl. setup): {n} patches, {feed.reads} region reads, {feed_rate:,.0f} patches/s")
        # the rest of epoch 0: bytes handed to the device per window over one whole cold epoch
        n += sum(len(x) for x, _ in feed.batches(0, start=min(args.batches, feed.steps_per_epoch)))
        h2d_per_window = feed.h2d_bytes / n
        window_bytes = feed.window_bytes
        print(
            f"host to device: {feed.h2d_bytes / 1e6:,.1f} MB for {n} windows = {h2d_per_window:,.0f} B per window, "
            f"{h2d_per_window / window_bytes:.2f} x a window's {window_bytes:,} B (goal <= 0.33)"
        )
        t = time.perf_counter()
        n_warm = sum(len(x) for i, (x, _) in zip(range(args.batches), feed.batches(0)))
        sync()
        warm_rate = n_warm / (time.perf_counter() - t)
        print(f"feed (warm: regions on the device, the steady state of later epochs): {warm_rate:,.0f} patches/s")

        # Device-side cut vs a plain contiguous copy of the same bytes, alternating rounds.
        b, c, w = args.batch, feed.n_channels, args.window
        region_bytes = sum(4 * c * r.ny * r.nx for r in feed.all_regions)
        n_src = max(2, -(-region_bytes // (4 * b * c * w * w)))
        sources = [torch.randn(b, c, w, w, device=device) for _ in range(n_src)]
        epochs = max(1, args.batches // feed.steps_per_epoch)
        feed_best = copy_best = 0.0
        for _ in range(args.rounds):
            sync()
            t = time.perf_counter()
            m = sum(len(x) for e in range(epochs) for x, _ in feed.batches(1 + e))
            sync()
            feed_best = max(feed_best, m / (time.perf_counter() - t))
            t = time.perf_counter()
            for i in range(m // b):
                sources[i % n_src].clone()
            sync()
            copy_best = max(copy_best, (m // b) * b / (time.perf_counter() - t))
        print(
            f"device-side feed ({device}): {feed_best:,.0f} windows/s; plain contiguous copy of the same bytes: "
            f"{copy_best:,.0f} windows/s; ratio {feed_best / copy_best:.2f} (goal >= 0.5)"
        )

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
        train_rate = 0.0
        if not args.skip_train:
            cfg = ModelConfig(window=args.window, patch=4, dim=192, depth=6, heads=3, mask_ratio=0.5)
            model = build_model(cfg, group_indices(list(ds["source"].values)))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            x, v = next(iter(feed.batches(1)))
            x, v = x[: args.train_batch].cpu(), v[: args.train_batch].cpu()
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
            print(
                f"training step (reference model, CPU, {torch.get_num_threads()} threads): {train_rate:,.0f} windows/s"
            )

    res = {
        "feed_patches_per_s": round(feed_rate, 1),
        "lazy_xbatcher_patches_per_s": round(lazy_rate, 1),
        "train_windows_per_s": None if args.skip_train else round(train_rate, 1),
        "feed_warm_patches_per_s": round(warm_rate, 1),
        "feed_vs_lazy_xbatcher": round(feed_rate / lazy_rate, 1),
        "feed_vs_train": None if args.skip_train else round(feed_rate / train_rate, 1),
        "device_feed_windows_per_s": round(feed_best, 1),
        "copy_windows_per_s": round(copy_best, 1),
        "device_feed_vs_copy": round(feed_best / copy_best, 3),
        "h2d_bytes_per_window": round(h2d_per_window, 1),
        "window_bytes": window_bytes,
        "h2d_vs_window_bytes": round(h2d_per_window / window_bytes, 3),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cube": [args.bands, args.size, args.size],
        "chunk": args.chunk,
        "window": args.window,
        "stride": args.stride,
    }
    vs_train = "not measured" if args.skip_train else f"{res['feed_vs_train']}x"
    print(f"feed / lazy xbatcher = {res['feed_vs_lazy_xbatcher']}x; feed / training = {vs_train}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    sys.exit(main() and 0)
