"""Comparison of methods (DESIGN.md section 6): the baselines, the ViT and its ablations on one cube.

Every method is scored on the same cube and evaluated by :func:`pipeline.evaluation.evaluate.evaluate_scores`
with the run config's deposits and protocol, so raster and point protocols are identical for all.
Deposits are never used for fitting: baselines fit on seeded pixel samples, the ViT on windows.

:func:`compare_stage` - the seven baselines (:func:`pipeline.evaluation.baselines.list_baselines`), the focal
controls (rx and isolation forest on a focal mean + std stack at the model window), the ViT of the run config
and its ablations (no fusion layer, geochemistry-only input, no masking), a random map as a reference, each
over several seeds: ``DIR/compare/comparison.csv`` and ``.md``. The repeated-seed and sensitivity
experiments are in :mod:`pipeline.evaluation.reliability`.

Honest comparison:

- every method is paired with the ViT of the same seed on the same cells
  (:func:`pipeline.evaluation.evaluate.paired_scores`): AUC difference, DeLong's p, and a spatial block
  bootstrap CI; the table shows them for the first seed (``runs.csv`` for every seed);
- the deep baselines get the ViT's training budget: as many training examples (windows for conv_ae, pixels
  for dense_ae and vae) as the ViT saw windows, unless their ``steps`` are given; ``train_examples`` says it;
- with a ``target:`` section, every baseline also runs on the pathfinder bands only (``<method>_<commodity>``),
  beside ``pathfinders_<commodity>`` (the pathfinders' own enrichment, no model) and the ViT's
  ``prospectivity_<commodity>`` when its scorer writes one; ``pca_<commodity>`` is the enrichment of the
  pathfinders' PCA residuals against all bands (:func:`pipeline.evaluation.baselines.pca_enrichment`), the
  combination the ViT's target map uses (the other methods give no per-band residual).
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
from pipeline.data.cube import from_arrays, normalised, open_cube, write_cube
from pipeline.data.pathfinders import resolve_target
from pipeline.errors import ConfigError, CubeError
from pipeline.evaluation.baselines import (
    BASELINES,
    FOCAL_BASELINES,
    TORCH_BASELINES,
    list_baselines,
    pca_enrichment,
    score_baseline,
)
from pipeline.evaluation.evaluate import evaluate_scores, paired_scores
from pipeline.evaluation.experiments import (
    check_seeds,
    cube_identity,
    ensure_cube_exists,
    markdown_table,
    metric_summary,
    params_changed,
    vit_run,
    vit_train_windows,
)
from pipeline.io import atomic_write_text
from pipeline.scoring.enrichment import enrichment_score
from pipeline.stages import run_stage

__all__ = [
    "VIT_VARIANTS",
    "REFERENCE",
    "default_methods",
    "geochemistry_cube",
    "subset_cube",
    "target_methods",
    "deep_budget_options",
    "method_scores",
    "paired_summary",
    "compare_methods",
    "compare_stage",
]

# ViT variants: the run config's model and the paper's ablations.
VIT_VARIANTS = ("vit", "vit_no_fusion", "vit_geochem_only", "vit_no_mask")
REFERENCE = "random"  # a seeded uniform random map: the AUC 0.5 line, measured
PATHFINDERS = "pathfinders"  # target rows: enrichment of the normalised pathfinder bands, no model
GEOCHEMISTRY = "geochemistry"
PAIRED_COLUMNS = ["d_auc", "ci_low", "ci_high", "p_delong", "p_boot"]
TABLE_COLUMNS = [
    "method",
    "auc_mean",
    "auc_std",
    *PAIRED_COLUMNS,
    "auc_buffered_mean",
    "pa_prediction_rate",
    "normalised_density",
    "train_examples",
    "wall_s",
    "n_seeds",
    "kind",
]
_EVAL_SECTIONS = ("model", "train", "score", "deposits", "evaluate", "target")


def default_methods(ablations: bool = True, focal: bool = True) -> list[str]:
    """The seven baselines, the focal controls (``focal``), the ViT, its ablations (``ablations``) and the
    random reference."""

    vit = list(VIT_VARIANTS) if ablations else ["vit"]
    return [*list_baselines(focal=focal), *vit, REFERENCE]


def _split_target(method: str, commodity: str | None) -> tuple[str, bool]:
    """``rx_Au`` -> (``rx``, True) when the target commodity is Au; else (method, False)."""
    if commodity and method.endswith(f"_{commodity}"):
        return method[: -len(commodity) - 1], True
    return method, False


def _kind(method: str, commodity: str | None = None) -> str:
    base, is_target = _split_target(method, commodity)
    if is_target:
        return "target"
    if method == REFERENCE:
        return "reference"
    if method == "vit":
        return "vit"
    if method in FOCAL_BASELINES:
        return "focal control"
    return "ablation" if method in VIT_VARIANTS else "baseline"


def _check_methods(methods: Sequence[str], commodity: str | None = None) -> list[str]:
    known = [*BASELINES, *VIT_VARIANTS, REFERENCE]
    if commodity:
        known += [f"{m}_{commodity}" for m in (*BASELINES, "vit", PATHFINDERS)]
    bad = [m for m in methods if m not in known]
    if bad:
        raise ConfigError(f"unknown comparison method(s) {bad}. Fix: use some of {', '.join(known)}")
    if not methods:
        raise ConfigError(f"no comparison method given. Fix: pass methods among {', '.join(known)}")
    return list(dict.fromkeys(methods))


def target_methods(cfg: RunConfig, methods: Sequence[str]) -> list[str]:
    """The target-aware rows for ``cfg.target``: the pathfinders' own enrichment, each baseline of
    ``methods`` on the pathfinder bands, and the ViT's target map (when ``vit`` is among ``methods``)."""
    if cfg.target is None:
        return []
    c = cfg.target.commodity
    rows = [f"{PATHFINDERS}_{c}"] + [f"{m}_{c}" for m in methods if m in BASELINES]
    return rows + ([f"vit_{c}"] if "vit" in methods else [])


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

    cube = open_cube(cube_path)
    sources = [str(s) for s in cube["source"].values.tolist()]
    keep = [str(b) for b, s in zip(cube["band"].values.tolist(), sources) if s == group]
    if not keep:
        raise ConfigError(
            f"the '{group}-only' ablation needs bands with source {group!r}; the cube's source groups are "
            f"{sorted(set(sources))}. Fix: drop 'vit_geochem_only' from the methods (or ablations=False)"
        )
    return subset_cube(cube_path, out_path, keep, f"source == {group!r}", group)


def subset_cube(cube_path: str | Path, out_path: str | Path, bands: Sequence[str], why: str, label: str) -> Path:
    """Write ``bands`` of a cube as a cube of their own (same grid, CRS and valid mask); ``why`` is recorded.

    Rewritten only when the parent cube or the band list changed. Returns ``out_path``.
    """

    cube_path, out_path = Path(cube_path), Path(out_path)
    parent = cube_identity(cube_path)
    if out_path.exists():
        try:
            prov = json.loads(open_cube(out_path).attrs.get("provenance", "{}"))
            if prov.get("parent_id") == parent and prov.get("bands") == list(bands):
                return out_path
        except (CubeError, json.JSONDecodeError):
            pass
    cube = open_cube(cube_path)
    all_bands = [str(b) for b in cube["band"].values.tolist()]
    keep = [all_bands.index(b) for b in bands]
    sub = cube.isel(band=keep)
    chunk = int(max(cube["evidence"].chunks[1][0], cube["evidence"].chunks[2][0]))
    ds = from_arrays(
        sub["evidence"].data,
        bands=list(bands),
        sources=[str(v) for v in sub["source"].values.tolist()],
        x=cube["x"].values,
        y=cube["y"].values,
        crs=str(cube.rio.crs),
        valid=cube["valid"].data,
        kinds=[str(v) for v in sub["kind"].values.tolist()],
        transforms=[str(v) for v in sub["transform"].values.tolist()],
        scalings=[str(v) for v in sub["scaling"].values.tolist()],
        files=[str(v) for v in sub["file"].values.tolist()],
        chunk=chunk,
        name=f"{cube.attrs.get('name', 'cube')}-{label}",
    )
    prov = json.loads(cube.attrs.get("provenance", "{}") or "{}")
    prov.update({"parent": str(cube_path), "parent_id": parent, "subset": why, "bands": list(bands)})
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


def _target_cube(cfg: RunConfig, out: Path) -> Path:
    """The pathfinder bands of ``out/cube.zarr`` as a cube of their own (``compare/cube_<commodity>.zarr``)."""
    cube_path = out / "cube.zarr"
    bands = resolve_target(cfg.target, [str(b) for b in open_cube(cube_path)["band"].values.tolist()])
    c = cfg.target.commodity
    return subset_cube(cube_path, out / "compare" / f"cube_{c}.zarr", bands, f"pathfinders of {c}", c)


def _pathfinder_map(cube: xr.Dataset, name: str) -> xr.DataArray:
    """Enrichment of the cube's (pathfinder) bands themselves: robust z-scores, no model."""
    valid = np.asarray(cube["valid"].values).astype(bool)
    z = normalised(cube, fill=np.nan).compute()
    score = enrichment_score(z, [str(b) for b in z["band"].values.tolist()])
    values = np.where(valid, np.asarray(score.values, dtype="float32"), np.nan)
    da = xr.DataArray(
        values, dims=("y", "x"), coords={"y": cube["y"].values, "x": cube["x"].values}, name=f"score_{name}"
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
    Target rows (``<method>_<commodity>``, see :func:`target_methods`) use the pathfinder bands only.
    """

    out = Path(out)
    cube_path = out / "cube.zarr"
    commodity = cfg.target.commodity if cfg.target is not None else None
    base, is_target = _split_target(method, commodity)
    if is_target and base == "vit":
        score, wall, _ = vit_run(
            cube_path,
            cfg,
            out / "runs",
            seed=seed,
            client=client,
            launcher=launcher,
            log=log,
            variable=f"prospectivity_{commodity}",
        )
        return score, wall
    if method in VIT_VARIANTS:
        if method == "vit_geochem_only":
            cube_path = geochemistry_cube(cube_path, out / "compare" / "cube_geochemistry.zarr")
        score, wall, _ = vit_run(
            cube_path, _variant_config(cfg, method), out / "runs", seed=seed, client=client, launcher=launcher, log=log
        )
        return score, wall
    if is_target and base == "pca":  # residuals against all bands: the ViT's enrichment combination
        cube = open_cube(cube_path)
        t0 = time.perf_counter()
        bands = resolve_target(cfg.target, [str(b) for b in cube["band"].values.tolist()])
        opts = {k: v for k, v in (baseline_options or {}).get("pca", {}).items() if k == "variance"}
        return pca_enrichment(cube, bands, seed=seed, **opts), time.perf_counter() - t0
    if is_target:
        cube_path = _target_cube(cfg, out)
    cube = open_cube(cube_path)
    t0 = time.perf_counter()
    if is_target and base == PATHFINDERS:
        score = _pathfinder_map(cube, method)
    elif method == REFERENCE:
        score = _random_map(cube, seed)
    elif base in BASELINES:
        score = score_baseline(base, cube, seed=seed, **(baseline_options or {}).get(base, {}))
    else:
        _check_methods([method], commodity)
    return score, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# equal training budgets
# ------------------------------------------------------------------------------------------------

# batch sizes of the deep baselines (their fitters' defaults), to turn a budget of examples into steps
_BATCH = {"dense_ae": 256, "vae": 256, "conv_ae": 16}


def deep_budget_options(baseline_options: dict[str, dict] | None, examples: int | None) -> dict[str, dict]:
    """``baseline_options`` with ``steps`` of each deep baseline set so that it sees ``examples`` training
    examples (windows for conv_ae, pixels for dense_ae and vae), the ViT's number of training windows.

    Options that give ``steps`` explicitly win; ``examples`` None leaves the fitters' defaults.
    """
    opts = {k: dict(v) for k, v in (baseline_options or {}).items()}
    if not examples:
        return opts
    for name in TORCH_BASELINES:
        o = opts.setdefault(name, {})
        if "steps" not in o:
            batch = int(o.get("batch_size", _BATCH[name]))
            o["steps"] = max(1, -(-int(examples) // batch))
    return opts


def _train_examples(method: str, score: xr.DataArray, vit_windows: int | None) -> float:
    """Training examples a method saw: steps x batch for the deep ones, pixels fitted for the others."""
    a = score.attrs
    if method == "vit":
        return float(vit_windows) if vit_windows else float("nan")
    if method in TORCH_BASELINES:
        return float(a["steps"]) * float(a["batch_size"])
    return float(a.get("n_fit", a.get("n_train", float("nan"))))


# ------------------------------------------------------------------------------------------------
# the comparison
# ------------------------------------------------------------------------------------------------


def _nan_mean(df: pd.DataFrame, c: str) -> float:
    return float(df[c].mean()) if c in df and df[c].notna().any() else float("nan")


def _aggregate(method: str, rows: list[dict], commodity: str | None) -> dict:
    df = pd.DataFrame(rows)
    n = len(df)
    first = df.sort_values("seed").iloc[0] if n else {}

    def firstv(c):
        v = first.get(c) if n else None
        return float(v) if v is not None and pd.notna(v) else float("nan")

    return {
        "method": method,
        "auc_mean": _nan_mean(df, "auc"),
        "auc_std": float(df["auc"].std(ddof=1)) if n > 1 else float("nan"),
        **{c: firstv(c) for c in PAIRED_COLUMNS},
        "auc_buffered_mean": _nan_mean(df, "auc_buffered_mean"),
        "pa_prediction_rate": _nan_mean(df, "pa_prediction_rate"),
        "normalised_density": _nan_mean(df, "normalised_density"),
        "train_examples": _nan_mean(df, "train_examples"),
        "wall_s": _nan_mean(df, "wall_s"),
        "n_seeds": n,
        "kind": _kind(method, commodity),
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
        "rx_focal": "scipy.ndimage",
        "iforest_focal": "sklearn.ensemble",
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
    focal: bool = True,
    n_boot: int = 1000,
    client=None,
    launcher=None,
    log: Callable[[str], None] = print,
    baseline_options: dict[str, dict] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score and evaluate every method with every seed on ``out/cube.zarr``, each paired with the ViT.

    ``methods`` None = :func:`default_methods` plus, with a ``target:`` section, :func:`target_methods`.
    The ViT of each seed runs first (cached): it is the reference of the paired columns
    (:data:`PAIRED_COLUMNS`, method - ViT) and its training windows set the deep baselines' budget
    (:func:`deep_budget_options`). Returns ``(table, runs)``: one row per method (:data:`TABLE_COLUMNS`;
    means over seeds, the AUC's sample std over seeds, paired figures of the first seed) and one row
    per (method, seed).
    """

    if cfg.deposits is None:
        raise ConfigError("the comparison needs known deposits to evaluate against. Fix: add a 'deposits' section")
    out = Path(out)
    commodity = cfg.target.commodity if cfg.target is not None else None
    if methods is None:
        methods = default_methods(ablations, focal)
        methods += target_methods(cfg, methods)
    methods = _check_methods(list(methods), commodity)
    seeds = check_seeds(seeds)
    _warm_imports(methods)
    has_vit = "vit" in methods
    runs: list[dict] = []
    for seed in seeds:
        ref, vit_windows = None, None
        if has_vit:
            ref, _, run_dir = vit_run(
                out / "cube.zarr", cfg, out / "runs", seed=seed, client=client, launcher=launcher, log=log
            )
            vit_windows = vit_train_windows(run_dir)
        options = deep_budget_options(baseline_options, vit_windows)
        for method in methods:
            try:
                score, wall = method_scores(
                    method, cfg, out, seed, client=client, launcher=launcher, log=log, baseline_options=options
                )
            except KeyError as exc:  # a target map the scorer does not write (yet)
                log(f"[compare] {method:>16s} seed {seed}: skipped ({exc})")
                continue
            m = metric_summary(evaluate_scores(cfg, score))
            paired = {c: float("nan") for c in PAIRED_COLUMNS}
            if ref is not None and method != "vit":
                p = paired_scores(cfg, score, ref, n_boot=n_boot)
                paired = {c: p[c] for c in PAIRED_COLUMNS}
            ex = _train_examples(_split_target(method, commodity)[0], score, vit_windows)
            runs.append({"method": method, "seed": seed, **m, **paired, "train_examples": ex, "wall_s": wall})
            extra = (
                f", vs vit {paired['d_auc']:+.3f} (p {paired['p_delong']:.3g})" if np.isfinite(paired["d_auc"]) else ""
            )
            log(f"[compare] {method:>16s} seed {seed}: AUC {m['auc']:.3f}{extra} ({wall:.1f} s)")
    runs_df = pd.DataFrame(runs)
    done = [m for m in methods if len(runs_df) and (runs_df["method"] == m).any()]
    table = [_aggregate(m, runs_df[runs_df["method"] == m].to_dict("records"), commodity) for m in done]
    return pd.DataFrame(table, columns=TABLE_COLUMNS), runs_df


def paired_summary(table: pd.DataFrame, seed: int) -> str:
    """The paired results as text for the terminal: one line per method against the ViT."""
    lines = [f"Paired against the ViT (seed {seed}, same cells): AUC difference, 95 % block-bootstrap CI, p-values"]
    for r in table.itertuples(index=False):
        if r.method == "vit" or not np.isfinite(r.d_auc):
            continue
        lines.append(
            f"  {r.method:>18s}  AUC {r.auc_mean:.3f}  d {r.d_auc:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]  "
            f"p_DeLong {r.p_delong:.3g}  p_boot {r.p_boot:.3g}"
        )
    return "\n".join(lines)


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
    focal: bool = True,
    n_boot: int = 1000,
    baseline_options: dict[str, dict] | None = None,
    ensure_cube: Callable[[], object] | None = None,
) -> dict:
    """Stage: ``DIR/compare/comparison.csv`` and ``comparison.md`` (plus ``runs.csv``, per seed).

    Prints (``log``) the paired results of every method against the ViT. Skipped on a rerun when the
    config sections it reads, the cube, the methods and the seeds are unchanged. ``force`` recomputes the
    table; ViT runs still come from their cache (:func:`vit_run`). Returns ``{"comparison_csv": Path,
    "comparison_md": Path}``.
    """

    out = Path(out)
    cdir = out / "compare"
    csv, md, params_path = cdir / "comparison.csv", cdir / "comparison.md", cdir / "params.json"
    ensure_cube_exists(out, ensure_cube)
    commodity = cfg.target.commodity if cfg.target is not None else None
    if methods is None:
        methods = default_methods(ablations, focal)
        methods += target_methods(cfg, methods)
    methods = _check_methods(list(methods), commodity)
    seeds = check_seeds(seeds)
    params = {
        "methods": methods,
        "seeds": seeds,
        "n_boot": n_boot,
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
            n_boot=n_boot,
            client=client,
            launcher=launcher,
            log=log,
            baseline_options=baseline_options,
        )
        atomic_write_text(cdir / "runs.csv", runs.to_csv(index=False))
        atomic_write_text(csv, table.to_csv(index=False))
        block = cfg.evaluate.block or cfg.model.window
        head = (
            f"# Comparison of methods: {cfg.name}\n\nSame cube, same deposits, same protocol "
            f"({cfg.evaluate.protocol}); seeds {seeds}; means over seeds, auc_std = sample std over seeds; "
            "wall_s = mean seconds per run (fit/train + score, this machine).\n\n"
            f"Paired with the ViT of seed {seeds[0]} on the same cells: d_auc = AUC(method) - AUC(vit); "
            f"ci_low/ci_high = 95 % spatial block bootstrap ({block} x {block}-cell blocks, {n_boot} replicates); "
            "p_delong = DeLong's test for correlated AUCs (assumes independent cells), p_boot = the bootstrap's. "
            "With few deposits, differences inside the CI are noise; with fewer than about 10 deposit cells the "
            "bootstrap understates the uncertainty (every replicate reuses the same few deposits): read p_delong.\n\n"
            "train_examples: training examples seen (ViT and conv_ae: windows; dense_ae and vae: pixels, "
            "their steps set to see as many examples as the ViT saw windows; other methods: pixels fitted). "
            "Focal controls: rx / isolation forest on each band's focal mean and std over the model window.\n\n"
        )
        if commodity:
            head += (
                f"Target {commodity} ({cfg.target.deposit_model or 'default deposit model'}): rows "
                f"`<method>_{commodity}` use the pathfinder bands only; `pathfinders_{commodity}` is their mean "
                f"positive robust z-score (no model); `pca_{commodity}` the mean positive standardised PCA residual "
                "of the pathfinders against all bands.\n\n"
            )
        atomic_write_text(md, head + markdown_table(table))
        atomic_write_text(params_path, json.dumps(params, indent=1, default=str))
        log(paired_summary(table, seeds[0]))

    run_stage("compare", cfg, out, [csv, md], _EVAL_SECTIONS, go, force=force, log=log, upstream=("cube",))
    return {"comparison_csv": csv, "comparison_md": md}
