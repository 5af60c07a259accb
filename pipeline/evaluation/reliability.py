"""Reliability experiments (DESIGN.md section 6): the ViT over several seeds, and its sensitivity to settings.

- :func:`reliability_stage` - the ViT over several seeds: mean and std of the per-run percentile maps
  (the std is the uncertainty map), AUC mean and std, Spearman rank correlation between runs:
  ``DIR/reliability/reliability.zarr``, ``mean.tif``, ``std.tif``, ``reliability.json``.
- :func:`sensitivity_table` - AUC vs window size and mask ratio: ``DIR/reliability/sensitivity.csv``
  and ``.md``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from pipeline.config import RunConfig
from pipeline.errors import ConfigError
from pipeline.evaluation.evaluate import evaluate_scores, write_metrics
from pipeline.evaluation.experiments import (
    check_seeds,
    cube_identity,
    ensure_cube_exists,
    markdown_table,
    metric_summary,
    open_zarr_store,
    params_changed,
    vit_run,
    write_zarr_atomic,
)
from pipeline.io import atomic_write_text
from pipeline.scoring.sinks import write_cog
from pipeline.stages import run_stage

__all__ = ["reliability", "reliability_stage", "sensitivity_table"]


def _percentiles(values: np.ndarray) -> np.ndarray:
    """Mid-rank percentile (0..1) of each finite value among the finite values; NaN elsewhere."""
    from scipy.stats import rankdata

    out = np.full(values.shape, np.nan, dtype="float32")
    ok = np.isfinite(values)
    n = int(ok.sum())
    if n:
        out[ok] = ((rankdata(values[ok]) - 0.5) / n).astype("float32")
    return out


def _spearman_matrix(maps: np.ndarray, valid: np.ndarray, max_pixels: int, seed: int) -> np.ndarray:
    """Spearman rank correlation between runs [S, S] on a seeded subsample of valid pixels."""
    from scipy.stats import spearmanr

    idx = np.flatnonzero(valid.ravel())
    if idx.size > max_pixels:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_pixels, replace=False))
    x = maps.reshape(maps.shape[0], -1)[:, idx].T  # [P, S]
    if maps.shape[0] == 1:
        return np.ones((1, 1))
    rho = spearmanr(x).statistic
    return np.atleast_2d(rho) if maps.shape[0] > 2 else np.array([[1.0, rho], [rho, 1.0]])


def reliability(
    cfg: RunConfig,
    out: str | Path,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    client=None,
    launcher=None,
    log: Callable[[str], None] = print,
    max_pixels: int = 200_000,
) -> tuple[xr.Dataset, dict]:
    """The ViT of ``cfg`` trained with each seed on ``out/cube.zarr``: maps and figures across runs.

    Returns ``(ds, summary)``. ``ds`` (y, x), in memory, with the cube's CRS:
    ``mean`` / ``std`` - mean and std over runs of each run's percentile map (a pixel's rank in the
    valid area, 0..1; scale-free, so runs whose error scales differ compare), ``std`` being the
    uncertainty map; ``score_mean`` / ``score_std`` - the same of the raw scores; ``valid``.
    ``summary``: per-run metrics, AUC mean and std (sample std), the AUC of the mean map, the Spearman
    matrix between runs (on at most ``max_pixels`` valid pixels) and its mean off-diagonal value.
    """

    seeds = check_seeds(seeds)
    out = Path(out)
    maps, walls, per_run = [], [], []
    template = None
    for seed in seeds:
        score, wall, run_dir = vit_run(
            out / "cube.zarr", cfg, out / "runs", seed=seed, client=client, launcher=launcher, log=log
        )
        template = score if template is None else template
        maps.append(np.asarray(score.values, dtype="float64"))
        walls.append(wall)
        m = metric_summary(evaluate_scores(cfg, score)) if cfg.deposits is not None else {}
        per_run.append({"seed": seed, **m, "wall_s": wall, "run": run_dir.name})
        log(f"[reliability] seed {seed}: AUC {m.get('auc', float('nan')):.3f}")
    stack = np.stack(maps)  # [S, H, W]
    valid = np.isfinite(stack).all(axis=0)
    pct = np.stack([_percentiles(np.where(valid, m, np.nan)) for m in stack])
    coords = {"y": template["y"].values, "x": template["x"].values}

    def da(values, long_name):
        return xr.DataArray(values.astype("float32"), dims=("y", "x"), coords=coords, attrs={"long_name": long_name})

    ddof = 1 if len(seeds) > 1 else 0
    with np.errstate(invalid="ignore"):
        ds = xr.Dataset(
            {
                "mean": da(pct.mean(axis=0), "mean percentile rank over runs (0..1)"),
                "std": da(pct.std(axis=0, ddof=ddof), "std of the percentile rank over runs (uncertainty)"),
                "score_mean": da(np.where(valid, stack, np.nan).mean(axis=0), "mean reconstruction error over runs"),
                "score_std": da(
                    np.where(valid, stack, np.nan).std(axis=0, ddof=ddof), "std of the reconstruction error"
                ),
                "valid": xr.DataArray(valid.astype("uint8"), dims=("y", "x"), coords=coords),
            },
            attrs={"seeds": json.dumps(seeds), "mpm_product": "reliability"},
        )
    ds = ds.rio.write_crs(template.rio.crs)
    for v in ds.data_vars:
        ds[v] = ds[v].rio.write_grid_mapping("spatial_ref")
    rho = _spearman_matrix(pct, valid, max_pixels, seed=cfg.evaluate.seed)
    off = rho[~np.eye(len(seeds), dtype=bool)]
    aucs = np.array([r.get("auc", np.nan) for r in per_run], dtype=float)
    summary = {
        "seeds": seeds,
        "runs": per_run,
        "auc_mean": float(np.mean(aucs)),
        "auc_std": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else float("nan"),
        "auc_of_mean_map": metric_summary(evaluate_scores(cfg, ds["mean"].where(ds["valid"] > 0))).get("auc")
        if cfg.deposits is not None
        else None,
        "spearman": rho.tolist(),
        "spearman_mean": float(off.mean()) if off.size else 1.0,
        "spearman_min": float(off.min()) if off.size else 1.0,
        "spearman_pixels": int(min(max_pixels, int(valid.sum()))),
        "uncertainty_mean": float(np.nanmean(ds["std"].values)),
        "wall_s": walls,
    }
    return ds, summary


def reliability_stage(
    cfg: RunConfig,
    out: Path,
    *,
    seeds=(0, 1, 2),
    force: bool = False,
    log=print,
    client=None,
    launcher=None,
    ensure_cube: Callable[[], object] | None = None,
) -> dict:
    """Stage: ``DIR/reliability/reliability.zarr`` (mean, std, score_mean, score_std), ``mean.tif``,
    ``std.tif`` (COGs) and ``reliability.json``. Skipped on a rerun with the same settings and seeds.
    """

    out = Path(out)
    rdir = out / "reliability"
    paths = {
        "reliability_zarr": rdir / "reliability.zarr",
        "mean_tif": rdir / "mean.tif",
        "std_tif": rdir / "std.tif",
        "reliability_json": rdir / "reliability.json",
    }
    ensure_cube_exists(out, ensure_cube)
    seeds = check_seeds(seeds)
    params = {"seeds": seeds, "cube": cube_identity(out / "cube.zarr")}
    force = force or params_changed(rdir / "params.json", params)

    def go():
        ds, summary = reliability(cfg, out, seeds=seeds, client=client, launcher=launcher, log=log)
        write_zarr_atomic(ds, paths["reliability_zarr"])
        written = open_zarr_store(paths["reliability_zarr"])
        write_cog(written["mean"], paths["mean_tif"])
        write_cog(written["std"], paths["std_tif"])
        write_metrics(summary, paths["reliability_json"])
        atomic_write_text(rdir / "params.json", json.dumps(params, indent=1))
        log(
            f"[reliability] AUC {summary['auc_mean']:.3f} +- {summary['auc_std']:.3f} over seeds {seeds}; "
            f"Spearman between runs {summary['spearman_mean']:.3f}"
        )

    run_stage(
        "reliability",
        cfg,
        out,
        list(paths.values()),
        ("model", "train", "score", "deposits", "evaluate"),
        go,
        force=force,
        log=log,
        upstream=("cube",),
    )
    return paths


def sensitivity_table(
    cfg: RunConfig,
    out: Path,
    *,
    windows: Sequence[int] = (8, 16, 32),
    mask_ratios: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
    seed: int | None = None,
    force: bool = False,
    log=print,
    client=None,
    launcher=None,
    ensure_cube: Callable[[], object] | None = None,
) -> Path:
    """AUC vs window size x mask ratio (one ViT run each, ``seed`` default ``cfg.train.seed``).

    Writes ``DIR/reliability/sensitivity.csv`` (one row per pair: window, mask_ratio, auc,
    success_rate_area, normalised_density, wall_s) and ``sensitivity.md`` (AUC, windows as rows, mask
    ratios as columns). The score stride is ``min(score.stride, window)``. A window that is not a
    multiple of ``model.patch`` is rejected. Returns the CSV path.
    """

    out = Path(out)
    rdir = out / "reliability"
    csv, md = rdir / "sensitivity.csv", rdir / "sensitivity.md"
    windows = [int(w) for w in windows]
    mask_ratios = [float(m) for m in mask_ratios]
    bad = [w for w in windows if w < cfg.model.patch or w % cfg.model.patch]
    if bad:
        raise ConfigError(
            f"sensitivity windows {bad} are not multiples of model.patch={cfg.model.patch}. "
            f"Fix: use multiples of {cfg.model.patch}, e.g. {[cfg.model.patch * k for k in (2, 4, 8)]}"
        )
    bad = [m for m in mask_ratios if not 0 <= m < 1]
    if bad:
        raise ConfigError(f"sensitivity mask ratios {bad} must lie in [0, 1). Fix: e.g. (0.0, 0.25, 0.5, 0.75)")
    if cfg.deposits is None:
        raise ConfigError("the sensitivity table needs known deposits. Fix: add a 'deposits' section")
    seed = cfg.train.seed if seed is None else int(seed)
    ensure_cube_exists(out, ensure_cube)
    params = {"windows": windows, "mask_ratios": mask_ratios, "seed": seed, "cube": cube_identity(out / "cube.zarr")}
    force = force or params_changed(rdir / "sensitivity_params.json", params)

    def go():
        rows = []
        for w in windows:
            for m in mask_ratios:
                c = cfg.with_updates(model={"window": w, "mask_ratio": m}, score={"stride": min(cfg.score.stride, w)})
                score, wall, _ = vit_run(
                    out / "cube.zarr", c, out / "runs", seed=seed, client=client, launcher=launcher, log=log
                )
                s = metric_summary(evaluate_scores(cfg, score))
                rows.append(
                    {
                        "window": w,
                        "mask_ratio": m,
                        "auc": s["auc"],
                        "success_rate_area": s["success_rate_area"],
                        "normalised_density": s["normalised_density"],
                        "wall_s": wall,
                    }
                )
                log(f"[sensitivity] window {w}, mask ratio {m:g}: AUC {s['auc']:.3f}")
        df = pd.DataFrame(rows)
        atomic_write_text(csv, df.to_csv(index=False))
        pivot = df.pivot(index="window", columns="mask_ratio", values="auc")
        pivot.columns = [f"mask {c:g}" for c in pivot.columns]
        pivot = pivot.reset_index()
        head = (
            f"# Sensitivity: ROC AUC vs window size and mask ratio ({cfg.name}, seed {seed})\n\n"
            f"Rows: window (pixels); columns: mask ratio. Patch {cfg.model.patch}, score stride "
            f"min({cfg.score.stride}, window); other settings from the run config.\n\n"
        )
        atomic_write_text(md, head + markdown_table(pivot))
        atomic_write_text(rdir / "sensitivity_params.json", json.dumps(params, indent=1))

    run_stage(
        "sensitivity",
        cfg,
        out,
        [csv, md],
        ("model", "train", "score", "deposits", "evaluate"),
        go,
        force=force,
        log=log,
        upstream=("cube",),
    )
    return csv
