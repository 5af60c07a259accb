"""No stale results: an input file edited between two runs reruns exactly the stages that read it (and the
stages built from them), says why, and ends with the outputs of a fresh run on the edited inputs.

Stage keys carry a fingerprint of each input file (:func:`pipeline.stages.file_fingerprint`): a content hash
for small files, so an edit that keeps the size and the mtime is still seen, and a ``touch`` reruns nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config import RunConfig
from pipeline.run.runner import run_pipeline
from pipeline.stages import file_fingerprint, stage_inputs

STAGES = ("cube", "train", "score", "evaluate")
ALL = ",".join(STAGES)


def _config(folder: Path) -> Path:
    """The 64-px synthetic province with a tiny model and a short training, in this process (no cluster)."""
    from pipeline.data.synthetic import write_province

    prov = write_province(folder / "province", size=64, seed=2)
    data = yaml.safe_load(prov.config_path.read_text())
    data["model"].update(dim=16, depth=1, heads=2, decoder_dim=16, decoder_depth=1)
    data["train"].update(epochs=1, steps_per_epoch=3, device="cpu")
    data["evaluate"].update(repeats=3)
    data["cluster"] = {"kind": "none"}
    path = prov.config_path.with_name("run.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _run(config: Path, out: Path) -> list[str]:
    lines: list[str] = []
    run_pipeline(RunConfig.from_yaml(config), out, stages=ALL, progress=False, log=lines.append)
    return lines


def _ran(lines: list[str]) -> list[str]:
    return [s for s in STAGES if any(line.startswith(f"[{s}] running") for line in lines)]


def _why(lines: list[str], stage: str) -> str:
    return next(line for line in lines if line.startswith(f"[{stage}] running"))


def _same_outputs(a: Path, b: Path) -> None:
    import torch
    import xarray as xr

    from pipeline.data.cube import open_cube

    ca, cb = open_cube(a / "cube.zarr"), open_cube(b / "cube.zarr")
    for v in ("evidence", "valid", "center", "scale"):
        np.testing.assert_array_equal(cb[v].values, ca[v].values, err_msg=f"cube {v}")
    sa, sb = (torch.load(d / "model.pt", weights_only=True)["state_dict"] for d in (a, b))
    for k, t in sa.items():
        assert torch.equal(sb[k], t), f"model.pt: weights {k} differ"
    za = xr.open_zarr(a / "prospectivity.zarr", consolidated=False)
    zb = xr.open_zarr(b / "prospectivity.zarr", consolidated=False)
    for v in za.data_vars:
        np.testing.assert_array_equal(zb[v].values, za[v].values, err_msg=f"prospectivity.zarr {v}")
    assert json.loads((b / "metrics.json").read_text()) == json.loads((a / "metrics.json").read_text())


def _same_size_edit(path: Path, old: bytes, new: bytes) -> None:
    """Replace the first ``old`` by ``new`` (same length) and put the mtime back: only the content changes."""
    st = path.stat()
    data = path.read_bytes()
    assert len(old) == len(new) and old in data
    path.write_bytes(data.replace(old, new, 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def _edit_raster(prov: Path) -> str:
    import rasterio

    with rasterio.open(prov / "geophysics" / "magnetic.tif", "r+") as dst:
        a = dst.read(1)
        a[10:30, 10:30] += 50.0
        dst.write(a, 1)
    return "layer 'magnetic' file 'magnetic.tif' changed"


def _edit_vector(prov: Path) -> str:
    import geopandas as gpd

    path = prov / "geology.gpkg"
    lith = gpd.read_file(path, layer="lithology")
    faults = gpd.read_file(path, layer="faults")
    faults = faults.set_geometry(faults.geometry.translate(300, 0))  # every fault 300 m east
    path.unlink()
    lith.to_file(path, layer="lithology", driver="GPKG")
    faults.to_file(path, layer="faults", driver="GPKG")
    return "layer 'fault_distance' file 'geology.gpkg' changed"


def _edit_points(prov: Path) -> str:
    csv = prov / "geochemistry" / "stream_sediment.csv"
    header, first = csv.read_text().splitlines()[:2]
    cr = first.split(",")[header.split(",").index("Cr")]
    bumped = str(int(cr[0]) % 9 + 1) + cr[1:] if cr[0].isdigit() and cr[0] != "0" else None
    assert bumped is not None, first
    _same_size_edit(csv, ("," + cr + ",").encode(), ("," + bumped + ",").encode())
    return "layer 'stream_sediment' file 'stream_sediment.csv' changed"


def _edit_deposits(prov: Path) -> str:
    csv = prov / "deposits.csv"
    _same_size_edit(csv, b"chromite", b"Chromite")  # one chromite deposit no longer matches the query
    return "deposits file 'deposits.csv' changed"


EDITS = {
    "raster": (_edit_raster, STAGES),
    "vector": (_edit_vector, STAGES),
    "points": (_edit_points, STAGES),
    "deposits": (_edit_deposits, ("evaluate",)),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished run (its province and output folder), copied by each case before it edits an input."""
    root = tmp_path_factory.mktemp("stale")
    config = _config(root)
    _run(config, root / "out")
    return root


def _copy(base: Path, dst: Path) -> tuple[Path, Path]:
    shutil.copytree(base, dst)
    return dst / "province" / "run.yaml", dst / "out"


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    [pytest.param(k, marks=pytest.mark.reliability("input edit", f"{k} edited between two runs"), id=k) for k in EDITS],
)
def test_edited_input_reruns_exactly_its_stages(base, tmp_path, kind, reliability):
    edit, expected = EDITS[kind]
    config, out = _copy(base, tmp_path / "case")
    before = json.loads((out / "metrics.json").read_text())
    assert _ran(_run(config, out)) == [], "an untouched rerun ran stages"
    why = edit(config.parent)
    lines = _run(config, out)
    ran = _ran(lines)
    assert ran == list(expected), "\n".join(lines)
    first = _why(lines, expected[0])
    assert why in first, first
    skipped = [s for s in STAGES if s not in ran]
    assert all(any(line.startswith(f"[{s}] up to date, skipped") for line in lines) for s in skipped), lines
    # a fresh run on the edited inputs gives the same outputs
    fresh = tmp_path / "fresh"
    shutil.copytree(config.parent, fresh / "province")
    _run(fresh / "province" / "run.yaml", fresh / "out")
    _same_outputs(fresh / "out", out)
    if kind == "deposits":
        assert json.loads((out / "metrics.json").read_text()) != before, "the deposits edit changed no metric"
    assert _ran(_run(config, out)) == [], "a third run (nothing edited since) ran stages"
    reliability(
        observed=f"rerun ran {ran}, skipped {skipped or 'nothing'}; it said: {first}; outputs equal a fresh run's "
        "on the edited inputs; a third run skipped every stage",
        kept="stages.json records the new fingerprints",
    )


@pytest.mark.reliability("input edit", "input touched (mtime only) or copied elsewhere: nothing reruns")
def test_touch_changes_no_fingerprint(tmp_path, reliability):
    f = tmp_path / "deposits.csv"
    f.write_text("ID,X,Y\n1,2,3\n")
    fp = file_fingerprint(f)
    os.utime(f, (1_000_000_000, 1_000_000_000))
    assert file_fingerprint(f) == fp
    g = tmp_path / "copy.csv"
    shutil.copy(f, g)
    assert file_fingerprint(g) == fp
    f.write_text("ID,X,Y\n1,2,4\n")  # same size, new content
    assert file_fingerprint(f) != fp
    reliability(observed="same content: same fingerprint after touch and copy; one digit changed: a new one", kept="-")


@pytest.mark.reliability("input edit", "shapefile sidecar (.dbf) edited: the layer's fingerprint changes")
def test_sidecar_files_are_part_of_the_fingerprint(tmp_path, reliability):
    shp = tmp_path / "faults.shp"
    for ext in (".shp", ".shx", ".dbf", ".prj"):
        shp.with_suffix(ext).write_bytes(b"x" * 10)
    (tmp_path / "faults_other.dbf").write_bytes(b"unrelated")
    fp = file_fingerprint(shp)
    shp.with_suffix(".dbf").write_bytes(b"y" * 10)
    fp2 = file_fingerprint(shp)
    assert fp2 != fp
    (tmp_path / "faults_other.dbf").write_bytes(b"changed")
    assert file_fingerprint(shp) == fp2
    tif = tmp_path / "mag.tif"
    tif.write_bytes(b"t" * 10)
    fp3 = file_fingerprint(tif)
    (tmp_path / "mag.tif.aux.xml").write_text("<PAMDataset/>")
    assert file_fingerprint(tif) != fp3
    reliability(
        observed="a .dbf edit changes the shapefile's fingerprint, a .tif.aux.xml beside a raster changes its; an "
        "unrelated file does not",
        kept="-",
    )


def test_large_file_fingerprint_reads_its_ends_only(tmp_path, monkeypatch):
    from pipeline import stages

    monkeypatch.setattr(stages, "HASH_LIMIT", 1024)
    big = tmp_path / "big.tif"
    big.write_bytes(os.urandom(4 * 2**20))
    fp = file_fingerprint(big)
    assert fp.startswith("size=") and "edges-sha256:" in fp
    data = bytearray(big.read_bytes())
    data[-10] ^= 0xFF  # an edit at the end, mtime put back: the hash of the last MiB sees it
    st = big.stat()
    big.write_bytes(bytes(data))
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_fingerprint(big) != fp


def test_stage_inputs_follow_the_config_sections(tmp_path):
    cfg = RunConfig.from_yaml(_config_only(tmp_path))
    cube = stage_inputs(cfg, ("grid", "layers"))
    assert "grid.mask file 'study_area.gpkg'" in cube and "layer 'magnetic' file 'magnetic.tif'" in cube
    assert not any(k.startswith("deposits") for k in cube)
    assert list(stage_inputs(cfg, ("deposits", "evaluate"))) == ["deposits file 'deposits.csv'"]
    assert stage_inputs(cfg, ("model", "train")) == {}


def _config_only(tmp_path: Path) -> Path:
    from pipeline.data.synthetic import write_province

    return write_province(tmp_path / "p", size=64, seed=0).config_path


def test_url_inputs_are_fingerprinted_by_their_store():
    import time

    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/stale/deposits.csv", b"ID,X,Y\n1,2,3\n")
    fp = file_fingerprint("memory://stale/deposits.csv")
    assert fp.startswith("url:")
    time.sleep(0.01)
    fs.pipe("/stale/deposits.csv", b"ID,X,Y\n1,2,4\n")  # same size, rewritten: the store's metadata changes
    assert file_fingerprint("memory://stale/deposits.csv") != fp
    assert file_fingerprint("memory://stale/none.csv") == "missing"
