"""`mpm demo` / `mpm run` end to end on a small synthetic province, and skip-on-rerun."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from pipeline.run.cli import main


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    # a real subprocess: the console entry point, worker processes and all
    return subprocess.run(
        [sys.executable, "-m", "pipeline.run.cli", *args], capture_output=True, text=True, timeout=900
    )


def test_demo_end_to_end_then_rerun_skips(tmp_path):
    out = tmp_path / "demo"
    res = _run_cli("demo", "--out", str(out), "--size", "64", "--epochs", "1", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("cube.zarr", "bands.png", "model.pt", "prospectivity.zarr", "prospectivity.tif", "metrics.json"):
        assert (out / name).exists(), name
    assert "Dask dashboard" in res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    auc = metrics["prospectivity"]["auc"]
    assert 0.0 <= auc <= 1.0
    import xarray as xr

    before = xr.open_zarr(out / "prospectivity.zarr")["prospectivity"].values
    model_bytes = (out / "model.pt").read_bytes()

    res2 = _run_cli("demo", "--out", str(out), "--size", "64", "--epochs", "1", "--quiet")
    assert res2.returncode == 0, res2.stderr[-3000:]
    for stage in ("cube", "train", "score", "evaluate"):
        assert f"[{stage}] up to date, skipped" in res2.stdout, res2.stdout
    after = xr.open_zarr(out / "prospectivity.zarr")["prospectivity"].values
    np.testing.assert_array_equal(before, after)
    assert (out / "model.pt").read_bytes() == model_bytes
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_changed_config_reruns_downstream_only(tmp_path, capsys):
    from pipeline.data.synthetic import write_province

    prov = write_province(tmp_path / "p", size=64, seed=1)
    out = tmp_path / "o"
    assert main(["run", str(prov.config_path), "--out", str(out), "--stages", "cube", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", str(prov.config_path), "--out", str(out), "--stages", "cube", "--quiet"]) == 0
    assert "[cube] up to date, skipped" in capsys.readouterr().out
    # a different grid chunk changes the cube's config section: the stage runs again
    text = prov.config_path.read_text().replace("chunk: 512", "chunk: 32")
    prov.config_path.write_text(text)
    assert main(["run", str(prov.config_path), "--out", str(out), "--stages", "cube", "--quiet"]) == 0
    assert "[cube] running" in capsys.readouterr().out


def test_unknown_stage_is_a_clear_error(tmp_path, capsys):
    from pipeline.data.synthetic import write_province

    prov = write_province(tmp_path / "p", size=64, seed=0)
    rc = main(["run", str(prov.config_path), "--out", str(tmp_path / "o"), "--stages", "cube,polish"])
    err = capsys.readouterr().err
    assert rc == 2 and "'polish'" in err and "Fix" in err


def test_vit_ranks_planted_deposits_of_the_synthetic_province(tmp_path):
    """The science check: trained without labels, the ViT ranks the planted chromite deposits well."""
    from pipeline.config import RunConfig
    from pipeline.data.synthetic import write_province
    from pipeline.run.runner import run_pipeline

    prov = write_province(tmp_path / "p", size=128, seed=3)
    cfg = RunConfig.from_yaml(prov.config_path).with_updates(cluster={"kind": "none"})
    run_pipeline(cfg, tmp_path / "o", stages="cube,train,score,evaluate", progress=False, log=lambda m: None)
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())["prospectivity"]
    assert metrics["n_deposits_used"] >= 5
    assert metrics["auc"] >= 0.9, metrics
    assert metrics["p_value"] < 0.01
