"""Checks before any work, and one line for every failure (issue 17).

Each case runs the CLI (``pipeline.run.cli.main``) on the small real province of ``mini_inputs`` with one
thing wrong, and checks the exit status 2, ONE line that names the item and the fix, and that nothing was
built (no cube, no model). Where a check exists to stop a long or huge run, the test also checks that the
refusal came at once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.run.cli import error_line, main

NOTHING = "nothing built (no cube.zarr, no model.pt, no temporary)"


def _edited(root: Path, edit, name: str = "bad.yaml") -> Path:
    data = yaml.safe_load((root / "run.yaml").read_text())
    edit(data)
    cfg = root / name
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    return cfg


def _built(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name != ".mpm.lock") if out.exists() else []


def _fails(args: list, capsys, *needles: str, out: Path | None = None, within: float | None = None) -> str:
    t0 = time.perf_counter()
    rc = main([str(a) for a in args])
    took = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in err, f"{n!r} not in: {err}"
    assert "Fix" in err, err
    if out is not None:
        assert _built(out) == [], _built(out)
    if within is not None:
        assert took < within, f"the refusal took {took:.1f} s"
    return err


# ------------------------------------------------------------------------------------------------
# finite numbers, names, duplicate keys, --stages
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, needles",
    [
        pytest.param(
            lambda d: d["grid"].update(resolution=float("nan")),
            ("grid.resolution", "finite", "nan"),
            marks=pytest.mark.reliability("config", "resolution .nan"),
            id="resolution-nan",
        ),
        pytest.param(
            lambda d: d["grid"].update(resolution=float("inf")),
            ("grid.resolution", "finite", "inf"),
            marks=pytest.mark.reliability("config", "resolution .inf"),
            id="resolution-inf",
        ),
        pytest.param(
            lambda d: d["grid"]["bounds"].__setitem__(2, float("nan")),
            ("grid.bounds", "finite", "nan"),
            marks=pytest.mark.reliability("config", "NaN in grid.bounds"),
            id="bounds-nan",
        ),
        pytest.param(
            lambda d: d.setdefault("train", {}).update(lr=float("inf")),
            ("train.lr", "finite"),
            marks=pytest.mark.reliability("config", "train.lr .inf"),
            id="lr-inf",
        ),
    ],
)
def test_non_finite_numbers(mini_inputs, tmp_path, capsys, reliability, edit, needles):
    cfg = _edited(mini_inputs, edit)
    out = tmp_path / "o"
    err = _fails(["cube", cfg, "--out", out, "--quiet"], capsys, *needles, out=out)
    assert not out.exists(), "a config error left the output folder behind"
    reliability(observed=err, kept=NOTHING)


@pytest.mark.parametrize(
    "edit, needles",
    [
        pytest.param(
            lambda d: d["layers"][0].update(name="geo/phys"),
            ("name 'geo/phys'", "letters, digits"),
            marks=pytest.mark.reliability("config", "layer name with '/' (would nest a Zarr group)"),
            id="name-slash",
        ),
        pytest.param(
            lambda d: d["layers"][0].update(source="geo/phys"),
            ("source 'geo/phys'", "letters, digits"),
            marks=pytest.mark.reliability("config", "source name with '/' (anomaly map lost from metrics)"),
            id="source-slash",
        ),
        pytest.param(
            lambda d: d["layers"][0].update(name="$\\alpha$"),
            ("name '$\\\\alpha$'", "letters, digits"),
            marks=pytest.mark.reliability("config", "layer name with matplotlib mathtext ($...$)"),
            id="name-mathtext",
        ),
        pytest.param(
            lambda d: d["layers"][4].update(columns=["Cr", "Ni/Co"]),
            ("band name 'ss_Ni/Co'", "columns"),
            marks=pytest.mark.reliability("config", "point column whose band name holds '/'"),
            id="band-slash",
        ),
    ],
)
def test_unsafe_names(mini_inputs, tmp_path, capsys, reliability, edit, needles):
    cfg = _edited(mini_inputs, edit)
    err = _fails(["cube", cfg, "--out", tmp_path / "o", "--quiet"], capsys, *needles, out=tmp_path / "o")
    reliability(observed=err, kept=NOTHING)


@pytest.mark.reliability("config", "a key given twice in the YAML")
def test_duplicate_yaml_key(mini_inputs, tmp_path, capsys, reliability):
    text = (mini_inputs / "run.yaml").read_text()
    cfg = mini_inputs / "dup.yaml"
    cfg.write_text(text.replace("name: mini\n", "name: mini\nmodel: {window: 16}\n") + "model: {window: 8, patch: 4}\n")
    err = _fails(["cube", cfg, "--out", tmp_path / "o"], capsys, "'model' is given twice", "lines 2 and 10")
    reliability(observed=err, kept=NOTHING)


@pytest.mark.reliability("config", "--stages '' (empty)")
def test_empty_stages(mini_inputs, tmp_path, capsys, reliability):
    out = tmp_path / "o"
    err = _fails(["run", mini_inputs / "run.yaml", "--out", out, "--stages", ""], capsys, "--stages is empty", out=out)
    reliability(observed=err, kept=NOTHING)


@pytest.mark.reliability("config", "--stages evaluate with no score map")
def test_stage_without_its_input(mini_inputs, tmp_path, capsys, reliability):
    out = tmp_path / "o"
    err = _fails(
        ["run", mini_inputs / "run.yaml", "--out", out, "--stages", "evaluate"],
        capsys,
        "stage 'evaluate' reads prospectivity.zarr",
        "--stages cube,train,score,evaluate",
        out=out,
    )
    assert "rerun the same command" not in err
    reliability(observed=err, kept=NOTHING)


# ------------------------------------------------------------------------------------------------
# the grid: size, CRS area of use, window
# ------------------------------------------------------------------------------------------------


@pytest.mark.reliability("config", "resolution 0.01 m (a 400,000 x 300,000 grid): refused before any work")
def test_huge_grid_is_refused_at_once(mini_inputs, tmp_path, capsys, reliability):
    cfg = _edited(mini_inputs, lambda d: d["grid"].update(resolution=0.01))
    out = tmp_path / "o"
    err = _fails(
        ["cube", cfg, "--out", out, "--quiet"],
        capsys,
        "400,000 x 300,000 pixels",
        "grid.max_pixels",
        out=out,
        within=20,
    )
    reliability(observed=err, kept=NOTHING)


@pytest.mark.reliability("config", "cube over grid.max_cube_gib (the limit is a setting)")
def test_cube_size_limit_is_configurable(mini_inputs, tmp_path, capsys, reliability):
    cfg = _edited(mini_inputs, lambda d: d["grid"].update(max_cube_gib=1e-5))
    err = _fails(["cube", cfg, "--out", tmp_path / "o", "--quiet"], capsys, "GiB, over grid.max_cube_gib 1e-05")
    ok = _edited(mini_inputs, lambda d: d["grid"].update(max_cube_gib=1), name="ok.yaml")
    assert main(["cube", str(ok), "--out", str(tmp_path / "o2"), "--quiet"]) == 0, capsys.readouterr().err
    reliability(observed=err, kept=NOTHING + "; with the limit raised the same grid builds")


@pytest.mark.parametrize(
    "edit, needles",
    [
        pytest.param(
            lambda d: d["grid"].update(bounds=[91.0, 45.0, 91.04, 45.03]),
            ("look like longitude/latitude degrees", "EPSG:32646", "metres"),
            marks=pytest.mark.reliability("config", "grid bounds in degrees with a UTM CRS"),
            id="degrees-in-utm",
        ),
        pytest.param(
            lambda d: d["grid"].update(crs="EPSG:4326"),
            ("are not longitude/latitude", "EPSG:4326 is geographic"),
            marks=pytest.mark.reliability("config", "metre bounds with EPSG:4326 (was a MemoryError at 18.6 GiB)"),
            id="metres-in-4326",
        ),
        pytest.param(
            lambda d: d["grid"].update(crs="EPSG:2193"),
            ("outside where grid.crs EPSG:2193 is defined", "area of use"),
            marks=pytest.mark.reliability("config", "grid bounds outside the CRS's area of use (UTM bounds, NZTM CRS)"),
            id="other-crs",
        ),
    ],
)
def test_bounds_against_the_crs(mini_inputs, tmp_path, capsys, reliability, edit, needles):
    cfg = _edited(mini_inputs, edit)
    err = _fails(["cube", cfg, "--out", tmp_path / "o", "--quiet"], capsys, *needles, out=tmp_path / "o", within=20)
    assert "layer '" not in err, "the message blames a layer"
    reliability(observed=err, kept=NOTHING)


@pytest.mark.reliability("config", "model window larger than the grid: refused before the cube is built")
def test_window_checked_before_the_cube(mini_inputs, tmp_path, capsys, reliability):
    cfg = _edited(mini_inputs, lambda d: d.update(model={"window": 64, "patch": 4, "dim": 16, "heads": 2}))
    out = tmp_path / "o"
    err = _fails(
        ["run", cfg, "--out", out, "--stages", "cube,train", "--quiet"],
        capsys,
        "40 x 30 pixels",
        "model.window 64",
        "at most 30",
        out=out,
    )
    reliability(observed=err, kept=NOTHING + " (the check came before the cube stage)")


@pytest.mark.reliability("raster", "layer path that is a folder")
def test_layer_path_is_a_folder(mini_inputs, tmp_path, capsys, reliability):
    (mini_inputs / "rasters").mkdir()
    cfg = _edited(mini_inputs, lambda d: d["layers"][0].update(path="rasters"))
    err = _fails(
        ["cube", cfg, "--out", tmp_path / "o", "--quiet"], capsys, "layer 'mag'", "is a folder, not a file", "inside it"
    )
    assert "expects a raster" not in err
    reliability(observed=err, kept=NOTHING)


# ------------------------------------------------------------------------------------------------
# one line for every failure: file system, memory, other libraries; --debug keeps the traceback
# ------------------------------------------------------------------------------------------------


@pytest.mark.reliability("fault", "--out is an existing file")
def test_out_is_a_file(mini_inputs, tmp_path, capsys, reliability):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    err = _fails(
        ["cube", mini_inputs / "run.yaml", "--out", target, "--quiet"], capsys, str(target), "must be a folder"
    )
    assert target.read_text() == "not a folder"
    reliability(observed=err, kept="the file untouched")


@pytest.mark.reliability("fault", "output folder that cannot be written")
def test_out_cannot_be_written(mini_inputs, tmp_path, capsys, reliability):
    if os.geteuid() == 0:  # root writes through permissions: use a folder of a filesystem nobody may write
        target = Path("/sys/mpm-reliability-test")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        target = ro / "out"
    try:
        target.mkdir()
    except OSError:
        pass
    else:
        target.rmdir()
        pytest.skip(f"{target} is writable here")
    err = _fails(["run", mini_inputs / "run.yaml", "--out", target, "--quiet"], capsys, str(target), "another --out")
    reliability(observed=err, kept="nothing")


@pytest.mark.reliability("fault", "a library's own error (not an mpm one) as one line")
def test_library_error_is_one_line(reliability):
    from pyproj import CRS

    try:
        CRS.from_user_input("+proj=nonsense")
    except Exception as exc:  # pyproj's own CRSError, from a real call
        exc.mpm_stage = "cube"
        line = error_line(exc)
    assert line.startswith("pyproj.CRSError in stage 'cube': ") and "\n" not in line, line
    assert "Fix:" in line and "mpm --debug" in line, line
    reliability(observed=f"error: {line}", kept="-")


@pytest.mark.reliability("fault", "--debug keeps the traceback, then the same one line")
def test_debug_keeps_the_traceback(mini_inputs, tmp_path, capsys, reliability):
    cube = tmp_path / "cube.zarr"
    cube.mkdir()
    (cube / "zarr.json").write_text("{ not json")
    args = ["train", str(mini_inputs / "run.yaml"), "--cube", str(cube), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert main(["--debug", *args]) == 2
    dbg = capsys.readouterr().err
    assert "Traceback (most recent call last)" in dbg and dbg.strip().splitlines()[-1] == err, dbg[-2000:]
    reliability(observed=f"without --debug: {err}; with it: the traceback, then the same line", kept="no model.pt")


@pytest.mark.reliability("fault", "MemoryError (a real numpy allocation failure) as one line")
def test_memory_error_line(reliability):
    try:
        np.empty(2**62, dtype=np.uint8)
    except MemoryError as exc:
        exc.mpm_stage = "cube"
        line = error_line(exc)
    else:  # pragma: no cover - overcommit allowed it
        pytest.skip("numpy allocated 4 EiB here")
    assert line.startswith("out of memory in stage 'cube'") and "Fix:" in line and "grid.resolution" in line
    assert "\n" not in line
    reliability(observed=f"error: {line}", kept="-")


def test_os_error_lines_name_the_item_and_the_fix(tmp_path):
    try:
        open(tmp_path / "missing" / "x.tif")
    except OSError as exc:
        line = error_line(exc)
    assert str(tmp_path / "missing" / "x.tif") in line and "Fix: check that the path exists" in line


@pytest.mark.slow
@pytest.mark.reliability("fault", "an error raised on a Dask worker (train stage): no 'Compute Failed ... Traceback:'")
def test_worker_side_error_is_one_line(tmp_path, reliability):
    import subprocess
    import sys

    from pipeline.data.synthetic import write_province

    prov = write_province(tmp_path / "p", size=64, seed=0)
    data = yaml.safe_load(prov.config_path.read_text())
    del data["grid"]["bounds"]  # the grid comes from the layers: the window is checked on the worker, in train
    data["model"].update(window=128)
    data["train"].update(device="cpu")
    data["cluster"] = {"kind": "local", "n_workers": 1, "threads_per_worker": 1, "memory_limit": "2GiB"}
    cfg = prov.config_path.with_name("worker.yaml")  # beside the province: its paths are relative
    cfg.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k != "MPM_DEBUG"}
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.run.cli", "run", str(cfg), "--out", str(tmp_path / "o"), "--quiet"]
        + ["--stages", "cube,train"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith("error: the cube is") and "window 128" in lines[0], lines
    assert "Compute Failed" not in res.stderr and "Traceback" not in res.stderr
    reliability(observed=lines[0] + " (the only line on stderr)", kept="cube.zarr; no model.pt")
