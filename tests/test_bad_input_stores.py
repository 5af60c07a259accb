"""Bad input after the cube stage: damaged or foreign cube stores, checkpoints, deposits, a window too big.

One small real run is built once for the module (the synthetic province at 64 px, ``mpm run`` with stages
cube, train, score: a real Zarr cube in 2 x 2 chunks, two real torch steps, a real score store). Each case then
damages a copy of what it needs, runs the CLI (``mpm train``, ``mpm score`` or ``mpm run --stages evaluate``)
and checks the exit status 2, the ONE error line (the item, the bad value, the fix) and what is left on disk.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from pipeline.run.cli import main

ONE_TORCH_THREAD = True  # see conftest._one_torch_thread

TINY = {
    "model": {
        "window": 8,
        "patch": 4,
        "dim": 16,
        "depth": 1,
        "heads": 2,
        "decoder_dim": 16,
        "decoder_depth": 1,
        "stem_channels": 4,
        "fusion_channels": 8,
    },
    "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 16, "seed": 0, "train_stride": 8},
    "score": {"stride": 8},
    "cluster": {"kind": "none"},
    "evaluate": {"buffer": 300, "repeats": 2},
}


def _write_config(prov_root: Path, name: str, edit=None) -> Path:
    data = yaml.safe_load((prov_root / "tiny.yaml").read_text())
    if edit is not None:
        edit(data)
    p = prov_root / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The synthetic province (64 px, 32 px chunks) run through cube, train and score once."""
    from pipeline.data.synthetic import write_province

    root = tmp_path_factory.mktemp("stores")
    prov = write_province(root / "province", size=64, seed=3, chunk=32)
    data = yaml.safe_load(prov.config_path.read_text())
    data.update(TINY)
    cfg = prov.root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    out = root / "run"
    assert main(["run", str(cfg), "--out", str(out), "--stages", "cube,train,score", "--quiet"]) == 0
    for name in ("cube.zarr", "model.pt", "checkpoint.pt", "prospectivity.zarr", "prospectivity.tif"):
        assert (out / name).exists(), name
    return SimpleNamespace(root=root, prov=prov.root, cfg=cfg, out=out, cube=out / "cube.zarr", model=out / "model.pt")


def _expect_error(argv: list[str], capsys, *needles: str) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, f"{n!r} not in: {err}"
    assert "Fix:" in err, err
    return err


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _cube_copy(run, tmp_path: Path) -> Path:
    dst = tmp_path / "copy" / "cube.zarr"
    shutil.copytree(run.cube, dst)
    return dst


def _train_fails(run, cube, out: Path, capsys, *needles, cfg=None) -> str:
    err = _expect_error(["train", cfg or run.cfg, "--cube", cube, "--out", out], capsys, *needles)
    left = _listing(out)
    assert not [n for n in left if n.startswith(("model.pt", "checkpoint.pt"))], left
    return err


def _score_fails(run, cube, model, out: Path, capsys, *needles, cfg=None) -> str:
    err = _expect_error(["score", cfg or run.cfg, "--cube", cube, "--model", model, "--out", out], capsys, *needles)
    left = _listing(out)
    assert not [n for n in left if n.startswith("prospectivity")], left
    return err


# ------------------------------------------------------------------------------------------------
# cube stores
# ------------------------------------------------------------------------------------------------


@pytest.mark.reliability("cube", "a chunk file of the cube deleted")
def test_deleted_chunk(run, tmp_path, capsys, reliability):
    """Zarr reads a missing chunk as NaN without a word: before the fix the model trained on a hole (zeros
    after normalisation). Chunks that are all NaN are legitimately absent, so the check is against 'valid'."""
    cube = _cube_copy(run, tmp_path)
    chunk = cube / "evidence" / "c" / "0" / "1" / "0"
    chunk.unlink()
    err = _train_fails(
        run,
        cube,
        tmp_path / "o",
        capsys,
        str(cube),
        "is damaged",
        "evidence/c/0/1/0",
        "missing (1 of 4)",
        "rebuild it with `mpm cube",
    )
    assert not chunk.exists()
    reliability(observed=err, kept="no model.pt, no checkpoint.pt; the damaged cube as it was")


@pytest.mark.reliability("cube", "a truncated chunk file in the cube")
def test_truncated_chunk(run, tmp_path, capsys, reliability):
    cube = _cube_copy(run, tmp_path)
    chunk = cube / "evidence" / "c" / "0" / "0" / "1"
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o"
    err = _expect_error(
        ["score", run.cfg, "--cube", cube, "--model", run.model, "--out", out],
        capsys,
        str(cube),
        "is damaged",
        "'evidence' data [0:13, 0:32, 32:64]",
        "cannot be read",
        "rebuild it with `mpm cube",
    )
    # the read fails inside the score write: the resumable store stays, marked incomplete; no GeoTIFF
    assert _listing(out) in ([], ["prospectivity.zarr"]), _listing(out)
    if (out / "prospectivity.zarr").exists():
        import json

        assert json.loads((out / "prospectivity.zarr" / "zarr.json").read_text())["attributes"]["mpm_complete"] is False
    reliability(
        observed=err,
        kept="no prospectivity.tif; prospectivity.zarr only as the resumable store, marked "
        "mpm_complete: false; the damaged cube as it was",
    )


@pytest.mark.parametrize(
    "meta, needles",
    [
        pytest.param(
            "zarr.json",
            ("no metadata for ['<root>']",),
            id="root",
            marks=pytest.mark.reliability("cube", "the cube's root zarr.json deleted"),
        ),
        pytest.param(
            "evidence/zarr.json",
            ("no metadata for ['evidence']",),
            id="evidence",
            marks=pytest.mark.reliability("cube", "the evidence array's zarr.json deleted"),
        ),
    ],
)
def test_deleted_metadata(run, tmp_path, capsys, reliability, meta, needles):
    cube = _cube_copy(run, tmp_path)
    (cube / meta).unlink()
    err = _score_fails(
        run, cube, run.model, tmp_path / "o", capsys, str(cube), "is incomplete", *needles, "rebuild it with `mpm cube"
    )
    reliability(observed=err, kept="no prospectivity.zarr or .tif")


@pytest.mark.reliability("cube", "a store that is not a cube (the prospectivity map)")
def test_store_that_is_not_a_cube(run, tmp_path, capsys, reliability):
    err = _train_fails(
        run,
        run.out / "prospectivity.zarr",
        tmp_path / "o",
        capsys,
        "prospectivity.zarr",
        "is a prospectivity store",
        "no 'evidence'",
        "pass the cube.zarr",
    )
    reliability(observed=err, kept="no model.pt, no checkpoint.pt")


@pytest.mark.reliability("cube", "a GeoTIFF passed as the cube")
def test_file_passed_as_cube(run, tmp_path, capsys, reliability):
    err = _train_fails(
        run,
        run.out / "prospectivity.tif",
        tmp_path / "o",
        capsys,
        "prospectivity.tif",
        "is a file, not a Zarr store",
        "pass the cube.zarr folder",
    )
    reliability(observed=err, kept="no model.pt, no checkpoint.pt")


@pytest.mark.reliability("cube", "cube path that does not exist")
def test_missing_cube(run, tmp_path, capsys, reliability):
    err = _train_fails(
        run, tmp_path / "nope" / "cube.zarr", tmp_path / "o", capsys, "nope/cube.zarr", "does not exist", "mpm cube"
    )
    reliability(observed=err, kept="no model.pt, no checkpoint.pt")


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------


@pytest.mark.reliability("checkpoint", "checkpoint trained on other bands")
def test_checkpoint_for_other_bands(run, tmp_path, capsys, reliability):
    other = _write_config(
        run.prov, "nogravity.yaml", lambda d: d.update(layers=[l for l in d["layers"] if l["name"] != "gravity"])
    )
    assert main(["cube", str(other), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    capsys.readouterr()
    # the bands differ only by 'gravity': the message must show it (score.py words it when the model is cached)
    err = _score_fails(
        run,
        tmp_path / "b" / "cube.zarr",
        run.model,
        tmp_path / "o",
        capsys,
        str(run.model),
        "trained on bands",
        "'gravity'",
        "retrain",
    )
    assert err.count("'gravity'") == 1 or "missing from the cube: ['gravity']" in err
    reliability(observed=err, kept="no prospectivity.zarr or .tif")


@pytest.mark.reliability("checkpoint", "checkpoint of random bytes")
def test_random_bytes_checkpoint(run, tmp_path, capsys, reliability):
    bad = tmp_path / "model.pt"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    err = _score_fails(
        run,
        run.cube,
        bad,
        tmp_path / "o",
        capsys,
        str(bad),
        "not a checkpoint of this package",
        "5000 bytes",
        "retrain with `mpm train`",
    )
    reliability(observed=err, kept="no prospectivity.zarr or .tif")


@pytest.mark.reliability("checkpoint", "truncated checkpoint")
def test_truncated_checkpoint(run, tmp_path, capsys, reliability):
    bad = tmp_path / "model.pt"
    data = run.model.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    err = _score_fails(
        run,
        run.cube,
        bad,
        tmp_path / "o",
        capsys,
        str(bad),
        "truncated or corrupt",
        f"{len(data) // 2} bytes",
        "retrain with `mpm train`",
    )
    reliability(observed=err, kept="no prospectivity.zarr or .tif")


class _Payload:
    """Unpickling this calls Path.touch(marker): proof that the file ran code when it was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(
            "torch",
            id="torch-archive",
            marks=pytest.mark.reliability("checkpoint", "torch checkpoint holding a pickled object (refused, not run)"),
        ),
        pytest.param(
            "pickle",
            id="raw-pickle",
            marks=pytest.mark.reliability(
                "checkpoint", "raw pickle of an arbitrary object as checkpoint (refused, not run)"
            ),
        ),
    ],
)
def test_pickled_object_checkpoint(run, tmp_path, capsys, reliability, kind):
    import torch

    marker = tmp_path / "code-ran"
    bad = tmp_path / "model.pt"
    if kind == "torch":
        torch.save({"state_dict": _Payload(marker), "bands": ["x"]}, bad)
        needles = ("holds pickled Python objects", "weights_only=True", "it asks for")
    else:
        with open(bad, "wb") as f:
            pickle.dump(_Payload(marker), f)
        needles = ("holds pickled Python objects", "weights_only=True")
    err = _score_fails(run, run.cube, bad, tmp_path / "o", capsys, str(bad), *needles, "retrain with `mpm train`")
    assert not marker.exists(), "loading the checkpoint ran the pickled code"
    reliability(observed=err, kept="the payload did not run (its marker file is absent); no prospectivity.zarr or .tif")


@pytest.mark.reliability("checkpoint", "a bare state_dict instead of a checkpoint")
def test_bare_state_dict(run, tmp_path, capsys, reliability):
    import torch

    bad = tmp_path / "weights.pt"
    torch.save(torch.load(run.model, weights_only=True)["state_dict"], bad)
    err = _score_fails(
        run,
        run.cube,
        bad,
        tmp_path / "o",
        capsys,
        str(bad),
        "lacks state_dict, model, bands",
        "bare state_dict",
        "pass the model.pt written by `mpm train`",
    )
    reliability(observed=err, kept="no prospectivity.zarr or .tif")


@pytest.mark.reliability("checkpoint", "checkpoint window differs from the config's model.window")
def test_checkpoint_window_mismatch(run, tmp_path, capsys, reliability):
    cfg = _write_config(run.prov, "win16.yaml", lambda d: d["model"].update(window=16))
    err = _score_fails(
        run,
        run.cube,
        run.model,
        tmp_path / "o",
        capsys,
        str(run.model),
        "has window 8",
        "model.window=16",
        "set model.window",
        cfg=cfg,
    )
    reliability(observed=err, kept="no prospectivity.zarr or .tif")


@pytest.mark.reliability("checkpoint", "checkpoint file that does not exist")
def test_missing_checkpoint(run, tmp_path, capsys, reliability):
    err = _score_fails(
        run, run.cube, tmp_path / "none.pt", tmp_path / "o", capsys, "none.pt", "does not exist", "mpm train"
    )
    reliability(observed=err, kept="no prospectivity.zarr or .tif")


@pytest.mark.reliability("checkpoint", "corrupt checkpoint.pt in the training folder (resume)")
def test_corrupt_resume_checkpoint(run, tmp_path, capsys, reliability):
    out = tmp_path / "o"
    out.mkdir()
    data = (run.out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    err = _expect_error(
        ["train", run.cfg, "--cube", run.cube, "--out", out],
        capsys,
        "checkpoint.pt",
        "truncated or corrupt",
        "delete it to start afresh",
    )
    assert _listing(out) == ["checkpoint.pt"]
    assert (out / "checkpoint.pt").read_bytes() == data[: len(data) // 3]  # not overwritten: the user decides
    reliability(observed=err, kept="checkpoint.pt untouched (delete it to start afresh), no model.pt")


# ------------------------------------------------------------------------------------------------
# config against the data
# ------------------------------------------------------------------------------------------------


@pytest.mark.reliability("config", "model window larger than the grid")
def test_window_larger_than_grid(run, tmp_path, capsys, reliability):
    cfg = _write_config(run.prov, "win128.yaml", lambda d: d["model"].update(window=128))
    err = _train_fails(
        run, run.cube, tmp_path / "o", capsys, "64 pixels", "window 128", "smaller model.window", cfg=cfg
    )
    reliability(observed=err, kept="no model.pt, no checkpoint.pt")


# ------------------------------------------------------------------------------------------------
# deposits (the evaluate stage)
# ------------------------------------------------------------------------------------------------


def _evaluate_fails(run, tmp_path, capsys, edit, *needles) -> str:
    cfg = _write_config(run.prov, f"dep-{tmp_path.name}.yaml", lambda d: edit(d["deposits"]))
    out = tmp_path / "o"
    shutil.copytree(run.out / "prospectivity.zarr", out / "prospectivity.zarr")
    err = _expect_error(["run", cfg, "--out", out, "--stages", "evaluate", "--quiet"], capsys, *needles)
    left = _listing(out)
    assert "metrics.json" not in left and not [n for n in left if "metrics" in n], left
    assert "evaluate" not in (
        yaml.safe_load((out / "stages.json").read_text()) if (out / "stages.json").exists() else {}
    )
    return err


def _deposits(run):
    import pandas as pd

    return pd.read_csv(run.prov / "deposits.csv")


@pytest.mark.reliability("deposits", "deposits outside the grid")
def test_deposits_outside_grid(run, tmp_path, capsys, reliability):
    d = _deposits(run)
    d["X"] = d["X"] + 5.0  # five degrees east: another province
    d.to_csv(run.prov / "far_deposits.csv", index=False)
    err = _evaluate_fails(
        run,
        tmp_path,
        capsys,
        lambda dep: dep.update(path="far_deposits.csv"),
        "far_deposits.csv",
        "lie outside the map",
        "their extent",
        "map bounds",
        "EPSG:4326",
        "deposits.crs",
    )
    reliability(observed=err, kept="no metrics.json, the evaluate stage not marked done; prospectivity.zarr kept")


@pytest.mark.reliability("deposits", "deposits CSV without a CRS (longitude/latitude read as metres)")
def test_deposits_without_crs(run, tmp_path, capsys, reliability):
    err = _evaluate_fails(
        run,
        tmp_path,
        capsys,
        lambda dep: dep.pop("crs"),
        "deposits.csv",
        "lie outside the map",
        "have no CRS",
        "set 'deposits.crs'",
    )
    reliability(observed=err, kept="no metrics.json, the evaluate stage not marked done")


@pytest.mark.reliability("deposits", "deposits CSV missing the x/y columns")
def test_deposits_without_xy_columns(run, tmp_path, capsys, reliability):
    _deposits(run).rename(columns={"X": "lon", "Y": "lat"}).to_csv(run.prov / "lonlat.csv", index=False)
    err = _evaluate_fails(
        run,
        tmp_path,
        capsys,
        lambda dep: dep.update(path="lonlat.csv"),
        "lonlat.csv",
        "no column(s) ['X', 'Y']",
        "'lon', 'lat'",
        "deposits.x",
    )
    reliability(observed=err, kept="no metrics.json, the evaluate stage not marked done")


@pytest.mark.reliability("deposits", "deposits query that selects nothing")
def test_deposits_query_selects_nothing(run, tmp_path, capsys, reliability):
    err = _evaluate_fails(
        run,
        tmp_path,
        capsys,
        lambda dep: dep.update(query="type == 'Chromite'"),
        "deposits.csv",
        "\"type == 'Chromite'\"",
        "selects none of the",
        "spelling",
    )
    reliability(observed=err, kept="no metrics.json, the evaluate stage not marked done")


@pytest.mark.reliability("deposits", "deposits file with zero rows")
def test_deposits_without_rows(run, tmp_path, capsys, reliability):
    _deposits(run).iloc[:0].to_csv(run.prov / "none.csv", index=False)
    err = _evaluate_fails(
        run,
        tmp_path,
        capsys,
        lambda dep: dep.update(path="none.csv", query=None),
        "none.csv",
        "holds no deposit (0 rows)",
        "deposits.path",
    )
    reliability(observed=err, kept="no metrics.json, the evaluate stage not marked done")


@pytest.mark.reliability("deposits", "deposits file that does not exist")
def test_deposits_file_missing(run, tmp_path, capsys, reliability):
    err = _evaluate_fails(
        run, tmp_path, capsys, lambda dep: dep.update(path="gone.csv"), "gone.csv", "does not exist", "deposits.path"
    )
    reliability(observed=err, kept="no metrics.json, the evaluate stage not marked done")
