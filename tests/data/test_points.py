"""The on-disk sample store (pipeline.data.points): out-of-core IDW equals IDW over every sample in memory."""

from __future__ import annotations

import gc
import pickle

import numpy as np
import pytest
from odc.geo.geobox import GeoBox

from pipeline.config import LayerConfig
from pipeline.data.points import SCRATCH_PREFIX, idw_block, idw_from_store, transform_samples, write_sample_store

RES = 100.0


def _geobox(h=70, w=90):
    return GeoBox.from_bbox((500_000, 4_000_000, 500_000 + w * RES, 4_000_000 + h * RES), "EPSG:32633", resolution=RES)


def _layer(**kw):
    base = {
        "name": "ss",
        "path": "s.csv",
        "kind": "points",
        "x": "X",
        "y": "Y",
        "crs": "EPSG:32633",
        "columns": ["a", "b", "c"],
    }
    return LayerConfig(**{**base, **kw})


def _samples(rng, n, geobox, spread=1.0, clustered=False):
    x0, y0, x1, y1 = geobox.boundingbox
    if clustered:  # most of the grid far from any sample: the search has to widen several times
        px = rng.normal(x0 + 0.2 * (x1 - x0), 300, n)
        py = rng.normal(y0 + 0.8 * (y1 - y0), 300, n)
    else:
        cx, cy, hx, hy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 * spread, (y1 - y0) / 2 * spread
        px, py = rng.uniform(cx - hx, cx + hx, n), rng.uniform(cy - hy, cy + hy, n)
    v = rng.lognormal(2, 0.5, (n, 3)).astype("float32")
    v[rng.random((n, 3)) < 0.05] = np.nan
    return px, py, v


def _blocks(px, py, v, size):
    for i in range(0, len(px), size):
        yield px[i : i + size], py[i : i + size], v[i : i + size].copy()


def _grid_from_store(store, geobox, chunk, **kw):
    from pipeline.data.grid import geobox_coords

    x, y = geobox_coords(geobox)
    h, w = geobox.shape
    out = np.full((3, h, w), -1.0, dtype="float32")
    for r in range(0, h, chunk):
        for c in range(0, w, chunk):
            r1, c1 = min(r + chunk, h), min(c + chunk, w)
            out[:, r:r1, c:c1] = idw_from_store(store, (r, r1), (c, c1), x[c:c1], y[r:r1], **kw)
    return out


@pytest.mark.parametrize(
    "case",
    [
        dict(n=400, spread=1.0, chunk=16, radius=None, max_distance=None, k=8),
        dict(n=400, spread=1.6, chunk=16, radius=None, max_distance=None, k=8),  # samples off the grid too
        dict(n=300, spread=1.0, chunk=20, radius=900.0, max_distance=None, k=6),
        dict(n=60, spread=1.0, chunk=8, radius=None, max_distance=1500.0, k=5),  # sparse: wide rings
        dict(n=50, clustered=True, chunk=8, radius=None, max_distance=None, k=12),
        dict(n=5, spread=1.0, chunk=16, radius=None, max_distance=None, k=12),  # fewer samples than k
        dict(n=400, spread=1.2, chunk=64, radius=None, max_distance=None, k=8),  # cells of a quarter chunk
        dict(n=300, spread=1.0, chunk=48, radius=2500.0, max_distance=None, k=8),  # radius over several cells
    ],
)
def test_store_idw_equals_idw_over_all_samples(tmp_path, case):
    """Every grid block, read from the store with its widening search, equals one IDW over all samples
    held in memory, for dense, sparse, clustered and off-grid samples, with and without a radius."""
    rng = np.random.default_rng(case["n"] + case["chunk"])
    gb = _geobox()
    px, py, v = _samples(rng, case["n"], gb, spread=case.get("spread", 1.0), clustered=case.get("clustered", False))
    layer = _layer(transform="none")
    store = write_sample_store(layer, _blocks(px, py, v, 37), gb, case["chunk"], tmp_path)
    assert store.n == case["n"]
    kw = dict(power=2.0, k=case["k"], radius=case["radius"], max_distance=case["max_distance"])
    got = _grid_from_store(store, gb, case["chunk"], **kw)
    from pipeline.data.grid import geobox_coords

    x, y = geobox_coords(gb)
    want = idw_block(px, py, v, x, y, **kw)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6, equal_nan=True)


def test_store_sorts_by_block_and_transforms(tmp_path):
    """Each grid block's rows hold exactly the samples inside it, transformed (CLR) as the layer asks,
    and the run files of pass 1 are gone."""
    rng = np.random.default_rng(3)
    gb = _geobox()
    px, py, v = _samples(rng, 500, gb)
    v[np.isnan(v)] = 1.0
    v[7, 1] = 0.0  # a zero: half the column's smallest positive value
    layer = _layer(transform="clr", zeros="half_min")
    store = write_sample_store(layer, _blocks(px, py, v, 64), gb, 16, tmp_path)
    assert sorted(p.name for p in store.folder.iterdir()) == ["values.f32", "xy.f64"]
    want = v.copy()
    want[7, 1] = v[:, 1][v[:, 1] > 0].min() / 2
    want = np.log(want)
    want -= want.mean(axis=1, keepdims=True)
    inv = ~gb.affine
    seen = 0
    for r in range(store.cells[0]):
        for c in range(store.cells[1]):
            x, y, vals = store.read((r, r), (c, c))
            seen += len(x)
            col, row = inv * (x, y)
            assert ((row // 16 == r) & (col // 16 == c)).all()
            idx = [int(np.flatnonzero((px == a) & (py == b))[0]) for a, b in zip(x, y)]
            np.testing.assert_allclose(vals, want[idx], rtol=1e-5, atol=1e-6)
    assert seen == 500


def test_store_removed_with_its_owner_not_with_a_copy(tmp_path):
    gb = _geobox()
    px, py, v = _samples(np.random.default_rng(1), 50, gb)
    store = write_sample_store(_layer(transform="none"), _blocks(px, py, v, 50), gb, 16, tmp_path)
    folder = store.folder
    assert folder.name.startswith(SCRATCH_PREFIX) and folder.parent == tmp_path
    copy = pickle.loads(pickle.dumps(store))  # what a worker process gets
    del copy
    gc.collect()
    assert folder.exists()
    del store
    gc.collect()
    assert not folder.exists()
    with pytest.raises(Exception, match="sample store .* is gone"):
        pickle.loads(
            pickle.dumps(write_sample_store(_layer(transform="none"), _blocks(px, py, v, 50), gb, 16, tmp_path))
        ).read((0, 0), (0, 0))


def test_store_refuses_bad_values_before_writing_anything(tmp_path):
    gb = _geobox()
    px, py, v = _samples(np.random.default_rng(2), 80, gb)
    v[5, 2] = -0.0
    v[6, 2] = 0.0
    with pytest.raises(Exception, match=r"needs positive values but column\(s\) \['c'\]"):
        write_sample_store(_layer(transform="log"), _blocks(px, py, v, 30), gb, 16, tmp_path)
    v[:, 1] = np.nan
    with pytest.raises(Exception, match=r"ss\.b.*no valid sample"):
        write_sample_store(_layer(transform="log", zeros="half_min"), _blocks(px, py, v, 30), gb, 16, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_transform_samples_matches_the_formula():
    v = np.array([[1.0, 2.0, 4.0], [0.0, 3.0, np.nan]], dtype="float32")
    out = transform_samples(v.copy(), _layer(transform="clr"), np.array([0.5, 1.0, 2.0]))
    want = np.log([1.0, 2.0, 4.0])
    np.testing.assert_allclose(out[0], want - want.mean(), rtol=1e-6)
    assert np.isnan(out[1]).all()  # CLR needs every part: a sample missing one is left out of all bands
    out = transform_samples(v.copy(), _layer(transform="log10"), np.array([0.5, 1.0, 2.0]))
    np.testing.assert_allclose(out[1, :2], np.log10([0.5, 3.0]), rtol=1e-6)  # the zero became half_min


def test_cube_build_leaves_no_sample_store(mini_inputs, tmp_path):
    """`mpm cube` keeps the samples on disk beside the cube while it builds and removes them after."""
    from pipeline.run.cli import main

    out = tmp_path / "out"
    assert main(["cube", str(mini_inputs / "run.yaml"), "--out", str(out), "--quiet"]) == 0
    assert (out / "cube.zarr").is_dir()
    assert not list(out.glob(f"{SCRATCH_PREFIX}*"))


def test_cube_with_samples_builds_on_a_local_cluster_of_processes(mini_inputs, tmp_path):
    """A notebook's usual state: a distributed LocalCluster with worker processes. The workers read the
    pickled store (same machine) and the cube equals the one built with threads in this process."""
    import distributed

    from pipeline.config import RunConfig
    from pipeline.data.cube import open_cube, write_cube
    from pipeline.data.ingest import build_cube

    cfg = RunConfig.from_yaml(mini_inputs / "run.yaml")
    write_cube(build_cube(cfg, scratch=tmp_path / "s1"), tmp_path / "threads.zarr")
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c,
        distributed.Client(c),
    ):
        ds = build_cube(cfg, scratch=tmp_path / "s2")
        folder = next((tmp_path / "s2").glob(f"{SCRATCH_PREFIX}*"))
        write_cube(ds, tmp_path / "cluster.zarr")
        assert folder.exists()  # the workers' copies did not remove it
        del ds
        gc.collect()
        assert not folder.exists()  # this process's store did
    a, b = open_cube(tmp_path / "threads.zarr"), open_cube(tmp_path / "cluster.zarr")
    np.testing.assert_array_equal(a.evidence.values, b.evidence.values)
    np.testing.assert_array_equal(a.center.values, b.center.values)
