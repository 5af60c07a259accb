"""Render the HTML report in headless Chromium: every embedded image loads, the page is not blank.

    python benchmarks/report_screenshot.py [REPORT.html] [--out DIR] [--size 64]

Without REPORT, a tiny synthetic run (``--size`` px, small model, one epoch) is made first and its
report rendered. Two Chromium runs on the report:

1. ``--dump-dom`` on a copy with a checker script appended: after the load event it counts the
   ``<img>`` elements with ``complete && naturalWidth > 0`` and writes the counts into the DOM;
2. ``--screenshot`` (1400 x 4000) of the report itself; the PNG must not be blank (pixel std).

Figure: wall seconds of the report screenshot; baseline, in the same run: the screenshot of a blank
page with the same flags (Chromium's own start-up cost). Exit status 1 when an image failed to load,
the page is blank, or Chromium is missing (2). Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECKER = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var m = document.createElement('div');
  m.id = 'mpm-image-check';
  m.setAttribute('data-total', imgs.length);
  m.setAttribute('data-loaded', ok);
  document.body.appendChild(m);
});
</script>
"""

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=10000",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium(
    exe: str, args: list[str], profile: Path, timeout: float = 120
) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [exe, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=timeout
    )
    return proc, time.perf_counter() - t0


def image_check(exe: str, report: Path, work: Path) -> dict:
    """Counts of <img> elements in the report and of those Chromium decoded."""
    text = report.read_text(encoding="utf-8")
    probe = work / "probe.html"
    probe.write_text(text.replace("</body>", CHECKER + "</body>", 1), encoding="utf-8")
    proc, _ = _chromium(exe, ["--dump-dom", probe.resolve().as_uri()], work / "profile-dom")
    m = re.search(r'id="mpm-image-check"[^>]*data-total="(\d+)"[^>]*data-loaded="(\d+)"', proc.stdout)
    if not m:
        raise RuntimeError(
            f"the checker marker is missing from Chromium's DOM dump (rc {proc.returncode}): {proc.stderr[-800:]}"
        )
    return {
        "images_total": int(m.group(1)),
        "images_loaded": int(m.group(2)),
        "img_tags_in_file": len(re.findall(r"<img\b", text)),
    }


def screenshot(exe: str, url: str, png: Path, profile: Path, size=(1400, 4000)) -> float:
    proc, seconds = _chromium(exe, [f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", url], profile)
    if not png.exists():
        raise RuntimeError(f"Chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-800:]}")
    return seconds


def pixel_std(png: Path) -> float:
    import numpy as np
    from PIL import Image

    return float(np.asarray(Image.open(png).convert("L"), dtype="float32").std())


def make_tiny_report(out: Path, size: int) -> Path:
    """A small synthetic run (cube, train, score, evaluate, report) in ``out``; returns report.html."""
    from pipeline.config import RunConfig
    from pipeline.data.synthetic import write_province
    from pipeline.evaluation.report import report_stage
    from pipeline.run.runner import build_cube_stage, evaluate_stage, quicklook_stage, score_stage, train_stage

    prov = write_province(out / "province", size=size, seed=0)
    cfg = RunConfig.from_yaml(prov.config_path).with_updates(
        model={
            "window": 8,
            "patch": 4,
            "dim": 16,
            "depth": 1,
            "heads": 2,
            "decoder_dim": 16,
            "decoder_depth": 1,
            "stem_channels": 4,
            "fusion_channels": 8,
        },
        train={"epochs": 1, "batch_size": 32},
        score={"stride": 4},
        cluster={"kind": "none"},
    )
    quiet = lambda *_: None  # noqa: E731
    build_cube_stage(cfg, out, progress=False, log=quiet)
    quicklook_stage(out / "cube.zarr", out, log=quiet)
    for stage in (train_stage, score_stage, evaluate_stage):
        stage(cfg, out, log=quiet)
    return report_stage(cfg, out, log=quiet)["report"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", nargs="?", help="report.html to render (default: make a tiny synthetic run)")
    p.add_argument("--out", default=None, help="folder for the screenshot and the tiny run (default: a temp dir)")
    p.add_argument("--size", type=int, default=64, help="synthetic province size for the tiny run (default 64)")
    args = p.parse_args(argv)

    exe = find_chromium()
    if exe is None:
        print("chromium not found (install it, e.g. the Debian package 'chromium')")
        print(json.dumps({"bench": "report_screenshot", "skipped": "chromium not found"}))
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="mpm-report-shot-"))
    out.mkdir(parents=True, exist_ok=True)
    report = Path(args.report) if args.report else make_tiny_report(out / "run", args.size)
    work = Path(tempfile.mkdtemp(prefix="mpm-chromium-"))
    try:
        check = image_check(exe, report, work)
        blank = work / "blank.html"
        blank.write_text("<!DOCTYPE html><html><body></body></html>")
        base_s = screenshot(exe, blank.as_uri(), work / "blank.png", work / "profile-blank")
        png = out / "report.png"
        shot_s = screenshot(exe, report.resolve().as_uri(), png, work / "profile-shot")
        std = pixel_std(png)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = check["images_loaded"] == check["images_total"] == check["img_tags_in_file"] > 0 and std > 5.0
    print(f"report: {report} ({report.stat().st_size / 1e6:.2f} MB)")
    print(
        f"images decoded by Chromium: {check['images_loaded']} / {check['images_total']} "
        f"(<img> tags in the file: {check['img_tags_in_file']})"
    )
    print(f"screenshot: {png} (pixel std {std:.1f}; blank page ~0)")
    print(f"render + screenshot: {shot_s:.2f} s; baseline blank page: {base_s:.2f} s; ratio x{shot_s / base_s:.2f}")
    print(
        json.dumps(
            {
                "bench": "report_screenshot",
                "ok": ok,
                **check,
                "pixel_std": round(std, 2),
                "report_mb": round(report.stat().st_size / 1e6, 3),
                "screenshot_s": round(shot_s, 3),
                "blank_page_s": round(base_s, 3),
                "ratio": round(shot_s / base_s, 3),
                "screenshot": str(png),
            }
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
