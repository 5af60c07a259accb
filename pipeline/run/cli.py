"""``mpm`` command line: wiring only; the logic lives in the stage modules.

    mpm demo  --out DIR                 synthetic province -> every output (the README's main job)
    mpm run   CONFIG --out DIR          cube -> train -> score -> evaluate -> report
    mpm cube  CONFIG --out DIR          DIR/cube.zarr
    mpm train CONFIG --cube C --out DIR DIR/model.pt
    mpm score CONFIG --cube C --model M --out DIR
    mpm compare CONFIG --out DIR        the ViT, ablations and seven comparison methods, one table
    mpm reliability CONFIG --out DIR    several seeds: mean and uncertainty maps
    mpm synth --out DIR                 write the synthetic province's input files only

Errors of this package print as one line (``error: ...``) and exit with status 2. Ctrl-C prints one line
naming the interrupted stage and exits with status 130; rerunning the same command resumes.

The commands import the stage modules inside their functions on purpose: those pull in torch, dask and
GDAL (seconds), and ``mpm --help`` or a config error should answer at once. No cycle is dodged here.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from pipeline.errors import MPMError


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
    from pipeline.run.runner import build_cube_stage

    cfg = _load(args.config)
    out = Path(args.out)
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
    prov = write_province(out / "province", size=args.size, seed=args.seed)
    print(f"synthetic province ({args.size} px, seed {args.seed}): {prov.config_path}")
    cfg = _load(str(prov.config_path))
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module="zarr")
    # rasterio warns when it warps in-memory arrays (ingest._warp_block) whose transforms are given separately: noise
    warnings.filterwarnings("ignore", message="Dataset has no geotransform", module="rasterio")
    try:
        return args.func(args)
    except MPMError as exc:
        msg = str(exc).replace("\n", " ")
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        stage = getattr(exc, "stage", None)
        what = f"interrupted during stage '{stage}'" if stage else f"interrupted ({args.command})"
        print(f"{what}: finished stages and outputs are kept; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
