"""Label-free selection (`mpm tune`) and the held-out validation loss inside training."""

from __future__ import annotations

import json

import pytest
import torch
from _cubes import BANDS, SOURCES, write_test_cube

from pipeline.config import RunConfig
from pipeline.data.cube import open_cube
from pipeline.models.checkpoint import load_checkpoint
from pipeline.models.regime import split_cube, validation_error
from pipeline.models.selection import tune
from pipeline.models.train import _validation_windows, train

ONE_TORCH_THREAD = True  # see conftest._one_torch_thread
MODEL = {
    "window": 8,
    "patch": 4,
    "dim": 16,
    "depth": 1,
    "heads": 2,
    "decoder_dim": 16,
    "decoder_depth": 1,
    "stem_channels": 4,
    "fusion_channels": 8,
}
TRAIN = {
    "epochs": 4,
    "batch_size": 16,
    "lr": 3e-3,
    "train_stride": 4,
    "holdout_fraction": 0.25,
    "holdout_block": 16,
    "validation_windows": 64,
}


def config(deposits=None, **train_kw) -> RunConfig:
    data = {
        "grid": {"crs": "EPSG:32646", "resolution": 100},
        "layers": [{"name": b, "path": f"{b}.tif", "source": s} for b, s in zip(BANDS, SOURCES)],
        "model": MODEL,
        "train": {**TRAIN, **train_kw},
    }
    if deposits is not None:
        data["deposits"] = {"path": str(deposits), "x": "X", "y": "Y", "crs": "EPSG:32646"}
    return RunConfig.from_dict(data)


@pytest.fixture(scope="module")
def cube_path(tmp_path_factory):
    return write_test_cube(tmp_path_factory.mktemp("cube") / "cube.zarr", size=64)


def test_training_records_a_held_out_loss_and_keeps_the_best_weights(tmp_path, cube_path):
    out = train(cube_path, config(), tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    val = summary["validation"]
    assert len(val) == 4 and all(v[1] == v[1] for v in val)  # one finite held-out loss per epoch
    assert summary["best"]["loss"] == pytest.approx(min(v[1] for v in val))
    model, meta = load_checkpoint(out)
    cals = meta["extra"]["calibration"]
    assert set(cals) == {"cross", "spatial"}  # one per scoring mode the model was trained for
    cal = cals["cross"]
    assert cal and cal["n_pixels"] > 100 and len(cal["scale"]) == len(BANDS)
    assert set(cal["median"]) == {"geochemistry", "geophysics", "geology"}
    # the saved weights are the best epoch's: re-measuring them gives the recorded best loss
    cfg = config()
    _, val_ds = split_cube(open_cube(cube_path), 16, 0.25, cfg.train.seed)
    batches = _validation_windows(val_ds, cfg.model, cfg.train, torch.device("cpu"))
    assert validation_error(model, batches) == pytest.approx(summary["best"]["loss"], rel=1e-4)


def test_early_stopping_stops_when_the_held_out_loss_stalls(tmp_path, cube_path):
    # a learning rate far too small: the held-out loss barely moves, so patience 1 stops early
    out = tmp_path / "slow"
    train(cube_path, config(epochs=30, lr=1e-7, patience=1), out)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["stopped_early_at"] is not None and len(summary["validation"]) < 30


def test_tune_never_reads_deposits_and_is_repeatable(tmp_path, cube_path):
    """The choice is the same with real deposits, other deposits, or a deposits file that does not exist:
    tune never opens it (a read of the missing file would raise)."""
    good = tmp_path / "deposits.csv"
    good.write_text("X,Y\n503000,3997000\n504000,3996000\n")
    other = tmp_path / "other.csv"
    other.write_text("X,Y\n501000,3999000\n")
    cand = {"window": [8], "mask_ratio": [0.25, 0.5], "cross_ratio": [0.25]}
    choices = []
    for i, dep in enumerate((good, other, tmp_path / "missing.csv")):
        rec = tune(
            cube_path, config(deposits=dep, epochs=2), tmp_path / f"tune{i}", candidates=cand, log=lambda *_: None
        )
        assert rec["deposits_read"] is False and len(rec["trials"]) == 2
        assert all(t["loss"] == t["loss"] for t in rec["trials"])
        choices.append((rec["choice"], [t["loss"] for t in rec["trials"]]))
    assert choices[0] == choices[1] == choices[2]
    chosen = choices[0][0]
    best = min(rec["trials"], key=lambda t: t["loss"])
    assert chosen["mask_ratio"] == best["mask_ratio"]
    assert (tmp_path / "tune0" / "model.tuned.yaml").read_text().count("mask_ratio") == 1
