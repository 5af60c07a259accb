"""Bad input: each case exits with status 2 and one clear line naming the item, the value and the fix,
and leaves no cube (nor a temporary store) behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rasterio.transform import from_origin

from pipeline.cli import main

from conftest import X0, Y0, write_raster

BASE = Path("run.yaml")


def _with_layer(root: Path, layer_yaml: str, replace: str | None = None) -> Path:
    """The mini config with one layer line added (or a line replaced)."""
    text = (root / "run.yaml").read_text()
    if replace is not None:
        lines = [l for l in text.splitlines() if replace not in l]
        text = "\n".join(lines) + "\n"
    cfg = root / "bad.yaml"
    cfg.write_text(text + (layer_yaml + "\n" if layer_yaml else ""))
    return cfg


def _run_expect_failure(cfg: Path, out: Path, capsys, *needles: str) -> str:
    rc = main(["cube", str(cfg), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, f"{n!r} not in: {err}"
    assert "Fix" in err or "fix" in err, err
    leftovers = [p.name for p in out.glob("cube.zarr*")] if out.exists() else []
    assert leftovers == [], leftovers
    return err


@pytest.mark.reliability("raster", "GeoTIFF without a CRS")
def test_missing_crs(mini_inputs, tmp_path, capsys, reliability):
    write_raster(mini_inputs / "nocrs.tif", np.ones((20, 20)), crs=None, transform=from_origin(X0, Y0, 100, 100))
    cfg = _with_layer(mini_inputs, "  - {name: bare, path: nocrs.tif}")
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, "'bare'", "no CRS", "crs: EPSG")
    reliability(observed=err, kept="no cube.zarr, no temporary store")


def test_layer_outside_grid(mini_inputs, tmp_path, capsys):
    write_raster(mini_inputs / "far.tif", np.ones((10, 10)), transform=from_origin(X0 + 1e6, Y0, 100, 100))
    cfg = _with_layer(mini_inputs, "  - {name: far, path: far.tif}")
    _run_expect_failure(cfg, tmp_path / "o", capsys, "'far'", "does not overlap", "CRS")


def test_all_nodata_layer(mini_inputs, tmp_path, capsys):
    write_raster(mini_inputs / "empty.tif", np.full((40, 50), -1.0), transform=from_origin(X0, Y0, 100, 100), nodata=-1)
    cfg = _with_layer(mini_inputs, "  - {name: empty, path: empty.tif}")
    _run_expect_failure(cfg, tmp_path / "o", capsys, "'empty'", "no data", "nodata")


def test_constant_layer(mini_inputs, tmp_path, capsys):
    write_raster(mini_inputs / "flat.tif", np.full((40, 50), 3.5), transform=from_origin(X0, Y0, 100, 100))
    cfg = _with_layer(mini_inputs, "  - {name: flat, path: flat.tif}")
    _run_expect_failure(cfg, tmp_path / "o", capsys, "'flat'", "constant (3.5)", "remove it")


def test_missing_file(mini_inputs, tmp_path, capsys):
    cfg = _with_layer(mini_inputs, "  - {name: ghost, path: ghost.tif}")
    _run_expect_failure(cfg, tmp_path / "o", capsys, "'ghost'", "ghost.tif", "does not exist")


def test_unreadable_file(mini_inputs, tmp_path, capsys):
    (mini_inputs / "junk.tif").write_bytes(b"this is not a tiff" * 10)
    cfg = _with_layer(mini_inputs, "  - {name: junk, path: junk.tif}")
    _run_expect_failure(cfg, tmp_path / "o", capsys, "'junk'", "junk.tif", "cannot be read")


def test_csv_without_xy_columns(mini_inputs, tmp_path, capsys):
    cfg = _with_layer(
        mini_inputs,
        '  - {name: s2, path: samples.csv, kind: points, x: EAST, y: NORTH, crs: "EPSG:4326", columns: [Cr]}',
    )
    _run_expect_failure(cfg, tmp_path / "o", capsys, "'s2'", "['EAST', 'NORTH']", "set 'x' and 'y'")


def test_non_numeric_values(mini_inputs, tmp_path, capsys):
    import pandas as pd

    df = pd.read_csv(mini_inputs / "samples.csv")
    df["Cr"] = df["Cr"].astype(object)
    df.loc[7, "Cr"] = "n.d."
    df.to_csv(mini_inputs / "samples.csv", index=False)
    _run_expect_failure(mini_inputs / "run.yaml", tmp_path / "o", capsys, "'ss'", "'Cr'", "'n.d.'", "row 7")


def test_duplicate_layer_names(mini_inputs, tmp_path, capsys):
    cfg = _with_layer(mini_inputs, "  - {name: mag, path: mag.tif, source: geophysics}")
    _run_expect_failure(cfg, tmp_path / "o", capsys, "duplicate layer name", "['mag']", "unique")


def test_missing_categorical_attribute(mini_inputs, tmp_path, capsys):
    cfg = _with_layer(
        mini_inputs,
        "  - {name: rock, path: geology.gpkg, layer: lithology, kind: categorical, attribute: LITHO, classes: [ultramafic]}",
    )
    _run_expect_failure(cfg, tmp_path / "o", capsys, "'rock'", "'LITHO'", "ROCKTYPE", "set 'attribute'")


def test_unknown_class_value(mini_inputs, tmp_path, capsys):
    cfg = _with_layer(
        mini_inputs,
        "  - {name: rock, path: geology.gpkg, layer: lithology, kind: categorical, attribute: ROCKTYPE, classes: [dunite]}",
    )
    _run_expect_failure(cfg, tmp_path / "o", capsys, "'rock'", "dunite", "fix 'classes'")


@pytest.mark.parametrize(
    "line, needles",
    [
        ("  - {name: m2, path: mag.tif, transform: sqrt}", ("layers[5] (name: 'm2').transform", "'sqrt'", "log")),
        ("  - {name: m3, path: mag.tif, kind: hologram}", ("layers[5] (name: 'm3').kind", "'hologram'", "continuous")),
    ],
)
def test_unknown_transform_or_kind(mini_inputs, tmp_path, capsys, line, needles):
    cfg = _with_layer(mini_inputs, line)
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, *needles)
    assert "use one of" in err


def test_unknown_config_key(mini_inputs, tmp_path, capsys):
    cfg = _with_layer(mini_inputs, "  - {name: m4, path: mag.tif, transfrom: log}")
    _run_expect_failure(cfg, tmp_path / "o", capsys, "transfrom", "unknown key", "check its spelling")


def test_log_of_non_positive_values(mini_inputs, tmp_path, capsys):
    write_raster(mini_inputs / "neg.tif", np.linspace(-5, 5, 2000).reshape(40, 50), transform=from_origin(X0, Y0, 100, 100))
    cfg = _with_layer(mini_inputs, "  - {name: neg, path: neg.tif, transform: log}")
    _run_expect_failure(cfg, tmp_path / "o", capsys, "'neg'", "positive", "nodata")


def test_failed_rebuild_keeps_previous_cube(mini_inputs, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["cube", str(mini_inputs / "run.yaml"), "--out", str(out), "--quiet"]) == 0
    write_raster(mini_inputs / "flat.tif", np.full((40, 50), 1.0), transform=from_origin(X0, Y0, 100, 100))
    cfg = _with_layer(mini_inputs, "  - {name: flat, path: flat.tif}")
    rc = main(["cube", str(cfg), "--out", str(out), "--quiet"])
    assert rc == 2 and "constant" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("cube.zarr*")) == ["cube.zarr"]
    from pipeline.cube import open_cube

    assert "flat" not in list(open_cube(out / "cube.zarr").band.values)
