"""``mpm`` command line: wiring only; the logic lives in the stage modules.

    mpm demo  --out DIR                 synthetic province -> every output (the README's main job)
    mpm run   CONFIG --out DIR          cube -> train -> score -> evaluate -> report
    mpm cube  CONFIG --out DIR          DIR/cube.zarr
    mpm train CONFIG --cube C --out DIR DIR/model.pt
    mpm score CONFIG --cube C --model M --out DIR
    mpm compare CONFIG --out DIR        the ViT, ablations and seven comparison methods, one table
    mpm reliability CONFIG --out DIR    several seeds: mean and uncertainty maps
    mpm synth --out DIR                 write the synthetic province's input files only

Every failure prints as one line (``error: ...``) that names the item and the fix, and exits with status 2:
errors of this package, and also a file system error (a folder that cannot be written, a full disk, an
``--out`` that is a file), running out of memory, and any other library's error (named with the stage it
happened in). ``mpm --debug ...`` prints the traceback as well. Ctrl-C prints one line naming the interrupted
stage and exits with status 130, SIGTERM (what a batch system sends) the same with status 143; rerunning the
same command resumes. A command that writes into ``--out`` holds its lock (:func:`pipeline.io.output_lock`):
a second one on the same folder fails at once, naming the first.

The commands import the stage modules inside their functions on purpose: those pull in torch, dask and
GDAL (seconds), and ``mpm --help`` or a config error should answer at once. No cycle is dodged here.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import traceback
import warnings
from contextlib import nullcontext
from pathlib import Path

from pipeline.errors import MPMError
from pipeline.io import output_lock
from pipeline.stages import Terminated


def _load(config: str):
    from pipeline.config import RunConfig

    return RunConfig.from_yaml(config)


def _with_cluster(cfg, args):
    """``--cluster PROFILE`` replaces the config's ``cluster`` section (see deploy/profiles/)."""
    if not getattr(args, "cluster", None):
        return cfg
    from pipeline.run.cluster import cluster_settings

    return cfg.with_updates(cluster=cluster_settings(args.cluster, cfg.cluster))


def cmd_cube(args) -> int:
    from pipeline.run.runner import build_cube_stage, run_pipeline
    from pipeline.storage import is_url, location

    cfg = _load(args.config)
    out = location(args.out)
    if is_url(out):  # object storage: the cube stage of a run, its working copy mirrored (pipeline.run.remote)
        path = run_pipeline(cfg, out, force=args.force, stages="cube", progress=not args.quiet)["cube"]
    else:
        path = build_cube_stage(cfg, out, force=args.force, progress=not args.quiet)
    print(f"cube: {path}")
    return 0


def cmd_synth(args) -> int:
    from pipeline.data.synthetic import write_province

    prov = write_province(Path(args.out), size=args.size, seed=args.seed)
    print(f"synthetic province: {prov.config_path}")
    return 0


def cmd_demo(args) -> int:
    from pipeline.data.synthetic import write_province
    from pipeline.run.runner import run_pipeline

    out = Path(args.out)
    folder, stamp = out / "province", out / "province" / ".mpm-demo.json"
    made = {"size": args.size, "seed": args.seed}
    config_path = folder / "province.yaml"
    # written once per size and seed: a GeoPackage written again differs in its bytes (timestamps), and the
    # stage keys fingerprint the inputs, so a rewrite would rerun every stage of an unchanged demo
    if not (config_path.is_file() and stamp.is_file() and stamp.read_text().strip() == json.dumps(made)):
        stamp.unlink(missing_ok=True)
        config_path = write_province(folder, size=args.size, seed=args.seed).config_path
        stamp.write_text(json.dumps(made) + "\n")
    print(f"synthetic province ({args.size} px, seed {args.seed}): {config_path}")
    cfg = _load(str(config_path))
    if args.epochs is not None:
        cfg = cfg.with_updates(train={"epochs": args.epochs})
    cfg = _with_cluster(cfg, args)
    _timed(out, lambda: run_pipeline(cfg, out, force=args.force, stages=args.stages, progress=not args.quiet))
    return 0


def _timed(out, run) -> None:
    """``run()``, then the stage timings of what it built (pipeline.run.progress)."""
    import time

    from pipeline.run.progress import read_manifest_at, stage_timings, timings_table

    before, t0 = read_manifest_at(out), time.perf_counter()
    run()
    print(timings_table(stage_timings(before, read_manifest_at(out)), time.perf_counter() - t0))


def cmd_run(args) -> int:
    from pipeline.run.runner import run_pipeline
    from pipeline.storage import location

    cfg = _with_cluster(_load(args.config), args)
    # --out may be a URL (s3://bucket/run): a local working copy mirrored there (pipeline.run.remote)
    out = location(args.out)
    _timed(out, lambda: run_pipeline(cfg, out, force=args.force, stages=args.stages, progress=not args.quiet))
    return 0


def cmd_compare(args) -> int:
    from pipeline.run.runner import compare_stage

    cfg = _load(args.config)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    methods = args.methods.split(",") if args.methods else None
    paths = compare_stage(
        cfg, Path(args.out), force=args.force, methods=methods, seeds=seeds, ablations=not args.no_ablations
    )
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def cmd_reliability(args) -> int:
    from pipeline.run.runner import reliability_stage, sensitivity_table

    cfg = _load(args.config)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    paths = reliability_stage(cfg, Path(args.out), seeds=seeds, force=args.force)
    for k, v in paths.items():
        print(f"{k}: {v}")
    if args.sensitivity:
        print(f"sensitivity: {sensitivity_table(cfg, Path(args.out), force=args.force)}")
    return 0


def cmd_train(args) -> int:
    from pipeline.models.train import train_from_config

    path = train_from_config(args.config, args.cube, args.out)
    print(f"model: {path}")
    return 0


def cmd_tune(args) -> int:
    from pipeline.models.selection import tune
    from pipeline.run.runner import build_cube_stage

    cfg = _load(args.config)
    out = Path(args.out)
    cube = build_cube_stage(cfg, out, progress=not args.quiet)
    record = tune(cube, cfg, out / "tune")
    print(f"tune: {record['choice']} (held-out-block loss; evidence in {out / 'tune' / 'tune.json'})")
    return 0


def cmd_score(args) -> int:
    from pipeline.scoring.score import score_to_disk

    cfg = _load(args.config)
    paths = score_to_disk(args.cube, args.model, cfg, args.out)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpm", description="Unsupervised mineral prospectivity mapping (fusion-conv ViT).")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error as well as its one line")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, config=True):
        if config:
            sp.add_argument("config", help="run-config YAML")
        sp.add_argument("--out", required=True, help="output folder")
        sp.add_argument("--force", action="store_true", help="redo stages whose outputs already exist")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    sp = sub.add_parser("cube", help="build DIR/cube.zarr from a run config")
    common(sp)
    sp.set_defaults(func=cmd_cube)

    stages_help = (
        "comma-separated stages to run (default: cube,quicklook,train,score,evaluate,report; also: compare,reliability)"
    )
    cluster_help = (
        "where train/score run, replacing the config's cluster section: 'local', 'none', a scheduler "
        "address (tcp://host:8786) or a cluster profile YAML (deploy/profiles/*.yaml)"
    )
    sp = sub.add_parser("run", help="run every stage of a config")
    common(sp)
    sp.add_argument("--stages", default=None, help=stages_help)
    sp.add_argument("--cluster", default=None, metavar="PROFILE", help=cluster_help)
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("demo", help="every stage on the embedded synthetic province (no input files)")
    common(sp, config=False)
    sp.add_argument("--size", type=int, default=192, help="province size in pixels a side (default 192)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    sp.add_argument("--stages", default=None, help=stages_help)
    sp.add_argument("--cluster", default=None, metavar="PROFILE", help=cluster_help)
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser(
        "compare", help="the ViT, its ablations and seven comparison methods: DIR/compare/comparison.csv|md"
    )
    common(sp)
    sp.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
    sp.add_argument("--seeds", default="0,1,2")
    sp.add_argument("--no-ablations", action="store_true")
    sp.set_defaults(func=cmd_compare)

    sp = sub.add_parser("reliability", help="N seeds: mean and uncertainty maps, AUC mean/std, rank correlation")
    common(sp)
    sp.add_argument("--seeds", default="0,1,2")
    sp.add_argument("--sensitivity", action="store_true", help="also the window x mask-ratio table")
    sp.set_defaults(func=cmd_reliability)

    sp = sub.add_parser("synth", help="write the synthetic province's input files and run config")
    sp.add_argument("--out", required=True)
    sp.add_argument("--size", type=int, default=192)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=cmd_synth)

    sp = sub.add_parser("train", help="train the model: DIR/model.pt")
    sp.add_argument("config")
    sp.add_argument("--cube", required=True)
    sp.add_argument("--out", required=True)
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser(
        "tune", help="choose window, mask ratio and objective by held-out-block loss (never reads deposits)"
    )
    common(sp)
    sp.set_defaults(func=cmd_tune)

    sp = sub.add_parser("score", help="score the cube: DIR/prospectivity.zarr and .tif")
    sp.add_argument("config")
    sp.add_argument("--cube", required=True)
    sp.add_argument("--model", required=True)
    sp.add_argument("--out", required=True)
    sp.set_defaults(func=cmd_score)

    return p


# what to do about an OSError, by errno
_OS_FIX = {
    errno.ENOSPC: "free disk space there, or give another --out",
    errno.EDQUOT: "free space within your quota, or give another --out",
    errno.EACCES: "make it writable (readable for an input), or give another --out",
    errno.EPERM: "make it writable (readable for an input), or give another --out",
    errno.EROFS: "give an --out on a writable filesystem",
    errno.EEXIST: "--out must be a folder: remove or rename the file there, or give another --out",
    errno.ENOTDIR: "--out must be a folder: a part of the path is a file; give another --out",
    errno.EISDIR: "give the path of a file there, not of a folder",
    errno.ENOENT: "check that the path exists (relative paths resolve against the config file's folder)",
    errno.EMFILE: "raise the open-file limit (ulimit -n), or use fewer workers",
    errno.ENAMETOOLONG: "use a shorter path",
}


def _short(text, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _stage_of(exc) -> str:
    stage = getattr(exc, "mpm_stage", None)
    return f" in stage '{stage}'" if stage else ""


def error_line(exc: BaseException) -> str:
    """The one line ``mpm`` prints for ``exc`` (without ``error: ``): the item, the problem and the fix."""
    if isinstance(exc, MPMError):
        return " ".join(str(exc).split())
    if isinstance(exc, MemoryError):
        return (
            f"out of memory{_stage_of(exc)}{': ' + _short(exc, 120) if str(exc) else ''}. Fix: check grid.resolution "
            "and grid.bounds (and their units), or lower grid.chunk, train.batch_size or score.batch_size; the "
            "finished stages are kept, and rerunning resumes"
        )
    if isinstance(exc, OSError):
        item = exc.filename if exc.filename is not None else None
        what = exc.strerror or _short(exc, 200) or type(exc).__name__
        where = f" {_short(item, 200)!r}" if item is not None else ""
        if exc.filename2 is not None:
            where += f" -> {_short(exc.filename2, 200)!r}"
        fix = _OS_FIX.get(exc.errno, "check the path, its permissions and the free space")
        return f"{what}{':' + where if where else ''}{_stage_of(exc)}. Fix: {fix}"
    name = type(exc).__module__.split(".")[0]
    lib = f"{name}." if name not in ("builtins", "__main__") else ""
    return (
        f"{lib}{type(exc).__name__}{_stage_of(exc)}: {_short(exc) or 'no message'}. Fix: check the input or setting "
        "it names; if they are valid, rerun with `mpm --debug ...` and report the traceback"
    )


def _on_sigterm(signum, frame):
    # once: a second SIGTERM while the first unwinds (closing the cluster) must not cut the cleanup short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def _lock_for(args):
    """``--out``'s lock for a command that writes there (``train``/``score`` write into --out too)."""
    from pipeline.storage import is_url

    out = getattr(args, "out", None)
    # an --out URL: the run locks its local working copy instead (pipeline.run.remote)
    return output_lock(out) if out and not is_url(out) else nullcontext()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module="zarr")
    # rasterio warns when it warps in-memory arrays (ingest._warp_block) whose transforms are given separately: noise
    warnings.filterwarnings("ignore", message="Dataset has no geotransform", module="rasterio")
    debug = args.debug or os.environ.get("MPM_DEBUG", "") not in ("", "0")
    previous = None
    if threading_main():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with _lock_for(args):
            return args.func(args)
    except KeyboardInterrupt as exc:
        stage = getattr(exc, "stage", None)
        signum = getattr(exc, "signum", 2)
        what = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
        what = f"{what} during stage '{stage}'" if stage else f"{what} ({args.command})"
        print(f"{what}: finished stages and outputs are kept; rerun the same command to resume", file=sys.stderr)
        return 128 + signum
    except Exception as exc:  # every failure: one line (the traceback with --debug)
        if debug:
            traceback.print_exc(file=sys.stderr)
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def threading_main() -> bool:
    """Signal handlers can be set from the main thread only (``main`` may run in a test's thread)."""
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
