"""Comparison of methods and reliability experiments (DESIGN.md section 6).

Every method is scored on the same cube and evaluated by :func:`pipeline.runner.evaluate_scores`
with the run config's deposits and protocol, so raster and point protocols are identical for all.
Deposits are never used for fitting: baselines fit on seeded pixel samples, the ViT on windows.

- :func:`compare_stage` - the seven baselines (:func:`pipeline.baselines.list_baselines`), the ViT of
  the run config and its ablations (no fusion layer, geochemistry-only input, no masking), a random
  map as a reference, each over several seeds: ``DIR/compare/comparison.csv`` and ``.md``.
- :func:`reliability_stage` - the ViT over several seeds: mean and std of the per-run percentile maps
  (the std is the uncertainty map), AUC mean and std, Spearman rank correlation between runs:
  ``DIR/reliability/reliability.zarr``, ``mean.tif``, ``std.tif``, ``reliability.json``.
- :func:`sensitivity_table` - AUC vs window size and mask ratio: ``DIR/reliability/sensitivity.csv``
  and ``.md``.

ViT runs are cached in ``DIR/runs/vit-<key>/`` where the key hashes the model, train and score
sections (seed included) and the cube's identity, so the comparison, the reliability experiment and
the sensitivity table share runs with equal settings, and a rerun retrains nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from .config import RunConfig
from .errors import ConfigError, CubeError
from .io import atomic_path, atomic_write_text

__all__ = [
    "VIT_VARIANTS",
    "REFERENCE",
    "default_methods",
    "vit_run",
    "geochemistry_cube",
    "method_scores",
    "compare_methods",
    "compare_stage",
    "reliability",
    "reliability_stage",
    "sensitivity_table",
    "markdown_table",
]

# ViT variants: the run config's model and the paper's ablations.
VIT_VARIANTS = ("vit", "vit_no_fusion", "vit_geochem_only", "vit_no_mask")
REFERENCE = "random"  # a seeded uniform random map: the AUC 0.5 line, measured
GEOCHEMISTRY = "geochemistry"
TABLE_COLUMNS = ["method", "auc_mean", "auc_std", "success_rate_area", "pa_prediction_rate",
                 "normalised_density", "wall_s", "n_seeds", "kind"]
_EVAL_SECTIONS = ("model", "train", "score", "deposits", "evaluate")


def default_methods(ablations: bool = True) -> list[str]:
    """The seven baselines, the ViT, its ablations (``ablations``) and the random reference."""
    from .baselines import list_baselines

    vit = list(VIT_VARIANTS) if ablations else ["vit"]
    return [*list_baselines(), *vit, REFERENCE]


def _kind(method: str) -> str:
    if method == REFERENCE:
        return "reference"
    if method == "vit":
        return "vit"
    return "ablation" if method in VIT_VARIANTS else "baseline"


def _check_methods(methods: Sequence[str]) -> list[str]:
    from .baselines import BASELINES

    known = [*BASELINES, *VIT_VARIANTS, REFERENCE]
    bad = [m for m in methods if m not in known]
    if bad:
        raise ConfigError(f"unknown comparison method(s) {bad}. Fix: use some of {', '.join(known)}")
    if not methods:
        raise ConfigError(f"no comparison method given. Fix: pass methods among {', '.join(known)}")
    return list(dict.fromkeys(methods))


def _check_seeds(seeds) -> list[int]:
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigError("no seed given for the repeated runs. Fix: pass e.g. seeds=(0, 1, 2)")
    return list(dict.fromkeys(seeds))


# ------------------------------------------------------------------------------------------------
# small I/O helpers
# ------------------------------------------------------------------------------------------------


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _cube_identity(cube_path: Path) -> str:
    """Changes whenever the cube store is rewritten (write_cube renames a new store into place)."""
    meta = Path(cube_path) / "zarr.json"
    if not meta.exists():
        raise CubeError(f"cube {str(cube_path)!r} does not exist. Fix: build it first (`mpm run CONFIG --stages cube`)")
    st = meta.stat()
    return f"{Path(cube_path).resolve()}|{st.st_mtime_ns}|{st.st_size}"


def _atomic_text(path: Path, text: str) -> Path:
    return atomic_write_text(path, text)


def _write_zarr_atomic(ds: xr.Dataset, path: Path) -> Path:
    """Write a small in-memory Dataset as Zarr v3 (``<path>.tmp-*`` then rename; see :mod:`pipeline.io`)."""
    for v in ds.variables.values():
        v.encoding.clear()
    with atomic_path(path) as tmp:
        ds.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False)
    return path


def _open_zarr(path: Path) -> xr.Dataset:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return xr.open_zarr(path, decode_coords="all", consolidated=False, zarr_format=3)


def _params_changed(path: Path, params: dict) -> bool:
    """True when ``path`` (JSON) records other experiment parameters than ``params`` (or none)."""
    try:
        return json.loads(path.read_text()) != json.loads(json.dumps(params, default=str))
    except (FileNotFoundError, json.JSONDecodeError):
        return True


def _nan(v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return v if math.isfinite(v) else float("nan")


def _summary(metrics: dict) -> dict:
    """The comparison's figures from a metrics dict of :func:`pipeline.runner.evaluate_scores`."""
    pa = metrics.get("pa_intersection") or {}
    return {
        "auc": _nan(metrics.get("auc")),
        "auc_buffered_mean": _nan(metrics.get("auc_buffered_mean")),
        "success_rate_area": _nan(metrics.get("success_rate_area")),
        "pa_prediction_rate": _nan(pa.get("prediction_rate")),
        "normalised_density": _nan(metrics.get("normalised_density")),
    }


# ------------------------------------------------------------------------------------------------
# ViT runs (cached) and the geochemistry-only cube
# ------------------------------------------------------------------------------------------------


def _quiet(_event: dict) -> None:
    pass


def vit_run(
    cube_path: str | Path,
    cfg: RunConfig,
    runs_dir: str | Path,
    *,
    seed: int | None = None,
    client=None,
    log: Callable[[str], None] = print,
) -> tuple[xr.DataArray, float, Path]:
    """Train the ViT of ``cfg`` (with ``train.seed = seed``) on a cube and score it; cached.

    Returns ``(prospectivity [y, x] in memory with the cube's CRS, wall seconds of train + score,
    run folder)``. The run folder ``runs_dir/vit-<key>`` holds ``model.pt``, ``prospectivity.zarr``
    and ``run.json``; a call with the same settings and cube loads them instead of retraining, and an
    interrupted run resumes from its ``checkpoint.pt``. Delete ``runs_dir`` to retrain from scratch.
    ``client``: train and score on that Dask cluster (None = in this process).
    """
    from .cube import open_cube
    from .score import score_cube
    from .train import train

    cube_path = Path(cube_path)
    if seed is not None:
        cfg = cfg.with_updates(train={"seed": int(seed)})
    data = cfg.model_dump(mode="json")
    key = _hash({"model": data["model"], "train": data["train"], "score": data["score"],
                 "cube": _cube_identity(cube_path)})
    run_dir = Path(runs_dir) / f"vit-{key}"
    zpath, info_path = run_dir / "prospectivity.zarr", run_dir / "run.json"
    if info_path.exists() and zpath.exists():
        info = json.loads(info_path.read_text())
        score = _open_zarr(zpath)["prospectivity"].load()
        return score.rio.write_crs(score.rio.crs), float(info["wall_s"]), run_dir
    # an interrupted run with this key resumes from its checkpoint.pt (same settings, same cube)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = train(cube_path, cfg, run_dir, client=client, progress=_quiet)
    cube = open_cube(cube_path)
    ds = score_cube(cube, model, cfg.score, model_cfg_window=cfg.model.window,
                    gpu=client is not None and cfg.cluster.gpus_per_worker > 0)
    score = ds["prospectivity"].compute()
    wall = time.perf_counter() - t0
    out = xr.Dataset({"prospectivity": score.drop_vars("spatial_ref", errors="ignore")})
    out = out.rio.write_crs(cube.rio.crs)
    out["prospectivity"] = out["prospectivity"].rio.write_grid_mapping("spatial_ref")
    _write_zarr_atomic(out, zpath)
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # the optimizer state is not needed any more
    _atomic_text(info_path, json.dumps({"wall_s": wall, "seed": cfg.train.seed, "cube": str(cube_path),
                                        "model": data["model"], "train": data["train"], "score": data["score"]},
                                       indent=1))
    log(f"[vit] trained and scored in {wall:.1f} s -> {run_dir.name} (seed {cfg.train.seed})")
    return score.rio.write_crs(cube.rio.crs), wall, run_dir


def geochemistry_cube(cube_path: str | Path, out_path: str | Path, group: str = GEOCHEMISTRY) -> Path:
    """Write the cube's ``group`` bands as a cube of their own (same grid, CRS and valid mask).

    The valid mask is the full cube's, so the ablation is scored and evaluated over the same area.
    Rewritten only when the parent cube changed. Returns ``out_path``.
    """
    from .cube import from_arrays, open_cube, write_cube

    cube_path, out_path = Path(cube_path), Path(out_path)
    parent = _cube_identity(cube_path)
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
        sub["evidence"].data, bands=[str(b) for b in sub["band"].values.tolist()],
        sources=[sources[i] for i in keep], x=cube["x"].values, y=cube["y"].values, crs=str(cube.rio.crs),
        valid=cube["valid"].data, kinds=[str(v) for v in sub["kind"].values.tolist()],
        transforms=[str(v) for v in sub["transform"].values.tolist()],
        scalings=[str(v) for v in sub["scaling"].values.tolist()],
        files=[str(v) for v in sub["file"].values.tolist()], chunk=chunk, name=f"{cube.attrs.get('name', 'cube')}-{group}",
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
    da = xr.DataArray(vals, dims=("y", "x"), coords={"y": cube["y"].values, "x": cube["x"].values},
                      name="score_random", attrs={"baseline": REFERENCE, "seed": seed})
    return da.rio.write_crs(cube.rio.crs)


def method_scores(
    method: str,
    cfg: RunConfig,
    out: str | Path,
    seed: int,
    *,
    client=None,
    log: Callable[[str], None] = print,
    baseline_options: dict[str, dict] | None = None,
) -> tuple[xr.DataArray, float]:
    """The score map [y, x] of ``method`` with ``seed`` on ``out/cube.zarr``, and its wall seconds.

    Baselines fit in this process (``baseline_options[name]`` are passed to
    :func:`pipeline.baselines.score_baseline`); ViT variants are cached runs (:func:`vit_run`).
    """
    from .baselines import BASELINES, score_baseline
    from .cube import open_cube

    out = Path(out)
    cube_path = out / "cube.zarr"
    if method in VIT_VARIANTS:
        if method == "vit_geochem_only":
            cube_path = geochemistry_cube(cube_path, out / "compare" / "cube_geochemistry.zarr")
        score, wall, _ = vit_run(cube_path, _variant_config(cfg, method), out / "runs", seed=seed,
                                 client=client, log=log)
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

    mods = {"pca": "sklearn.decomposition", "rx": "sklearn.covariance", "iforest": "sklearn.ensemble",
            "lof": "sklearn.neighbors", "ocsvm": "sklearn.svm", "dense_ae": "torch", "conv_ae": "torch",
            "vae": "torch"}
    for m in methods:
        importlib.import_module(mods.get(m, "pipeline.train" if m in VIT_VARIANTS else "numpy"))


def compare_methods(
    cfg: RunConfig,
    out: str | Path,
    *,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    ablations: bool = True,
    client=None,
    log: Callable[[str], None] = print,
    baseline_options: dict[str, dict] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score and evaluate every method with every seed on ``out/cube.zarr``.

    Returns ``(table, runs)``: one row per method (:data:`TABLE_COLUMNS`; means over seeds, the AUC's
    sample std over seeds, mean wall seconds per run) and one row per (method, seed).
    """
    from .runner import evaluate_scores

    if cfg.deposits is None:
        raise ConfigError("the comparison needs known deposits to evaluate against. Fix: add a 'deposits' section")
    methods = _check_methods(list(methods) if methods is not None else default_methods(ablations))
    seeds = _check_seeds(seeds)
    _warm_imports(methods)
    runs, table = [], []
    for method in methods:
        rows = []
        for seed in seeds:
            score, wall = method_scores(method, cfg, out, seed, client=client, log=log,
                                        baseline_options=baseline_options)
            m = _summary(evaluate_scores(cfg, score))
            rows.append({"method": method, "seed": seed, **m, "wall_s": wall})
            log(f"[compare] {method:>16s} seed {seed}: AUC {m['auc']:.3f} ({wall:.1f} s)")
        runs += rows
        table.append(_aggregate(method, rows))
    return pd.DataFrame(table, columns=TABLE_COLUMNS), pd.DataFrame(runs)


def _fmt(v, digits: int = 3) -> str:
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "-" if not math.isfinite(v) else f"{v:.{digits}f}"
    return str(v).replace("|", "\\|")


def markdown_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table of ``df`` (NaN as '-'), without extra dependencies."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v, digits) for v in row) + " |")
    return "\n".join(lines) + "\n"


def compare_stage(
    cfg: RunConfig,
    out: Path,
    *,
    force: bool = False,
    log=print,
    client=None,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    ablations: bool = True,
    baseline_options: dict[str, dict] | None = None,
) -> dict:
    """Stage: ``DIR/compare/comparison.csv`` and ``comparison.md`` (plus ``runs.csv``, per seed).

    Skipped on a rerun when the config sections it reads, the cube, the methods and the seeds are
    unchanged. ``force`` recomputes the table; ViT runs still come from their cache (:func:`vit_run`). Returns ``{"comparison_csv": Path, "comparison_md": Path}``.
    """
    from .runner import build_cube_stage, run_stage

    out = Path(out)
    cdir = out / "compare"
    csv, md, params_path = cdir / "comparison.csv", cdir / "comparison.md", cdir / "params.json"
    if not (out / "cube.zarr").exists():
        build_cube_stage(cfg, out, force=False, progress=False, log=log)
    methods = _check_methods(list(methods) if methods is not None else default_methods(ablations))
    seeds = _check_seeds(seeds)
    params = {"methods": methods, "seeds": seeds, "baseline_options": baseline_options or {},
              "cube": _cube_identity(out / "cube.zarr")}
    force = force or _params_changed(params_path, params)

    def go():
        table, runs = compare_methods(cfg, out, methods=methods, seeds=seeds, client=client, log=log,
                                      baseline_options=baseline_options)
        _atomic_text(cdir / "runs.csv", runs.to_csv(index=False))
        _atomic_text(csv, table.to_csv(index=False))
        head = (f"# Comparison of methods: {cfg.name}\n\nSame cube, same deposits, same protocol "
                f"({cfg.evaluate.protocol}); seeds {seeds}; means over seeds, auc_std = sample std over seeds; "
                "wall_s = mean seconds per run (fit/train + score, this machine).\n\n")
        _atomic_text(md, head + markdown_table(table))
        _atomic_text(params_path, json.dumps(params, indent=1, default=str))

    run_stage("compare", cfg, out, [csv, md], _EVAL_SECTIONS, go, force=force, log=log, upstream=("cube",))
    return {"comparison_csv": csv, "comparison_md": md}


# ------------------------------------------------------------------------------------------------
# reliability: several seeds of the ViT
# ------------------------------------------------------------------------------------------------


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
    from .runner import evaluate_scores

    seeds = _check_seeds(seeds)
    out = Path(out)
    maps, walls, per_run = [], [], []
    template = None
    for seed in seeds:
        score, wall, run_dir = vit_run(out / "cube.zarr", cfg, out / "runs", seed=seed, client=client, log=log)
        template = score if template is None else template
        maps.append(np.asarray(score.values, dtype="float64"))
        walls.append(wall)
        m = _summary(evaluate_scores(cfg, score)) if cfg.deposits is not None else {}
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
        ds = xr.Dataset({
            "mean": da(pct.mean(axis=0), "mean percentile rank over runs (0..1)"),
            "std": da(pct.std(axis=0, ddof=ddof), "std of the percentile rank over runs (uncertainty)"),
            "score_mean": da(np.where(valid, stack, np.nan).mean(axis=0), "mean reconstruction error over runs"),
            "score_std": da(np.where(valid, stack, np.nan).std(axis=0, ddof=ddof), "std of the reconstruction error"),
            "valid": xr.DataArray(valid.astype("uint8"), dims=("y", "x"), coords=coords),
        }, attrs={"seeds": json.dumps(seeds), "mpm_product": "reliability"})
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
        "auc_of_mean_map": _summary(evaluate_scores(cfg, ds["mean"].where(ds["valid"] > 0))).get("auc")
        if cfg.deposits is not None else None,
        "spearman": rho.tolist(),
        "spearman_mean": float(off.mean()) if off.size else 1.0,
        "spearman_min": float(off.min()) if off.size else 1.0,
        "spearman_pixels": int(min(max_pixels, int(valid.sum()))),
        "uncertainty_mean": float(np.nanmean(ds["std"].values)),
        "wall_s": walls,
    }
    return ds, summary


def reliability_stage(cfg: RunConfig, out: Path, *, seeds=(0, 1, 2), force: bool = False, log=print,
                      client=None) -> dict:
    """Stage: ``DIR/reliability/reliability.zarr`` (mean, std, score_mean, score_std), ``mean.tif``,
    ``std.tif`` (COGs) and ``reliability.json``. Skipped on a rerun with the same settings and seeds.
    """
    from .evaluate import write_metrics
    from .runner import build_cube_stage, run_stage
    from .sinks import write_cog

    out = Path(out)
    rdir = out / "reliability"
    paths = {"reliability_zarr": rdir / "reliability.zarr", "mean_tif": rdir / "mean.tif",
             "std_tif": rdir / "std.tif", "reliability_json": rdir / "reliability.json"}
    if not (out / "cube.zarr").exists():
        build_cube_stage(cfg, out, force=False, progress=False, log=log)
    seeds = _check_seeds(seeds)
    params = {"seeds": seeds, "cube": _cube_identity(out / "cube.zarr")}
    force = force or _params_changed(rdir / "params.json", params)

    def go():
        ds, summary = reliability(cfg, out, seeds=seeds, client=client, log=log)
        _write_zarr_atomic(ds, paths["reliability_zarr"])
        written = _open_zarr(paths["reliability_zarr"])
        write_cog(written["mean"], paths["mean_tif"])
        write_cog(written["std"], paths["std_tif"])
        write_metrics(summary, paths["reliability_json"])
        _atomic_text(rdir / "params.json", json.dumps(params, indent=1))
        log(f"[reliability] AUC {summary['auc_mean']:.3f} +- {summary['auc_std']:.3f} over seeds {seeds}; "
            f"Spearman between runs {summary['spearman_mean']:.3f}")

    run_stage("reliability", cfg, out, list(paths.values()), ("model", "train", "score", "deposits", "evaluate"),
              go, force=force, log=log, upstream=("cube",))
    return paths


# ------------------------------------------------------------------------------------------------
# sensitivity to window size and mask ratio
# ------------------------------------------------------------------------------------------------


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
) -> Path:
    """AUC vs window size x mask ratio (one ViT run each, ``seed`` default ``cfg.train.seed``).

    Writes ``DIR/reliability/sensitivity.csv`` (one row per pair: window, mask_ratio, auc,
    success_rate_area, normalised_density, wall_s) and ``sensitivity.md`` (AUC, windows as rows, mask
    ratios as columns). The score stride is ``min(score.stride, window)``. A window that is not a
    multiple of ``model.patch`` is rejected. Returns the CSV path.
    """
    from .runner import build_cube_stage, evaluate_scores, run_stage

    out = Path(out)
    rdir = out / "reliability"
    csv, md = rdir / "sensitivity.csv", rdir / "sensitivity.md"
    windows = [int(w) for w in windows]
    mask_ratios = [float(m) for m in mask_ratios]
    bad = [w for w in windows if w < cfg.model.patch or w % cfg.model.patch]
    if bad:
        raise ConfigError(f"sensitivity windows {bad} are not multiples of model.patch={cfg.model.patch}. "
                          f"Fix: use multiples of {cfg.model.patch}, e.g. {[cfg.model.patch * k for k in (2, 4, 8)]}")
    bad = [m for m in mask_ratios if not 0 <= m < 1]
    if bad:
        raise ConfigError(f"sensitivity mask ratios {bad} must lie in [0, 1). Fix: e.g. (0.0, 0.25, 0.5, 0.75)")
    if cfg.deposits is None:
        raise ConfigError("the sensitivity table needs known deposits. Fix: add a 'deposits' section")
    seed = cfg.train.seed if seed is None else int(seed)
    if not (out / "cube.zarr").exists():
        build_cube_stage(cfg, out, force=False, progress=False, log=log)
    params = {"windows": windows, "mask_ratios": mask_ratios, "seed": seed, "cube": _cube_identity(out / "cube.zarr")}
    force = force or _params_changed(rdir / "sensitivity_params.json", params)

    def go():
        rows = []
        for w in windows:
            for m in mask_ratios:
                c = cfg.with_updates(model={"window": w, "mask_ratio": m}, score={"stride": min(cfg.score.stride, w)})
                score, wall, _ = vit_run(out / "cube.zarr", c, out / "runs", seed=seed, client=client, log=log)
                s = _summary(evaluate_scores(cfg, score))
                rows.append({"window": w, "mask_ratio": m, "auc": s["auc"], "success_rate_area": s["success_rate_area"],
                             "normalised_density": s["normalised_density"], "wall_s": wall})
                log(f"[sensitivity] window {w}, mask ratio {m:g}: AUC {s['auc']:.3f}")
        df = pd.DataFrame(rows)
        _atomic_text(csv, df.to_csv(index=False))
        pivot = df.pivot(index="window", columns="mask_ratio", values="auc")
        pivot.columns = [f"mask {c:g}" for c in pivot.columns]
        pivot = pivot.reset_index()
        head = (f"# Sensitivity: ROC AUC vs window size and mask ratio ({cfg.name}, seed {seed})\n\n"
                f"Rows: window (pixels); columns: mask ratio. Patch {cfg.model.patch}, score stride "
                f"min({cfg.score.stride}, window); other settings from the run config.\n\n")
        _atomic_text(md, head + markdown_table(pivot))
        _atomic_text(rdir / "sensitivity_params.json", json.dumps(params, indent=1))

    run_stage("sensitivity", cfg, out, [csv, md], ("model", "train", "score", "deposits", "evaluate"), go,
              force=force, log=log, upstream=("cube",))
    return csv
