"""Progress a person can see: the training progress renderer, stage timings, and both in a real ``mpm run``."""

from __future__ import annotations

import io

import pytest

from pipeline.run.progress import TrainProgress, format_eta, stage_timings, timings_table


def events(total: int, every: int = 1, wps: float = 1234.0):
    for step in range(every, total + 1, every):
        yield {"step": step, "total_steps": total, "epoch": step // 50, "loss": 1.0 / step, "windows_per_s": wps}


def test_plain_lines_every_tenth_of_the_steps_with_eta():
    lines = []
    shown = TrainProgress(lines.append, live=False, every_s=1e9)
    for e in events(200):
        shown(e)
    assert 10 <= len(lines) <= 12, lines
    assert lines[0].startswith("[train] step 1/200 (0%) epoch 1 loss 1.0000 1,234 windows/s ETA")
    assert lines[-1].startswith("[train] step 200/200 (100%) epoch 5") and lines[-1].endswith("ETA 0 s")


def test_a_new_run_of_steps_starts_afresh():
    lines = []
    shown = TrainProgress(lines.append, live=False, every_s=1e9)
    for e in events(20, every=10):
        shown(e)
    for e in events(30, every=10):  # the next ensemble member
        shown(e)
    assert [l.split(" (")[0] for l in lines] == [
        "[train] step 10/20",
        "[train] step 20/20",
        "[train] step 10/30",
        "[train] step 20/30",
        "[train] step 30/30",
    ]


def test_live_bar_on_a_terminal():
    stream = io.StringIO()
    shown = TrainProgress(print, live=True, stream=stream)
    for e in events(100, every=10):
        shown(e)
    shown.close()
    text = stream.getvalue()
    assert "100/100" in text and "windows/s" in text and "loss 0.0100" in text


def test_eta_format():
    assert format_eta(12.4) == "12 s" and format_eta(65) == "1:05" and format_eta(3723) == "1:02:03"
    assert format_eta(float("nan")) == "?"


def test_stage_timings_tell_built_from_skipped():
    before = {"cube": {"built": "a", "seconds": 3.0}, "train": {"built": "b", "seconds": 50.0}}
    after = {"cube": {"built": "a", "seconds": 3.0}, "train": {"built": "c", "seconds": 61.5}, "score": {"built": "d"}}
    rows = stage_timings(before, after)
    assert rows == [("cube", None), ("train", 61.5), ("score", 0.0)]
    table = timings_table(rows, 70.0)
    assert "cube         skipped (up to date)" in table and "train            61.5 s" in table
    assert table.splitlines()[-1].startswith("  total            70.0 s")


@pytest.mark.slow
def test_mpm_run_shows_training_progress_and_stage_timings(tmp_path, capfd):
    from pipeline.data.synthetic import write_province
    from pipeline.run.cli import main

    prov = write_province(tmp_path / "prov", size=64, seed=1)
    args = ["run", str(prov.config_path), "--out", str(tmp_path / "out"), "--stages", "cube,train"]
    assert main([*args, "--cluster", "none", "--quiet"]) == 0
    text = capfd.readouterr().out
    steps = [l for l in text.splitlines() if l.startswith("[train] step ")]
    assert steps and "windows/s ETA" in steps[-1] and "(100%)" in steps[-1], text
    assert "stage timings:" in text and "train    " in text.split("stage timings:")[1]
    assert main([*args, "--cluster", "none", "--quiet"]) == 0
    again = capfd.readouterr().out.split("stage timings:")[1]
    assert "cube         skipped (up to date)" in again and "train        skipped (up to date)" in again
