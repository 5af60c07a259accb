"""Stage orchestration for ``mpm run`` / ``mpm demo``: each stage is a plain function of (config, out dir).

A stage records what it was built from (a hash of the config sections it reads) in ``DIR/stages.json``;
on a rerun a stage whose outputs exist, are complete and whose recorded hash matches is skipped (``force``
redoes it).

Crash safety (an exception, Ctrl-C, SIGKILL, a lost worker, at any point):

- a stage's entry is removed from ``stages.json`` before the stage starts and written back only after all of
  its outputs are complete, so ``stages.json`` never marks a stage done whose outputs are missing or partial;
- every output is written atomically (:mod:`pipeline.io`) or, for the resumable score store, marked complete
  only at the end; a skipped stage's outputs are checked to be complete, not merely present;
- a rerun of the same command therefore skips exactly the finished stages and redoes (or resumes: training
  from ``checkpoint.pt``, scoring from the store's region manifest) the one that was interrupted, after
  removing the temporaries that a killed writer left behind;
- Ctrl-C raises :class:`StageInterrupted` (a KeyboardInterrupt naming the stage); ``mpm`` prints one line
  and exits with status 130.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path

import numpy as np
from typing import Callable

from .config import RunConfig
from .io import atomic_path, atomic_write_json, atomic_write_text, clear_stale, remove_path

MANIFEST = "stages.json"


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C during a stage: ``stage`` names it (the CLI prints it and exits with status 130)."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


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
    atomic_write_json(out / MANIFEST, manifest)


def output_complete(p: Path) -> bool:
    """True when output ``p`` is there and complete: a non-empty file, or a Zarr store whose root metadata
    is there and which is not marked incomplete (``mpm_complete: false``, see :mod:`pipeline.sinks`)."""
    p = Path(p)
    if p.is_file():
        return p.stat().st_size > 0
    if not p.is_dir():
        return False
    if p.suffix != ".zarr":
        return True
    meta = p / "zarr.json"
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return attrs.get("mpm_complete", True) is not False


def _forget(out: Path, name: str) -> None:
    """Remove ``name`` from the manifest (before its stage runs: a crash must not leave it marked done)."""
    manifest = _read_manifest(out)
    if name in manifest:
        del manifest[name]
        _write_manifest(out, manifest)


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
    # a stage is stale if any upstream stage was rebuilt after it: an upstream's record carries a fresh
    # "built" token each time it runs (records written before there were tokens hash as they did then)
    up_keys = {}
    for u in upstream:
        rec = manifest.get(u, {})
        up_keys[u] = [rec.get("key"), rec["built"]] if "built" in rec else rec.get("key")
    key = _hash({"own": key, "upstream": up_keys})
    done = manifest.get(name, {})
    if not force and done.get("key") == key and all(output_complete(p) for p in outputs):
        log(f"[{name}] up to date, skipped ({', '.join(p.name for p in outputs)})")
        return False
    t0 = time.perf_counter()
    _forget(out, name)
    for p in outputs:  # temporaries of a writer that was killed (SIGKILL leaves them)
        clear_stale(p)
    log(f"[{name}] running ...")
    try:
        fn()
    except StageInterrupted:
        raise
    except KeyboardInterrupt:
        raise StageInterrupted(name) from None
    incomplete = [str(p) for p in outputs if not output_complete(p)]
    if incomplete:
        from .errors import MPMError

        raise MPMError(f"stage '{name}' finished without complete outputs {incomplete}. Fix: rerun with --force")
    manifest = _read_manifest(out)
    manifest[name] = {"key": key, "built": uuid.uuid4().hex[:12], "seconds": round(time.perf_counter() - t0, 2),
                      "outputs": [str(p) for p in outputs]}
    _write_manifest(out, manifest)
    log(f"[{name}] done in {time.perf_counter() - t0:.1f} s")
    return True


def build_cube_stage(cfg: RunConfig, out: Path, *, force: bool = False, progress: bool = True, log=print) -> Path:
    from .cube import write_cube
    from .ingest import build_cube, provenance

    from .samples import SCRATCH_PREFIX

    path = out / "cube.zarr"

    def clear_samples():  # point samples on disk while the cube is built (pipeline.samples)
        for folder in out.glob(f"{SCRATCH_PREFIX}*"):
            remove_path(folder)

    def build():
        clear_samples()  # left by a killed build
        try:
            return write_cube(build_cube(cfg, scratch=out), path, progress=progress, provenance=provenance(cfg))
        finally:
            clear_samples()

    run_stage("cube", cfg, out, [path], ("grid", "layers"), build, force=force, log=log)
    return path


def quicklook_stage(cube_path: Path, out: Path, log=print) -> Path:
    """Write ``bands.png``: every band of the cube and its valid mask."""
    import matplotlib

    matplotlib.use("Agg")
    from .cube import open_cube
    from .plotting import plot_bands

    fig = plot_bands(open_cube(cube_path))
    path = out / "bands.png"
    try:
        with atomic_path(path, keep_suffix=True) as tmp:
            fig.savefig(tmp, dpi=80)
    except KeyboardInterrupt:
        raise StageInterrupted("quicklook") from None
    log(f"[quicklook] {path}")
    return path


def _client(client):
    """A stage's ``client``: a Dask client, None, or a function that starts one (see :func:`run_pipeline`)."""
    return client() if callable(client) else client


def train_stage(cfg: RunConfig, out: Path, *, force: bool = False, log=print, client=None) -> dict:
    from .train import train

    model = out / "model.pt"

    def go():
        # checkpoint.pt resumes an interrupted run of this very stage only: not after --force, a changed
        # config or a rebuilt cube (a finished checkpoint would otherwise be "resumed" with no training)
        ckpt, tag = out / "checkpoint.pt", out / "checkpoint.for"
        want = _hash({"train": stage_key(cfg, ("model", "train")), "cube": _read_manifest(out).get("cube", {})})
        if ckpt.exists() and (force or not tag.exists() or tag.read_text().strip() != want):
            log(f"[train] starting afresh: {ckpt.name} belongs to another run")
            ckpt.unlink()
        atomic_write_text(tag, want)
        train(out / "cube.zarr", cfg, out, client=_client(client))

    run_stage("train", cfg, out, [model], ("model", "train"), go, force=force, log=log, upstream=("cube",))
    return {"model": model}


def score_stage(cfg: RunConfig, out: Path, *, force: bool = False, log=print, client=None) -> dict:
    from .score import score_to_disk

    zpath, tif = out / "prospectivity.zarr", out / "prospectivity.tif"
    run_stage(
        "score", cfg, out, [zpath, tif], ("score",),
        lambda: score_to_disk(out / "cube.zarr", out / "model.pt", cfg, out, client=_client(client)),
        force=force, log=log, upstream=("cube", "train"),
    )
    return {"prospectivity_zarr": zpath, "prospectivity_tif": tif}


def open_scores(path: Path):
    """The prospectivity Dataset written by the score stage (lazy, with its CRS)."""
    import warnings

    import xarray as xr

    if not output_complete(Path(path)):
        from .errors import MPMError

        raise MPMError(
            f"{str(path)!r} is missing or incomplete (its score stage was interrupted or has not run). "
            "Fix: rerun the same `mpm run` command; it resumes the score stage"
        )
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
    use_cluster = any(n in ("train", "score", "compare", "reliability") for n in later) and cfg.cluster.kind != "none"

    def get_client():
        """The Dask client, started on first use: a rerun whose train and score stages are up to date
        (e.g. after an interrupted evaluate or report) starts no cluster."""
        nonlocal client
        if client is None:
            from .cluster import make_cluster

            client = make_cluster(cfg.cluster)
            log(f"[cluster] Dask dashboard: {client.dashboard_link}")
        return client

    try:
        for name in later:
            if name not in avail:
                log(f"[{name}] not available in this install, skipped")
                continue
            if not use_cluster:
                arg = None
            elif name in ("train", "score"):
                arg = get_client  # called by the stage only when it runs
            elif name in ("compare", "reliability"):
                arg = get_client()
            else:
                arg = client
            outputs.update(globals()[f"{name}_stage"](cfg, out, force=force, log=log, client=arg))
    except BaseException:
        if client is not None:
            # Ctrl-C, a lost worker, an error: the workers are torn down mid-task; their shutdown chatter
            # would bury the one line that says what happened
            _quiet_cluster(client)
        raise
    finally:
        if client is not None:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None:  # a cluster we started (local, jobqueue, gateway, kubernetes)
                cluster.close()
    log("outputs: " + ", ".join(f"{k}={v}" for k, v in outputs.items()))
    _summary(out, log)
    return outputs


def _quiet_logs() -> None:
    import logging

    # distributed's teardown warnings, and asyncio's "Task exception was never retrieved" for the gathers
    # that the interrupt cut short
    for name in ("distributed", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _quiet_cluster(client) -> None:
    """Silence distributed's logs here and, best effort (2 s at most), on the workers."""
    import threading

    _quiet_logs()

    def run():
        try:
            client.run(_quiet_logs, on_error="ignore")
        except Exception:  # a worker that is gone or busy: its chatter is the lesser evil
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(2.0)


def _summary(out: Path, log) -> None:
    import json

    m = out / "metrics.json"
    if m.exists():
        p = json.loads(m.read_text()).get("prospectivity", {})
        if "auc" in p:
            log(f"summary: prospectivity ROC AUC {p['auc']:.3f} ({p.get('protocol')} protocol) -> {m}")
    if (out / "report.html").exists():
        log(f"report: {out / 'report.html'}")
