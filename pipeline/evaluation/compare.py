"""Comparison of methods (DESIGN.md section 6): the baselines, the ViT and its ablations on one cube.

Every method is scored on the same cube and evaluated by :func:`pipeline.evaluation.evaluate.evaluate_scores`
with the run config's deposits and protocol, so raster and point protocols are identical for all.
Deposits are never used for fitting: baselines fit on seeded pixel samples, the ViT on windows.

:func:`compare_stage` - the seven baselines (:func:`pipeline.evaluation.baselines.list_baselines`), the ViT of
the run config and its ablations (no fusion layer, geochemistry-only input, no masking), a random map as a
reference, each over several seeds: ``DIR/compare/comparison.csv`` and ``.md``. The repeated-seed and
sensitivity experiments are in :mod:`pipeline.evaluation.reliability`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from pipeline.config import RunConfig
from pipeline.data.cube import from_arrays, open_cube, write_cube
from pipeline.errors import ConfigError, CubeError
from pipeline.evaluation.baselines import BASELINES, list_baselines, score_baseline
from pipeline.evaluation.evaluate import evaluate_scores
from pipeline.evaluation.experiments import (
    check_seeds,
    cube_identity,
    ensure_cube_exists,
    markdown_table,
    metric_summary,
    params_changed,
    vit_run,
)
from pipeline.io import atomic_write_text
from pipeline.stages import run_stage

__all__ = [
    "VIT_VARIANTS",
    "REFERENCE",
    "default_methods",
    "geochemistry_cube",
    "method_scores",
    "compare_methods",
    "compare_stage",
]

# ViT variants: the run config's model and the paper's ablations.
VIT_VARIANTS = ("vit", "vit_no_fusion", "vit_geochem_only", "vit_no_mask")
REFERENCE = "random"  # a seeded uniform random map: the AUC 0.5 line, measured
GEOCHEMISTRY = "geochemistry"
TABLE_COLUMNS = [
    "method",
    "auc_mean",
    "auc_std",
    "success_rate_area",
    "pa_prediction_rate",
    "normalised_density",
    "wall_s",
    "n_seeds",
    "kind",
]
_EVAL_SECTIONS = ("model", "train", "score", "deposits", "evaluate")


def default_methods(ablations: bool = True) -> list[str]:
    """The seven baselines, the ViT, its ablations (``ablations``) and the random reference."""

    vit = list(VIT_VARIANTS) if ablations else ["vit"]
    return [*list_baselines(), *vit, REFERENCE]


def _kind(method: str) -> str:
    if method == REFERENCE:
        return "reference"
    if method == "vit":
        return "vit"
    return "ablation" if method in VIT_VARIANTS else "baseline"


def _check_methods(methods: Sequence[str]) -> list[str]:
    known = [*BASELINES, *VIT_VARIANTS, REFERENCE]
    bad = [m for m in methods if m not in known]
    if bad:
        raise ConfigError(f"unknown comparison method(s) {bad}. Fix: use some of {', '.join(known)}")
    if not methods:
        raise ConfigError(f"no comparison method given. Fix: pass methods among {', '.join(known)}")
    return list(dict.fromkeys(methods))


# ------------------------------------------------------------------------------------------------
# small I/O helpers
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# ViT runs (cached) and the geochemistry-only cube
# ------------------------------------------------------------------------------------------------


def geochemistry_cube(cube_path: str | Path, out_path: str | Path, group: str = GEOCHEMISTRY) -> Path:
    """Write the cube's ``group`` bands as a cube of their own (same grid, CRS and valid mask).

    The valid mask is the full cube's, so the ablation is scored and evaluated over the same area.
    Rewritten only when the parent cube changed. Returns ``out_path``.
    """

    cube_path, out_path = Path(cube_path), Path(out_path)
    parent = cube_identity(cube_path)
    if out_path.exists():
        try:
            prov = json.loads(open_cube(out_path).attrs.get("provenance", "{}"))
            if prov.get("parent_id") == parent:
                return out_path
        except (CubeError, json.JSONDecodeError):
            pass
    cube = open_cube(cube_path)
    sources = [str(s) for s in cube["source"].values.tolist()]
    keep = [i for i, s in enumerate(sources) if s == group]
    if not keep:
        raise ConfigError(
            f"the '{group}-only' ablation needs bands with source {group!r}; the cube's source groups are "
            f"{sorted(set(sources))}. Fix: drop 'vit_geochem_only' from the methods (or ablations=False)"
        )
    sub = cube.isel(band=keep)
    chunk = int(max(cube["evidence"].chunks[1][0], cube["evidence"].chunks[2][0]))
    ds = from_arrays(
        sub["evidence"].data,
        bands=[str(b) for b in sub["band"].values.tolist()],
        sources=[sources[i] for i in keep],
        x=cube["x"].values,
        y=cube["y"].values,
        crs=str(cube.rio.crs),
        valid=cube["valid"].data,
        kinds=[str(v) for v in sub["kind"].values.tolist()],
        transforms=[str(v) for v in sub["transform"].values.tolist()],
        scalings=[str(v) for v in sub["scaling"].values.tolist()],
        files=[str(v) for v in sub["file"].values.tolist()],
        chunk=chunk,
        name=f"{cube.attrs.get('name', 'cube')}-{group}",
    )
    prov = json.loads(cube.attrs.get("provenance", "{}") or "{}")
    prov.update({"parent": str(cube_path), "parent_id": parent, "subset": f"source == {group!r}"})
    return write_cube(ds, out_path, provenance=prov)


# ------------------------------------------------------------------------------------------------
# one method, one seed -> a score map
# ------------------------------------------------------------------------------------------------


def _variant_config(cfg: RunConfig, method: str) -> RunConfig:
    if method == "vit_no_fusion":
        return cfg.with_updates(model={"fusion": False})
    if method == "vit_no_mask":
        return cfg.with_updates(model={"mask_ratio": 0.0})
    if method == "vit_geochem_only" and cfg.score.combine:
        combine = {g: w for g, w in cfg.score.combine.items() if g == GEOCHEMISTRY} or None
        return cfg.with_updates(score={"combine": combine})
    return cfg


def _random_map(cube: xr.Dataset, seed: int) -> xr.DataArray:
    valid = np.asarray(cube["valid"].values).astype(bool)
    vals = np.random.default_rng(seed).random(valid.shape).astype("float32")
    vals[~valid] = np.nan
    da = xr.DataArray(
        vals,
        dims=("y", "x"),
        coords={"y": cube["y"].values, "x": cube["x"].values},
        name="score_random",
        attrs={"baseline": REFERENCE, "seed": seed},
    )
    return da.rio.write_crs(cube.rio.crs)


def method_scores(
    method: str,
    cfg: RunConfig,
    out: str | Path,
    seed: int,
    *,
    client=None,
    launcher=None,
    log: Callable[[str], None] = print,
    baseline_options: dict[str, dict] | None = None,
) -> tuple[xr.DataArray, float]:
    """The score map [y, x] of ``method`` with ``seed`` on ``out/cube.zarr``, and its wall seconds.

    Baselines fit in this process (``baseline_options[name]`` are passed to
    :func:`pipeline.evaluation.baselines.score_baseline`); ViT variants are cached runs (:func:`vit_run`).
    """

    out = Path(out)
    cube_path = out / "cube.zarr"
    if method in VIT_VARIANTS:
        if method == "vit_geochem_only":
            cube_path = geochemistry_cube(cube_path, out / "compare" / "cube_geochemistry.zarr")
        score, wall, _ = vit_run(
            cube_path, _variant_config(cfg, method), out / "runs", seed=seed, client=client, launcher=launcher, log=log
        )
        return score, wall
    cube = open_cube(cube_path)
    t0 = time.perf_counter()
    if method == REFERENCE:
        score = _random_map(cube, seed)
    elif method in BASELINES:
        score = score_baseline(method, cube, seed=seed, **(baseline_options or {}).get(method, {}))
    else:
        _check_methods([method])
    return score, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# the comparison
# ------------------------------------------------------------------------------------------------


def _aggregate(method: str, rows: list[dict]) -> dict:
    df = pd.DataFrame(rows)
    n = len(df)

    def mean(c):
        return float(df[c].mean()) if c in df and df[c].notna().any() else float("nan")

    return {
        "method": method,
        "auc_mean": mean("auc"),
        "auc_std": float(df["auc"].std(ddof=1)) if n > 1 else float("nan"),
        "success_rate_area": mean("success_rate_area"),
        "pa_prediction_rate": mean("pa_prediction_rate"),
        "normalised_density": mean("normalised_density"),
        "wall_s": mean("wall_s"),
        "n_seeds": n,
        "kind": _kind(method),
    }


def _warm_imports(methods) -> None:
    """Import the libraries up front, so that the first method's wall time is not an import time."""
    import importlib

    mods = {
        "pca": "sklearn.decomposition",
        "rx": "sklearn.covariance",
        "iforest": "sklearn.ensemble",
        "lof": "sklearn.neighbors",
        "ocsvm": "sklearn.svm",
        "dense_ae": "torch",
        "conv_ae": "torch",
        "vae": "torch",
    }
    for m in methods:
        importlib.import_module(mods.get(m, "pipeline.models.train" if m in VIT_VARIANTS else "numpy"))


def compare_methods(
    cfg: RunConfig,
    out: str | Path,
    *,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    ablations: bool = True,
    client=None,
    launcher=None,
    log: Callable[[str], None] = print,
    baseline_options: dict[str, dict] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score and evaluate every method with every seed on ``out/cube.zarr``.

    Returns ``(table, runs)``: one row per method (:data:`TABLE_COLUMNS`; means over seeds, the AUC's
    sample std over seeds, mean wall seconds per run) and one row per (method, seed).
    """

    if cfg.deposits is None:
        raise ConfigError("the comparison needs known deposits to evaluate against. Fix: add a 'deposits' section")
    methods = _check_methods(list(methods) if methods is not None else default_methods(ablations))
    seeds = check_seeds(seeds)
    _warm_imports(methods)
    runs, table = [], []
    for method in methods:
        rows = []
        for seed in seeds:
            score, wall = method_scores(
                method, cfg, out, seed, client=client, launcher=launcher, log=log, baseline_options=baseline_options
            )
            m = metric_summary(evaluate_scores(cfg, score))
            rows.append({"method": method, "seed": seed, **m, "wall_s": wall})
            log(f"[compare] {method:>16s} seed {seed}: AUC {m['auc']:.3f} ({wall:.1f} s)")
        runs += rows
        table.append(_aggregate(method, rows))
    return pd.DataFrame(table, columns=TABLE_COLUMNS), pd.DataFrame(runs)


def compare_stage(
    cfg: RunConfig,
    out: Path,
    *,
    force: bool = False,
    log=print,
    client=None,
    launcher=None,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    ablations: bool = True,
    baseline_options: dict[str, dict] | None = None,
    ensure_cube: Callable[[], object] | None = None,
) -> dict:
    """Stage: ``DIR/compare/comparison.csv`` and ``comparison.md`` (plus ``runs.csv``, per seed).

    Skipped on a rerun when the config sections it reads, the cube, the methods and the seeds are
    unchanged. ``force`` recomputes the table; ViT runs still come from their cache (:func:`vit_run`). Returns ``{"comparison_csv": Path, "comparison_md": Path}``.
    """

    out = Path(out)
    cdir = out / "compare"
    csv, md, params_path = cdir / "comparison.csv", cdir / "comparison.md", cdir / "params.json"
    ensure_cube_exists(out, ensure_cube)
    methods = _check_methods(list(methods) if methods is not None else default_methods(ablations))
    seeds = check_seeds(seeds)
    params = {
        "methods": methods,
        "seeds": seeds,
        "baseline_options": baseline_options or {},
        "cube": cube_identity(out / "cube.zarr"),
    }
    force = force or params_changed(params_path, params)

    def go():
        table, runs = compare_methods(
            cfg,
            out,
            methods=methods,
            seeds=seeds,
            client=client,
            launcher=launcher,
            log=log,
            baseline_options=baseline_options,
        )
        atomic_write_text(cdir / "runs.csv", runs.to_csv(index=False))
        atomic_write_text(csv, table.to_csv(index=False))
        head = (
            f"# Comparison of methods: {cfg.name}\n\nSame cube, same deposits, same protocol "
            f"({cfg.evaluate.protocol}); seeds {seeds}; means over seeds, auc_std = sample std over seeds; "
            "wall_s = mean seconds per run (fit/train + score, this machine).\n\n"
        )
        atomic_write_text(md, head + markdown_table(table))
        atomic_write_text(params_path, json.dumps(params, indent=1, default=str))

    run_stage("compare", cfg, out, [csv, md], _EVAL_SECTIONS, go, force=force, log=log, upstream=("cube",))
    return {"comparison_csv": csv, "comparison_md": md}


# ------------------------------------------------------------------------------------------------
# reliability: several seeds of the ViT
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# sensitivity to window size and mask ratio
# ------------------------------------------------------------------------------------------------
