"""Sinks on real stores: resumable region-by-region Zarr writes, the COG (overviews not zero), score_to_disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from pipeline.config import RunConfig, ScoreConfig
from pipeline.data.cube import open_cube
from pipeline.scoring.score import score_cube, score_to_disk
from pipeline.scoring.sinks import MANIFEST_DIR, OutputError, is_complete, write_cog, write_zarr_resumable, zarr_regions

sys.path.insert(0, str(Path(__file__).parents[1]))
from test_score import TINY, make_checkpoint, make_cube  # noqa: E402  (the small cube + model fixtures)

ONE_TORCH_THREAD = True  # see conftest._one_torch_thread


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(cube path, checkpoint path, lazy score Dataset with 3 x 4 = 12 chunk regions)."""
    tmp = tmp_path_factory.mktemp("sinks")
    cube = make_cube(tmp, h=45, w=58, chunk=16)
    ckpt = make_checkpoint(tmp, cube)
    return cube, ckpt, score_cube(open_cube(cube), ckpt, ScoreConfig(stride=4))


class Interrupt(Exception):
    pass


@pytest.mark.filterwarnings("ignore:Object at .mpm_regions is not recognized")  # opening an incomplete store
def test_interrupted_write_resumes_only_missing_regions(scored, tmp_path):
    _, _, ds = scored
    regions = zarr_regions(ds)
    assert len(regions) == 12
    whole = write_zarr_resumable(ds, tmp_path / "whole.zarr", scheduler="sync")

    path = tmp_path / "resumed.zarr"
    seen: list[str] = []

    def stop_after_five(keys):
        seen.extend(keys)
        if len(seen) >= 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        write_zarr_resumable(ds, path, scheduler="sync", regions_per_batch=1, on_batch=stop_after_five)
    assert not is_complete(path) and len(os.listdir(path / MANIFEST_DIR)) == 5
    assert xr.open_zarr(path, consolidated=False).attrs["mpm_complete"] is False

    rerun: list[str] = []
    write_zarr_resumable(ds, path, scheduler="sync", regions_per_batch=4, on_batch=rerun.extend)
    assert len(rerun) == 7 and not set(rerun) & set(seen)
    assert is_complete(path) and not (path / MANIFEST_DIR).exists()
    a, b = xr.open_zarr(whole, decode_coords="all"), xr.open_zarr(path, decode_coords="all")
    for v in ("prospectivity", "contribution", "anomaly_geochemistry", "valid"):
        np.testing.assert_array_equal(b[v].values, a[v].values)
    assert b.rio.crs.to_epsg() == 32650 and b["prospectivity"].dims == ("y", "x")

    again: list[str] = []
    write_zarr_resumable(ds, path, scheduler="sync", on_batch=again.extend)
    assert again == []  # complete: nothing rewritten


def test_killed_writer_process_resumes(scored, tmp_path):
    """SIGKILL a subprocess writing the store (partial chunks possible), then resume in this process."""
    cube, ckpt, ds = scored
    path = tmp_path / "killed.zarr"
    script = textwrap.dedent(
        f"""
        import time, torch
        torch.set_num_threads(1)
        from pipeline.config import ScoreConfig
        from pipeline.data.cube import open_cube
        from pipeline.scoring.score import score_cube
        from pipeline.scoring.sinks import write_zarr_resumable
        ds = score_cube(open_cube({str(cube)!r}), {str(ckpt)!r}, ScoreConfig(stride=4))
        write_zarr_resumable(ds, {str(path)!r}, scheduler="sync", regions_per_batch=1,
                             on_batch=lambda keys: time.sleep(0.5))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (path / MANIFEST_DIR).exists() and len(os.listdir(path / MANIFEST_DIR)) >= 2:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done_before = len(os.listdir(path / MANIFEST_DIR))
    assert 2 <= done_before < 12 and not is_complete(path)

    rerun: list[str] = []
    write_zarr_resumable(ds, path, scheduler="sync", on_batch=rerun.extend)
    assert len(rerun) == 12 - done_before and is_complete(path)
    np.testing.assert_allclose(
        xr.open_zarr(path)["prospectivity"].values,
        ds["prospectivity"].compute(scheduler="sync").values,
        atol=1e-6,
        equal_nan=True,
    )


def test_other_inputs_restart_and_foreign_paths_are_refused(scored, tmp_path):
    _, _, ds = scored
    path = write_zarr_resumable(ds, tmp_path / "out.zarr", scheduler="sync", fingerprint="model-a")
    rewritten: list[str] = []
    write_zarr_resumable(ds, path, scheduler="sync", fingerprint="model-b", on_batch=rewritten.extend)
    assert len(rewritten) == 12  # another model: every region again
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="was not written by write_zarr_resumable.*remove it or choose another"):
        write_zarr_resumable(ds, foreign, scheduler="sync")
    assert (foreign / "notes.txt").exists()
    with pytest.raises(OutputError, match="nothing to write lazily"):
        write_zarr_resumable(ds.compute(scheduler="sync"), tmp_path / "eager.zarr")


def test_cog_has_nonzero_overviews_and_matches_zarr(scored, tmp_path):
    import rasterio

    _, _, ds = scored
    # A bigger raster than the tiny cube so that the COG gets several overview levels.
    big = xr.concat([xr.concat([ds["prospectivity"]] * 12, "x")] * 12, "y")
    big = big.assign_coords(
        y=4_000_000 - 100 * (np.arange(big.sizes["y"]) + 0.5), x=500_000 + 100 * (np.arange(big.sizes["x"]) + 0.5)
    ).rio.write_crs("EPSG:32650")
    zpath = write_zarr_resumable(
        big.to_dataset(name="prospectivity").chunk({"y": 256, "x": 256}), tmp_path / "p.zarr", scheduler="sync"
    )
    stored = xr.open_zarr(zpath, decode_coords="all")["prospectivity"]
    tif = write_cog(stored, tmp_path / "p.tif", blocksize=128, scheduler="sync")
    assert not list(tmp_path.glob("p.tif.tmp-*"))
    with rasterio.open(tif) as src:
        assert src.crs.to_epsg() == 32650
        assert src.transform.almost_equals(stored.rio.transform())
        assert (src.block_shapes[0]) == (128, 128)
        overviews = src.overviews(1)
        assert len(overviews) >= 2
        h, w = stored.shape
        padded = src.read(1)
        # odc-geo pads right/bottom to a multiple of 2**levels with nodata; same origin and resolution
        assert padded.shape[0] - h < 2 ** len(overviews) and padded.shape[1] - w < 2 ** len(overviews)
        assert np.isnan(padded[h:]).all() and np.isnan(padded[:, w:]).all()
        full = padded[:h, :w]
        np.testing.assert_array_equal(np.isnan(full), np.isnan(stored.values))
        np.testing.assert_allclose(full, stored.values, equal_nan=True)
        for f in overviews:
            ov = src.read(1, out_shape=(src.height // f, src.width // f))
            finite = ov[np.isfinite(ov)]
            assert finite.size > 0.8 * ov.size and (finite > 0).all(), f"overview 1/{f} has zeros"
            assert abs(float(finite.mean()) / float(np.nanmean(full)) - 1) < 0.2


def test_cog_refuses_bands_and_missing_crs(scored, tmp_path):
    _, _, ds = scored
    with pytest.raises(OutputError, match="needs a \\(y, x\\) DataArray.*select one band"):
        write_cog(ds["contribution"], tmp_path / "c.tif")
    with pytest.raises(OutputError, match="no CRS"):
        bare = xr.DataArray(ds["prospectivity"].data, dims=("y", "x"), coords={"y": ds.y, "x": ds.x})
        write_cog(bare, tmp_path / "n.tif")


def test_score_to_disk_writes_zarr_and_cog(scored, tmp_path):
    import rasterio

    cube, ckpt, _ = scored
    cfg = RunConfig.from_dict(
        {
            "grid": {"crs": "EPSG:32650", "resolution": 100},
            "layers": [{"name": "Cr", "path": "cr.tif"}],
            "model": {**TINY, "mask_ratio": 0.5},
            "score": {"stride": 4},
            "cluster": {"kind": "none"},
        },
        base_dir=tmp_path,
    )
    paths = score_to_disk(cube, ckpt, cfg, tmp_path / "out")
    assert set(paths) == {"prospectivity_zarr", "prospectivity_tif"}
    z = xr.open_zarr(paths["prospectivity_zarr"], decode_coords="all")
    assert z.attrs["mpm_complete"] is True and z.rio.crs.to_epsg() == 32650
    valid = z["valid"].values.astype(bool)
    assert np.isfinite(z["prospectivity"].values[valid]).all() and np.isnan(z["prospectivity"].values[~valid]).all()
    with rasterio.open(paths["prospectivity_tif"]) as src:
        h, w = z["prospectivity"].shape
        np.testing.assert_allclose(src.read(1)[:h, :w], z["prospectivity"].values, equal_nan=True)
