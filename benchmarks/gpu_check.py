"""The one prepared device check (issue 15): ``make gpu-check`` on a machine with a GPU, in one go.

Without CUDA it says so in one line and exits 0. With CUDA it runs, printing each check as it goes:

1. ``gpu tests``: the ``gpu``-marked tests (tests/test_gpu.py): the feed on CUDA, a bf16 training step eager and
   compiled, GPU vs CPU scores, each LocalCUDACluster worker on its own GPU, an NCCL group and DDP training
   over every GPU of the box, a LocalCUDACluster scoring a small cube;
2. ``training``: benchmarks/train.py, the reference model (12 bands, 32 px windows, patch 4, dim 192, depth 6)
   in bf16: eager and compiled training windows/s beside its forward-only rate;
3. ``scoring``: a cube on disk scored end to end (score_cube -> Zarr) in px/s beside the model's dense rate on
   the same device (forward windows/s x stride^2), with a checkpoint the real trainer wrote;
4. ``feed``: benchmarks/patches.py on CUDA: the device-side feed's windows/s (beside a plain device copy of
   the same bytes, and host-to-device bytes per window), set beside the compiled training step.

Every step runs as a child process with its own time limit, all within 8 minutes. The check goes on after a
failure (device time is scarce: one run shows every problem), then exits non-zero naming the first one.
Writes ``OUT/gpu_check.json`` and ``OUT/gpu_check_rows.md`` (rows for docs/performance.md).

    python benchmarks/gpu_check.py [--out out/gpu-check] [--budget 480]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: imported by the pipeline and the checks; a fresh GPU machine must have them (docs/performance.md says how)
REQUIRED = ("torch", "numpy", "xarray", "dask", "distributed", "dask_cuda", "zarr", "xbatcher", "pydantic", "rioxarray")
GOALS = {
    "train_compiled_windows_per_s": 40_000,  # H100/H200, reference model, bf16, compiled
    "scoring_vs_dense": 0.5,  # end to end >= 50 % of the model's dense rate on the same device
    "feed_vs_train": 1.0,  # the feed never slower than the training step
}


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _run(cmd: list[str], timeout: float, tag: str) -> tuple[int, list[str]]:
    """Run a child, echoing its lines as they come; (returncode, lines). 124 when killed at ``timeout``."""
    lines: list[str] = []
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )

    def echo() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            print(f"    {tag}| {lines[-1]}", flush=True)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = 124
    reader.join(timeout=5)
    return rc, lines


def _last_json(lines: list[str]) -> dict:
    for line in reversed(lines):
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    raise ValueError("no JSON line in its output")


# -- the scoring step (a child process of its own) ----------------------------------------------------------


def scoring_step(size: int, chunk: int, stride: int, batch: int) -> dict:
    """Reference model: a checkpoint from the real trainer, its dense forward rate, and end-to-end scoring."""
    import numpy as np
    import torch

    from pipeline.config import RunConfig, ScoreConfig
    from pipeline.data.cube import from_arrays, open_cube, write_cube
    from pipeline.models import autocast_context
    from pipeline.models.checkpoint import load_checkpoint
    from pipeline.run.runner import train
    from pipeline.scoring.score import score_cube
    from pipeline.scoring.sinks import write_zarr_resumable

    # the CPU runs it only to check this code on a box without a GPU (tiny sizes)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    train_batch = 256 if device.type == "cuda" else 16
    bands = [f"b{i}" for i in range(12)]
    sources = ["geochemistry"] * 6 + ["geophysics"] * 3 + ["geology"] * 3
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:size, 0:size] / size
        ev = np.stack(
            [np.sin((3 + b) * xx) + np.cos((2 + b) * yy) + 0.1 * rng.standard_normal((size, size)) for b in range(12)]
        ).astype("float32")
        x = 100.0 * (np.arange(size) + 0.5)
        y = 100.0 * (size - np.arange(size) - 0.5)
        valid = np.ones((size, size), bool)
        ds = from_arrays(ev, bands=bands, sources=sources, x=x, y=y, crs="EPSG:32646", valid=valid, chunk=chunk)
        cube_path = write_cube(ds, work / "cube.zarr")
        cfg = RunConfig.from_dict(
            {
                "grid": {"crs": "EPSG:32646", "resolution": 100},
                "layers": [{"name": b, "path": f"{b}.tif", "source": s} for b, s in zip(bands, sources)],
                "model": {"window": 32, "patch": 4, "dim": 192, "depth": 6, "heads": 3},
                "train": {"epochs": 1, "steps_per_epoch": 5, "batch_size": train_batch, "checkpoint_every": 100},
                "score": {"stride": stride, "batch_size": batch},
            }
        )
        ckpt = train(cube_path, cfg, work / "run")
        model = load_checkpoint(ckpt, map_location="cpu")[0].to(device).eval()
        xb = torch.randn(batch, 12, 32, 32, device=device)
        with torch.inference_mode(), autocast_context(device):
            model(xb)
            sync()
            n, t = 0, time.perf_counter()
            while time.perf_counter() - t < 5 or n < 3:
                model(xb)
                n += 1
            sync()
        fwd = n * batch / (time.perf_counter() - t)
        dense = fwd * stride * stride
        print(f"model forward (bf16, eager): {fwd:,.0f} windows/s -> dense {dense:,.0f} px/s at stride {stride}")
        scored = score_cube(open_cube(cube_path), ckpt, ScoreConfig(stride=stride, batch_size=batch))
        t = time.perf_counter()
        # threads: the reads, the blending and the writes of several regions overlap the GPU's work
        write_zarr_resumable(scored, work / "p.zarr", scheduler="threads", regions_per_batch=64)
        e2e = size * size / (time.perf_counter() - t)
        print(f"end to end: {size * size:,} px, {e2e:,.0f} px/s = {e2e / dense:.0%} of the dense rate (goal >= 50 %)")
    return {
        "scoring_end_to_end_px_per_s": round(e2e),
        "model_dense_px_per_s": round(dense),
        "model_forward_windows_per_s": round(fwd, 1),
        "scoring_vs_dense": round(e2e / dense, 3),
        "scoring_cube": [12, size, size],
        "scoring_stride": stride,
    }


# -- the check ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "out/gpu-check", help="folder of the JSON and rows")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
    ap.add_argument("--step", choices=["scoring"], help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=2048, help="side of the feed benchmark's cube")
    ap.add_argument("--score-size", type=int, default=4096, help="side of the scoring cube")
    args = ap.parse_args(argv)

    import torch

    if args.step == "scoring":
        batch = 4096 if torch.cuda.is_available() else 64
        print(json.dumps(scoring_step(args.score_size, min(512, args.score_size), 16, batch)))
        return 0
    if not torch.cuda.is_available():
        build = torch.version.cuda or "none"
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}, CUDA build: {build}); nothing to check")
        return 0

    t0 = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0)
    card = {
        "gpu": name,
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": len(os.sched_getaffinity(0)),
        "python": sys.version.split()[0],
    }
    print(f"gpu-check on {card['gpus']} x {name}, torch {card['torch']} (CUDA {card['cuda']}), {card['cpus']} CPUs")
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"gpu-check FAILED: first failure: packages {missing} are not importable with {sys.executable}. Fix: "
            "install the project's pins and dask-cuda into this environment (docs/performance.md, 'GPU check')"
        )
        return 1

    results: dict = {"card": card, "checks": {}, "figures": {}}
    failures: list[str] = []
    py = sys.executable
    steps = [
        ("gpu tests", [py, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-v", "-p", "no:cacheprovider"], 240),
        ("training", [py, "benchmarks/train.py", "--batch", "1024", "--steps", "20"], 120),
        ("scoring", [py, __file__, "--step", "scoring", "--score-size", str(args.score_size)], 150),
        (
            "feed",
            [py, "benchmarks/patches.py", "--device", "cuda", "--skip-train", "--size", str(args.size)]
            + ["--chunk", "512", "--batch", "1024", "--batches", "60", "--lazy-patches", "10"],
            80,
        ),
    ]
    for i, (what, cmd, limit) in enumerate(steps, 1):
        left = args.budget - (time.monotonic() - t0)
        if left < 20:
            failures.append(f"{what}: not run, the {args.budget:.0f} s budget is spent")
            print(f"[{i}/{len(steps)}] {what}: SKIPPED (budget spent)", flush=True)
            continue
        limit = min(limit, left - 10)
        print(f"[{i}/{len(steps)}] {what} (at most {limit:.0f} s) ...", flush=True)
        t = time.monotonic()
        rc, lines = _run(cmd, limit, what)
        took = time.monotonic() - t
        entry = {"rc": rc, "seconds": round(took, 1)}
        problem = None
        if rc == 124:
            problem = f"{what}: stopped at its {limit:.0f} s limit"
        elif rc != 0:
            failed = [ln.split(" ")[0] for ln in lines if " FAILED" in ln or " ERROR" in ln]
            tail = next((ln for ln in reversed(lines) if ln.strip()), "no output")
            problem = f"{what}: exit {rc}: " + (", ".join(failed[:4]) if failed else tail[:300])
        elif what != "gpu tests":
            try:
                results["figures"][what] = _last_json(lines)
            except ValueError as exc:
                problem = f"{what}: {exc}"
        entry["ok"] = problem is None
        results["checks"][what] = entry
        if problem:
            failures.append(problem)
        print(
            f"[{i}/{len(steps)}] {what}: {'PASS' if problem is None else 'FAIL: ' + problem} ({took:.0f} s)", flush=True
        )

    goals = _goals(results["figures"])
    results["goals"] = goals
    results["failures"] = failures
    results["seconds"] = round(time.monotonic() - t0, 1)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    rows = _rows(card, results["figures"], goals)
    (out / "gpu_check_rows.md").write_text(rows)
    print(rows)
    print(json.dumps({"gpu": name, "failures": len(failures), "goals": goals, "seconds": results["seconds"]}))
    if failures:
        print(f"gpu-check FAILED: first failure: {failures[0]}")
        return 1
    print(f"gpu-check passed in {results['seconds']:.0f} s; figures in {out / 'gpu_check.json'}")
    return 0


def _goals(fig: dict) -> dict:
    tr, sc, fd = fig.get("training", {}), fig.get("scoring", {}), fig.get("feed", {})
    compiled = tr.get("train_windows_per_s_compiled")
    step = compiled or tr.get("train_windows_per_s")
    feed = fd.get("device_feed_windows_per_s")
    got = {
        "train_compiled_windows_per_s": compiled,
        "scoring_vs_dense": sc.get("scoring_vs_dense"),
        "feed_vs_train": round(feed / step, 2) if feed and step else None,
    }
    return {k: {"value": v, "goal": GOALS[k], "met": v is not None and v >= GOALS[k]} for k, v in got.items()}


def _rows(card: dict, fig: dict, goals: dict) -> str:
    tr, sc, fd = fig.get("training", {}), fig.get("scoring", {}), fig.get("feed", {})

    def n(v, unit=""):
        return "-" if v is None else f"{v:,.0f}{unit}"

    def met(key):
        g = goals[key]
        return "-" if g["value"] is None else ("met" if g["met"] else "missed")

    where = f"{card['gpus']} x {card['gpu']}, torch {card['torch']}"
    return "\n".join(
        [
            f"GPU check on {where} (`make gpu-check`):",
            "",
            "| what | figure | baseline, same run | ratio | goal |",
            "|---|---|---|---|---|",
            f"| training, reference model, bf16 eager | {n(tr.get('train_windows_per_s'))} windows/s | forward only "
            f"{n(tr.get('forward_windows_per_s'))} windows/s | - | - |",
            f"| training, torch.compile | {n(tr.get('train_windows_per_s_compiled'))} windows/s | eager "
            f"{n(tr.get('train_windows_per_s'))} windows/s | - | >= 40,000 windows/s: {met('train_compiled_windows_per_s')} |",
            f"| scoring end to end (stride {sc.get('scoring_stride', '-')}) | {n(sc.get('scoring_end_to_end_px_per_s'))} px/s "
            f"| model dense {n(sc.get('model_dense_px_per_s'))} px/s | {sc.get('scoring_vs_dense', '-')} | >= 0.5: "
            f"{met('scoring_vs_dense')} |",
            f"| device-side feed (warm) | {n(fd.get('device_feed_windows_per_s'))} windows/s | device copy of the same "
            f"bytes {n(fd.get('copy_windows_per_s'))} windows/s | {fd.get('device_feed_vs_copy', '-')} | - |",
            f"| feed vs the compiled training step | {n(fd.get('device_feed_windows_per_s'))} windows/s | training "
            f"{n(tr.get('train_windows_per_s_compiled') or tr.get('train_windows_per_s'))} windows/s | "
            f"{goals['feed_vs_train']['value'] or '-'} | >= 1: {met('feed_vs_train')} |",
            f"| feed host to device per window | {n(fd.get('h2d_bytes_per_window'), ' B')} | window "
            f"{n(fd.get('window_bytes'), ' B')} | {fd.get('h2d_vs_window_bytes', '-')} | <= 0.33 |",
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
