"""benchmarks/gpu_check.py without a GPU: one line and exit 0; its step runner, goals and rows on plain data."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer")
def test_without_cuda_one_line_and_exit_0():
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and done.stdout.startswith("gpu-check: no CUDA device here")


def test_a_step_is_stopped_at_its_limit_and_its_lines_kept():
    rc, lines = gpu_check._run(
        [sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"], 3, "t"
    )
    assert rc == 124 and lines == ["started"]
    rc, lines = gpu_check._run([sys.executable, "-c", "print('{\"a\": 1}')"], 30, "t")
    assert rc == 0 and gpu_check._last_json(lines) == {"a": 1}


def test_goals_and_rows():
    fig = {
        "training": {
            "train_windows_per_s": 40_000,
            "train_windows_per_s_compiled": 62_000,
            "forward_windows_per_s": 150_000,
        },
        "scoring": {
            "scoring_end_to_end_px_per_s": 30e6,
            "model_dense_px_per_s": 80e6,
            "scoring_vs_dense": 0.375,
            "scoring_stride": 16,
        },
        "feed": {"device_feed_windows_per_s": 500_000, "copy_windows_per_s": 900_000, "device_feed_vs_copy": 0.56},
    }
    goals = gpu_check._goals(fig)
    assert goals["train_compiled_windows_per_s"]["met"] and not goals["scoring_vs_dense"]["met"]
    assert goals["feed_vs_train"] == {"value": 8.06, "goal": 1.0, "met": True}
    rows = gpu_check._rows({"gpus": 1, "gpu": "NVIDIA H200", "torch": "2.13.0"}, fig, goals)
    assert (
        "| training, torch.compile | 62,000 windows/s | eager 40,000 windows/s | - | >= 40,000 windows/s: met |" in rows
    )
    assert ">= 0.5: missed" in rows and rows.count("\n| ") == 7
