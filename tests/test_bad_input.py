"""Bad input to ``mpm cube``: the config, rasters, vectors and point samples.

Each case runs the CLI (``pipeline.run.cli.main``) on the small real province of ``mini_inputs`` with one
thing wrong, and checks that it exits with status 2 and ONE line (``error: ...``) that names the item, the bad
value and the fix, and that no cube (nor a temporary store) is left behind. A few cases are inputs that look
wrong but must work (``handled``): the test checks the cube that comes out.

Cube stores, checkpoints and deposits (which need a built cube, a trained model or a score map) are in
test_bad_input_stores.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import RES, UTM, X0, Y0, H, W, smooth_field, write_raster
from rasterio.transform import Affine, from_origin

from pipeline.run.cli import main

NO_CUBE = "no cube.zarr, no temporary store"


def _with_layer(root: Path, layer_yaml: str, replace: str | None = None) -> Path:
    """The mini config with one layer line added (or a line replaced)."""
    text = (root / "run.yaml").read_text()
    if replace is not None:
        lines = [l for l in text.splitlines() if replace not in l]
        text = "\n".join(lines) + "\n"
    cfg = root / "bad.yaml"
    cfg.write_text(text + (layer_yaml + "\n" if layer_yaml else ""))
    return cfg


def _edited(root: Path, edit) -> Path:
    """The mini config loaded, changed by ``edit(dict)`` and written back as bad.yaml."""
    data = yaml.safe_load((root / "run.yaml").read_text())
    edit(data)
    cfg = root / "bad.yaml"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    return cfg


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("cube.zarr*")) if out.exists() else []


def _run_expect_failure(cfg: Path, out: Path, capsys, *needles: str) -> str:
    rc = main(["cube", str(cfg), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, f"{n!r} not in: {err}"
    assert "Fix" in err or "fix" in err, err
    assert _leftovers(out) == [], _leftovers(out)
    return err


def _build(cfg: Path, out: Path, capsys):
    """A cube that must build: returns it opened."""
    from pipeline.data.cube import open_cube

    rc = main(["cube", str(cfg), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 0, err
    assert _leftovers(out) == ["cube.zarr"]
    return open_cube(out / "cube.zarr")


def _mag_array():
    """The magnetics of mini_inputs on the target grid itself (100 m, no shift), and its transform."""
    t = from_origin(X0, Y0, RES, RES)
    cols, rows = np.meshgrid(np.arange(W), np.arange(H))
    xs, ys = t @ (cols + 0.5, rows + 0.5)
    return smooth_field(xs, ys).astype("float32"), t


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------


@pytest.mark.reliability("config", "duplicate layer names")
def test_duplicate_layer_names(mini_inputs, tmp_path, capsys, reliability):
    cfg = _with_layer(mini_inputs, "  - {name: mag, path: mag.tif, source: geophysics}")
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, "duplicate layer name", "['mag']", "unique")
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.parametrize(
    "line, needles",
    [
        pytest.param(
            "  - {name: m2, path: mag.tif, transform: sqrt}",
            ("layers[5] (name: 'm2').transform", "'sqrt'", "log"),
            marks=pytest.mark.reliability("config", "unknown transform"),
            id="transform",
        ),
        pytest.param(
            "  - {name: m3, path: mag.tif, kind: hologram}",
            ("layers[5] (name: 'm3').kind", "'hologram'", "continuous"),
            marks=pytest.mark.reliability("config", "unknown layer kind"),
            id="kind",
        ),
    ],
)
def test_unknown_transform_or_kind(mini_inputs, tmp_path, capsys, reliability, line, needles):
    cfg = _with_layer(mini_inputs, line)
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, *needles)
    assert "use one of" in err
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("config", "misspelt layer key")
def test_unknown_config_key(mini_inputs, tmp_path, capsys, reliability):
    cfg = _with_layer(mini_inputs, "  - {name: m4, path: mag.tif, transfrom: log}")
    err = _run_expect_failure(
        cfg, tmp_path / "o", capsys, "transfrom", "unknown key", "did you mean 'transform'", "check its spelling"
    )
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("config", "misspelt top-level section")
def test_unknown_top_level_key(mini_inputs, tmp_path, capsys, reliability):
    cfg = _edited(mini_inputs, lambda d: d.update(trian={"epochs": 2}))
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, "trian: unknown key", "did you mean 'train'")
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("config", "YAML syntax error")
def test_yaml_syntax_error(mini_inputs, tmp_path, capsys, reliability):
    text = (mini_inputs / "run.yaml").read_text().splitlines()
    i = next(n for n, l in enumerate(text) if l.startswith("grid:"))
    text[i] = text[i].replace("chunk: 16}", "chunk: 16")  # an unclosed flow mapping
    cfg = mini_inputs / "bad.yaml"
    cfg.write_text("\n".join(text) + "\n")
    err = _run_expect_failure(
        cfg, tmp_path / "o", capsys, "bad.yaml", "not valid YAML at line", "opened at line 2", "unclosed bracket"
    )
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("config", "empty config file")
def test_empty_config(mini_inputs, tmp_path, capsys, reliability):
    cfg = mini_inputs / "bad.yaml"
    cfg.write_text("# nothing here yet\n")
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, "bad.yaml", "is empty", "name, grid, layers")
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("config", "negative resolution")
def test_negative_resolution(mini_inputs, tmp_path, capsys, reliability):
    cfg = _edited(mini_inputs, lambda d: d["grid"].update(resolution=-100))
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, "grid.resolution", "must be positive", "-100", "pixel size")
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("config", "bounds with xmin > xmax")
def test_unordered_bounds(mini_inputs, tmp_path, capsys, reliability):
    def swap(d):
        x0, y0, x1, y1 = d["grid"]["bounds"]
        d["grid"]["bounds"] = [x1, y0, x0, y1]

    cfg = _edited(mini_inputs, swap)
    err = _run_expect_failure(
        cfg, tmp_path / "o", capsys, "grid.bounds", "xmin >= xmax", f"{X0 + W * RES:g}", "[xmin, ymin, xmax, ymax]"
    )
    assert "ymin >= ymax" not in err
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("config", "unknown CRS string")
def test_unknown_crs(mini_inputs, tmp_path, capsys, reliability):
    cfg = _edited(mini_inputs, lambda d: d["grid"].update(crs="UTM 46N"))
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, "grid.crs", "'UTM 46N'", "not a CRS", "EPSG code")
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("config", "duplicate band names after class expansion")
def test_duplicate_classes(mini_inputs, tmp_path, capsys, reliability):
    # 'gabbro' twice would give two bands named lith_gabbro (before the fix the cube was built with both)
    cfg = _edited(mini_inputs, lambda d: d["layers"][2].update(classes=["ultramafic", "gabbro", "gabbro"]))
    err = _run_expect_failure(
        cfg,
        tmp_path / "o",
        capsys,
        "layers[2] (name: 'lith')",
        "['lith_gabbro']",
        "more than once",
        "list each value once in 'classes'",
    )
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("config", "band name clashes with another layer's class band")
def test_band_name_clash(mini_inputs, tmp_path, capsys, reliability):
    cfg = _with_layer(mini_inputs, "  - {name: lith_gabbro, path: mag.tif, source: geophysics}")
    err = _run_expect_failure(
        cfg, tmp_path / "o", capsys, "band name 'lith_gabbro'", "clashes with layer 'lith'", "rename one of them"
    )
    reliability(observed=err, kept=NO_CUBE)


# ------------------------------------------------------------------------------------------------
# rasters
# ------------------------------------------------------------------------------------------------


@pytest.mark.reliability("raster", "GeoTIFF without a CRS")
def test_missing_crs(mini_inputs, tmp_path, capsys, reliability):
    write_raster(mini_inputs / "nocrs.tif", np.ones((20, 20)), crs=None, transform=from_origin(X0, Y0, 100, 100))
    cfg = _with_layer(mini_inputs, "  - {name: bare, path: nocrs.tif}")
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, "'bare'", "no CRS", "crs: EPSG")
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("raster", "raster outside the grid")
def test_layer_outside_grid(mini_inputs, tmp_path, capsys, reliability):
    write_raster(mini_inputs / "far.tif", np.ones((10, 10)), transform=from_origin(X0 + 1e6, Y0, 100, 100))
    cfg = _with_layer(mini_inputs, "  - {name: far, path: far.tif}")
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, "'far'", "does not overlap", f"{X0 + 1e6:.0f}", "CRS")
    assert "np.float64" not in err
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("raster", "wrong CRS override on a bare raster (UTM metres declared EPSG:4326)")
def test_wrong_crs_override(mini_inputs, tmp_path, capsys, reliability):
    arr, t = _mag_array()
    write_raster(mini_inputs / "bare.tif", arr, crs=None, transform=t)
    cfg = _with_layer(mini_inputs, '  - {name: bare, path: bare.tif, crs: "EPSG:4326"}')
    err = _run_expect_failure(
        cfg,
        tmp_path / "o",
        capsys,
        "'bare'",
        "bare.tif",
        f"{X0:.0f}",
        "not longitude/latitude",
        "the layer's 'crs:'",
        "EPSG:4326",
        f"crs: {UTM}",
    )
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("raster", "file tagged with a CRS its coordinates cannot be in")
def test_file_tagged_with_wrong_crs(mini_inputs, tmp_path, capsys, reliability):
    arr, t = _mag_array()
    write_raster(mini_inputs / "tagged.tif", arr, crs="EPSG:4326", transform=t)  # metres, tagged as degrees
    cfg = _with_layer(mini_inputs, "  - {name: tagged, path: tagged.tif}")
    err = _run_expect_failure(
        cfg,
        tmp_path / "o",
        capsys,
        "'tagged'",
        "not longitude/latitude",
        "the file declares",
        "EPSG:4326",
        "gdal_edit.py -a_srs",
    )
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("raster", "coordinates in kilometres for a metre CRS")
def test_raster_in_kilometres(mini_inputs, tmp_path, capsys, reliability):
    arr, _ = _mag_array()
    write_raster(mini_inputs / "km.tif", arr, transform=from_origin(X0 / 1000, Y0 / 1000, RES / 1000, RES / 1000))
    cfg = _with_layer(mini_inputs, "  - {name: km, path: km.tif}")
    err = _run_expect_failure(
        cfg,
        tmp_path / "o",
        capsys,
        "'km'",
        "does not overlap",
        f"{X0 / 1000:g}",
        "look like kilometres",
        "metres",
        "multiply by 1000",
    )
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("raster", "all-nodata raster")
def test_all_nodata_layer(mini_inputs, tmp_path, capsys, reliability):
    write_raster(mini_inputs / "empty.tif", np.full((40, 50), -1.0), transform=from_origin(X0, Y0, 100, 100), nodata=-1)
    cfg = _with_layer(mini_inputs, "  - {name: empty, path: empty.tif}")
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, "'empty'", "no data", "nodata")
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("raster", "constant raster")
def test_constant_layer(mini_inputs, tmp_path, capsys, reliability):
    write_raster(mini_inputs / "flat.tif", np.full((40, 50), 3.5), transform=from_origin(X0, Y0, 100, 100))
    cfg = _with_layer(mini_inputs, "  - {name: flat, path: flat.tif}")
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, "'flat'", "constant (3.5)", "remove it")
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("raster", "zero variance inside the study area only")
def test_zero_variance_after_masking(mini_inputs, tmp_path, capsys, reliability):
    import geopandas as gpd
    from shapely.geometry import box

    # varies over the grid, but constant (7) inside the study area: no evidence where it matters
    arr, t = _mag_array()
    arr[5:25, 5:35] = 7.0
    write_raster(mini_inputs / "half.tif", arr, transform=t)
    area = box(X0 + 6 * RES, Y0 - 24 * RES, X0 + 34 * RES, Y0 - 6 * RES)
    gpd.GeoDataFrame({"id": [1]}, geometry=[area], crs=UTM).to_file(mini_inputs / "area.gpkg")

    def edit(d):
        d["grid"]["mask"] = "area.gpkg"
        d["layers"].append({"name": "half", "path": "half.tif"})

    err = _run_expect_failure(
        _edited(mini_inputs, edit), tmp_path / "o", capsys, "'half'", "constant (7)", "over the study area", "remove it"
    )
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("raster", "missing input file")
def test_missing_file(mini_inputs, tmp_path, capsys, reliability):
    cfg = _with_layer(mini_inputs, "  - {name: ghost, path: ghost.tif}")
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, "'ghost'", "ghost.tif", "does not exist")
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("raster", "file that is not a raster")
def test_unreadable_file(mini_inputs, tmp_path, capsys, reliability):
    (mini_inputs / "junk.tif").write_bytes(b"this is not a tiff" * 10)
    cfg = _with_layer(mini_inputs, "  - {name: junk, path: junk.tif}")
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, "'junk'", "junk.tif", "cannot be read")
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("raster", "truncated GeoTIFF (valid header, bytes cut)")
def test_truncated_geotiff(mini_inputs, tmp_path, capsys, reliability):
    import rasterio

    arr, t = _mag_array()
    p = write_raster(mini_inputs / "cut.tif", arr, transform=t)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    with rasterio.open(p) as src:  # the header survives: the file opens, only its pixels are gone
        assert src.shape == (H, W)
    cfg = _with_layer(mini_inputs, "  - {name: cut, path: cut.tif}")
    err = _run_expect_failure(
        cfg,
        tmp_path / "o",
        capsys,
        "'cut'",
        "cut.tif",
        "is truncated",
        f"it is {len(data) * 2 // 3} bytes",
        "copy or download the file again",
    )
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("raster", "band number beyond the file's bands")
def test_band_out_of_range(mini_inputs, tmp_path, capsys, reliability):
    cfg = _with_layer(mini_inputs, "  - {name: mag3, path: mag.tif, band: 3}")
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, "'mag3'", "band 3", "has 1", "set 'band'")
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("raster", "log transform of non-positive values")
def test_log_of_non_positive_values(mini_inputs, tmp_path, capsys, reliability):
    write_raster(
        mini_inputs / "neg.tif", np.linspace(-5, 5, 2000).reshape(40, 50), transform=from_origin(X0, Y0, 100, 100)
    )
    cfg = _with_layer(mini_inputs, "  - {name: neg, path: neg.tif, transform: log}")
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, "'neg'", "positive", "nodata")
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("raster", "NaN and +-inf values in a band (handled: read as nodata)")
def test_inf_in_raster_is_nodata(mini_inputs, tmp_path, capsys, reliability):
    """Decision: +-inf in a float raster is no data, like NaN and the nodata value. It must not enter the
    cube (evidence holds no inf) nor leak into its neighbours through the resampling; those pixels are
    outside ``valid``, and every other pixel equals the same raster without the bad values."""
    arr, t = _mag_array()
    write_raster(mini_inputs / "clean.tif", arr, transform=t)
    bad = arr.copy()
    bad[10:12, 20:22] = np.inf
    bad[3, 30] = -np.inf
    bad[25, 5] = np.nan
    write_raster(mini_inputs / "inf.tif", bad, transform=t)
    ref = _build(_with_layer(mini_inputs, "  - {name: m, path: clean.tif}"), tmp_path / "ref", capsys)
    ds = _build(_with_layer(mini_inputs, "  - {name: m, path: inf.tif}"), tmp_path / "o", capsys)
    ev = ds.evidence.sel(band="m").values
    assert not np.isinf(ds.evidence.values).any()
    hit = ~np.isfinite(bad)
    assert np.isnan(ev[hit]).all() and not ds.valid.values.astype(bool)[hit].any()
    np.testing.assert_array_equal(ev[~hit], ref.evidence.sel(band="m").values[~hit])
    reliability(
        observed=f"handled: exit 0; {int(hit.sum())} NaN/inf pixels read as nodata, no inf in the cube, "
        "the other pixels equal the clean raster's",
        kept="cube.zarr, those pixels outside 'valid'",
    )


@pytest.mark.reliability("raster", "south-up raster (positive y pixel size) (handled)")
def test_south_up_raster_aligns(mini_inputs, tmp_path, capsys, reliability):
    """A raster stored bottom row first (transform e > 0) is the same map: it must align exactly like the
    north-up file. Before the fix its footprint had bottom > top and it was rejected as 'does not overlap'."""
    import rasterio

    arr, t = _mag_array()
    write_raster(mini_inputs / "north.tif", arr, transform=t)
    south = Affine(t.a, 0.0, t.c, 0.0, -t.e, t.f + t.e * H)  # origin at the bottom-left, y grows downwards
    write_raster(mini_inputs / "south.tif", arr[::-1], transform=south)
    with rasterio.open(mini_inputs / "south.tif") as src:
        assert src.transform.e > 0
    ref = _build(_with_layer(mini_inputs, "  - {name: m, path: north.tif}"), tmp_path / "ref", capsys)
    ds = _build(_with_layer(mini_inputs, "  - {name: m, path: south.tif}"), tmp_path / "o", capsys)
    got, want = ds.evidence.sel(band="m").values, ref.evidence.sel(band="m").values
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got, arr, rtol=1e-6)  # and both equal the field on the target grid
    reliability(observed="handled: exit 0; the south-up raster aligns exactly like its north-up copy", kept="cube.zarr")


# ------------------------------------------------------------------------------------------------
# vectors
# ------------------------------------------------------------------------------------------------


@pytest.mark.reliability("vector", "categorical attribute not in the file")
def test_missing_categorical_attribute(mini_inputs, tmp_path, capsys, reliability):
    cfg = _with_layer(
        mini_inputs,
        "  - {name: rock, path: geology.gpkg, layer: lithology, kind: categorical, attribute: LITHO, classes: [ultramafic]}",
    )
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, "'rock'", "'LITHO'", "ROCKTYPE", "set 'attribute'")
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("vector", "categorical class not present in the data")
def test_unknown_class_value(mini_inputs, tmp_path, capsys, reliability):
    cfg = _with_layer(
        mini_inputs,
        "  - {name: rock, path: geology.gpkg, layer: lithology, kind: categorical, attribute: ROCKTYPE, classes: [dunite]}",
    )
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, "'rock'", "dunite", "fix 'classes'")
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("vector", "empty vector layer")
def test_empty_vector_layer(mini_inputs, tmp_path, capsys, reliability):
    import geopandas as gpd

    faults = gpd.read_file(mini_inputs / "geology.gpkg", layer="faults")
    faults.iloc[:0].to_file(mini_inputs / "nofaults.gpkg", layer="faults")
    cfg = _with_layer(mini_inputs, "  - {name: f2, path: nofaults.gpkg, layer: faults, kind: distance}")
    err = _run_expect_failure(
        cfg, tmp_path / "o", capsys, "'f2'", "layer 'faults'", "nofaults.gpkg", "no features (0 rows)"
    )
    assert "query None" not in err
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("vector", "query that selects no feature")
def test_vector_query_selects_nothing(mini_inputs, tmp_path, capsys, reliability):
    cfg = _with_layer(
        mini_inputs,
        "  - {name: um, path: geology.gpkg, layer: lithology, kind: indicator, query: \"ROCKTYPE == 'Ultramafic'\"}",
    )
    err = _run_expect_failure(
        cfg,
        tmp_path / "o",
        capsys,
        "'um'",
        "query \"ROCKTYPE == 'Ultramafic'\"",
        "selects no feature",
        "relax the query",
    )
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("vector", "layer name not in the GeoPackage")
def test_wrong_vector_layer_name(mini_inputs, tmp_path, capsys, reliability):
    cfg = _with_layer(mini_inputs, "  - {name: f3, path: geology.gpkg, layer: fault, kind: distance}")
    err = _run_expect_failure(
        cfg, tmp_path / "o", capsys, "'f3'", "layer 'fault'", "['lithology', 'faults']", "'layer' name"
    )
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("vector", "vector file without a CRS")
def test_vector_without_crs(mini_inputs, tmp_path, capsys, reliability):
    import geopandas as gpd

    faults = gpd.read_file(mini_inputs / "geology.gpkg", layer="faults").set_crs(None, allow_override=True)
    faults.to_file(mini_inputs / "bare.gpkg", layer="faults")
    cfg = _with_layer(mini_inputs, "  - {name: f4, path: bare.gpkg, layer: faults, kind: distance}")
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, "'f4'", "bare.gpkg", "has no CRS", "crs: EPSG")
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("vector", "indicator layer made of lines")
def test_indicator_of_lines(mini_inputs, tmp_path, capsys, reliability):
    cfg = _with_layer(mini_inputs, "  - {name: f5, path: geology.gpkg, layer: faults, kind: indicator}")
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, "'f5'", "needs polygons", "LineString", "kind 'distance'")
    reliability(observed=err, kept=NO_CUBE)


# ------------------------------------------------------------------------------------------------
# point samples
# ------------------------------------------------------------------------------------------------


def _samples(root: Path):
    import pandas as pd

    return pd.read_csv(root / "samples.csv")


@pytest.mark.reliability("points", "CSV without the configured x/y columns")
def test_csv_without_xy_columns(mini_inputs, tmp_path, capsys, reliability):
    cfg = _with_layer(
        mini_inputs,
        '  - {name: s2, path: samples.csv, kind: points, x: EAST, y: NORTH, crs: "EPSG:4326", columns: [Cr]}',
    )
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, "'s2'", "['EAST', 'NORTH']", "set 'x' and 'y'")
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("points", "non-numeric value in a sample column")
def test_non_numeric_values(mini_inputs, tmp_path, capsys, reliability):
    df = _samples(mini_inputs)
    df["Cr"] = df["Cr"].astype(object)
    df.loc[7, "Cr"] = "n.d."
    df.to_csv(mini_inputs / "samples.csv", index=False)
    err = _run_expect_failure(mini_inputs / "run.yaml", tmp_path / "o", capsys, "'ss'", "'Cr'", "'n.d.'", "row 7")
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("points", "longitude and latitude swapped")
def test_lon_lat_swapped(mini_inputs, tmp_path, capsys, reliability):
    df = _samples(mini_inputs)
    df["X"], df["Y"] = df["Y"].copy(), df["X"].copy()  # x now holds latitudes (~36), y longitudes (~93)
    df.to_csv(mini_inputs / "samples.csv", index=False)
    err = _run_expect_failure(
        mini_inputs / "run.yaml",
        tmp_path / "o",
        capsys,
        "'ss'",
        "cannot be placed on the grid",
        "swapped",
        "swap 'x' and 'y'",
    )
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("points", "coordinates in kilometres for a metre CRS")
def test_points_in_kilometres(mini_inputs, tmp_path, capsys, reliability):
    from pyproj import Transformer

    df = _samples(mini_inputs)
    x, y = Transformer.from_crs("EPSG:4326", UTM, always_xy=True).transform(df["X"].to_numpy(), df["Y"].to_numpy())
    df["X"], df["Y"] = x / 1000, y / 1000
    df.to_csv(mini_inputs / "km.csv", index=False)
    cfg = _with_layer(
        mini_inputs, f'  - {{name: km, path: km.csv, kind: points, x: X, y: Y, crs: "{UTM}", columns: [Cr]}}'
    )
    err = _run_expect_failure(
        cfg, tmp_path / "o", capsys, "'km'", "does not overlap", "look like kilometres", "multiply by 1000"
    )
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("points", "CSV with a header and zero rows")
def test_points_without_rows(mini_inputs, tmp_path, capsys, reliability):
    _samples(mini_inputs).iloc[:0].to_csv(mini_inputs / "samples.csv", index=False)
    err = _run_expect_failure(
        mini_inputs / "run.yaml", tmp_path / "o", capsys, "'ss'", "samples.csv", "no data rows", "0 samples"
    )
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("points", "query that selects no sample")
def test_points_query_selects_nothing(mini_inputs, tmp_path, capsys, reliability):
    cfg = _with_layer(
        mini_inputs,
        '  - {name: s3, path: samples.csv, kind: points, x: X, y: Y, crs: "EPSG:4326", columns: [Cr], query: "Cr > 1e9"}',
    )
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, "'s3'", "'Cr > 1e9'", "no sample", "relax the query")
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("points", "value column not in the CSV")
def test_points_value_column_missing(mini_inputs, tmp_path, capsys, reliability):
    cfg = _with_layer(
        mini_inputs,
        '  - {name: s4, path: samples.csv, kind: points, x: X, y: Y, crs: "EPSG:4326", columns: [Cr, Au]}',
    )
    err = _run_expect_failure(cfg, tmp_path / "o", capsys, "'s4'", "['Au']", "samples.csv", "'columns'")
    reliability(observed=err, kept=NO_CUBE)


@pytest.mark.reliability("points", "+-inf in a sample value (handled: read as missing)")
def test_inf_sample_value_is_missing(mini_inputs, tmp_path, capsys, reliability):
    """Decision: a sample value of +-inf is missing, exactly like the -9999 sentinel (with CLR the whole
    sample leaves every band, as for any missing part). The cube must equal the one where that value is
    -9999, and hold no inf."""
    df = _samples(mini_inputs)
    df["Cr"] = df["Cr"].astype(float)
    df.loc[11, "Cr"] = -9999.0
    df.loc[20, "Ni"] = -9999.0
    df.to_csv(mini_inputs / "samples.csv", index=False)
    ref = _build(mini_inputs / "run.yaml", tmp_path / "ref", capsys)
    df.loc[11, "Cr"] = np.inf
    df.loc[20, "Ni"] = -np.inf
    df.to_csv(mini_inputs / "samples.csv", index=False)
    assert "inf" in (mini_inputs / "samples.csv").read_text()
    with np.errstate(invalid="ignore"):
        ds = _build(mini_inputs / "run.yaml", tmp_path / "o", capsys)
    assert not np.isinf(ds.evidence.values).any()
    np.testing.assert_array_equal(ds.evidence.values, ref.evidence.values)
    np.testing.assert_array_equal(ds.valid.values, ref.valid.values)
    reliability(
        observed="handled: exit 0; inf / -inf sample values are missing values (the cube equals the one "
        "with -9999 there), no inf in the cube",
        kept="cube.zarr",
    )


@pytest.mark.reliability("points", "duplicate sample coordinates with conflicting values (handled)")
def test_duplicate_sample_coordinates(mini_inputs, tmp_path, capsys, reliability):
    """Two samples at one place with different values (a field duplicate and its re-assay): not an error.
    IDW weighs both equally, so a pixel near them gets their mean."""
    import pandas as pd

    ax, ay = X0 + 1234.0, Y0 - 1234.0  # off any pixel centre (a centre on a sample takes it exactly)
    bx, by = X0 + 2800.0, Y0 - 1234.0
    pd.DataFrame({"E": [ax, ax, bx], "N": [ay, ay, by], "Au": [10.0, 30.0, 50.0]}).to_csv(
        mini_inputs / "dup.csv", index=False
    )
    cfg = _with_layer(
        mini_inputs,
        f'  - {{name: au, path: dup.csv, kind: points, x: E, y: N, crs: "{UTM}", '
        "columns: [Au], interpolation: {k: 2, radius: 400}}",
    )
    ds = _build(cfg, tmp_path / "o", capsys)
    au = ds.evidence.sel(band="au")
    near_a = float(au.sel(x=ax, y=ay, method="nearest"))
    near_b = float(au.sel(x=bx, y=by, method="nearest"))
    assert near_a == pytest.approx(20.0, rel=1e-6), near_a  # the mean of the two conflicting values
    assert near_b == pytest.approx(50.0, rel=1e-6)
    reliability(
        observed=f"handled: exit 0; the pixel at the duplicated site holds {near_a:g}, the mean of 10 and 30",
        kept="cube.zarr",
    )


# ------------------------------------------------------------------------------------------------
# the cube on disk
# ------------------------------------------------------------------------------------------------


@pytest.mark.reliability("cube", "failed rebuild keeps the previous cube")
def test_failed_rebuild_keeps_previous_cube(mini_inputs, tmp_path, capsys, reliability):
    out = tmp_path / "o"
    assert main(["cube", str(mini_inputs / "run.yaml"), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    write_raster(mini_inputs / "flat.tif", np.full((40, 50), 1.0), transform=from_origin(X0, Y0, 100, 100))
    cfg = _with_layer(mini_inputs, "  - {name: flat, path: flat.tif}")
    rc = main(["cube", str(cfg), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "constant" in err and "\n" not in err
    assert sorted(p.name for p in out.glob("cube.zarr*")) == ["cube.zarr"]
    from pipeline.data.cube import open_cube

    bands = list(open_cube(out / "cube.zarr").band.values)
    assert "flat" not in bands and "mag" in bands
    reliability(observed=err, kept="the previous cube.zarr, intact (opens, without the new band); no temporary store")
