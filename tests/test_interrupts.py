"""Interrupted `mpm run`: SIGINT (Ctrl-C) and SIGKILL inside each stage, then the same command again.

Every run is a real `python -m pipeline.run.cli run` subprocess on a tiny synthetic province (64 px, a
LocalCluster of one worker process for train and score). The signal goes to the run's whole process group
for SIGINT (what Ctrl-C in a terminal does: the Dask worker gets it too) and to the CLI process alone for
SIGKILL (what the OOM killer does; its worker must not outlive it). After the interruption:

- SIGINT: exit status 130, one line ``interrupted during stage '<stage>': ... rerun the same command to
  resume`` and no traceback, from the CLI or from the worker;
- ``stages.json`` marks no stage done whose outputs are missing or incomplete, and nothing half-written
  sits under a final name;
- the rerun skips exactly the stages that had finished, redoes (train: resumes from ``checkpoint.pt``;
  score: resumes the store's regions) the interrupted one and the rest, and its outputs equal those of one
  undisturbed run of the same command (module fixture): bitwise for the cube, the weights, the score
  store, the GeoTIFF, the metrics and the target polygons. Two things legitimately differ and are not
  compared bitwise: ``report.html`` (it prints the generation time, the output folder and the stage
  timings: its sections are compared instead) and the training loss *history* (a resumed run averages the
  logged loss over the steps it ran; the weights it ends with are identical).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("cube", "train", "score", "evaluate", "report")
RUN_TIMEOUT = 240  # s: a hung run fails the test instead of hanging the suite


def write_config(folder: Path, *, seed: int = 0, **cluster) -> Path:
    """The 64-px synthetic province with a short training (8 steps, a checkpoint every 2) and 2 x 2 regions."""
    from pipeline.data.synthetic import write_province

    prov = write_province(folder / "province", size=64, seed=seed)
    cfg = yaml.safe_load(prov.config_path.read_text())
    cfg["grid"]["chunk"] = 32  # 4 score regions: the score store resumes region by region
    cfg["train"].update(epochs=4, checkpoint_every=2, device="cpu")
    cfg["cluster"] = {"kind": "local", "n_workers": 1, "threads_per_worker": 1, "memory_limit": "3GiB", **cluster}
    path = prov.config_path.with_name("run.yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Run:
    """A `mpm run` subprocess in its own session (process group), its output lines collected as they come."""

    def __init__(self, config: Path, out: Path, *extra: str):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.run.cli", "run", str(config), "--out", str(out), "--quiet", *extra],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            # a terminal's Ctrl-C: a suite started in the background (`make reliability &`) inherits SIGINT
            # ignored, and Python then installs no KeyboardInterrupt handler
            preexec_fn=_default_sigint,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(s, b), daemon=True)
            for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, buf):
        for line in stream:
            buf.append(line.rstrip("\n"))

    def wait_for(self, pred, timeout: float = RUN_TIMEOUT, what: str = "") -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if pred():
                return
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the pumps drain
                raise AssertionError(f"the run ended (status {self.proc.returncode}) before {what}:\n" + self.log())
            time.sleep(0.02)
        self.kill_group()
        raise AssertionError(f"timed out waiting for {what}:\n" + self.log())

    def line(self, prefix: str) -> bool:
        return any(line.startswith(prefix) for line in self.out)

    def finish(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise AssertionError(f"`mpm run` did not exit within {timeout} s (a hang):\n" + self.log()) from None
        for t in self._threads:
            t.join(10)
        return self.proc.returncode

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def group_gone(self, timeout: float = 30) -> bool:
        """True once no process of the run's group is left (the CLI and its Dask worker)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.1)
        return False

    def log(self) -> str:
        return "\n".join(["--- stdout", *self.out, "--- stderr", *self.err])


def run_to_end(config: Path, out: Path, *extra: str) -> Run:
    r = Run(config, out, *extra)
    rc = r.finish()
    assert rc == 0, f"`mpm run` failed with status {rc}:\n{r.log()}"
    return r


# -- what is on disk --------------------------------------------------------------------------------


def stages_done(out: Path) -> dict:
    p = out / "stages.json"
    return json.loads(p.read_text()) if p.exists() else {}


def check_loadable(path: Path) -> None:
    """Open ``path`` with the reader its kind has; fails on a truncated or partial file."""
    import rasterio
    import xarray as xr

    name = path.name
    if name == "cube.zarr":
        from pipeline.data.cube import open_cube

        ds = open_cube(path)
        assert np.isfinite(ds["scale"].values).all()
        ds["evidence"].values  # noqa: B018  (every chunk read)
    elif name.endswith(".zarr"):
        from pipeline.scoring.sinks import is_complete

        assert is_complete(path), f"{path} is under its final name and marked done, but incomplete"
        xr.open_zarr(path, consolidated=False)["prospectivity"].values  # noqa: B018
    elif name.endswith(".pt"):
        from pipeline.models.checkpoint import load_checkpoint

        load_checkpoint(path)
    elif name.endswith(".tif"):
        with rasterio.open(path) as src:
            src.read(1)
            for ov in src.overviews(1):
                assert ov > 1
    elif name.endswith(".json"):
        json.loads(path.read_text())
    elif name.endswith(".gpkg"):
        from pipeline.evaluation.targets import read_targets

        read_targets(path)
    elif name.endswith(".html"):
        assert path.read_text().rstrip().endswith("</html>")
    elif name.endswith(".png"):
        import matplotlib.image

        matplotlib.image.imread(path)


def check_consistent(out: Path) -> list[str]:
    """Invariants after any interruption; returns the stages marked done.

    Every stage marked done has all its outputs there and loadable; every final-named output that exists
    is loadable (the resumable score store excepted: it may be there, marked incomplete, for the rerun to
    resume); no final-named file is half-written.
    """
    from pipeline.scoring.sinks import is_complete

    if not out.exists():  # interrupted before anything was kept: the lock removes the empty folder it made
        return []
    done = stages_done(out)
    for name, rec in done.items():
        for p in map(Path, rec["outputs"]):
            assert p.exists(), f"stages.json marks {name!r} done but its output {p} is missing"
            check_loadable(p)
    for p in sorted(out.iterdir()):
        if ".tmp-" in p.name or ".old-" in p.name or p.name in ("province", "stages.json"):
            continue
        if p.name == "prospectivity.zarr" and not is_complete(p):
            assert "score" not in done
            continue
        check_loadable(p)
    return list(done)


def compare_outputs(ref: Path, out: Path) -> None:
    """Every output of ``out`` equals the undisturbed run's in ``ref`` (see the module doc)."""
    import rasterio
    import torch
    import xarray as xr
    from geopandas.testing import assert_geodataframe_equal

    from pipeline.data.cube import open_cube
    from pipeline.evaluation.targets import read_targets

    a, b = open_cube(ref / "cube.zarr"), open_cube(out / "cube.zarr")
    for v in ("evidence", "valid", "center", "scale"):
        np.testing.assert_array_equal(b[v].values, a[v].values, err_msg=f"cube {v}")
    for name in ("model.pt", "checkpoint.pt"):
        sa = torch.load(ref / name, weights_only=True)
        sb = torch.load(out / name, weights_only=True)
        assert sa["step"] == sb["step"]
        for k, t in sa["state_dict"].items():
            assert torch.equal(sb["state_dict"][k], t), f"{name}: weights {k} differ"
    za = xr.open_zarr(ref / "prospectivity.zarr", consolidated=False)
    zb = xr.open_zarr(out / "prospectivity.zarr", consolidated=False)
    assert set(za.data_vars) == set(zb.data_vars)
    for v in za.data_vars:
        np.testing.assert_array_equal(zb[v].values, za[v].values, err_msg=f"prospectivity.zarr {v}")
    with rasterio.open(ref / "prospectivity.tif") as ta, rasterio.open(out / "prospectivity.tif") as tb:
        np.testing.assert_array_equal(tb.read(), ta.read())
        assert ta.transform == tb.transform and ta.crs == tb.crs
    assert json.loads((out / "metrics.json").read_text()) == json.loads((ref / "metrics.json").read_text())
    ga, gb = read_targets(ref / "targets.gpkg"), read_targets(out / "targets.gpkg")
    assert len(ga) == len(gb) > 0
    assert_geodataframe_equal(gb, ga, check_less_precise=False)
    assert (gb.geometry.to_wkb() == ga.geometry.to_wkb()).all()
    sa = json.loads((ref / "train_summary.json").read_text())
    sb = json.loads((out / "train_summary.json").read_text())
    assert [r["digest"] for r in sb["ranks"]] == [r["digest"] for r in sa["ranks"]] and sb["steps"] == sa["steps"]
    heads = re.compile(r"<h[23]>(.*?)</h[23]>")
    ha, hb = (heads.findall((d / "report.html").read_text()) for d in (ref, out))
    assert ha == hb and "Provenance" in ha


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(config, output folder) of one undisturbed run of the command that the cases interrupt."""
    tmp = tmp_path_factory.mktemp("interrupts")
    config = write_config(tmp)
    out = tmp / "reference"
    t0 = time.perf_counter()
    run_to_end(config, out)
    print(f"undisturbed run: {time.perf_counter() - t0:.1f} s")
    assert check_consistent(out) == list(STAGES)
    return config, out


def interrupt(config: Path, out: Path, stage: str, sig: int) -> Run:
    """Start the run, wait until it is inside ``stage``, send ``sig``; returns the ended run."""
    r = Run(config, out)
    r.wait_for(lambda: r.line(f"[{stage}] running"), what=f"stage {stage!r} to start")
    if stage == "train":  # well inside: after its first checkpoint (rank 0 writes it)
        r.wait_for(lambda: (out / "checkpoint.pt").exists(), what="the first checkpoint")
    elif stage == "score":  # well inside: after a first region is on disk
        regions = out / "prospectivity.zarr" / ".mpm_regions"
        r.wait_for(lambda: regions.is_dir() and any(regions.iterdir()), what="the first scored region")
    else:  # short stages (evaluate takes about 1 s): the "running" line is printed as the stage starts
        time.sleep(0.05)
    if sig == signal.SIGINT:
        os.killpg(r.proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
    else:
        os.kill(r.proc.pid, signal.SIGKILL)
    r.finish(timeout=120)
    assert not r.line(f"[{stage}] done"), f"stage {stage!r} had finished before the signal landed:\n{r.log()}"
    return r


def check_rerun(reference_out: Path, config: Path, out: Path, stage: str) -> tuple[list[str], list[str]]:
    """Rerun the same command; returns (stages skipped, stages run). Checks it redid exactly the rest."""
    before = set(stages_done(out))
    r = run_to_end(config, out)
    skipped = [s for s in STAGES if r.line(f"[{s}] up to date, skipped")]
    ran = [s for s in STAGES if r.line(f"[{s}] running")]
    i = STAGES.index(stage)
    assert skipped == list(STAGES[:i]) and set(skipped) == before, r.log()
    assert ran == list(STAGES[i:]), r.log()
    assert check_consistent(out) == list(STAGES)
    compare_outputs(reference_out, out)
    return skipped, ran


def _resumed_from(out: Path) -> int:
    return json.loads((out / "train_summary.json").read_text())["resumed_from"]


# Each case costs about one whole run (~30-40 s on a quiet 2-core box): the default run keeps the most
# common one (Ctrl-C during training on the cluster), the rest of the matrix is slow.
DEFAULT_CASES = {("train", "SIGINT")}
CASES = [
    pytest.param(
        stage,
        sig,
        marks=[
            pytest.mark.reliability("interrupt", f"{sig} during stage {stage}"),
            *([] if (stage, sig) in DEFAULT_CASES else [pytest.mark.slow]),
        ],
        id=f"{sig}-{stage}",
    )
    for sig in ("SIGINT", "SIGKILL")
    for stage in STAGES
]


@pytest.mark.parametrize("stage,sig", CASES)
def test_interrupted_run_resumes_to_identical_outputs(reference, tmp_path, stage, sig, reliability):
    config, ref = reference
    out = tmp_path / "run"
    r = interrupt(config, out, stage, getattr(signal, sig))
    if sig == "SIGINT":
        assert r.proc.returncode == 130, r.log()
        said = [line for line in r.err if line.startswith("interrupted")]
        assert said == [
            f"interrupted during stage '{stage}': finished stages and outputs are kept; "
            "rerun the same command to resume"
        ], r.log()
        assert not any(
            "Traceback" in line or "KeyboardInterrupt" in line or " - distributed." in line for line in r.err
        ), r.log()
        observed = f"exit 130, one line: {said[0]}; "
    else:
        assert r.proc.returncode == -signal.SIGKILL
        observed = "killed (status -9); "
    assert r.group_gone(), "a Dask worker process outlived the interrupted `mpm run`"
    done = check_consistent(out)
    assert done == list(STAGES[: STAGES.index(stage)]), f"stages.json after the interruption: {done}"
    partial = (
        "prospectivity.zarr (incomplete, resumable); "
        if (out / "prospectivity.zarr").exists() and stage == "score"
        else ""
    )
    ckpt = (out / "checkpoint.pt").exists() and stage == "train"

    skipped, ran = check_rerun(ref, config, out, stage)
    resumed = _resumed_from(out)
    if ckpt:
        assert resumed > 0, "the rerun did not resume training from checkpoint.pt"
    reliability(
        observed=observed
        + f"the rerun skipped {skipped or 'nothing'}, ran {ran}"
        + (f" (training resumed from step {resumed})" if ckpt else "")
        + "; every output equals an undisturbed run's",
        kept=f"stages.json: {done or 'no stage'} done; "
        + partial
        + ("checkpoint.pt; " if ckpt else "")
        + "no half-written file under a final name",
    )


@pytest.mark.slow
@pytest.mark.reliability("interrupt", "forced rerun killed in score: the old map is never reported as done")
def test_forced_rerun_killed_in_score_is_not_taken_for_done(reference, tmp_path, reliability):
    """A finished run, then `--force --stages train,score` (new weights: the score store is rewritten from
    scratch) killed inside score. Before the fix, stages.json still marked score done from the first run,
    so a plain rerun skipped score and evaluated a half-written map."""
    import shutil

    config, ref = reference
    out = tmp_path / "run"
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("province"))
    manifest = json.loads((out / "stages.json").read_text())  # the copied manifest names ref's paths
    for rec in manifest.values():
        rec["outputs"] = [str(out / Path(p).name) for p in rec["outputs"]]
    (out / "stages.json").write_text(json.dumps(manifest))
    r = Run(config, out, "--force", "--stages", "train,score")
    regions = out / "prospectivity.zarr" / ".mpm_regions"
    r.wait_for(
        lambda: r.line("[score] running") and regions.is_dir() and any(regions.iterdir()),
        what="the forced score stage to write a first region",
    )
    os.kill(r.proc.pid, signal.SIGKILL)
    r.finish(120)
    assert r.group_gone()
    done = check_consistent(out)
    assert "score" not in done and "train" in done, done
    again = run_to_end(config, out)
    ran = [s for s in STAGES if again.line(f"[{s}] running")]
    assert ran == ["score", "evaluate", "report"], again.log()  # score, and what was built from the old map
    assert check_consistent(out) == list(STAGES)
    compare_outputs(ref, out)
    reliability(
        observed=f"the rerun without --force ran {ran} (score, and the stages built from the old map); "
        "outputs equal an undisturbed run's",
        kept=f"stages.json: {done} done, score not; prospectivity.zarr marked incomplete",
    )


# -- one run per output folder, and SIGTERM ----------------------------------------------------------------

_HOLD = (
    "import sys, time\n"
    "from pipeline.io import output_lock\n"
    "with output_lock(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(float(sys.argv[2]))\n"
)


def _holder(out: Path, seconds: float = 120) -> subprocess.Popen:
    """Another process holding ``out``'s lock (until it sleeps ``seconds`` or is killed)."""
    p = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(out), str(seconds)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.reliability("lock", "a command on a folder that another run holds, then that run killed (-9)")
def test_locked_folder_fails_at_once_then_a_dead_holder_is_taken_over(tmp_path, capsys, reliability):
    import socket

    from pipeline.run.cli import main

    config = write_config(tmp_path)
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        t0 = time.perf_counter()
        rc = main(["run", str(config), "--out", str(out), "--quiet"])
        took = time.perf_counter() - t0
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error: output folder") and "\n" not in err, err
        assert f"pid {holder.pid} on host {socket.gethostname()!r}" in err and "Fix" in err, err
        assert took < 5, f"the refusal took {took:.1f} s"
        assert sorted(p.name for p in out.iterdir()) == [".mpm.lock"], "the refused run wrote into the folder"
    finally:
        holder.kill()  # SIGKILL: the holder cannot remove its lock file
        holder.wait()
    assert json.loads((out / ".mpm.lock").read_text())["pid"] == holder.pid
    rc = main(["run", str(config), "--out", str(out), "--stages", "cube", "--quiet"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    took_over = [line for line in cap.out.splitlines() if line.startswith("[lock] took over")]
    assert len(took_over) == 1 and f"pid {holder.pid}" in took_over[0], cap.out
    assert not (out / ".mpm.lock").exists(), "the lock file outlived the run"
    reliability(
        observed=f"{err}; after the holder was killed (-9), the next run: {took_over[0]}, and ran",
        kept="nothing written by the refused run; the dead holder's lock file replaced, then removed at the end",
    )


@pytest.mark.slow
@pytest.mark.reliability("lock", "two `mpm run` started at once on one folder")
def test_two_runs_at_once_exactly_one_runs(reference, tmp_path, reliability):
    config, ref = reference
    out = tmp_path / "run"
    a, b = Run(config, out), Run(config, out)
    codes = {}
    t0 = time.time()
    while len(codes) < 2 and time.time() - t0 < RUN_TIMEOUT:  # the refused one ends first, at once
        for r in (a, b):
            if r not in codes and r.proc.poll() is not None:
                codes[r] = (r.finish(), time.time() - t0)
        time.sleep(0.05)
    assert len(codes) == 2, a.log() + b.log()
    assert sorted(c for c, _ in codes.values()) == [0, 2], a.log() + b.log()
    winner, loser = (a, b) if codes[a][0] == 0 else (b, a)
    lines = [line for line in loser.err if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: output folder"), loser.log()
    assert f"pid {winner.proc.pid} " in lines[0], loser.log()
    assert not any(line.startswith("[") for line in loser.out), loser.log()
    assert codes[loser][1] < 20, f"the refused run took {codes[loser][1]:.1f} s to end"
    assert check_consistent(out) == list(STAGES)
    compare_outputs(ref, out)
    reliability(
        observed=f"one ran to the end; the other exited 2 after {codes[loser][1]:.0f} s having run no stage, "
        f"one line: {lines[0]}",
        kept="the outputs of the run that ran, equal to an undisturbed run's",
    )


@pytest.mark.slow
@pytest.mark.reliability("interrupt", "SIGTERM during stage train (what a batch system sends)")
def test_sigterm_is_handled_like_ctrl_c(reference, tmp_path, reliability):
    config, ref = reference
    out = tmp_path / "run"
    r = Run(config, out)
    r.wait_for(lambda: r.line("[train] running"), what="stage 'train' to start")
    r.wait_for(lambda: (out / "checkpoint.pt").exists(), what="the first checkpoint")
    os.kill(r.proc.pid, signal.SIGTERM)  # the CLI alone, as `kill PID` or a scheduler's stop
    assert r.finish(timeout=120) == 143, r.log()
    said = [line for line in r.err if line.startswith("terminated")]
    assert said == [
        "terminated (SIGTERM) during stage 'train': finished stages and outputs are kept; "
        "rerun the same command to resume"
    ], r.log()
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in r.err), r.log()
    assert r.group_gone(), "a Dask worker process outlived the terminated `mpm run`"
    done = check_consistent(out)
    assert done == ["cube"], done
    assert not (out / ".mpm.lock").exists(), "SIGTERM left the lock file"
    skipped, ran = check_rerun(ref, config, out, "train")
    reliability(
        observed=f"exit 143, one line: {said[0]}; the rerun skipped {skipped}, ran {ran}; every output equals an "
        "undisturbed run's",
        kept=f"stages.json: {done} done; checkpoint.pt; no lock file",
    )
