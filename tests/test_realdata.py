"""Cubes from the real datasets in ../shared/data (skipped where the data are absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import shared_data

from pipeline.config import RunConfig
from pipeline.data.cube import open_cube, write_cube
from pipeline.data.ingest import build_cube

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
pytestmark = pytest.mark.realdata


def _build(name, tmp_path):
    cfg = RunConfig.from_yaml(CONFIGS / f"{name}.yaml")
    return cfg, open_cube(write_cube(build_cube(cfg), tmp_path / "cube.zarr"))


def test_cn_south_li_three_grids_on_one(tmp_path):
    root = shared_data("cn-south-li")
    cfg, ds = _build("cn-south-li", tmp_path)
    bands = list(ds.band.values)
    assert len(bands) == 42 and "xx" not in bands and "yy" not in bands
    assert bands[-3:] == ["granite", "strata", "faults"]
    assert ds.rio.crs.to_epsg() == 32650 and ds.sizes["y"] == 645 and ds.sizes["x"] == 556
    # the geology grid is kept exactly: granite equals the source raster pixel for pixel
    import rasterio

    with rasterio.open(root / "rasters/geology/Granite.tif") as src:
        np.testing.assert_allclose(ds.evidence.sel(band="granite").values, src.read(1), atol=1e-6)
    # CLR across the 39 geochemistry bands sums to zero
    geo = ds.evidence.sel(band=bands[:39]).values
    valid = ds.valid.values.astype(bool)
    assert np.abs(geo[:, valid].sum(axis=0)).max() < 1e-3
    assert valid.mean() > 0.5


def test_wa_murchison_vector_evidence(tmp_path):
    shared_data("wa-murchison")
    cfg, ds = _build("wa-murchison", tmp_path)
    assert list(ds.band.values) == ["fault_distance", "greenstone", "greenstone_distance"]
    gs = ds.evidence.sel(band="greenstone").values
    gd = ds.evidence.sel(band="greenstone_distance").values
    assert set(np.unique(gs)) == {0.0, 1.0}
    # inside the greenstone the distance to it is zero; the belt covers ~12,222 km2 of ~133,000
    assert (gd[gs == 1] == 0).all()
    assert 9_000 < gs.sum() < 15_000
    assert ds.evidence.sel(band="fault_distance").min() == 0


def test_gswa_soil1_points_gridded(tmp_path):
    shared_data("gswa-soil1")
    cfg, ds = _build("gswa-soil1", tmp_path)
    assert ds.rio.crs.to_epsg() == 32750
    assert len(ds.band) == 8
    valid = ds.valid.values.astype(bool)
    assert valid.sum() > 5000
    au = ds.evidence.sel(band="soil_Au_ppm").values[valid]
    assert np.isfinite(au).all() and au.std() > 0.1


@pytest.mark.parametrize("name", ["cn-south-li", "wa-murchison", "gswa-soil1"])
def test_real_config_runs_end_to_end_at_reduced_size(name, tmp_path):
    """cube -> train -> score -> evaluate on each real dataset, with a small model and few steps."""
    import json

    from pipeline.run.runner import run_pipeline

    shared_data(name)
    cfg = RunConfig.from_yaml(CONFIGS / f"{name}.yaml").with_updates(
        model={"dim": 32, "depth": 1, "heads": 2, "decoder_dim": 32, "decoder_depth": 1},
        train={"epochs": 1, "steps_per_epoch": 3, "train_stride": 8, "batch_size": 16},
        score={"stride": 16},
        cluster={"kind": "none"},
    )
    out = tmp_path / "o"
    run_pipeline(cfg, out, stages="cube,train,score,evaluate", progress=False, log=lambda m: None)
    for f in ("cube.zarr", "model.pt", "prospectivity.zarr", "prospectivity.tif", "metrics.json"):
        assert (out / f).exists(), f
    m = json.loads((out / "metrics.json").read_text())["prospectivity"]
    assert 0.0 <= m["auc"] <= 1.0
    assert m["protocol"] == ("points" if name == "gswa-soil1" else "raster")
