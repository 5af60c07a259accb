"""Property-based invariants (hypothesis): random inputs, real components.

- a raster aligned onto its own grid (``grid.like`` or the same crs/resolution/bounds) comes back unchanged;
- the evaluation metrics depend on the order of the scores only (strictly increasing transforms change
  nothing; negating the score gives 1 - AUC);
- lazy chunked scoring (``score_cube``, map_overlap) equals scoring the cube as one chunk;
- IDW gives back each sample's value at its own location, and stays within the samples' range;
- a cube written to Zarr opens with the same values, mask, bands, coordinates and CRS.

Every property runs a fixed, derandomised set of examples (reproducible in CI; no example database), and
is one reliability case: an outer test runs the inner ``@given`` function and records what it checked.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import rioxarray  # noqa: F401  (the .rio accessor)
import xarray as xr
from conftest import write_raster
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

ONE_TORCH_THREAD = True  # see conftest._one_torch_thread

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# expensive examples: report the failing example as found (shrinking a scoring run can take minutes)
NO_SHRINK = dict(phases=[Phase.explicit, Phase.reuse, Phase.generate])


# ------------------------------------------------------------------------------------------------
# alignment onto the raster's own grid is the identity
# ------------------------------------------------------------------------------------------------

# (crs, origin x range, origin y range, pixel sizes): a projected UTM north and south grid, Web Mercator,
# and a lon/lat grid
CRS_SPECS = [
    ("EPSG:32646", (200_000.0, 800_000.0), (1_000_000.0, 5_000_000.0), (0.5, 10.0, 25.0, 30.0, 100.0, 250.0, 1000.0)),
    ("EPSG:32733", (200_000.0, 800_000.0), (6_000_000.0, 9_000_000.0), (1.0, 20.0, 50.0, 90.0, 500.0)),
    ("EPSG:3857", (-1.5e7, 1.5e7), (-7e6, 7e6), (10.0, 30.0, 100.0, 1000.0)),
    ("EPSG:4326", (-170.0, 160.0), (-55.0, 70.0), (0.0001, 0.00025, 0.001, 0.0083333333333, 0.01, 0.05)),
]
INT_RANGES = {"uint8": (0, 255), "uint16": (0, 65535), "int16": (-32768, 32767), "int32": (-(2**31), 2**31 - 1)}


PROJECTED = [s for s in CRS_SPECS if s[0] != "EPSG:4326"]
LONLAT = [s for s in CRS_SPECS if s[0] == "EPSG:4326"]


@st.composite
def raster_specs(draw, crs_specs=tuple(PROJECTED)):
    crs, (x_lo, x_hi), (y_lo, y_hi), sizes = draw(st.sampled_from(crs_specs))
    rx = draw(st.sampled_from(sizes))
    # square pixels, or rectangular ones
    ry = rx * draw(st.sampled_from([1.0, 1.0, 0.5, 2.0, 1.5]))
    w = draw(st.integers(3, 200))
    h = draw(st.integers(3, 200 if w < 60 else 60))
    x0 = draw(st.floats(x_lo, x_hi, allow_nan=False))
    y0 = draw(st.floats(y_lo, y_hi, allow_nan=False))
    if crs == "EPSG:4326":  # keep the raster on the globe
        assume(x0 + w * rx < 180 and y0 - h * ry > -90 and y0 <= 90)
    dtype = draw(st.sampled_from(["float32", "float64", "uint8", "uint16", "int16", "int32"]))
    if dtype in INT_RANGES:
        lo, hi = INT_RANGES[dtype]
        nodata = draw(st.sampled_from([lo, hi, 0 if lo < 0 else hi - 1]))
    else:
        nodata = draw(st.sampled_from([-9999.0, -3.4e38, 0.0, 1e20, float("nan")]))
    how = draw(st.sampled_from(["like", "bounds"]))
    chunk = draw(st.sampled_from([16, 23, 64, 512]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(
        crs=crs, rx=rx, ry=ry, w=w, h=h, x0=x0, y0=y0, dtype=dtype, nodata=nodata, how=how, chunk=chunk, seed=seed
    )


def _random_values(spec) -> tuple[np.ndarray, np.ndarray]:
    """Values of the raster's dtype (never the nodata value) and a random nodata mask."""
    rng = np.random.default_rng(spec["seed"])
    shape = (spec["h"], spec["w"])
    dtype = spec["dtype"]
    if dtype in INT_RANGES:
        lo, hi = INT_RANGES[dtype]
        vals = rng.integers(lo, hi, size=shape, endpoint=True, dtype=np.int64)
        vals[vals == spec["nodata"]] = spec["nodata"] + (1 if spec["nodata"] < hi else -1)
        vals = vals.astype(dtype)
    else:
        vals = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 6)).astype(dtype)
        vals[vals == spec["nodata"]] = 1.0
    mask = rng.random(shape) < rng.choice([0.0, 0.05, 0.3])
    mask.flat[rng.integers(0, mask.size)] = False  # at least one pixel with data
    return vals, mask


def _check_alignment_identity(spec) -> None:
    """Write ``spec``'s raster as a GeoTIFF, align it onto its own grid through the ingest path, compare."""
    import rasterio
    from rasterio.transform import from_origin

    from pipeline.config import RunConfig
    from pipeline.data.ingest import open_raster_layer, target_geobox

    vals, mask = _random_values(spec)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        file_vals = vals.copy()
        file_vals[mask] = spec["nodata"]
        transform = from_origin(spec["x0"], spec["y0"], spec["rx"], spec["ry"])
        write_raster(
            d / "r.tif", file_vals, crs=spec["crs"], transform=transform, nodata=spec["nodata"], dtype=spec["dtype"]
        )
        if spec["how"] == "like":
            grid = {"like": "r.tif", "chunk": spec["chunk"]}
        else:
            with rasterio.open(d / "r.tif") as src:
                bounds = list(src.bounds)
            grid = {
                "crs": spec["crs"],
                "resolution": [spec["rx"], spec["ry"]],
                "bounds": bounds,
                "chunk": spec["chunk"],
            }
        cfg = RunConfig.from_dict({"grid": grid, "layers": [{"name": "r", "path": "r.tif"}]}, base_dir=d)
        geobox = target_geobox(cfg)
        assert tuple(geobox.shape) == vals.shape, f"grid shape {tuple(geobox.shape)} != raster shape {vals.shape}"
        da = open_raster_layer(cfg.layers[0], cfg, geobox, cfg.grid.chunk)
        assert da.dtype == np.float32 and da.dims == ("y", "x"), (da.dtype, da.dims)
        got = da.values
        x, y = da["x"].values, da["y"].values
    want = vals.astype("float32")
    want[mask] = np.nan
    assert np.array_equal(np.isnan(got), mask), (
        f"nodata pixels differ at {np.argwhere(np.isnan(got) != mask)[:5].tolist()}"
    )
    assert np.array_equal(got.view(np.uint32)[~mask], want.view(np.uint32)[~mask]), (
        f"values differ at {np.argwhere((got != want) & ~mask)[:5].tolist()}"
    )
    # pixel centres of the output are the raster's
    tol = 1e-9 * max(1.0, abs(spec["x0"]), abs(spec["y0"]))
    np.testing.assert_allclose(x, spec["x0"] + spec["rx"] * (np.arange(spec["w"]) + 0.5), rtol=0, atol=tol)
    np.testing.assert_allclose(y, spec["y0"] - spec["ry"] * (np.arange(spec["h"]) + 0.5), rtol=0, atol=tol)


def _run_alignment(crs_specs, n: int) -> list[dict]:
    seen: list[dict] = []

    @settings(max_examples=n, **SETTINGS, **NO_SHRINK)
    @given(spec=raster_specs(tuple(crs_specs)))
    def prop(spec):
        _check_alignment_identity(spec)
        seen.append(spec)

    prop()
    return seen


@pytest.mark.reliability("property", "raster aligned onto its own grid is the identity (projected CRSs)")
def test_alignment_onto_its_own_grid_is_identity(reliability):
    seen = _run_alignment(PROJECTED, 30)
    crss = sorted({s["crs"] for s in seen})
    sizes = [s["w"] * s["h"] for s in seen]
    assert len(crss) == len(PROJECTED) and len({s["dtype"] for s in seen}) >= 4, (crss, {s["dtype"] for s in seen})
    reliability(
        observed=f"{len(seen)} random rasters ({min(sizes)}-{max(sizes)} px; {', '.join(crss)}; 6 dtypes; "
        "random origins, square and rectangular pixels, nodata incl. NaN; grid from 'like' and from "
        "crs/resolution/bounds): values bitwise identical in float32, nodata -> NaN",
        kept="n/a (read-only; temporary GeoTIFFs)",
    )


@pytest.mark.reliability("property", "raster aligned onto its own grid is the identity (lon/lat grid)")
def test_alignment_onto_its_own_lonlat_grid_is_identity(reliability):
    try:
        seen = _run_alignment(LONLAT, 20)
    except Exception as exc:
        reliability(
            observed=f"lon/lat grid: {type(exc).__name__}: {str(exc).splitlines()[0]}",
            kept="n/a (read-only; temporary GeoTIFFs)",
        )
        raise
    sizes = [s["w"] * s["h"] for s in seen]
    reliability(
        observed=f"{len(seen)} random lon/lat rasters ({min(sizes)}-{max(sizes)} px; 6 dtypes; grid from 'like' "
        "and from crs/resolution/bounds): values bitwise identical in float32, nodata -> NaN",
        kept="n/a (read-only; temporary GeoTIFFs)",
    )


# ------------------------------------------------------------------------------------------------
# metrics depend on the order of the scores only
# ------------------------------------------------------------------------------------------------

TRANSFORMS = {
    "exp": np.exp,
    "affine 3x+7": lambda v: 3.0 * v + 7.0,
    "affine 0.01x-2": lambda v: 0.01 * v - 2.0,
    "x**3": lambda v: v**3,
    "rank": None,  # below: dense ranks of the valid values
}


def _apply(name: str, values: np.ndarray) -> np.ndarray:
    if name == "rank":
        from scipy.stats import rankdata

        out = np.full_like(values, np.nan)
        ok = np.isfinite(values)
        out[ok] = rankdata(values[ok], method="dense")
        return out
    with np.errstate(invalid="ignore"):
        return TRANSFORMS[name](values)


@st.composite
def maps_and_deposits(draw):
    h = draw(st.integers(4, 40))
    w = draw(st.integers(4, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    # scores on a lattice of 1/8: ties happen, and a transform never merges two distinct scores
    levels = draw(st.sampled_from([3, 10, 80]))
    values = rng.integers(-levels, levels, size=(h, w), endpoint=True) / 8.0
    invalid = rng.random((h, w)) < draw(st.sampled_from([0.0, 0.1, 0.4]))
    values[invalid] = np.nan
    n_dep = draw(st.integers(1, 12))
    rows = rng.integers(0, h, n_dep)
    cols = rng.integers(0, w, n_dep)
    # deposits anywhere inside their cell; a few may fall on invalid cells or outside the grid
    fy, fx = rng.uniform(0.05, 0.95, n_dep), rng.uniform(0.05, 0.95, n_dep)
    outside = rng.random(n_dep) < 0.1
    cols = np.where(outside, cols + w + 3, cols)
    ok = np.isfinite(values[rows, np.minimum(cols, w - 1)]) & ~outside
    assume(ok.any())
    dep_cells = set(zip(rows[ok].tolist(), cols[ok].tolist()))
    assume(np.isfinite(values).sum() > len(dep_cells))  # some negatives
    crs = draw(st.sampled_from(["EPSG:32646", "EPSG:3857"]))
    deposits_crs = draw(st.sampled_from([crs, "EPSG:4326"]))
    res = draw(st.sampled_from([30.0, 100.0, 250.0]))
    return dict(values=values, rows=rows, cols=cols, fx=fx, fy=fy, crs=crs, deposits_crs=deposits_crs, res=res)


def _score_da(values: np.ndarray, crs: str, res: float) -> xr.DataArray:
    h, w = values.shape
    x = 500_000.0 + res * (np.arange(w) + 0.5)
    y = 4_000_000.0 - res * (np.arange(h) + 0.5)
    return xr.DataArray(values, dims=("y", "x"), coords={"y": y, "x": x}, name="prospectivity").rio.write_crs(crs)


def _deposits(m: dict):
    import geopandas as gpd

    res = m["res"]
    x = 500_000.0 + res * (m["cols"] + m["fx"])
    y = 4_000_000.0 - res * (m["rows"] + m["fy"])
    gdf = gpd.GeoDataFrame({"id": np.arange(len(x))}, geometry=gpd.points_from_xy(x, y), crs=m["crs"])
    return gdf.to_crs(m["deposits_crs"]) if m["deposits_crs"] != m["crs"] else gdf


def _all_metrics(score: xr.DataArray, deposits) -> dict:
    from pipeline.config import EvaluateConfig
    from pipeline.evaluation import evaluate as ev

    fpr, tpr, auc = ev.roc_curve(score, deposits)
    area, dep, sr = ev.success_rate_curve(score, deposits)
    pa = ev.prediction_area(score, deposits, n_thresholds=51)
    summary = ev.evaluate_map(score, deposits, EvaluateConfig(repeats=3, seed=3), n_permutations=49)
    return dict(auc=auc, fpr=fpr, tpr=tpr, sr_area=area, sr_dep=dep, sr=sr, pa=pa, summary=summary)


@pytest.mark.reliability("property", "metrics invariant to strictly increasing transforms of the score")
def test_metrics_invariant_to_monotone_transforms(reliability, caplog):
    import logging

    caplog.set_level(logging.ERROR, logger="pipeline.evaluation.deposits")  # dropped-deposit warnings are expected here
    seen: list[dict] = []

    @settings(max_examples=10, **SETTINGS)
    @given(m=maps_and_deposits())
    def prop(m):
        # deposits drawn in lon/lat are reprojected once here (each metric call would redo it)
        deposits = _deposits(m).to_crs(m["crs"])
        base = _all_metrics(_score_da(m["values"], m["crs"], m["res"]), deposits)
        for name in TRANSFORMS:
            _check_invariant(name, m, deposits, base)
        seen.append(dict(n_dep=base["summary"]["n_deposit_cells"], shape=m["values"].shape))

    def _check_invariant(name, m, deposits, base):
        tv = _apply(name, m["values"])
        other = _all_metrics(_score_da(tv, m["crs"], m["res"]), deposits)
        assert other["auc"] == pytest.approx(base["auc"], abs=1e-12)
        for k in ("fpr", "tpr", "sr_area", "sr_dep"):
            np.testing.assert_array_equal(other[k], base[k], err_msg=k)
        assert other["sr"] == pytest.approx(base["sr"], abs=1e-12)
        pa, pb = other["pa"], base["pa"]
        np.testing.assert_array_equal(pa.prediction_rate, pb.prediction_rate)
        np.testing.assert_array_equal(pa.occupied_area, pb.occupied_area)
        np.testing.assert_array_equal(pa.percentiles, pb.percentiles)
        assert (pa.rate, pa.area, pa.normalised_density) == pytest.approx(
            (pb.rate, pb.area, pb.normalised_density), abs=1e-12
        )
        # thresholds are scores themselves: they are the transformed thresholds (not invariant, by design)
        np.testing.assert_allclose(pa.thresholds, _apply(name, pb.thresholds) if name != "rank" else pa.thresholds)
        sa, sb = other["summary"], base["summary"]
        for k in sb:
            if k == "pa_intersection":
                for kk in ("prediction_rate", "occupied_area", "normalised_density"):
                    assert sa[k][kk] == pytest.approx(sb[k][kk], abs=1e-12), (k, kk)
            else:
                assert sa[k] == pytest.approx(sb[k], abs=1e-12), (name, k)

    prop()
    names = sorted(TRANSFORMS)
    reliability(
        observed=f"{len(seen)} random maps (4-40 px a side, ties, NaN areas) x random deposit sets "
        f"({min(s['n_dep'] for s in seen)}-{max(s['n_dep'] for s in seen)} deposit cells, deposits in "
        f"the map's CRS or lon/lat) under {', '.join(names)}: AUC, ROC, success-rate curve, P-A rates "
        "and intersection, buffered AUC and random-placement p-value unchanged",
        kept="n/a (in memory)",
    )


@pytest.mark.reliability("property", "AUC of the negated score is 1 - AUC (ties included)")
def test_negated_score_gives_one_minus_auc(reliability, caplog):
    import logging

    from pipeline.evaluation import evaluate as ev

    caplog.set_level(logging.ERROR, logger="pipeline.evaluation.deposits")
    seen: list[float] = []

    @settings(max_examples=30, **SETTINGS)
    @given(m=maps_and_deposits())
    def prop(m):
        deposits = _deposits(m)
        s = _score_da(m["values"], m["crs"], m["res"])
        neg = _score_da(-m["values"], m["crs"], m["res"])
        auc, auc_neg = ev.roc_auc_all(s, deposits), ev.roc_auc_all(neg, deposits)
        assert auc + auc_neg == pytest.approx(1.0, abs=1e-12)
        # the success-rate area is the same statistic (P(valid cell below a deposit cell) + ties / 2, the
        # deposit cells among the valid cells): it too is mirrored
        _, _, sr = ev.success_rate_curve(s, deposits)
        _, _, sr_neg = ev.success_rate_curve(neg, deposits)
        assert sr + sr_neg == pytest.approx(1.0, abs=1e-12)
        seen.append(auc)

    prop()
    reliability(
        observed=f"{len(seen)} random maps with tied scores and random deposit sets: "
        "AUC(-s) = 1 - AUC(s) and success-rate area(-s) = 1 - area(s) within 1e-12",
        kept="n/a (in memory)",
    )


# ------------------------------------------------------------------------------------------------
# chunked scoring equals one-chunk scoring
# ------------------------------------------------------------------------------------------------

TINY = dict(
    window=8,
    patch=4,
    dim=16,
    depth=1,
    heads=2,
    decoder_dim=16,
    decoder_depth=1,
    stem_channels=4,
    fusion_channels=8,
    mask_ratio=0.5,
)
SCORE_SIZE = 40


@pytest.fixture(scope="module")
def scoring_store(tmp_path_factory):
    import torch
    from _cubes import BANDS, SOURCES, write_test_cube

    from pipeline.config import ModelConfig
    from pipeline.data.cube import open_cube
    from pipeline.models import build_model, group_indices
    from pipeline.models.checkpoint import save_checkpoint

    tmp = tmp_path_factory.mktemp("prop_score")
    cube_path = write_test_cube(tmp / "cube.zarr", size=SCORE_SIZE, chunk=SCORE_SIZE, seed=4)
    cube = open_cube(cube_path)
    groups = group_indices(SOURCES)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY), groups).eval()
    ckpt = save_checkpoint(
        tmp / "model.pt",
        model,
        model_cfg=ModelConfig(**TINY),
        bands=BANDS,
        sources=SOURCES,
        center=cube["center"].values,
        scale=cube["scale"].values,
        groups=groups,
    )
    return cube_path, ckpt


def _partition(draw, n: int) -> tuple[int, ...]:
    """A random split of n pixels into chunks: regular (3..n px), or irregular (from 1 px)."""
    if draw(st.booleans()):
        size = draw(st.integers(3, n))
        return tuple([size] * (n // size) + ([n % size] if n % size else []))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=6)))
    edges = [0, *cuts, n]
    return tuple(b - a for a, b in zip(edges, edges[1:]))


@pytest.mark.reliability("property", "chunked scoring equals one-chunk scoring")
def test_chunked_scoring_equals_one_chunk(scoring_store, reliability):
    from pipeline.config import ScoreConfig
    from pipeline.data.cube import open_cube
    from pipeline.scoring.score import score_cube

    cube_path, ckpt = scoring_store
    cfg = ScoreConfig(stride=4, batch_size=64)
    whole = score_cube(open_cube(cube_path).chunk({"y": -1, "x": -1}), ckpt, cfg).compute(scheduler="sync")
    valid = whole["valid"].values.astype(bool)
    assert (
        np.isfinite(whole["prospectivity"].values[valid]).all()
        and np.isnan(whole["prospectivity"].values[~valid]).all()
    )
    seen: list[dict] = []

    @settings(max_examples=15, **SETTINGS, **NO_SHRINK)
    @given(data=st.data())
    def prop(data):
        cy = _partition(data.draw, SCORE_SIZE)
        cx = _partition(data.draw, SCORE_SIZE)
        batch = data.draw(st.sampled_from([7, 64, 512]))
        cube = open_cube(cube_path).chunk({"y": cy, "x": cx})
        ds = score_cube(cube, ckpt, ScoreConfig(stride=4, batch_size=batch)).compute(scheduler="sync")
        worst = 0.0
        for v in ("prospectivity", "contribution", "anomaly_geochemistry", "anomaly_geophysics", "anomaly_geology"):
            a, b = ds[v].values, whole[v].values
            assert np.array_equal(np.isnan(a), np.isnan(b)), v
            ok = ~np.isnan(b)
            # float32 sums over other window batches: 1e-6 absolute, or relative above 1
            diff = float((np.abs(a[ok] - b[ok]) / (1.0 + np.abs(b[ok]))).max()) if ok.any() else 0.0
            assert diff <= 1e-6, (v, diff, cy, cx, batch)
            worst = max(worst, diff)
        seen.append(dict(cy=cy, cx=cx, worst=worst))

    prop()
    n_chunks = [len(s["cy"]) * len(s["cx"]) for s in seen]
    assert max(n_chunks) > 1
    reliability(
        observed=f"{len(seen)} random chunkings (regular and irregular, {min(n_chunks)}-{max(n_chunks)} chunks, "
        "chunks from 1 px, batch sizes 7-512) of a 40x40 8-band cube, tiny untrained ViT with masked "
        "passes: prospectivity, anomalies and contributions within 1e-6 (relative above 1) of one chunk, "
        "NaN exactly where invalid",
        kept="n/a (lazy scoring, nothing written)",
    )


# ------------------------------------------------------------------------------------------------
# IDW reproduces the samples
# ------------------------------------------------------------------------------------------------


@pytest.mark.reliability("property", "IDW reproduces sample values at sample locations")
def test_idw_reproduces_samples(reliability):
    from pipeline.data.points import idw_block

    seen: list[int] = []

    @settings(max_examples=30, **SETTINGS)
    @given(
        h=st.integers(2, 30),
        w=st.integers(2, 30),
        m=st.integers(1, 3),
        seed=st.integers(0, 2**31 - 1),
        k=st.integers(1, 16),
        power=st.sampled_from([1.0, 2.0, 3.5]),
        use_radius=st.booleans(),
        res=st.sampled_from([1.0, 30.0, 100.0, 0.001]),
    )
    def prop(h, w, m, seed, k, power, use_radius, res):
        rng = np.random.default_rng(seed)
        xs = 500_000.0 + res * (np.arange(w) + 0.5)
        ys = 4_000_000.0 - res * (np.arange(h) + 0.5)
        n = int(rng.integers(1, h * w + 1))
        flat = rng.choice(h * w, size=n, replace=False)  # unique locations
        r, c = flat // w, flat % w
        px, py = xs[c], ys[r]
        vals = rng.standard_normal((n, m)) * 100
        vals[rng.random((n, m)) < 0.15] = np.nan  # missing values in some columns
        radius = float(res * rng.uniform(0.5, 5)) if use_radius else None
        out = idw_block(px, py, vals if m > 1 else vals[:, 0], xs, ys, power=power, k=k, radius=radius)
        out = out if m > 1 else out[None]
        assert out.shape == (m, h, w) and out.dtype == np.float32
        for j in range(m):
            have = np.isfinite(vals[:, j])
            np.testing.assert_array_equal(out[j, r[have], c[have]], vals[have, j].astype("float32"))
            got = out[j][np.isfinite(out[j])]
            if have.any() and got.size:  # a convex combination: never outside the samples' range
                lo, hi = np.float32(vals[have, j].min()), np.float32(vals[have, j].max())
                assert got.min() >= lo - 1e-3 * max(1.0, abs(lo)) and got.max() <= hi + 1e-3 * max(1.0, abs(hi))
        seen.append(n)

    prop()
    reliability(
        observed=f"{len(seen)} random sample sets ({min(seen)}-{max(seen)} samples, 1-3 columns with missing "
        "values, k 1-16, with and without a radius): every sample's pixel holds its value exactly; "
        "all pixels within the samples' range",
        kept="n/a (in memory)",
    )


# ------------------------------------------------------------------------------------------------
# Zarr cube round trip
# ------------------------------------------------------------------------------------------------


@pytest.mark.reliability("property", "cube Zarr round trip keeps values, mask, bands and CRS")
def test_cube_zarr_round_trip(reliability):
    from pipeline.data.cube import from_arrays, open_cube, write_cube

    seen: list[tuple] = []

    @settings(max_examples=8, **SETTINGS)
    @given(
        c=st.integers(1, 4),
        h=st.integers(1, 40),
        w=st.integers(2, 40),
        chunk=st.integers(1, 48),
        crs=st.sampled_from(["EPSG:32646", "EPSG:4326", "EPSG:3857"]),
        seed=st.integers(0, 2**31 - 1),
    )
    def prop(c, h, w, chunk, crs, seed):
        rng = np.random.default_rng(seed)
        ev = (rng.standard_normal((c, h, w)) * rng.uniform(0.01, 1e4)).astype("float32")
        holes = rng.random((c, h, w)) < 0.1
        ev[holes] = np.nan
        valid = np.isfinite(ev).all(axis=0) & (rng.random((h, w)) < 0.9)
        assume(valid.sum() >= 2 and all(np.ptp(ev[i][valid]) > 0 for i in range(c)))
        res = 0.001 if crs == "EPSG:4326" else 100.0
        x = 10.0 + res * (np.arange(w) + 0.5) if crs == "EPSG:4326" else 500_000 + res * (np.arange(w) + 0.5)
        y = 40.0 - res * (np.arange(h) + 0.5) if crs == "EPSG:4326" else 4_000_000 - res * (np.arange(h) + 0.5)
        bands = [f"b{i}" for i in range(c)]
        sources = [["geochemistry", "geophysics"][i % 2] for i in range(c)]
        ds = from_arrays(ev, bands=bands, sources=sources, x=x, y=y, crs=crs, valid=valid, chunk=chunk)
        with tempfile.TemporaryDirectory() as d:
            path = write_cube(ds, Path(d) / "cube.zarr")
            back = open_cube(path)
            got = back["evidence"].values
            assert got.dtype == np.float32 and got.shape == (c, h, w)
            assert np.array_equal(got.view(np.uint32), ev.view(np.uint32)), "evidence not bitwise identical"
            np.testing.assert_array_equal(back["valid"].values.astype(bool), valid)
            assert back["band"].values.tolist() == bands and back["source"].values.tolist() == sources
            np.testing.assert_array_equal(back["x"].values, x)
            np.testing.assert_array_equal(back["y"].values, y)
            assert back.rio.crs == ds.rio.crs
            assert np.isfinite(back["center"].values).all() and (back["scale"].values > 0).all()
            assert sorted(p.name for p in Path(d).iterdir()) == ["cube.zarr"]  # no temporary store left
        seen.append((c, h, w))

    prop()
    reliability(
        observed=f"{len(seen)} random cubes (1-4 bands, up to 40x40, chunks 1-48 px, 3 CRSs, NaN holes): "
        "evidence bitwise identical, valid mask, bands, sources, x/y and CRS unchanged",
        kept="only cube.zarr (no temporary store)",
    )
