"""The HTML report and its target polygons, from a real (tiny) run folder."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import RunConfig
from pipeline.evaluation.report import ReportError, git_commit, package_versions, report_stage

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = {
    "window": 8,
    "patch": 4,
    "dim": 16,
    "depth": 1,
    "heads": 2,
    "decoder_dim": 16,
    "decoder_depth": 1,
    "stem_channels": 4,
    "fusion_channels": 8,
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMG_RE = re.compile(r'<img\b[^>]*\bsrc="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """cube -> quicklook -> train -> score -> evaluate on a 64 px province (tiny model, in-process)."""
    from pipeline.data.synthetic import write_province
    from pipeline.run.runner import build_cube_stage, evaluate_stage, quicklook_stage, score_stage, train_stage

    out = tmp_path_factory.mktemp("report")
    prov = write_province(out / "province", size=64, seed=0)
    cfg = RunConfig.from_yaml(prov.config_path).with_updates(
        name="tiny <run> & 'co'",
        model=TINY_MODEL,
        train={"epochs": 1, "batch_size": 32},
        score={"stride": 4},
        cluster={"kind": "none"},
    )
    build_cube_stage(cfg, out, progress=False, log=quiet)
    quicklook_stage(out / "cube.zarr", out, log=quiet)
    for stage in (train_stage, score_stage, evaluate_stage):
        stage(cfg, out, log=quiet)
    paths = report_stage(cfg, out, log=quiet)
    return {"cfg": cfg, "out": out, "paths": paths, "html": paths["report"].read_text(encoding="utf-8")}


def _images(text: str) -> list[bytes]:
    return [base64.b64decode(b, validate=True) for b in IMG_RE.findall(text)]


def test_report_is_self_contained_with_png_figures(run):
    text = run["html"]
    assert text.startswith("<!DOCTYPE html>")
    # nothing fetched from elsewhere: no src/href to a URL, no stylesheet or script links
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', text, re.I)
    assert "<link" not in text.lower() and "<script" not in text.lower()
    imgs = _images(text)
    assert len(imgs) == text.count("<img")  # every <img> carries embedded data
    # prospectivity + 3 group anomalies, 2 contribution figures, ROC + success rate + P-A, evidence bands
    assert len(imgs) == 10
    for data in imgs:
        assert data.startswith(PNG_MAGIC) and len(data) > 2000
    for heading in (
        "Prospectivity and anomaly maps",
        "What drives the anomaly",
        "Evaluation against known deposits",
        "Target polygons",
        "Run configuration",
        "Provenance",
    ):
        assert heading in text
    # the 3 source groups' anomaly maps
    for g in ("geochemistry", "geophysics", "geology"):
        assert f'alt="anomaly_{g} map"' in text


def test_report_escapes_text_and_carries_provenance(run):
    text = run["html"]
    assert "tiny &lt;run&gt; &amp; &#x27;co&#x27;" in text
    assert "tiny <run>" not in text
    # config YAML, package versions, input hashes from the cube's provenance, stage times
    assert "window: 8" in text
    versions = package_versions()
    assert versions["numpy"] in text and versions["xarray"] in text
    prov = json.loads(
        __import__("pipeline.data.cube", fromlist=["open_cube"]).open_cube(run["out"] / "cube.zarr").attrs["provenance"]
    )
    some_hash = next(iter(prov["inputs"].values()))["hash"]
    assert some_hash and some_hash in text
    commit = git_commit()
    assert commit == "unknown" or re.match(r"[0-9a-f]{40}", commit)
    assert git_commit("/") == "unknown"  # not a repository: graceful
    m = json.loads((run["out"] / "metrics.json").read_text())["prospectivity"]
    assert f"{m['auc']:.4g}" in text


def test_targets_written_with_the_report(run):
    from pipeline.evaluation.targets import read_targets

    gdf = read_targets(run["paths"]["targets"])
    assert set(gdf["level"]) == {0.02, 0.05, 0.10}
    assert gdf.crs is not None and gdf.crs.to_epsg() == 32646
    n_valid = json.loads((run["out"] / "metrics.json").read_text())["prospectivity"]["n_valid_cells"]
    for level, sub in gdf.groupby("level"):
        assert sub["n_cells"].sum() == round(level * n_valid)
    assert "Target polygons (targets.gpkg)" in run["html"]


def test_report_adds_uncertainty_and_comparison_when_present(run, tmp_path):
    from pipeline.evaluation.reliability import reliability_stage

    cfg, out = run["cfg"], run["out"]
    lines: list[str] = []
    report_stage(cfg, out, log=lines.append)
    assert any("up to date, skipped" in line for line in lines)
    reliability_stage(cfg, out, seeds=(0, 1), log=quiet)
    (out / "compare").mkdir(exist_ok=True)
    pd.DataFrame(
        {
            "method": ["pca", "vit"],
            "auc_mean": [0.7, 0.9],
            "auc_std": [0.01, 0.02],
            "d_auc": [-0.2, float("nan")],
            "ci_low": [-0.35, float("nan")],
            "ci_high": [-0.05, float("nan")],
            "p_delong": [0.01, float("nan")],
            "p_boot": [0.02, float("nan")],
            "auc_buffered_mean": [0.68, 0.88],
            "pa_prediction_rate": [0.6, 0.8],
            "normalised_density": [1.5, 4.0],
            "wall_s": [0.1, 2.0],
            "n_seeds": [2, 2],
            "kind": ["baseline", "vit"],
        }
    ).to_csv(out / "compare" / "comparison.csv", index=False)
    lines.clear()
    report_stage(cfg, out, log=lines.append)  # the reliability stage ran since: the report is rebuilt
    assert any("[report] done" in line for line in lines)
    text = (out / "report.html").read_text(encoding="utf-8")
    imgs = _images(text)
    assert len(imgs) == 10 + 4  # uncertainty + mean map + comparison bars + forest plot of paired differences
    assert 'alt="paired AUC differences"' in text
    assert "<div>success-rate area<b>" not in text  # no headline figure that repeats the AUC
    assert all(d.startswith(PNG_MAGIC) for d in imgs)
    assert 'alt="uncertainty map"' in text and "Reliability (repeated runs)" in text
    assert "Comparison of methods" in text and "<td class='l'>vit</td>" in text


def test_report_needs_a_score_map(tmp_path, run):
    with pytest.raises(ReportError, match="prospectivity.zarr.*Fix"):
        report_stage(run["cfg"], tmp_path, log=quiet)


def test_report_renders_in_headless_chromium(run, tmp_path):
    import shutil

    if not any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")):
        pytest.skip("headless Chromium is not installed (e.g. `apt-get install chromium`): rendering not checked")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "report_screenshot.py"),
            str(run["paths"]["report"]),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n_img = run["paths"]["report"].read_text(encoding="utf-8").count("<img")
    assert result["ok"] and result["images_loaded"] == result["images_total"] == n_img >= 10
    assert result["pixel_std"] > 5 and (tmp_path / "report.png").stat().st_size > 10_000
