"""Faults with real processes: a lost DDP rank, writers killed at random points, crashes inside a stage.

- A DDP rank's Dask worker process is SIGKILLed mid-training (2 worker processes, gloo): training stops
  within a bounded time with one ClusterError line telling the user to rerun, and the rerun (a fresh
  cluster, as a rerun of `mpm run` gets) resumes from the last checkpoint to the very weights of an
  undisturbed run.
- Atomic writes: a process that rewrites every kind of output the pipeline writes, over and over, while
  this process reads them, is SIGKILLed at random points; no read ever sees a half-written file, and
  every final-named output left is complete (the temporaries are recognised as such, and removed by the
  stage runner before a rerun).
- The stage runner: a stage that fails or is interrupted is never marked done, a partial output is never
  taken for done, and what a killed writer left is cleared before the stage is redone.

The cube is built with the local threaded scheduler inside the `mpm` process (the Dask cluster is started
after it, for train and score), so there is no cube-building worker to kill: killing the `mpm` process
during the cube write is the case (tests/test_interrupts.py, SIGKILL and SIGINT during stage cube). A
killed scoring worker is tests/test_score.py::test_killed_worker_still_gives_complete_identical_output.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _cubes import write_test_cube

from pipeline.errors import MPMError

ONE_TORCH_THREAD = True  # see conftest._one_torch_thread
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


# -- a lost DDP rank ---------------------------------------------------------------------------------


MODEL = {
    "window": 16,
    "patch": 4,
    "dim": 32,
    "depth": 2,
    "heads": 2,
    "decoder_dim": 32,
    "decoder_depth": 1,
    "stem_channels": 8,
    "fusion_channels": 16,
    "mask_ratio": 0.5,
}


def _ddp_config():
    from _cubes import BANDS, SOURCES

    from pipeline.config import RunConfig

    return RunConfig.from_dict(
        {
            "grid": {"crs": "EPSG:32646", "resolution": 100},
            "layers": [{"name": b, "path": f"{b}.tif", "source": s} for b, s in zip(BANDS, SOURCES)],
            "model": MODEL,
            # 2 ranks x 4 windows a step, a checkpoint every 2 steps: long enough to kill a rank well inside
            "train": {
                "epochs": 4,
                "batch_size": 8,
                "lr": 2e-3,
                "train_stride": 8,
                "checkpoint_every": 2,
                "seed": 0,
                "ddp_workers": 2,
                "device": "cpu",
            },
        }
    )


def _cluster():
    from pipeline.config import ClusterConfig
    from pipeline.run.cluster import make_cluster

    return make_cluster(ClusterConfig(kind="local", n_workers=2, threads_per_worker=1, memory_limit="2GiB"))


def _close(client) -> None:
    import logging

    logging.getLogger("distributed").setLevel(logging.CRITICAL)  # a killed worker's teardown chatter
    cluster = client.cluster
    client.close()
    cluster.close()
    logging.getLogger("distributed").setLevel(logging.WARNING)


@pytest.mark.slow  # ~60 s (130 s on a busy box): three clusters of two worker processes, three DDP trainings
@pytest.mark.reliability("fault", "DDP rank's worker process killed during training")
def test_lost_ddp_rank_is_one_clear_error_and_the_rerun_resumes(tmp_path, reliability):
    from pipeline.models.checkpoint import load_checkpoint
    from pipeline.run.cluster import ClusterError
    from pipeline.run.runner import train

    cube = write_test_cube(tmp_path / "cube.zarr")
    cfg = _ddp_config()

    client = _cluster()
    try:
        ref = train(cube, cfg, tmp_path / "ref", client=client)  # undisturbed, same layout
        ref_summary = json.loads((tmp_path / "ref" / "train_summary.json").read_text())
    finally:
        _close(client)

    out = tmp_path / "run"
    client = _cluster()
    killed: dict = {}
    try:
        pids = client.run(os.getpid)  # {worker address: pid}; rank r runs on the r-th address in order
        victim = sorted(pids)[1]  # rank 1: rank 0 writes the checkpoints, the other one loses its peer

        def killer():
            deadline = time.time() + 120
            while time.time() < deadline:
                ck = out / "checkpoint.pt"
                if ck.exists():
                    try:
                        step = load_checkpoint(ck)[1]["step"]
                    except MPMError:
                        step = 0  # being replaced this instant: look again
                    if step >= 4:
                        os.kill(pids[victim], signal.SIGKILL)
                        killed.update(step=step, t=time.monotonic())
                        return
                time.sleep(0.01)

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        with pytest.raises(ClusterError) as err:
            train(cube, cfg, out, client=client)
        stopped_after = time.monotonic() - killed["t"]
        t.join()
    finally:
        _close(client)
    msg = str(err.value)
    assert "\n" not in msg and "rank 1" in msg and "rerun the same command" in msg and "resumes from it" in msg, msg
    assert stopped_after < 30, f"training took {stopped_after:.0f} s to notice the lost rank (bounded: 30 s)"
    meta = load_checkpoint(out / "checkpoint.pt")[1]
    last, total = meta["step"], meta["extra"]["total_steps"]
    assert killed["step"] <= last < total and not (out / "model.pt").exists()
    assert f"step {last} of {total}" in msg

    client = _cluster()  # a rerun of the command: a new cluster
    try:
        train(cube, cfg, out, client=client)
    finally:
        _close(client)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from"] == last
    assert [r["digest"] for r in summary["ranks"]] == [r["digest"] for r in ref_summary["ranks"]]
    a, b = load_checkpoint(ref)[0].state_dict(), load_checkpoint(out / "model.pt")[0].state_dict()
    for k in a:
        assert torch_equal(a[k], b[k]), k
    reliability(
        observed=f"error: {msg} (raised {stopped_after:.1f} s after the kill); the rerun resumed from "
        f"step {last} and its weights equal an undisturbed run's bit for bit",
        kept=f"checkpoint.pt at step {last}; no model.pt",
    )


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


# -- atomic writes under SIGKILL -----------------------------------------------------------------------


WRITER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import numpy as np
    import torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    out = Path({out!r})
    from expected_outputs import expected
    from pipeline import io
    from pipeline.models.checkpoint import save_checkpoint
    from pipeline.evaluation.experiments import write_zarr_atomic
    from pipeline.data.cube import write_cube
    from pipeline.evaluation.report import write_report
    from pipeline.stages import _write_manifest
    from pipeline.run.runner import quicklook_stage
    from pipeline.scoring.sinks import write_cog
    from pipeline.evaluation.targets import write_targets
    from pipeline.evaluation.evaluate import write_metrics

    e = expected()
    writers = [
        ("cube.zarr", lambda p: write_cube(e["cube"], p)),
        ("stages.json", lambda p: _write_manifest(out, e["stages"])),
        ("metrics.json", lambda p: write_metrics(e["metrics"], p)),
        ("train_summary.json", lambda p: io.atomic_write_json(p, e["summary"], indent=1)),
        ("report.html", lambda p: write_report(e["html"], p)),
        ("targets.gpkg", lambda p: write_targets(e["targets"], p)),
        ("prospectivity.tif", lambda p: write_cog(e["map"], p, blocksize=64)),
        ("uncertainty.zarr", lambda p: write_zarr_atomic(e["small"], p)),
        ("checkpoint.pt", lambda p: save_checkpoint(p, e["model"], **e["ckpt_meta"])),
        ("bands.png", lambda p: quicklook_stage(out / "cube.zarr", out, log=lambda s: None)),
    ]
    n = 0
    while True:
        for name, write in writers:
            write(out / name)
        n += 1
        if n == 1:
            print("ready", flush=True)
    """
)


def _read_and_check(path: Path, exp: dict) -> None:
    """Read one final-named output in full and compare it with what the writer writes; raises if it is
    incomplete or different. Absent is fine (FileNotFoundError is passed on for the caller to allow)."""
    import rasterio
    import torch
    import xarray as xr

    from pipeline.evaluation.targets import read_targets

    name = path.name
    if name in ("stages.json", "metrics.json", "train_summary.json"):
        got = json.loads(path.read_bytes())
        want = {
            "stages.json": exp["stages"],
            "metrics.json": json.loads(json.dumps(exp["metrics"])),
            "train_summary.json": exp["summary"],
        }[name]
        assert got == want, f"{name} differs from what was written"
    elif name == "report.html":
        assert path.read_text(encoding="utf-8") == exp["html"]
    elif name == "targets.gpkg":
        got = read_targets(path)
        assert len(got) == len(exp["targets"]) and (got.geometry.to_wkb() == exp["targets"].geometry.to_wkb()).all()
    elif name == "prospectivity.tif":
        with rasterio.open(path) as src:
            np.testing.assert_array_equal(src.read(1)[: exp["map"].shape[0], : exp["map"].shape[1]], exp["map"].values)
            assert src.overviews(1)
    elif name == "checkpoint.pt":
        blob = torch.load(path, weights_only=True)
        for k, v in exp["model"].state_dict().items():
            assert torch.equal(blob["state_dict"][k], v)
    elif name == "bands.png":
        import matplotlib.image

        assert matplotlib.image.imread(path).shape[0] > 10
    elif name == "cube.zarr":
        from pipeline.data.cube import open_cube

        np.testing.assert_array_equal(open_cube(path)["evidence"].values, exp["cube"]["evidence"].values)
    elif name == "uncertainty.zarr":
        ds = xr.open_zarr(path, consolidated=False)
        np.testing.assert_array_equal(ds["std"].values, exp["small"]["std"].values)
    else:  # pragma: no cover
        raise AssertionError(f"unexpected output {name}")


ROUNDS = 1  # one writer process killed at a random point (~15 s); more rounds: more points, same checks
FILES = (
    "stages.json",
    "metrics.json",
    "train_summary.json",
    "report.html",
    "targets.gpkg",
    "prospectivity.tif",
    "checkpoint.pt",
    "bands.png",
)
STORES = ("cube.zarr", "uncertainty.zarr")


@pytest.fixture(scope="module")
def expected_module(tmp_path_factory):
    """A module (a file the writer process imports too) that builds every output's expected content."""
    d = tmp_path_factory.mktemp("expected")
    (d / "expected_outputs.py").write_text(
        textwrap.dedent(
            """
        import numpy as np
        _CACHE = {}

        def expected():
            if _CACHE:
                return _CACHE
            import geopandas as gpd
            import torch
            import xarray as xr
            from shapely.geometry import box
            from _cubes import make_arrays, BANDS, SOURCES
            from pipeline.config import ModelConfig
            from pipeline.data.cube import from_arrays
            from pipeline.models import build_model, group_indices

            ev, valid = make_arrays(64)
            x = 500_000 + 100 * (np.arange(64) + 0.5)
            y = 4_000_000 - 100 * (np.arange(64) + 0.5)
            cube = from_arrays(ev, bands=BANDS, sources=SOURCES, x=x, y=y, crs="EPSG:32646", valid=valid, chunk=32)
            rng = np.random.default_rng(0)
            m = xr.DataArray(rng.random((256, 256)).astype("float32"), dims=("y", "x"),
                             coords={"y": 4_000_000 - 100 * (np.arange(256) + 0.5), "x": 500_000 + 100 * (np.arange(256) + 0.5)},
                             name="prospectivity").rio.write_crs("EPSG:32646")
            mc = ModelConfig(window=16, patch=4, dim=64, depth=4, heads=4)
            torch.manual_seed(0)
            model = build_model(mc, group_indices(SOURCES))
            _CACHE.update(
                cube=cube, map=m, model=model,
                ckpt_meta=dict(model_cfg=mc, bands=BANDS, sources=SOURCES, center=[0.0] * 8, scale=[1.0] * 8,
                               groups=group_indices(SOURCES), step=7),
                stages={s: {"key": f"k{i}", "seconds": i, "outputs": [f"/x/{s}"] * 50} for i, s in enumerate("abcdefgh")},
                metrics={"prospectivity": {"auc": 0.9, "curve": rng.random(20000).tolist()}},
                summary={"ranks": [{"rank": 0, "digest": "d" * 16}], "history": rng.random((3000, 2)).tolist()},
                html="<!DOCTYPE html>\\n<html><body>" + "<p>" + "x" * 4_000_000 + "</p></body></html>\\n",
                targets=gpd.GeoDataFrame({"level": [0.05] * 40, "rank": range(40)},
                                         geometry=[box(i, 0, i + 1, 1) for i in range(40)], crs="EPSG:32646"),
                small=xr.Dataset({"std": (("y", "x"), rng.random((64, 64)).astype("float32"))}),
            )
            return _CACHE
        """
        )
    )
    sys.path.insert(0, str(d))
    sys.path.insert(0, str(TESTS))
    from expected_outputs import expected

    return d, expected()


@pytest.mark.reliability("atomic write", "writer SIGKILLed at random points while another process reads")
def test_killed_writers_never_expose_a_half_written_file(expected_module, tmp_path, reliability):
    from pipeline.io import clear_stale

    mod_dir, exp = expected_module
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(TESTS), out=str(out)))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(mod_dir), str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    rng = random.Random(1234)
    reads = 0
    torn: list[str] = []
    left_over: set[str] = set()
    for _round in range(ROUNDS):
        proc = subprocess.Popen(
            [sys.executable, str(script)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-3000:]
            stop = time.monotonic() + rng.uniform(3.0, 6.0)  # a random point of the write loop
            while time.monotonic() < stop:  # read while the writer replaces the files
                for name in FILES:
                    try:
                        _read_and_check(out / name, exp)
                        reads += 1
                    except FileNotFoundError:
                        pass
                    except Exception as exc:  # noqa: BLE001 - anything else is a torn read
                        torn.append(f"{name}: {type(exc).__name__}: {exc}")
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        assert not torn, torn[:3]
        # after the kill: every final-named output is complete; files are always there (os.replace), a
        # store may be absent for the instant between moving the old one aside and renaming the new one
        for name in FILES + STORES:
            if name in FILES or (out / name).exists():
                _read_and_check(out / name, exp)
        for name in FILES + STORES:  # what the stage runner does before it redoes a stage
            for stale in clear_stale(out / name):
                left_over.add(stale.name.split(".tmp-")[0].split(".old-")[0].lstrip("."))
            _read_and_check(out / name, exp)
        assert not [p.name for p in out.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert reads > 20
    reliability(
        observed=f"{reads} full reads of {len(FILES)} kinds of file during the writes, none torn; after each of "
        f"{ROUNDS} SIGKILL(s) at a random point every output ({', '.join(FILES + STORES)}) was complete and equal to what was written",
        kept=f"the last complete version of each output; temporaries of {sorted(left_over) or 'none'} "
        "(recognised by pipeline.io.stale_temporaries, removed before a stage reruns)",
    )


# -- the stage runner under failures ------------------------------------------------------------------


@pytest.fixture
def tiny_cfg(tmp_path):
    from pipeline.config import RunConfig

    return RunConfig.from_dict(
        {"grid": {"crs": "EPSG:32646", "resolution": 100}, "layers": [{"name": "a", "path": "a.tif"}]},
        base_dir=tmp_path,
    )


@pytest.mark.reliability("interrupt", "exception or Ctrl-C inside a stage: never marked done, redone on rerun")
def test_a_failed_or_interrupted_stage_is_never_marked_done(tmp_path, tiny_cfg, reliability):
    from pipeline.io import atomic_write_text, temporary_name
    from pipeline.run.runner import StageInterrupted, run_stage

    out = tmp_path / "o"
    target = out / "thing.txt"
    log: list[str] = []

    def write():
        atomic_write_text(target, "v1")

    assert run_stage("thing", tiny_cfg, out, [target], ("grid",), write, log=log.append)
    done = json.loads((out / "stages.json").read_text())
    assert "thing" in done

    # forced rerun that fails half-way: the old record goes, the old output stays complete
    def crash():
        Path(temporary_name(target)).write_text("half")  # what a killed writer leaves
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        run_stage("thing", tiny_cfg, out, [target], ("grid",), crash, force=True, log=log.append)
    assert "thing" not in json.loads((out / "stages.json").read_text())
    assert target.read_text() == "v1"

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(StageInterrupted) as exc:
        run_stage("thing", tiny_cfg, out, [target], ("grid",), interrupted, log=log.append)
    assert exc.value.stage == "thing" and isinstance(exc.value, KeyboardInterrupt)
    assert "thing" not in json.loads((out / "stages.json").read_text())

    log.clear()
    assert run_stage("thing", tiny_cfg, out, [target], ("grid",), write, log=log.append)  # redone, not skipped
    assert log[0] == "[thing] running ..." and not list(out.glob("*.tmp-*"))  # the half-written temporary went
    assert not run_stage("thing", tiny_cfg, out, [target], ("grid",), write, log=log.append)  # now up to date
    reliability(
        observed="the failed and the interrupted stage (StageInterrupted 'thing', exit 130 in the CLI) were "
        "not in stages.json; the rerun ran the stage again, then skipped it",
        kept="the previous complete output; the killed writer's temporary, removed before the rerun",
    )


@pytest.mark.reliability("interrupt", "partial score store and a stale stages.json record: not taken for done")
def test_a_partial_store_is_never_taken_for_done(tmp_path, tiny_cfg, reliability):
    import xarray as xr

    from pipeline.scoring.score import open_scores
    from pipeline.stages import _write_manifest, output_complete, run_stage, stage_key
    from pipeline.stages import digest as _hash

    out = tmp_path / "o"
    out.mkdir()
    store = out / "prospectivity.zarr"
    xr.Dataset(
        {"prospectivity": (("y", "x"), np.zeros((4, 4), "float32"))},
        attrs={"mpm_complete": False, "mpm_write_fingerprint": "x"},
    ).to_zarr(store, zarr_format=3, consolidated=False)
    assert not output_complete(store)
    with pytest.raises(MPMError, match="incomplete.*rerun the same `mpm run` command") as err:
        open_scores(store)
    # a record claiming the stage done (as a run before this fix could leave): the partial store is redone
    key = _hash({"own": stage_key(tiny_cfg, ("score",)), "upstream": {}})
    _write_manifest(out, {"score": {"key": key, "outputs": [str(store)]}})
    ran = []

    def finish():
        ran.append(1)
        xr.Dataset({"prospectivity": (("y", "x"), np.ones((4, 4), "float32"))}, attrs={"mpm_complete": True}).to_zarr(
            store, mode="w", zarr_format=3, consolidated=False
        )

    assert run_stage("score", tiny_cfg, out, [store], ("score",), finish, log=lambda s: None) and ran == [1]
    assert output_complete(store) and not run_stage(
        "score", tiny_cfg, out, [store], ("score",), finish, log=lambda s: None
    )
    reliability(
        observed=f"evaluate/report refuse it: error: {err.value}; the score stage ran again although "
        "stages.json had a matching record",
        kept="prospectivity.zarr marked mpm_complete: false until finished",
    )
