"""What every experiment shares: cached ViT runs, experiment parameters, and the figures they report.

ViT runs are cached in ``DIR/runs/vit-<key>/`` where the key hashes the model, train and score
sections (seed included) and the cube's identity, so the comparison, the reliability experiment and
the sensitivity table share runs with equal settings, and a rerun retrains nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from pipeline.config import RunConfig
from pipeline.data.cube import open_cube
from pipeline.data.pathfinders import resolve_target
from pipeline.errors import ConfigError, CubeError
from pipeline.io import atomic_path, atomic_write_text
from pipeline.models.train import train
from pipeline.scoring.score import score_cube

__all__ = [
    "vit_run",
    "vit_train_windows",
    "check_seeds",
    "cube_identity",
    "write_zarr_atomic",
    "open_zarr_store",
    "params_changed",
    "metric_summary",
    "ensure_cube_exists",
    "markdown_table",
]


def check_seeds(seeds) -> list[int]:
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigError("no seed given for the repeated runs. Fix: pass e.g. seeds=(0, 1, 2)")
    return list(dict.fromkeys(seeds))


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cube_identity(cube_path: Path) -> str:
    """Changes whenever the cube store is rewritten (write_cube renames a new store into place)."""
    meta = Path(cube_path) / "zarr.json"
    if not meta.exists():
        raise CubeError(f"cube {str(cube_path)!r} does not exist. Fix: build it first (`mpm run CONFIG --stages cube`)")
    st = meta.stat()
    return f"{Path(cube_path).resolve()}|{st.st_mtime_ns}|{st.st_size}"


def write_zarr_atomic(ds: xr.Dataset, path: Path) -> Path:
    """Write a small in-memory Dataset as Zarr v3 (``<path>.tmp-*`` then rename; see :mod:`pipeline.io`)."""
    for v in ds.variables.values():
        v.encoding.clear()
    with atomic_path(path) as tmp:
        ds.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False)
    return path


def open_zarr_store(path: Path) -> xr.Dataset:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return xr.open_zarr(path, decode_coords="all", consolidated=False, zarr_format=3)


def params_changed(path: Path, params: dict) -> bool:
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


def metric_summary(metrics: dict) -> dict:
    """The comparison's figures from a metrics dict of :func:`pipeline.evaluation.evaluate.evaluate_scores`."""
    pa = metrics.get("pa_intersection") or {}
    return {
        "auc": _nan(metrics.get("auc")),
        "auc_buffered_mean": _nan(metrics.get("auc_buffered_mean")),
        "success_rate_area": _nan(metrics.get("success_rate_area")),
        "pa_prediction_rate": _nan(pa.get("prediction_rate")),
        "normalised_density": _nan(metrics.get("normalised_density")),
    }


def ensure_cube_exists(out: Path, ensure_cube: Callable[[], object] | None) -> None:
    """Build ``out/cube.zarr`` with ``ensure_cube`` (the run layer's cube stage) when it is missing."""
    if (out / "cube.zarr").exists():
        return
    if ensure_cube is None:
        raise CubeError(
            f"{str(out / 'cube.zarr')!r} does not exist. Fix: build it first (mpm run CONFIG --out {out} --stages cube)"
        )
    ensure_cube()


def _quiet(_event: dict) -> None:
    pass


def vit_run(
    cube_path: str | Path,
    cfg: RunConfig,
    runs_dir: str | Path,
    *,
    seed: int | None = None,
    client=None,
    launcher=None,
    log: Callable[[str], None] = print,
    variable: str = "prospectivity",
) -> tuple[xr.DataArray, float, Path]:
    """Train the ViT of ``cfg`` (with ``train.seed = seed``) on a cube and score it; cached.

    Returns ``(variable [y, x] in memory with the cube's CRS, wall seconds of train + score, run
    folder)``; ``variable`` is ``prospectivity`` or a target-aware map ``prospectivity_<commodity>``
    when the scorer writes one (KeyError otherwise). The run folder ``runs_dir/vit-<key>`` holds
    ``model.pt``, ``prospectivity.zarr`` (every ``prospectivity*`` map) and ``run.json`` (with
    ``train_windows``: windows seen in training); a call with the same settings and cube loads them
    instead of retraining, and an interrupted run resumes from its ``checkpoint.pt``. Delete
    ``runs_dir`` to retrain from scratch. ``client``: score on that Dask cluster; ``launcher``: train
    there (see :func:`pipeline.models.train.train`); None = in this process.
    """

    cube_path = Path(cube_path)
    if seed is not None:
        cfg = cfg.with_updates(train={"seed": int(seed)})
    data = cfg.model_dump(mode="json")
    keyed = {"model": data["model"], "train": data["train"], "score": data["score"], "cube": cube_identity(cube_path)}
    if data.get("target") is not None:  # the target changes the maps written; runs without one keep their key
        keyed["target"] = data["target"]
    run_dir = Path(runs_dir) / f"vit-{_hash(keyed)}"
    zpath, info_path = run_dir / "prospectivity.zarr", run_dir / "run.json"
    if info_path.exists() and zpath.exists():
        info = json.loads(info_path.read_text())
        store = open_zarr_store(zpath)
        if variable not in store:
            raise KeyError(f"{variable} is not among the ViT's maps {sorted(map(str, store.data_vars))}")
        score = store[variable].load()
        return score.rio.write_crs(score.rio.crs), float(info["wall_s"]), run_dir
    # an interrupted run with this key resumes from its checkpoint.pt (same settings, same cube)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = train(cube_path, cfg, run_dir, launcher=launcher, progress=_quiet)
    cube = open_cube(cube_path)
    target = None
    if cfg.target is not None:  # prospectivity_<commodity>: the pathfinders' positive residuals
        target = (cfg.target.commodity, resolve_target(cfg.target, [str(b) for b in cube["band"].values.tolist()]))
    ds = score_cube(
        cube,
        model,
        cfg.score,
        model_cfg_window=cfg.model.window,
        gpu=client is not None and cfg.cluster.gpus_per_worker > 0,
        target=target,
    )
    names = [str(v) for v in ds.data_vars if str(v).startswith("prospectivity")]
    maps = {n: ds[n].compute() for n in names}
    wall = time.perf_counter() - t0
    out = xr.Dataset({n: v.drop_vars("spatial_ref", errors="ignore") for n, v in maps.items()})
    out = out.rio.write_crs(cube.rio.crs)
    for n in names:
        out[n] = out[n].rio.write_grid_mapping("spatial_ref")
    write_zarr_atomic(out, zpath)
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # the optimizer state is not needed any more
    atomic_write_text(
        info_path,
        json.dumps(
            {
                "wall_s": wall,
                "seed": cfg.train.seed,
                "cube": str(cube_path),
                "model": data["model"],
                "train": data["train"],
                "score": data["score"],
                "train_windows": _windows_seen(run_dir, cfg),
            },
            indent=1,
        ),
    )
    log(f"[vit] trained and scored in {wall:.1f} s -> {run_dir.name} (seed {cfg.train.seed})")
    if variable not in maps:
        raise KeyError(f"{variable} is not among the ViT's maps {names}")
    return maps[variable].rio.write_crs(cube.rio.crs), wall, run_dir


def _windows_seen(run_dir: Path, cfg: RunConfig) -> int | None:
    """Training windows of a finished run: steps done (the last logged step; early stopping) x batch."""
    try:
        summary = json.loads((run_dir / "train_summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    history = summary.get("history") or []
    steps = int(history[-1][0]) if history else int(summary.get("steps") or 0)
    return steps * int(cfg.train.batch_size) or None


def vit_train_windows(run_dir: Path) -> int | None:
    """``train_windows`` of a cached ViT run (:func:`vit_run`), None when unknown."""
    try:
        return json.loads((Path(run_dir) / "run.json").read_text()).get("train_windows")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


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
