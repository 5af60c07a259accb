"""score_block on numpy (the science), then score_cube (the Dask wrapper) against it."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig, ScoreConfig
from pipeline.data.cube import from_arrays, open_cube, write_cube
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models import build_model, group_indices
from pipeline.models.checkpoint import save_checkpoint
from pipeline.scoring.score import blend_weight, load_model_cached, score_block, score_cube, window_starts

BANDS = ["Cr", "Ni", "mag", "litho"]
SOURCES = ["geochemistry", "geochemistry", "geophysics", "geology"]
GROUPS = group_indices(SOURCES)
TINY = dict(
    window=8, patch=4, dim=16, depth=1, heads=2, decoder_dim=16, decoder_depth=1, stem_channels=4, fusion_channels=8
)


ONE_TORCH_THREAD = True  # see conftest._one_torch_thread


def tiny_model(mask_ratio: float = 0.5, seed: int = 0, cross_ratio: float = 0.25):
    torch.manual_seed(seed)
    return build_model(ModelConfig(**TINY, mask_ratio=mask_ratio, cross_ratio=cross_ratio), GROUPS).eval()


def make_cube(tmp: Path, h: int = 45, w: int = 58, chunk: int = 16, seed: int = 0) -> Path:
    """A small cube (4 bands, 3 source groups) with a no-data corner and a hole; sizes not multiples of the stride."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    ev = np.stack(
        [
            np.exp(np.sin(3 * xx) + 0.1 * rng.standard_normal((h, w))),
            np.exp(np.cos(2 * yy) + 0.1 * rng.standard_normal((h, w))),
            xx + yy + 0.05 * rng.standard_normal((h, w)),
            ((xx - 0.4) ** 2 + (yy - 0.5) ** 2 < 0.05).astype(float),
        ]
    ).astype("float32")
    valid = np.ones((h, w), bool)
    valid[:6, :9] = False
    valid[20:23, 30:34] = False
    ev[:, ~valid] = np.nan
    ds = from_arrays(
        ev,
        bands=BANDS,
        sources=SOURCES,
        x=500_000 + 100 * (np.arange(w) + 0.5),
        y=4_000_000 - 100 * (np.arange(h) + 0.5),
        crs="EPSG:32650",
        valid=valid,
        chunk=chunk,
    )
    return write_cube(ds, tmp / "cube.zarr")


def make_checkpoint(tmp: Path, cube_path: Path, mask_ratio: float = 0.5, name: str = "model.pt") -> Path:
    cube = open_cube(cube_path)
    model = tiny_model(mask_ratio)
    return save_checkpoint(
        tmp / name,
        model,
        model_cfg=ModelConfig(**TINY, mask_ratio=mask_ratio),
        bands=BANDS,
        sources=SOURCES,
        center=cube["center"].values,
        scale=cube["scale"].values,
        groups=GROUPS,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("score")
    cube = make_cube(tmp)
    return cube, make_checkpoint(tmp, cube)


def numpy_inputs(cube_path: Path) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.data.cube import normalised

    cube = open_cube(cube_path)
    return normalised(cube).values, cube["valid"].values.astype(bool)


# -- numpy kernel ----------------------------------------------------------------------------------


def test_window_starts_touch_the_edge():
    assert window_starts(37, 8, 4).tolist() == [0, 4, 8, 12, 16, 20, 24, 28, 29]
    assert window_starts(36, 8, 4).tolist() == [0, 4, 8, 12, 16, 20, 24, 28]
    assert window_starts(8, 8, 4).tolist() == [0]
    assert window_starts(5, 8, 4).tolist() == [0]  # padded
    with pytest.raises(ConfigError, match="stride 9 must be between 1 and the window size 8"):
        window_starts(40, 8, 9)


def test_blend_weight_is_smooth_and_positive():
    w = blend_weight(32)
    assert w.min() >= 0.1 - 1e-6 and np.allclose(w, w[::-1]) and w.argmax() in (15, 16)


@pytest.mark.parametrize("mask_ratio", [0.0, 0.5])
def test_score_block_every_valid_pixel_and_only_those(mask_ratio):
    rng = np.random.default_rng(1)
    h, w = 29, 35  # not multiples of the stride: the last row and column need the edge windows
    x = rng.standard_normal((4, h, w)).astype("float32")
    valid = np.ones((h, w), bool)
    valid[:3, :4] = False
    x[:, ~valid] = 0
    out = score_block(x, valid, tiny_model(mask_ratio), stride=4, groups=GROUPS)
    assert set(out) == {
        "contribution",
        "anomaly_geochemistry",
        "anomaly_geophysics",
        "anomaly_geology",
        "prospectivity",
    }
    assert out["contribution"].shape == (4, h, w) and out["prospectivity"].shape == (h, w)
    for v in out.values():
        assert v.dtype == np.float32
        assert np.isfinite(v[..., valid]).all() and np.isnan(v[..., ~valid]).all()
    assert np.isfinite(out["prospectivity"][-1, 4:]).all() and np.isfinite(out["prospectivity"][4:, -1]).all()
    # without a calibration: a group's anomaly is its bands' mean squared residual; the groups weigh equally
    groups_mean = np.mean([out[f"anomaly_{g}"][valid] for g in GROUPS], axis=0)
    np.testing.assert_allclose(out["prospectivity"][valid], groups_mean, rtol=1e-5)
    np.testing.assert_allclose(out["anomaly_geochemistry"][valid], out["contribution"][:2, valid].mean(0), rtol=1e-5)
    assert (out["prospectivity"][valid] > 0).all()


def test_score_block_smaller_than_window_is_padded():
    x = np.random.default_rng(2).standard_normal((4, 5, 3)).astype("float32")
    out = score_block(x, np.ones((5, 3), bool), tiny_model(), stride=4, groups=GROUPS)
    assert out["prospectivity"].shape == (5, 3) and np.isfinite(out["prospectivity"]).all()


def test_score_block_tiles_equal_the_whole_array():
    """Windows on the global grid + halo window-1: tiling does not change a single value."""
    rng = np.random.default_rng(3)
    h, w, halo = 41, 50, 7
    x = rng.standard_normal((4, h, w)).astype("float32")
    valid = rng.random((h, w)) > 0.05
    x[:, ~valid] = 0
    model = tiny_model(0.5)
    whole = score_block(x, valid, model, stride=4, groups=GROUPS)["prospectivity"]
    tiled = np.full((h, w), np.nan, np.float32)
    for y0, y1 in ((0, 13), (13, 30), (30, 41)):
        for x0, x1 in ((0, 20), (20, 23), (23, 50)):
            oy, ox = max(0, y0 - halo), max(0, x0 - halo)
            sl = (slice(oy, min(h, y1 + halo)), slice(ox, min(w, x1 + halo)))
            part = score_block(
                x[(slice(None), *sl)], valid[sl], model, stride=4, groups=GROUPS, origin=(oy, ox), full_shape=(h, w)
            )["prospectivity"]
            tiled[y0:y1, x0:x1] = part[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
    np.testing.assert_allclose(tiled, whole, atol=1e-5, equal_nan=True)


def test_masked_scoring_predicts_each_token_from_its_context():
    """Spatial scoring: a token's prediction ignores its own pixels, so changing them moves the error exactly
    as (r - x)^2 with a fixed r. A model trained without masking is scored by plain reconstruction: r moves."""
    rng = np.random.default_rng(4)
    base = rng.standard_normal((4, 8, 8)).astype("float32")
    valid = np.ones((8, 8), bool)

    def errs(model, value):
        x = base.copy()
        x[:, 4:8, 0:4] = value  # token (1, 0)
        return score_block(x, valid, model, stride=8, groups=GROUPS, mode="spatial")["contribution"][:, 5, 1]

    for mask_ratio, cross, independent in ((0.5, 0.25, True), (0.5, 0.0, True), (0.0, 0.0, False)):
        model = tiny_model(mask_ratio, cross_ratio=cross)
        a, b, c = 0.0, 1.0, 3.0
        ea, eb, ec = errs(model, a), errs(model, b), errs(model, c)
        r = ((ea - eb) / (b - a) + a + b) / 2  # the fixed reconstruction implied by two values
        assert np.allclose((r - c) ** 2, ec, atol=1e-4) is independent


def test_cross_scoring_predicts_a_source_from_the_others_in_place():
    """Cross-source scoring: a source's prediction at a token ignores that source's own pixels there, but
    uses the other sources' pixels at the same token (which spatial scoring hides)."""
    rng = np.random.default_rng(4)
    base = rng.standard_normal((4, 8, 8)).astype("float32")
    valid = np.ones((8, 8), bool)
    model = tiny_model(0.0, cross_ratio=0.5)

    def geochem_error(bands, value, mode="cross"):
        x = base.copy()
        x[bands, 4:8, 0:4] = value  # token (1, 0)
        return score_block(x, valid, model, stride=8, groups=GROUPS, mode=mode)["contribution"][:2, 5, 1]

    own = [geochem_error([0, 1], v) for v in (0.0, 1.0, 3.0)]
    r = ((own[0] - own[1]) / 1.0 + 1.0) / 2
    np.testing.assert_allclose((r - 3.0) ** 2, own[2], atol=1e-4)  # own values never reach the prediction
    other = [geochem_error([2, 3], v) for v in (0.0, 3.0)]
    assert not np.allclose(other[0], other[1], atol=1e-4)  # geophysics and geology at that place do


def test_combine_weights_groups():
    x = np.random.default_rng(5).standard_normal((4, 16, 16)).astype("float32")
    valid = np.ones((16, 16), bool)
    out = score_block(x, valid, tiny_model(), stride=4, groups=GROUPS, combine={"geochemistry": 3, "geology": 1})
    want = (3 * out["anomaly_geochemistry"] + out["anomaly_geology"]) / 4
    np.testing.assert_allclose(out["prospectivity"], want, rtol=1e-6)
    with pytest.raises(ConfigError, match="unknown source group.*'gravity'"):
        score_block(x, valid, tiny_model(), stride=4, groups=GROUPS, combine={"gravity": 1})


# -- dask wrapper ----------------------------------------------------------------------------------


def test_score_cube_is_lazy(store):
    cube_path, ckpt = store
    cube = open_cube(cube_path)  # opening loads the small per-band coordinates: outside the guard

    def refuse(*args, **kwargs):
        raise AssertionError("dask computed something; score_cube must stay lazy")

    with dask.config.set(scheduler=refuse):
        ds = score_cube(cube, ckpt, ScoreConfig(stride=4))
        assert ds["prospectivity"].dims == ("y", "x") and ds["contribution"].dims == ("band", "y", "x")
        assert {"anomaly_geochemistry", "anomaly_geophysics", "anomaly_geology", "valid"} <= set(ds.data_vars)
        assert all(v.chunks is not None for v in ds.data_vars.values())
        assert ds.rio.crs.to_epsg() == 32650
        assert ds.rio.transform() == cube.rio.transform()


@pytest.mark.parametrize("chunk", [8, 16, 23, 64])
def test_score_cube_chunking_has_no_seams(store, chunk):
    """Every chunking (even chunks smaller than the halo) equals the unchunked numpy kernel."""
    cube_path, ckpt = store
    x, valid = numpy_inputs(cube_path)
    model, _ = load_model_cached(ckpt)
    want = score_block(x, valid, model, stride=4, groups=GROUPS)
    cube = open_cube(cube_path).chunk({"y": chunk, "x": chunk})
    ds = score_cube(cube, ckpt, ScoreConfig(stride=4)).compute(scheduler="sync")
    np.testing.assert_allclose(ds["prospectivity"].values, want["prospectivity"], atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(ds["contribution"].values, want["contribution"], atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(ds["anomaly_geology"].values, want["anomaly_geology"], atol=1e-5, equal_nan=True)
    assert np.isfinite(ds["prospectivity"].values[valid]).all()
    assert np.isnan(ds["prospectivity"].values[~valid]).all()


def test_score_cube_counts_no_compute_until_asked(store):
    from dask.callbacks import Callback

    cube_path, ckpt = store
    cube = open_cube(cube_path)
    started = []
    with Callback(start=lambda dsk: started.append(1)):
        ds = score_cube(cube, ckpt, ScoreConfig(stride=4))
        assert started == []
        ds["prospectivity"].compute(scheduler="sync")
    assert len(started) == 1


def test_score_cube_gpu_annotation(store):
    cube_path, ckpt = store
    ds = score_cube(open_cube(cube_path), ckpt, ScoreConfig(stride=4), gpu=True)
    layers = ds["prospectivity"].data.__dask_graph__().layers.values()
    assert any((layer.annotations or {}).get("resources") == {"GPU": 1} for layer in layers)
    plain = score_cube(open_cube(cube_path), ckpt, ScoreConfig(stride=4))
    assert not any(
        (layer.annotations or {}).get("resources")
        for layer in plain["prospectivity"].data.__dask_graph__().layers.values()
    )


def test_score_cube_refuses_wrong_window_and_bands(store, tmp_path):
    cube_path, ckpt = store
    with pytest.raises(CheckpointError, match="window 8 but the config says model.window=32"):
        score_cube(open_cube(cube_path), ckpt, ScoreConfig(stride=4), model_cfg_window=32)
    cube = open_cube(cube_path)
    other = cube.assign_coords(band=["Cr", "Ni", "mag", "gravity"])
    with pytest.raises(CheckpointError, match="gravity"):
        score_cube(other, ckpt, ScoreConfig(stride=4))
    with pytest.raises(CheckpointError, match="does not exist"):
        score_cube(cube, tmp_path / "missing.pt", ScoreConfig(stride=4))


def test_model_cache_loads_once_and_reloads_a_new_file(store, tmp_path):
    cube_path, _ = store
    ckpt = make_checkpoint(tmp_path, cube_path)
    a, _ = load_model_cached(ckpt)
    assert load_model_cached(ckpt)[0] is a
    time.sleep(0.01)
    make_checkpoint(tmp_path, cube_path)  # rewritten: new mtime
    assert load_model_cached(ckpt)[0] is not a


@pytest.mark.slow  # ~60-90 s on a shared 2-core box: cold worker processes import torch twice
@pytest.mark.reliability("fault", "scoring worker process killed mid-write")
def test_killed_worker_still_gives_complete_identical_output(tmp_path, reliability):
    """SIGKILL one of two worker processes while regions are being scored: the nanny restarts it,
    Dask reruns its tasks, and the store equals an undisturbed single-process run."""
    import xarray as xr
    from distributed import Client, LocalCluster

    from pipeline.scoring.sinks import MANIFEST_DIR, is_complete, write_zarr_resumable

    cube_path = make_cube(tmp_path, h=64, w=64, chunk=16)
    ckpt = make_checkpoint(tmp_path, cube_path)
    cfg = ScoreConfig(stride=4, batch_size=4)  # many small forward passes: slow enough to kill mid-way
    t0 = time.perf_counter()
    ref = write_zarr_resumable(score_cube(open_cube(cube_path), ckpt, cfg), tmp_path / "ref.zarr", scheduler="sync")
    print(f"undisturbed run {time.perf_counter() - t0:.1f} s")

    out = tmp_path / "killed.zarr"
    killed = []
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, resources={"GPU": 1}
        ) as cluster,
        Client(cluster) as client,
    ):
        pids = client.run(os.getpid)

        def killer():
            deadline = time.time() + 60
            while time.time() < deadline:
                if (out / MANIFEST_DIR).exists() and len(os.listdir(out / MANIFEST_DIR)) >= 1:
                    os.kill(next(iter(pids.values())), signal.SIGKILL)
                    killed.append(len(os.listdir(out / MANIFEST_DIR)))
                    return
                time.sleep(0.005)

        t0 = time.perf_counter()
        t = threading.Thread(target=killer)
        t.start()
        # gpu=True: the tasks need the 'GPU' resource the workers declare (annotations survive to the scheduler)
        write_zarr_resumable(
            score_cube(open_cube(cube_path), ckpt, cfg, gpu=True), out, scheduler=client, regions_per_batch=16
        )
        t.join()
        print(f"cluster run {time.perf_counter() - t0:.1f} s, killed after {killed} regions")
    assert killed and killed[0] < 16, f"the worker was not killed mid-way ({killed})"
    assert is_complete(out)
    a, b = xr.open_zarr(ref), xr.open_zarr(out)
    for v in ("prospectivity", "contribution", "anomaly_geology"):
        np.testing.assert_allclose(b[v].values, a[v].values, atol=1e-6, equal_nan=True)
    reliability(
        observed=f"SIGKILL of one of two worker processes after {killed[0]} of 16 regions: the nanny restarted it "
        "and Dask reran its regions; the store equals an undisturbed run's (atol 1e-6)",
        kept="prospectivity.zarr complete (mpm_complete: true)",
    )


def test_seed_ensemble_is_the_mean_map_with_its_std_as_uncertainty(tmp_path):
    from pipeline.scoring.score import score_ensemble

    cube_path = make_cube(tmp_path)
    torch.manual_seed(1)
    a = make_checkpoint(tmp_path, cube_path, name="a.pt")
    b = save_checkpoint(
        tmp_path / "b.pt",
        tiny_model(0.5, seed=7),
        model_cfg=ModelConfig(**TINY, mask_ratio=0.5),
        bands=BANDS,
        sources=SOURCES,
        center=open_cube(cube_path)["center"].values,
        scale=open_cube(cube_path)["scale"].values,
        groups=GROUPS,
    )
    cube = open_cube(cube_path)
    cfg = ScoreConfig(stride=4)
    one = [score_cube(cube, c, cfg).compute(scheduler="sync") for c in (a, b)]
    ens = score_ensemble(cube, [a, b], cfg).compute(scheduler="sync")
    maps = np.stack([o["prospectivity"].values for o in one])
    np.testing.assert_allclose(ens["prospectivity"].values, maps.mean(0), rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(ens["uncertainty"].values, maps.std(0, ddof=1), rtol=1e-4, atol=1e-6, equal_nan=True)
    assert float(ens["uncertainty"].max()) > 0 and ens.rio.crs is not None
    single = score_ensemble(cube, [a], cfg)
    assert bool(single["uncertainty"].isnull().all())
