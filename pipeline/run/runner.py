"""Stage orchestration for ``mpm run`` / ``mpm demo``: each stage is a plain function of (config, out dir).

Each stage runs through :func:`pipeline.stages.run_stage`, which skips it when its outputs are complete and
were built from the same config sections, and keeps a crash, Ctrl-C or lost worker from leaving a stage
marked done with missing or partial outputs (its docstring has the rules). This module also chooses where
training runs: in this process, or on a Dask cluster through :mod:`pipeline.run.cluster`.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from pipeline import storage
from pipeline.config import RunConfig
from pipeline.data.cube import open_cube, write_cube
from pipeline.data.ingest import build_cube, provenance
from pipeline.data.points import SCRATCH_PREFIX
from pipeline.errors import ConfigError
from pipeline.evaluation import compare, reliability, report
from pipeline.evaluation.diagnostics import border_effect
from pipeline.evaluation.evaluate import evaluate_scores, write_metrics
from pipeline.evaluation.plotting import plot_bands
from pipeline.io import atomic_path, atomic_write_text, output_lock, remove_path
from pipeline.models import train as training
from pipeline.run.cluster import make_cluster, run_training_on_cluster
from pipeline.run.preflight import preflight
from pipeline.run.progress import TrainProgress
from pipeline.run.remote import run_mirrored
from pipeline.scoring.score import open_scores, score_to_disk
from pipeline.stages import StageInterrupted, digest, output_complete, read_manifest, run_stage, stage_key


def launcher_for(client):
    """The training launcher of :func:`pipeline.models.train.train` for a Dask client (None: in this process)."""
    return None if client is None else functools.partial(run_training_on_cluster, client)


def train(cube, cfg: RunConfig, out, client=None, progress=None, *, log_every: int = 10) -> Path:
    """Train the ViT of ``cfg`` on ``cube`` into ``out/model.pt``: in this process, or on ``client``'s cluster.

    With a Dask client: one task pinned to a worker (a GPU worker when the cluster has GPU resources), or
    ``train.ddp_workers`` tasks running torch DDP (gloo on CPU, NCCL on GPU). See
    :func:`pipeline.models.train.train` for ``progress`` and resuming.
    """
    return training.train(cube, cfg, out, launcher=launcher_for(client), progress=progress, log_every=log_every)


def build_cube_stage(cfg: RunConfig, out: Path, *, force: bool = False, progress: bool = True, log=print) -> Path:
    """Stage: ``out/cube.zarr`` from the config's grid and layers."""
    path = out / "cube.zarr"

    def clear_samples():  # point samples on disk while the cube is built (pipeline.data.points)
        for folder in out.glob(f"{SCRATCH_PREFIX}*"):
            remove_path(folder)

    def build():
        preflight(cfg, ("cube",))
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

    fig = plot_bands(open_cube(cube_path))
    path = out / "bands.png"
    try:
        with atomic_path(path, keep_suffix=True) as tmp:
            fig.savefig(tmp, dpi=80)
    except KeyboardInterrupt as exc:
        raise StageInterrupted("quicklook", getattr(exc, "signum", 2)) from None
    log(f"[quicklook] {path}")
    return path


def _client(client):
    """A stage's ``client``: a Dask client, None, or a function that starts one (see :func:`run_pipeline`)."""
    return client() if callable(client) else client


def ensemble_paths(cfg: RunConfig, out: Path) -> list[Path]:
    """The models of the seed ensemble (``train.seeds``): ``out/model.pt`` (seed ``train.seed``), then
    ``out/ensemble/seed-<s>/model.pt`` for the following seeds."""
    seeds = [cfg.train.seed + k for k in range(cfg.train.seeds)]
    return [out / "model.pt"] + [out / "ensemble" / f"seed-{s}" / "model.pt" for s in seeds[1:]]


def train_stage(cfg: RunConfig, out: Path, *, force: bool = False, log=print, client=None) -> dict:
    """Stage: ``out/model.pt`` and the rest of the seed ensemble (resumes an interrupted run of itself from
    each model's ``checkpoint.pt``)."""
    models = ensemble_paths(cfg, out)

    def go():
        for k, model in enumerate(models):
            run_dir = model.parent
            run_cfg = cfg.with_updates(train={"seed": cfg.train.seed + k})
            # checkpoint.pt resumes an interrupted run of this very stage only: not after --force, a changed
            # config or a rebuilt cube (a finished checkpoint would otherwise be "resumed" with no training)
            ckpt, tag = run_dir / "checkpoint.pt", run_dir / "checkpoint.for"
            want = digest({"train": stage_key(run_cfg, ("model", "train")), "cube": read_manifest(out).get("cube", {})})
            if ckpt.exists() and (force or not tag.exists() or tag.read_text().strip() != want):
                log(f"[train] starting afresh: {ckpt.name} belongs to another run")
                ckpt.unlink()
            if model.exists() and tag.exists() and tag.read_text().strip() == want and k > 0:
                continue  # an ensemble member finished before an interruption
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(tag, want)
            if len(models) > 1:
                log(f"[train] ensemble member {k + 1}/{len(models)} (seed {run_cfg.train.seed})")
            shown = TrainProgress(log)  # steps, loss, windows/s and ETA where a person sees them
            try:
                train(out / "cube.zarr", run_cfg, run_dir, client=_client(client), progress=shown)
            finally:
                shown.close()

    run_stage("train", cfg, out, models, ("model", "train"), go, force=force, log=log, upstream=("cube",))
    return {"model": models[0]}


def score_stage(cfg: RunConfig, out: Path, *, force: bool = False, log=print, client=None) -> dict:
    """Stage: ``out/prospectivity.zarr`` (with ``uncertainty`` over the seed ensemble) and the COG
    ``prospectivity.tif``."""
    zpath, tif = out / "prospectivity.zarr", out / "prospectivity.tif"
    run_stage(
        "score",
        cfg,
        out,
        [zpath, tif],
        ("score",),
        lambda: score_to_disk(out / "cube.zarr", ensemble_paths(cfg, out), cfg, out, client=_client(client)),
        force=force,
        log=log,
        upstream=("cube", "train"),
    )
    return {"prospectivity_zarr": zpath, "prospectivity_tif": tif}


def evaluate_stage(cfg: RunConfig, out: Path, *, force: bool = False, log=print, client=None) -> dict:
    """Stage: ``out/metrics.json`` (every score map against the deposits)."""
    path = out / "metrics.json"

    def go():
        scores = open_scores(out / "prospectivity.zarr")
        metrics = {"prospectivity": evaluate_scores(cfg, scores["prospectivity"])}
        for name in scores.data_vars:
            if name.startswith(("anomaly_", "prospectivity_")):  # per-group and target (commodity) maps
                metrics[name] = evaluate_scores(cfg, scores[name])
        # label-free: does the map light up at the study area's edge?
        metrics["border_effect"] = border_effect(scores["prospectivity"].load(), cfg.model.window)
        write_metrics(metrics, path)
        m = metrics["prospectivity"]
        if "auc" in m:
            log(f"[evaluate] prospectivity ROC AUC = {m['auc']:.3f} ({m.get('protocol')} protocol)")

    run_stage("evaluate", cfg, out, [path], ("deposits", "evaluate"), go, force=force, log=log, upstream=("score",))
    return {"metrics": path}


def _experiment(fn, cfg: RunConfig, out: Path, force: bool, log, client, options: dict):
    """Run an experiment of :mod:`pipeline.evaluation` with this layer's helpers: a training launcher for
    ``client`` and the cube stage, run first when the cube is missing."""
    ensure_cube = lambda: build_cube_stage(cfg, out, force=False, progress=False, log=log)
    return fn(
        cfg, out, force=force, log=log, client=client, launcher=launcher_for(client), ensure_cube=ensure_cube, **options
    )


def compare_stage(cfg: RunConfig, out: Path, *, force: bool = False, log=print, client=None, **options) -> dict:
    """Stage: the comparison of methods (:func:`pipeline.evaluation.compare.compare_stage`)."""
    return _experiment(compare.compare_stage, cfg, out, force, log, client, options)


def reliability_stage(cfg: RunConfig, out: Path, *, force: bool = False, log=print, client=None, **options) -> dict:
    """Stage: the ViT over several seeds (:func:`pipeline.evaluation.reliability.reliability_stage`)."""
    return _experiment(reliability.reliability_stage, cfg, out, force, log, client, options)


def sensitivity_table(cfg: RunConfig, out: Path, *, force: bool = False, log=print, client=None, **options) -> Path:
    """AUC vs window and mask ratio (:func:`pipeline.evaluation.reliability.sensitivity_table`)."""
    return _experiment(reliability.sensitivity_table, cfg, out, force, log, client, options)


def report_stage(cfg: RunConfig, out: Path, *, force: bool = False, log=print, client=None) -> dict:
    """Stage: ``out/report.html`` and ``out/targets.gpkg``."""
    return report.report_stage(cfg, out, force=force, log=log, client=client)


ALL_STAGES = ("cube", "quicklook", "train", "score", "evaluate", "compare", "reliability", "report")
DEFAULT_STAGES = ("cube", "quicklook", "train", "score", "evaluate", "report")


def available_stages() -> tuple[str, ...]:
    """Stages whose modules are present in this install (all of them in a release)."""
    import importlib.util

    need = {
        "train": "pipeline.models.train",
        "score": "pipeline.scoring.score",
        "evaluate": "pipeline.evaluation.evaluate",
        "compare": "pipeline.evaluation.compare",
        "reliability": "pipeline.evaluation.compare",
        "report": "pipeline.evaluation.report",
    }
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
    """Run the stages of ``cfg`` into ``out``; returns a dict of the outputs written.

    Holds ``out``'s lock throughout (:func:`pipeline.io.output_lock`: a second run on ``out`` fails at once),
    and checks the stages asked for and the config (:func:`pipeline.run.preflight.preflight`) before any work.
    """
    if storage.is_url(out):  # object storage: a local working copy mirrored to the URL (pipeline.run.remote)
        again = lambda local: run_pipeline(cfg, local, force=force, stages=stages, progress=progress, log=log)
        return run_mirrored(str(out), again, log=log)
    out = Path(out)
    avail = available_stages()
    wanted = parse_stages(stages, avail)
    with output_lock(out, log=log):
        preflight(cfg, wanted)
        check_prerequisites(out, wanted)
        return _run_stages(cfg, out, wanted, avail, force, progress, log)


def parse_stages(stages: str | None, avail: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """``--stages`` as a tuple (None: the default stages); an empty or unknown name is a ConfigError."""
    avail = available_stages() if avail is None else avail
    if stages is None:
        return tuple(s for s in DEFAULT_STAGES if s in avail)
    wanted = tuple(s.strip() for s in str(stages).split(","))
    if not any(wanted):
        raise ConfigError(
            f"--stages is empty. Fix: name the stages to run, e.g. --stages cube,train (all: {','.join(ALL_STAGES)}), "
            "or leave --stages out to run the default ones"
        )
    unknown = [s[:40] for s in wanted if s not in ALL_STAGES]
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {unknown[:5]}. Fix: use some of {','.join(ALL_STAGES)}")
    return wanted


# what a stage reads that an earlier stage writes: (output, the stage that writes it)
_NEEDS = {
    "quicklook": (("cube.zarr", "cube"),),
    "train": (("cube.zarr", "cube"),),
    "score": (("cube.zarr", "cube"), ("model.pt", "train")),
    "evaluate": (("prospectivity.zarr", "score"),),
    "report": (("prospectivity.zarr", "score"),),
}


def check_prerequisites(out: Path, wanted: tuple[str, ...]) -> None:
    """A stage asked for without the stage that writes its input, whose output is not in ``out``: one line
    naming the stage to add (not "rerun": nothing was interrupted)."""
    for stage in wanted:
        for name, writer in _NEEDS.get(stage, ()):
            if writer not in wanted and not output_complete(out / name):
                chain = [s for s in ("cube", "train", "score") if ALL_STAGES.index(s) <= ALL_STAGES.index(writer)]
                add = ",".join(dict.fromkeys([*chain, *wanted]))
                raise ConfigError(
                    f"--stages {','.join(wanted)}: stage '{stage}' reads {name}, which is not in {str(out)[:200]!r} "
                    f"(stage '{writer}' writes it, and it is not among the stages asked for). Fix: add it, e.g. "
                    f"--stages {add}"
                )


def _run_stages(cfg: RunConfig, out: Path, wanted, avail, force: bool, progress: bool, log) -> dict:
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
            client = make_cluster(cfg.cluster)
            log(f"[cluster] Dask dashboard: {client.dashboard_link}")
            if os.environ.get("MPM_DEBUG", "") in ("", "0"):
                client.run(quiet_task_failures, on_error="ignore")
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


class _NoComputeFailed:
    """Drops a worker's "Compute Failed ... Traceback: ..." record: the error it logs reaches the client,
    and ``mpm`` prints it as one line (``mpm --debug`` keeps these records)."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("Compute Failed")


def quiet_task_failures() -> None:
    """Run on each worker (``client.run``): a failed task is not logged there before the client raises it."""
    import logging

    logger = logging.getLogger("distributed.worker")
    if not any(isinstance(f, _NoComputeFailed) for f in logger.filters):
        logger.addFilter(_NoComputeFailed())


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
    m = out / "metrics.json"
    if m.exists():
        p = json.loads(m.read_text()).get("prospectivity", {})
        if "auc" in p:
            log(f"summary: prospectivity ROC AUC {p['auc']:.3f} ({p.get('protocol')} protocol) -> {m}")
    if (out / "report.html").exists():
        log(f"report: {out / 'report.html'}")
