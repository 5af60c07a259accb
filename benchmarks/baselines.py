"""Benchmark: the seven comparison methods on a planted-anomaly cube, and evaluate_map on a large map.

Figures: seconds per method (fit on ``--train`` pixels + scoring every valid pixel) and its AUC on
the planted deposits; the reference measured in the same run is the PCA baseline (the cheapest
method), printed as a ratio. Then evaluate_map on a ``--eval-size``^2 map vs one bare sklearn
roc_auc_score over the same cells (ratio = how much the full metric set costs over one AUC).

    python benchmarks/baselines.py                 # 192 x 192 x 12 bands, a few minutes on 2 cores
    python benchmarks/baselines.py --size 1024 --eval-size 4096
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
from scipy.ndimage import gaussian_filter


def planted_cube(path: Path, size: int, bands: int, n_dep: int, seed: int = 0):
    from pipeline.data.cube import from_arrays, open_cube, write_cube

    rng = np.random.default_rng(seed)
    latent = np.stack([gaussian_filter(rng.normal(size=(size, size)), 4) for _ in range(3)])
    latent /= latent.std(axis=(1, 2), keepdims=True)
    ev = np.einsum("cl,lhw->chw", rng.normal(size=(bands, 3)), latent) + 0.2 * rng.normal(size=(bands, size, size))
    rows, cols = rng.integers(3, size - 3, n_dep), rng.integers(3, size - 3, n_dep)
    direction = np.where(np.arange(bands) % 2 == 0, 1.0, -1.0) * 1.5
    for r, c in zip(rows, cols):
        ev[:, r - 1 : r + 2, c - 1 : c + 2] += direction[:, None, None]
    x = 400_000 + 100 * np.arange(size) + 50
    y = 5_000_000 - 100 * np.arange(size) - 50
    ds = from_arrays(
        ev.astype("float32"),
        bands=[f"b{i}" for i in range(bands)],
        sources=["geochemistry"] * bands,
        x=x,
        y=y,
        crs="EPSG:32646",
        chunk=min(512, size),
    )
    cube = open_cube(write_cube(ds, path))
    return cube, gpd.GeoDataFrame(geometry=gpd.points_from_xy(x[cols], y[rows]), crs="EPSG:32646")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--bands", type=int, default=12)
    p.add_argument("--deposits", type=int, default=20)
    p.add_argument("--train", type=int, default=20000, help="max_train_pixels")
    p.add_argument("--eval-size", type=int, default=1024)
    p.add_argument("--methods", default=None, help="comma-separated subset (default: the seven)")
    args = p.parse_args()

    import xarray as xr

    from pipeline.config import EvaluateConfig
    from pipeline.evaluation.baselines import list_baselines, score_baseline
    from pipeline.evaluation.evaluate import evaluate_map, roc_auc_all

    figures: dict = {"machine": "2-core CPU sandbox", "size": args.size, "bands": args.bands, "train": args.train}
    with tempfile.TemporaryDirectory() as tmp:
        cube, deposits = planted_cube(Path(tmp) / "cube.zarr", args.size, args.bands, args.deposits)
        methods = args.methods.split(",") if args.methods else list_baselines()
        if "pca" not in methods:
            methods = ["pca", *methods]
        score_baseline("pca", cube, max_train_pixels=500)  # warm-up: imports are not the method's cost
        times, aucs = {}, {}
        for name in methods:
            t0 = time.perf_counter()
            score = score_baseline(name, cube, seed=0, max_train_pixels=args.train)
            times[name] = time.perf_counter() - t0
            aucs[name] = roc_auc_all(score, deposits)
        ref = times["pca"]
        print(f"{args.size}x{args.size}x{args.bands} cube, {args.train} training pixels; reference = pca {ref:.2f} s")
        for name in methods:
            mpix = args.size**2 / times[name] / 1e6
            print(
                f"  {name:9s} {times[name]:7.2f} s  ({mpix:5.2f} Mpixel/s)  x{times[name] / ref:6.1f} pca   AUC {aucs[name]:.3f}"
            )
        figures["seconds"] = {k: round(v, 3) for k, v in times.items()}
        figures["ratio_to_pca"] = {k: round(v / ref, 2) for k, v in times.items()}
        figures["auc"] = {k: round(v, 4) for k, v in aucs.items()}

    n = args.eval_size
    rng = np.random.default_rng(1)
    coords = {"y": 3_000_000 - 100 * (np.arange(n) + 0.5), "x": 200_000 + 100 * (np.arange(n) + 0.5)}
    values = rng.random((n, n), dtype="float32")
    idx = rng.choice(n * n, 200, replace=False)
    values.flat[idx] += 0.5
    score = xr.DataArray(values, dims=("y", "x"), coords=coords).rio.write_crs("EPSG:32650")
    dep = gpd.GeoDataFrame(geometry=gpd.points_from_xy(coords["x"][idx % n], coords["y"][idx // n]), crs="EPSG:32650")
    from sklearn.metrics import roc_auc_score

    t0 = time.perf_counter()
    labels = np.zeros(n * n)
    labels[idx] = 1
    roc_auc_score(labels, values.ravel())
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate_map(score, dep, EvaluateConfig(repeats=20))
    t_eval = time.perf_counter() - t0
    print(f"evaluate_map on {n}x{n}: {t_eval:.2f} s vs one sklearn roc_auc_score {t_ref:.2f} s (x{t_eval / t_ref:.1f})")
    figures["evaluate_map_s"] = round(t_eval, 3)
    figures["roc_auc_score_s"] = round(t_ref, 3)
    figures["evaluate_ratio"] = round(t_eval / t_ref, 2)
    figures["eval_size"] = n
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
