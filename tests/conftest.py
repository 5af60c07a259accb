"""Shared fixtures: tiny real inputs (GeoTIFFs via rasterio, a GeoPackage, a CSV) with a real CRS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest_plugins = ["_reliability"]

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
UTM = "EPSG:32646"
X0, Y0, RES = 500_000.0, 4_000_000.0, 100.0  # target grid origin (top-left) and pixel size
W, H = 40, 30


def write_raster(path, arr, *, crs=UTM, transform=None, nodata=None, dtype="float32"):
    import rasterio

    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[None]
    profile = dict(
        driver="GTiff",
        height=arr.shape[1],
        width=arr.shape[2],
        count=arr.shape[0],
        dtype=dtype,
        transform=transform,
        nodata=nodata,
    )
    if crs is not None:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(arr.astype(dtype))
    return Path(path)


def smooth_field(x, y):
    """An analytic field (metres in, smooth values out) to check alignment against."""
    return 100.0 + 10.0 * np.sin((x - X0) / 900.0) + 8.0 * np.cos((Y0 - y) / 700.0) + (x - X0) / 400.0


@pytest.fixture
def mini_inputs(tmp_path):
    """A small multi-source province: raster, other-CRS raster, lithology + faults GeoPackage, sample CSV."""
    import geopandas as gpd
    import pandas as pd
    from pyproj import Transformer
    from rasterio.transform import from_origin
    from shapely.geometry import LineString, box

    rng = np.random.default_rng(0)
    # magnetics: 50 m cells, shifted 25 m from the target grid
    t = from_origin(X0 - 200, Y0 + 200, 50, 50)
    cols, rows = np.meshgrid(np.arange(90), np.arange(70))
    xs, ys = t @ (cols + 0.5, rows + 0.5)
    write_raster(tmp_path / "mag.tif", smooth_field(xs, ys), transform=t, nodata=-99999)
    # gravity in lon/lat
    tr = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    lon0, lat1 = tr.transform(X0 - 500, Y0 + 500)
    lon1, lat0 = tr.transform(X0 + W * RES + 500, Y0 - H * RES - 500)
    g = from_origin(lon0, lat1, 0.002, 0.002)
    gw, gh = int((lon1 - lon0) / 0.002) + 1, int((lat1 - lat0) / 0.002) + 1
    write_raster(tmp_path / "grav.tif", rng.normal(0, 1, (gh, gw)), crs="EPSG:4326", transform=g, nodata=-99999)
    lith = gpd.GeoDataFrame(
        {"ROCKTYPE": ["ultramafic", "gabbro", "basalt"]},
        geometry=[
            box(X0, Y0 - 3000, X0 + 1500, Y0),
            box(X0 + 1500, Y0 - 3000, X0 + 3000, Y0),
            box(X0 + 3000, Y0 - 3000, X0 + 4000, Y0),
        ],
        crs=UTM,
    )
    lith.to_file(tmp_path / "geology.gpkg", layer="lithology")
    faults = gpd.GeoDataFrame(
        {"id": [1]}, geometry=[LineString([(X0 - 1000, Y0 - 1450), (X0 + 5000, Y0 - 1450)])], crs=UTM
    )
    faults.to_file(tmp_path / "geology.gpkg", layer="faults")
    n = 150
    sx = rng.uniform(X0, X0 + W * RES, n)
    sy = rng.uniform(Y0 - H * RES, Y0, n)
    lon, lat = tr.transform(sx, sy)
    df = pd.DataFrame(
        {
            "X": lon,
            "Y": lat,
            "Cr": rng.lognormal(5, 0.5, n),
            "Ni": rng.lognormal(4, 0.5, n),
            "Co": rng.lognormal(3, 0.5, n),
        }
    )
    df.loc[3, "Ni"] = -9999
    df.loc[4, "Co"] = -0.5  # below detection: '< 0.5'
    df.to_csv(tmp_path / "samples.csv", index=False)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"""name: mini
grid: {{crs: "{UTM}", resolution: {RES}, bounds: [{X0}, {Y0 - H * RES}, {X0 + W * RES}, {Y0}], chunk: 16}}
layers:
  - {{name: mag, path: mag.tif, source: geophysics}}
  - {{name: grav, path: grav.tif, source: geophysics}}
  - {{name: lith, path: geology.gpkg, layer: lithology, source: geology, kind: categorical, attribute: ROCKTYPE, classes: [ultramafic, gabbro]}}
  - {{name: fault_distance, path: geology.gpkg, layer: faults, source: geology, kind: distance}}
  - {{name: ss, path: samples.csv, source: geochemistry, kind: points, x: X, y: Y, crs: "EPSG:4326", columns: [Cr, Ni, Co], transform: clr, interpolation: {{radius: 2000}}}}
"""
    )
    return tmp_path


@pytest.fixture
def no_dask_compute():
    """A dask scheduler that fails the test on any compute: proves a function stays lazy."""
    import dask

    def refuse(*args, **kwargs):
        raise AssertionError("dask computed something; this step must stay lazy")

    with dask.config.set(scheduler=refuse):
        yield


def shared_data(name: str) -> Path:
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"real dataset {name!r} not present at {p} (../shared/data is only on the project's machines)")
    return p


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(request):
    """Modules that set ``ONE_TORCH_THREAD = True`` run torch on one intra-op thread: tiny tensors on a
    shared 2-core box are 10-50x slower with two (OpenMP spin-wait contention)."""
    if not getattr(request.module, "ONE_TORCH_THREAD", False):
        yield
        return
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
