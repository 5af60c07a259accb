"""Stage orchestration for ``mpm run`` / ``mpm demo``: each stage is a plain function of (config, out dir).

A stage records what it was built from (a hash of the config sections it reads) in ``DIR/stages.json``;
on a rerun a stage whose output exists and whose recorded hash matches is skipped (``force`` redoes it).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
from typing import Callable

from .config import RunConfig

MANIFEST = "stages.json"


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_key(cfg: RunConfig, sections: tuple[str, ...]) -> str:
    data = cfg.model_dump(mode="json")
    return _hash({s: data.get(s) for s in sections})


def _read_manifest(out: Path) -> dict:
    p = out / MANIFEST
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return {}


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / MANIFEST)


def run_stage(
    name: str,
    cfg: RunConfig,
    out: Path,
    outputs: list[Path],
    sections: tuple[str, ...],
    fn: Callable[[], object],
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
    upstream: tuple[str, ...] = (),
) -> bool:
    """Run ``fn`` unless its outputs exist and were built from the same config sections. Returns True if run."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(out)
    key = stage_key(cfg, sections)
    # a stage is stale if any upstream stage was rebuilt after it
    up_keys = {u: manifest.get(u, {}).get("key") for u in upstream}
    key = _hash({"own": key, "upstream": up_keys})
    done = manifest.get(name, {})
    if not force and done.get("key") == key and all(Path(p).exists() for p in outputs):
        log(f"[{name}] up to date, skipped ({', '.join(p.name for p in outputs)})")
        return False
    t0 = time.perf_counter()
    log(f"[{name}] running ...")
    fn()
    manifest = _read_manifest(out)
    manifest[name] = {"key": key, "seconds": round(time.perf_counter() - t0, 2), "outputs": [str(p) for p in outputs]}
    _write_manifest(out, manifest)
    log(f"[{name}] done in {time.perf_counter() - t0:.1f} s")
    return True


def build_cube_stage(cfg: RunConfig, out: Path, *, force: bool = False, progress: bool = True, log=print) -> Path:
    from .cube import write_cube
    from .ingest import build_cube, provenance

    path = out / "cube.zarr"
    run_stage(
        "cube", cfg, out, [path], ("grid", "layers"),
        lambda: write_cube(build_cube(cfg), path, progress=progress, provenance=provenance(cfg)),
        force=force, log=log,
    )
    return path


def quicklook_stage(cube_path: Path, out: Path, log=print) -> Path:
    """Write ``bands.png``: every band of the cube and its valid mask."""
    import matplotlib

    matplotlib.use("Agg")
    from .cube import open_cube
    from .plotting import plot_bands

    fig = plot_bands(open_cube(cube_path))
    path = out / "bands.png"
    tmp = out / ".bands.tmp.png"
    fig.savefig(tmp, dpi=80)
    os.replace(tmp, path)
    log(f"[quicklook] {path}")
    return path


def train_stage(cfg: RunConfig, out: Path, *, force: bool = False, log=print, client=None) -> dict:
    from .train import train

    model = out / "model.pt"
    run_stage(
        "train", cfg, out, [model], ("model", "train"),
        lambda: train(out / "cube.zarr", cfg, out, client=client),
        force=force, log=log, upstream=("cube",),
    )
    return {"model": model}


def score_stage(cfg: RunConfig, out: Path, *, force: bool = False, log=print, client=None) -> dict:
    from .score import score_to_disk

    zpath, tif = out / "prospectivity.zarr", out / "prospectivity.tif"
    run_stage(
        "score", cfg, out, [zpath, tif], ("score",),
        lambda: score_to_disk(out / "cube.zarr", out / "model.pt", cfg, out, client=client),
        force=force, log=log, upstream=("cube", "train"),
    )
    return {"prospectivity_zarr": zpath, "prospectivity_tif": tif}


def open_scores(path: Path):
    """The prospectivity Dataset written by the score stage (lazy, with its CRS)."""
    import warnings

    import xarray as xr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return xr.open_zarr(path, decode_coords="all", consolidated=False)


_EVAL_INPUTS: dict = {}


def _evaluation_inputs(cfg: RunConfig, crs):
    """Deposits and, for the point protocol, sample locations in ``crs``, read once per process.

    Comparisons evaluate dozens of maps against the same files; the key includes the files' mtimes so
    that an edited file is read again.
    """
    from . import evaluate as ev

    paths = [cfg.resolve(cfg.deposits.path)]
    points = next((l for l in cfg.layers if l.kind == "points"), None) if cfg.evaluate.protocol == "points" else None
    if points is not None:
        paths.append(cfg.resolve(points.path))
    key = (
        cfg.deposits.model_dump_json(), str(cfg.base_dir), points.model_dump_json() if points else None,
        str(crs), tuple(p.stat().st_mtime_ns if p.exists() else None for p in paths),
    )
    if key not in _EVAL_INPUTS:
        deposits = ev.load_deposits(cfg.deposits, cfg.base_dir)
        samples = None
        if points is not None:
            from .ingest import read_points

            px, py, _ = read_points(points, cfg, crs)
            samples = np.column_stack([px, py])
        if len(_EVAL_INPUTS) > 8:
            _EVAL_INPUTS.clear()
        _EVAL_INPUTS[key] = (deposits, samples)
    return _EVAL_INPUTS[key]


def evaluate_scores(cfg: RunConfig, score) -> dict:
    """Metrics of one score map (y, x) against the config's deposits, with the config's protocol."""
    from . import evaluate as ev

    if cfg.deposits is None:
        return {"note": "no deposits in the config: nothing to evaluate"}
    score = score.load()
    deposits, samples = _evaluation_inputs(cfg, score.rio.crs)
    if cfg.evaluate.protocol == "points":
        import geopandas as gpd

        pts = gpd.GeoDataFrame(geometry=gpd.points_from_xy(samples[:, 0], samples[:, 1]), crs=score.rio.crs)
        s = ev.sample_map_at_points(score, pts)
        dep = deposits.to_crs(score.rio.crs)
        res = ev.point_protocol_auc(
            s, samples, np.column_stack([dep.geometry.x, dep.geometry.y]),
            min_dist_km=cfg.evaluate.min_dist_km, draws=cfg.evaluate.repeats, seed=cfg.evaluate.seed, return_all=True,
        )
        return {"protocol": "points", "auc": res["auc_mean"], "auc_std": res["auc_std"], "n_samples": int(len(s)),
                "n_deposits": int(len(dep)), "n_eligible_negatives": res["n_eligible"], "fallback": res["fallback"]}
    metrics = ev.evaluate_map(score, deposits, cfg.evaluate)
    metrics["protocol"] = "raster"
    return metrics


def evaluate_stage(cfg: RunConfig, out: Path, *, force: bool = False, log=print, client=None) -> dict:
    from .evaluate import write_metrics

    path = out / "metrics.json"

    def go():
        scores = open_scores(out / "prospectivity.zarr")
        metrics = {"prospectivity": evaluate_scores(cfg, scores["prospectivity"])}
        for name in scores.data_vars:
            if name.startswith("anomaly_"):
                metrics[name] = evaluate_scores(cfg, scores[name])
        write_metrics(metrics, path)
        m = metrics["prospectivity"]
        if "auc" in m:
            log(f"[evaluate] prospectivity ROC AUC = {m['auc']:.3f} ({m.get('protocol')} protocol)")

    run_stage("evaluate", cfg, out, [path], ("deposits", "evaluate"), go, force=force, log=log,
              upstream=("score",))
    return {"metrics": path}


def compare_stage(cfg: RunConfig, out: Path, *, force: bool = False, log=print, client=None) -> dict:
    from .compare import compare_stage as run_compare

    return run_compare(cfg, out, force=force, log=log, client=client)


def reliability_stage(cfg: RunConfig, out: Path, *, force: bool = False, log=print, client=None) -> dict:
    from .compare import reliability_stage as run_reliability

    return run_reliability(cfg, out, force=force, log=log, client=client)


def report_stage(cfg: RunConfig, out: Path, *, force: bool = False, log=print, client=None) -> dict:
    from .report import report_stage as run_report

    return run_report(cfg, out, force=force, log=log, client=client)


ALL_STAGES = ("cube", "quicklook", "train", "score", "evaluate", "compare", "reliability", "report")
DEFAULT_STAGES = ("cube", "quicklook", "train", "score", "evaluate", "report")


def available_stages() -> tuple[str, ...]:
    """Stages whose modules are present in this install (all of them in a release)."""
    import importlib.util

    need = {"train": "pipeline.train", "score": "pipeline.score", "evaluate": "pipeline.evaluate",
            "compare": "pipeline.compare", "reliability": "pipeline.compare", "report": "pipeline.report"}
    return tuple(s for s in ALL_STAGES if s not in need or importlib.util.find_spec(need[s]) is not None)


def run_pipeline(
    cfg: RunConfig,
    out: Path,
    *,
    force: bool = False,
    stages: str | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Run the stages of ``cfg`` into ``out``; returns a dict of the outputs written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    avail = available_stages()
    wanted = tuple(s.strip() for s in stages.split(",")) if stages else tuple(s for s in DEFAULT_STAGES if s in avail)
    unknown = [s for s in wanted if s not in ALL_STAGES]
    if unknown:
        from .errors import ConfigError

        raise ConfigError(f"--stages: unknown stage(s) {unknown}. Fix: use some of {','.join(ALL_STAGES)}")
    outputs: dict[str, Path] = {}
    cube_path = out / "cube.zarr"
    if "cube" in wanted:
        outputs["cube"] = build_cube_stage(cfg, out, force=force, progress=progress, log=log)
    if "quicklook" in wanted:
        outputs["bands"] = quicklook_stage(cube_path, out, log=log)
    later = [n for n in ("train", "score", "evaluate", "compare", "reliability", "report") if n in wanted]
    client = None
    if any(n in ("train", "score") for n in later) and cfg.cluster.kind != "none":
        from .cluster import make_cluster

        client = make_cluster(cfg.cluster)
        log(f"[cluster] Dask dashboard: {client.dashboard_link}")
    try:
        for name in later:
            if name not in avail:
                log(f"[{name}] not available in this install, skipped")
                continue
            outputs.update(globals()[f"{name}_stage"](cfg, out, force=force, log=log, client=client))
    finally:
        if client is not None:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None:  # a cluster we started (local, jobqueue, gateway, kubernetes)
                cluster.close()
    log("outputs: " + ", ".join(f"{k}={v}" for k, v in outputs.items()))
    _summary(out, log)
    return outputs


def _summary(out: Path, log) -> None:
    import json

    m = out / "metrics.json"
    if m.exists():
        p = json.loads(m.read_text()).get("prospectivity", {})
        if "auc" in p:
            log(f"summary: prospectivity ROC AUC {p['auc']:.3f} ({p.get('protocol')} protocol) -> {m}")
    if (out / "report.html").exists():
        log(f"report: {out / 'report.html'}")
