"""Benchmark: province-scale dense scoring, end to end (cube on disk -> prospectivity Zarr).

Figures (one run, same process, same model):
  model_dense_px_per_s   the model's own forward rate on in-memory windows, as pixels/s of dense scoring
                         (windows/s x stride^2, with the same K complementary-mask passes)    -> baseline
  end_to_end_px_per_s    score_cube + write_zarr_resumable from a cube on disk               (goal >= 70 %)
  per_pixel_px_per_s     one window centred on every pixel (measured on a subset)             (goal: dense >= 100x)
  peak_rss_mb            peak RSS of a LocalCluster worker scoring a cube larger than its memory_limit

Default: a reduced model (dim 64, depth 2) that runs in a few minutes on 2 CPU cores;
``--reference`` for the DESIGN.md model (dim 192, depth 6, heads 3). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def make_cube(path: Path, size: int, bands: int, chunk: int, seed: int = 0) -> Path:
    import dask.array as da

    from pipeline.data.cube import from_arrays, write_cube

    rs = da.random.RandomState(seed)
    yy = da.arange(size, chunks=chunk)[:, None] / size
    xx = da.arange(size, chunks=chunk)[None, :] / size
    layers = [
        da.exp(da.sin((3 + i) * xx) * da.cos((2 + i) * yy) + 0.1 * rs.standard_normal((size, size), chunks=chunk))
        for i in range(bands)
    ]
    ev = da.stack(layers).astype("float32")
    sources = ["geochemistry"] * (bands // 2) + ["geophysics"] * (bands // 4)
    sources += ["geology"] * (bands - len(sources))
    ds = from_arrays(
        ev,
        bands=[f"b{i}" for i in range(bands)],
        sources=sources,
        x=np.arange(size) * 100.0 + 50,
        y=-np.arange(size) * 100.0 - 50,
        crs="EPSG:32650",
        chunk=chunk,
    )
    return write_cube(ds, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="side of the end-to-end cube in pixels")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--bands", type=int, default=12)
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mask-ratio", type=float, default=0.5)
    ap.add_argument("--reference", action="store_true", help="DESIGN.md reference model: dim 192, depth 6, heads 3")
    ap.add_argument("--per-pixel", type=int, default=256, help="pixels scored one window each (subset)")
    ap.add_argument("--mem-size", type=int, default=2048, help="side of the cube for the memory test (0 = skip)")
    ap.add_argument("--mem-limit", default="1GiB", help="worker memory_limit for the memory test")
    ap.add_argument("--mem-stride", type=int, default=32, help="stride of the memory test (32: 4x fewer windows)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is fastest on a shared 2-core box: no spin-wait contention)",
    )
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    if args.reference:
        args.dim, args.depth, args.heads = 192, 6, 3

    import torch

    torch.set_num_threads(args.threads)

    from pipeline.config import ModelConfig, ScoreConfig
    from pipeline.data.cube import normalised, open_cube
    from pipeline.models import build_model, complementary_masks, group_indices
    from pipeline.models.checkpoint import save_checkpoint
    from pipeline.scoring.score import load_model_cached, score_cube
    from pipeline.scoring.sinks import write_zarr_resumable

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-score-"))
    mcfg = ModelConfig(
        window=args.window,
        patch=args.patch,
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
        mask_ratio=args.mask_ratio,
    )
    w, s = args.window, args.stride
    print(f"model: {mcfg.model_dump()}  bands {args.bands}  stride {s}  torch threads {torch.get_num_threads()}")

    t = time.perf_counter()
    cube_path = make_cube(work / "cube.zarr", args.size, args.bands, args.chunk)
    cube = open_cube(cube_path)
    groups = group_indices(cube["source"].values.tolist())
    torch.manual_seed(0)
    model = build_model(mcfg, groups).eval()
    n_params = sum(p.numel() for p in model.parameters())
    ckpt = save_checkpoint(
        work / "model.pt",
        model,
        model_cfg=mcfg,
        bands=cube["band"].values.tolist(),
        sources=cube["source"].values.tolist(),
        center=cube["center"].values,
        scale=cube["scale"].values,
        groups=groups,
    )
    print(
        f"cube {args.size}x{args.size}x{args.bands} written in {time.perf_counter() - t:.1f} s; model {n_params / 1e6:.2f} M params"
    )

    # 1. the model's own dense rate: in-memory windows, same K masked passes as scoring
    masks = complementary_masks(model.n_tokens, args.mask_ratio, seed=0) if args.mask_ratio > 0 else None
    x = torch.randn(args.batch_size, args.bands, w, w)

    def forward(batch):
        if masks is None:
            return model(batch)
        return [model(batch, token_mask=m.expand(len(batch), -1)) for m in masks]

    with torch.inference_mode():
        forward(x)
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < 8 or n < 2:
            forward(x)
            n += 1
        wps = n * args.batch_size / (time.perf_counter() - t)
    model_px = wps * s * s
    print(f"model forward: {wps:,.0f} windows/s -> dense {model_px:,.0f} px/s at stride {s}")

    # 2. end to end: cube on disk -> prospectivity Zarr (threaded scheduler, one task at a time: torch uses the cores)
    t = time.perf_counter()
    ds = score_cube(cube, ckpt, ScoreConfig(stride=s, batch_size=args.batch_size))
    # "sync": tasks run in this thread, whose torch thread count was set above (OpenMP settings are
    # per thread: a dask pool thread would start 2 torch threads and contend on a shared box).
    write_zarr_resumable(ds, work / "prospectivity.zarr", scheduler="sync", regions_per_batch=64)
    e2e_s = time.perf_counter() - t
    n_px = args.size * args.size
    e2e_px = n_px / e2e_s
    print(
        f"end to end: {n_px:,} px in {e2e_s:.1f} s = {e2e_px:,.0f} px/s = {e2e_px / model_px:.0%} of the model's dense rate (goal >= 70 %)"
    )

    # 3. per-pixel-centred baseline: one window (K passes) per pixel, centre pixel's error
    z = normalised(cube).isel(y=slice(0, 256), x=slice(0, 256)).values
    zp = np.pad(z, ((0, 0), (w // 2, w // 2), (w // 2, w // 2)), mode="reflect")
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, size=(args.per_pixel, 2))
    m, _ = load_model_cached(ckpt)
    t = time.perf_counter()
    with torch.inference_mode():
        for b0 in range(0, len(pix), args.batch_size):
            pp = pix[b0 : b0 + args.batch_size]
            win = torch.from_numpy(np.stack([zp[:, r : r + w, c : c + w] for r, c in pp]))
            if masks is None:
                rec = m(win)
            else:
                rec = sum(
                    m(win, token_mask=mk.expand(len(win), -1))
                    * mk.reshape(w // args.patch, -1).repeat_interleave(args.patch, 0).repeat_interleave(args.patch, 1)
                    for mk in masks
                )
            _ = ((rec[:, :, w // 2, w // 2] - win[:, :, w // 2, w // 2]) ** 2).mean(1)
    pp_px = len(pix) / (time.perf_counter() - t)
    print(f"per-pixel-centred: {pp_px:,.0f} px/s; dense end to end is {e2e_px / pp_px:,.0f}x faster (goal >= 100x)")

    # 4. memory: a cube several times the worker memory limit, one worker process
    peak_mb = limit_mb = cube_mb = mem_s = None
    if args.mem_size:
        import psutil
        from dask.utils import parse_bytes
        from distributed import Client, LocalCluster

        big = make_cube(work / "big.zarr", args.mem_size, args.bands, 512)
        cube_mb = args.mem_size**2 * args.bands * 4 / 2**20
        limit_mb = parse_bytes(args.mem_limit) / 2**20
        with (
            LocalCluster(
                n_workers=1, threads_per_worker=1, memory_limit=args.mem_limit, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            pid = next(iter(client.run(os.getpid).values()))
            proc, peak, stop = psutil.Process(pid), [0], threading.Event()

            def watch():
                while not stop.is_set():
                    try:
                        peak[0] = max(peak[0], proc.memory_info().rss)
                    except psutil.Error:
                        pass
                    time.sleep(0.1)

            th = threading.Thread(target=watch, daemon=True)
            th.start()
            t = time.perf_counter()
            big_ds = score_cube(open_cube(big), ckpt, ScoreConfig(stride=args.mem_stride, batch_size=args.batch_size))
            write_zarr_resumable(big_ds, work / "big_prospectivity.zarr", scheduler=client, regions_per_batch=8)
            mem_s = time.perf_counter() - t
            stop.set()
            th.join()
            peak_mb = peak[0] / 2**20
        print(
            f"memory: cube {cube_mb:,.0f} MB scored by one worker limited to {limit_mb:,.0f} MB in {mem_s:.0f} s "
            f"({args.mem_size**2 / mem_s:,.0f} px/s, 1 torch thread); worker peak RSS {peak_mb:,.0f} MB "
            f"= {peak_mb / cube_mb:.2f} x cube"
        )

    print(
        json.dumps(
            {
                "benchmark": "score",
                "model": {
                    "window": w,
                    "patch": args.patch,
                    "dim": args.dim,
                    "depth": args.depth,
                    "heads": args.heads,
                    "mask_ratio": args.mask_ratio,
                    "params_m": round(n_params / 1e6, 3),
                },
                "size": args.size,
                "bands": args.bands,
                "stride": s,
                "chunk": args.chunk,
                "end_to_end_px_per_s": round(e2e_px),
                "model_dense_px_per_s": round(model_px),
                "end_to_end_vs_model": round(e2e_px / model_px, 3),
                "per_pixel_px_per_s": round(pp_px, 1),
                "dense_vs_per_pixel": round(e2e_px / pp_px, 1),
                "peak_rss_mb": peak_mb and round(peak_mb),
                "worker_memory_limit_mb": limit_mb and round(limit_mb),
                "cube_mb": cube_mb and round(cube_mb),
                "memory_run_s": mem_s and round(mem_s, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
