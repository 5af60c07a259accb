"""Synthetic province: determinism, real files with real CRSs, planted geology, and the config contract."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
import yaml
from pyproj import Transformer
from scipy.spatial import cKDTree

from pipeline.config import RunConfig
from pipeline.data.synthetic import CRS, ELEMENTS, NODATA, generate_fields, write_province
from pipeline.errors import ConfigError

SIZE, RES = 192, 100.0
TO_UTM = Transformer.from_crs("EPSG:4326", CRS, always_xy=True)


@pytest.fixture(scope="module")
def province(tmp_path_factory):
    return write_province(tmp_path_factory.mktemp("province"), SIZE, seed=0)


@pytest.fixture(scope="module")
def truth():
    return generate_fields(SIZE, seed=0)


@pytest.fixture(scope="module")
def samples(province):
    df = pd.read_csv(province.samples_path)
    df["x"], df["y"] = TO_UTM.transform(df.X.to_numpy(), df.Y.to_numpy())
    return df


def _deposits_utm(path):
    df = pd.read_csv(path)
    df["x"], df["y"] = TO_UTM.transform(df.X.to_numpy(), df.Y.to_numpy())
    return df


def _at(da, x, y):
    """Values of a truth DataArray at map points (nearest pixel)."""
    res = float(da.x[1] - da.x[0])
    col = np.floor((np.asarray(x) - float(da.x[0]) + res / 2) / res).astype(int)
    row = np.floor((float(da.y[0]) + res / 2 - np.asarray(y)) / res).astype(int)
    return da.values[row.clip(0, da.shape[0] - 1), col.clip(0, da.shape[1] - 1)]


def _read(path):
    with rasterio.open(path) as src:
        return src.read(1), src.crs, src.res, src.profile


# -- determinism --------------------------------------------------------------------------------


def test_same_seed_is_identical_and_matches_truth(province, truth, tmp_path):
    again = write_province(tmp_path / "again", SIZE, seed=0)
    for a, b in [(province.samples_path, again.samples_path), (province.deposits_path, again.deposits_path)]:
        assert a.read_bytes() == b.read_bytes()
    for a, b in [(province.magnetic_path, again.magnetic_path), (province.gravity_path, again.gravity_path)]:
        np.testing.assert_array_equal(_read(a)[0], _read(b)[0])
    for layer in ("lithology", "faults"):
        ga = gpd.read_file(province.geology_path, layer=layer)
        gb = gpd.read_file(again.geology_path, layer=layer)
        assert shapely.equals(ga.geometry.values, gb.geometry.values).all()
    # the in-memory truth is what was written (bar the few blanked edge pixels)
    mag = _read(province.magnetic_path)[0]
    ok = mag != NODATA
    assert 0 < (~ok).sum() < 0.01 * mag.size
    np.testing.assert_array_equal(mag[ok], truth["magnetic"].values[ok])


def test_different_seed_gives_a_different_province(province, tmp_path):
    other = write_province(tmp_path / "other", SIZE, seed=1)
    assert other.samples_path.read_bytes() != province.samples_path.read_bytes()
    a, b = _deposits_utm(province.deposits_path), _deposits_utm(other.deposits_path)
    assert len(a) != len(b) or not np.allclose(a[["x", "y"]], b[["x", "y"]])


# -- files --------------------------------------------------------------------------------------


def test_files_exist_with_their_crs(province):
    for p in province.files:
        assert p.is_file() and p.stat().st_size > 0, p
    mag, mag_crs, mag_res, mag_prof = _read(province.magnetic_path)
    grav, grav_crs, grav_res, grav_prof = _read(province.gravity_path)
    assert mag_crs.to_epsg() == 32646 and grav_crs.to_epsg() == 4326 and mag_crs != grav_crs
    assert mag.shape == (SIZE, SIZE) and mag_res == (RES, RES)
    assert rasterio.transform.array_bounds(SIZE, SIZE, mag_prof["transform"]) == pytest.approx(province.bounds)
    # gravity: ~2.5x coarser, in degrees
    assert grav_res[1] * 111_320 == pytest.approx(2.5 * RES, rel=0.01)
    assert (grav == NODATA).any() and (mag == NODATA).any()
    for prof in (mag_prof, grav_prof):
        assert prof["tiled"] and prof["blockxsize"] == 256 and prof["compress"] == "deflate"
        assert prof["nodata"] == NODATA
    # magnetics high over ultramafics, in nT-sized numbers
    assert np.nanmax(np.where(mag == NODATA, np.nan, mag)) > 200


def test_geology_vectors_cover_the_area(province):
    litho = gpd.read_file(province.geology_path, layer="lithology")
    faults = gpd.read_file(province.geology_path, layer="faults")
    study = gpd.read_file(province.study_area_path)
    assert litho.crs.to_epsg() == 32646 and faults.crs.to_epsg() == 32646
    assert set(litho.ROCKTYPE) == {"ultramafic", "gabbro", "basalt", "sediment", "granite"}
    box = shapely.box(*province.bounds)
    assert litho.area.sum() == pytest.approx(box.area, rel=1e-6)
    assert shapely.union_all(litho.geometry.values).symmetric_difference(box).area < 1e-6 * box.area
    assert (faults.geom_type == "LineString").all() and len(faults) >= 4
    # the study area is most of the grid, but not all of it
    assert len(study) == 1 and 0.8 * box.area < study.area.iloc[0] < box.area
    assert box.contains(study.geometry.iloc[0])


# -- planted geology ----------------------------------------------------------------------------


def test_deposits_lie_in_ultramafics_near_faults(province):
    dep = _deposits_utm(province.deposits_path)
    chromite = dep.query("type == 'chromite'")
    assert set(dep.type) == {"chromite", "copper"} and (dep.type == "copper").sum() >= 2
    assert len(chromite) == province.n_deposits and 12 <= len(chromite) <= 25
    litho = gpd.read_file(province.geology_path, layer="lithology")
    um = shapely.union_all(litho[litho.ROCKTYPE == "ultramafic"].geometry.values)
    faults = shapely.union_all(gpd.read_file(province.geology_path, layer="faults").geometry.values)
    x, y = chromite.x.to_numpy(), chromite.y.to_numpy()
    assert shapely.contains_xy(um, x, y).all()
    assert (shapely.distance(shapely.points(x, y), faults) <= 7 * RES).all()
    study = gpd.read_file(province.study_area_path).geometry.iloc[0]
    assert shapely.contains_xy(study, x, y).all()
    copper = dep.query("type == 'copper'")
    assert not shapely.contains_xy(um, copper.x.to_numpy(), copper.y.to_numpy()).any()


def test_barren_body_is_ultramafic_far_from_faults_and_deposits(truth):
    barren = truth["barren"].values
    assert barren.sum() > 50
    assert (truth["ultramafic"].values[barren]).all()
    assert truth["fault_distance"].values[barren].min() >= 10 * RES
    dep = truth["deposits"]
    chrom = dep[dep.type == "chromite"]
    assert not _at(truth["barren"], chrom.x, chrom.y).any()
    # ...and it looks like the mineralised ultramafics in the geophysics (a real distractor)
    um_ore = truth["ultramafic"].values & ~barren
    sediment = truth["lithology"].values == 4
    for name in ("magnetic", "gravity"):
        f = truth[name].values
        assert f[barren].mean() > f[sediment].mean()
    assert truth["magnetic"].values[barren].mean() > 0.5 * truth["magnetic"].values[um_ore].mean()


def test_geochemistry_cr_signal_and_distractors(samples, truth):
    dep = truth["deposits"]
    chrom = dep[dep.type == "chromite"]
    xy = samples[["x", "y"]].to_numpy()
    d_dep, _ = cKDTree(chrom[["x", "y"]].to_numpy()).query(xy)
    cr = samples.Cr.to_numpy()
    ok = cr > 0  # drop missing and below-detection values
    near = ok & (d_dep <= 1.5 * RES)
    over_barren = ok & _at(truth["barren"], samples.x, samples.y)
    feats = truth["features"]
    d_town, _ = cKDTree(feats[feats.kind == "town"][["x", "y"]].to_numpy()).query(xy)
    litho = _at(truth["lithology"], samples.x, samples.y)
    background = ok & (litho == 4) & (d_town > 15 * RES)
    assert near.sum() >= 10 and over_barren.sum() >= 10 and background.sum() > 500
    med_near, med_barren, med_bg = np.median(cr[near]), np.median(cr[over_barren]), np.median(cr[background])
    assert med_near > 2 * med_barren, (med_near, med_barren)
    assert med_barren > 4 * med_bg, (med_barren, med_bg)
    # the town is a Cr spike without the ultramafic MgO
    town = (d_town <= 3 * RES) & (samples.MgO.to_numpy() > 0) & ok
    assert town.sum() >= 1
    assert np.median(cr[town]) > 4 * med_bg
    assert np.median(samples.MgO.to_numpy()[town]) < 0.5 * np.median(samples.MgO.to_numpy()[over_barren])


def test_samples_have_detection_limits_and_missing_values(samples, province):
    assert list(samples.columns[:3]) == ["ID", "X", "Y"] and tuple(samples.columns[3:-2]) == ELEMENTS
    vals = samples[list(ELEMENTS)]
    assert (vals == -9999).sum().sum() > 0
    below = (vals < 0) & (vals != -9999)
    assert below.to_numpy().sum() > 10
    for col in ELEMENTS:  # '<DL' is written as exactly -DL: one negative value per column
        assert vals.loc[below[col], col].nunique() <= 1
    assert samples.X.between(88, 95).all() and samples.Y.between(43, 48).all()  # lon/lat
    density = len(samples) / SIZE**2
    assert 1 / 9 <= density <= 1 / 4 and len(samples) == province.n_samples


def test_size_scales_samples_and_deposits(tmp_path):
    small = write_province(tmp_path / "s", 128, seed=3)
    large = write_province(tmp_path / "l", 256, seed=3)
    ratio = large.n_samples / small.n_samples
    assert 3.6 < ratio < 4.4
    assert large.n_deposits > small.n_deposits >= 3
    assert _read(large.magnetic_path)[0].shape == (256, 256)
    assert large.bounds[2] - large.bounds[0] == 256 * RES


def test_truth_dataarrays_carry_grid_and_crs(truth, province):
    with rasterio.open(province.magnetic_path) as src:
        xs, _ = rasterio.transform.xy(src.transform, [0] * SIZE, list(range(SIZE)))
    for name in (*ELEMENTS, "magnetic", "gravity", "lithology", "fault_distance", "ultramafic"):
        da = truth[name]
        assert da.dims == ("y", "x") and da.shape == (SIZE, SIZE)
        assert da.rio.crs.to_epsg() == 32646
        np.testing.assert_allclose(da.x.values, xs)
    assert truth["faults"].values.sum() > 0
    assert truth["Cr"].attrs["units"] == "ppm"


# -- config -------------------------------------------------------------------------------------


def test_config_validates_and_paths_resolve(province):
    raw = yaml.safe_load(province.config_path.read_text())
    cfg = RunConfig.from_yaml(province.config_path)
    assert cfg.grid.crs == CRS and cfg.grid.resolution == RES
    assert tuple(cfg.grid.bounds) == province.bounds
    paths = [cfg.grid.mask, cfg.deposits.path, *(layer.path for layer in cfg.layers)]
    for p in paths:
        assert not p.is_absolute(), p  # relative in the YAML ...
        assert cfg.resolve(p).is_file(), p  # ... and resolving next to it
    assert [raw_layer["path"] for raw_layer in raw["layers"]] == [str(layer.path) for layer in cfg.layers]
    assert len(cfg.band_names) == 13
    assert {layer.source for layer in cfg.layers} == {"geochemistry", "geophysics", "geology"}
    kinds = {layer.name: layer.kind for layer in cfg.layers}
    assert kinds == {
        "stream_sediment": "points",
        "magnetic": "continuous",
        "gravity": "continuous",
        "lithology": "categorical",
        "fault_distance": "distance",
    }
    dep = pd.read_csv(cfg.resolve(cfg.deposits.path)).query(cfg.deposits.query)
    assert len(dep) == province.n_deposits
    assert (cfg.model.window, cfg.model.patch, cfg.model.dim, cfg.model.depth) == (16, 4, 64, 2)
    assert (cfg.train.epochs, cfg.train.batch_size) == (3, 64)
    # the columns the config grids exist in the CSV
    header = province.samples_path.read_text().split("\n", 1)[0].split(",")
    assert set(cfg.layers[0].columns) <= set(header)


def test_bad_arguments_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="size 16 .*>= 64"):
        write_province(tmp_path, 16)
    with pytest.raises(ConfigError, match="resolution"):
        generate_fields(128, resolution=0)
