"""Training: the loss falls, resume equals uninterrupted, DDP over Dask worker processes equals one process."""

from __future__ import annotations

import json

import pytest
import torch
from _cubes import BANDS, SOURCES, write_test_cube

from pipeline.config import RunConfig
from pipeline.data.cube import open_cube
from pipeline.errors import CheckpointError
from pipeline.models import build_model, group_indices, masked_mse
from pipeline.models.checkpoint import load_checkpoint
from pipeline.models.patches import WindowFeed
from pipeline.models.train import lr_at, train_from_config
from pipeline.run.runner import train

MODEL = {
    "window": 16,
    "patch": 4,
    "dim": 32,
    "depth": 2,
    "heads": 2,
    "decoder_dim": 32,
    "decoder_depth": 1,
    "stem_channels": 8,
    "fusion_channels": 16,
    "mask_ratio": 0.5,
}
# the loop's own properties (determinism, resume, DDP) on a fixed window set: no held-out blocks,
# augmentation or early stopping here (tests/models/test_regime.py covers those)
TRAIN = {
    "epochs": 3,
    "batch_size": 8,
    "lr": 2e-3,
    "train_stride": 8,
    "checkpoint_every": 2,
    "seed": 0,
    "holdout_fraction": 0.0,
    "augment": False,
    "nodata_augment": 0.0,
    "patience": 0,
}


def run_config(model=None, train=None) -> RunConfig:
    return RunConfig.from_dict(
        {
            "grid": {"crs": "EPSG:32646", "resolution": 100},
            "layers": [{"name": b, "path": f"{b}.tif", "source": s} for b, s in zip(BANDS, SOURCES)],
            "model": {**MODEL, **(model or {})},
            "train": {**TRAIN, **(train or {})},
        }
    )


ONE_TORCH_THREAD = True  # see conftest._one_torch_thread


@pytest.fixture(scope="module")
def cube_path(tmp_path_factory):
    return write_test_cube(tmp_path_factory.mktemp("cube") / "cube.zarr")


def eval_loss(model, cube_path):
    feed = WindowFeed(cube_path, window=16, stride=8, batch_size=8, min_valid_fraction=0.5)
    with torch.no_grad():
        losses = [masked_mse(model.eval()(x), x, v) for x, v in feed.batches(0)]
    return float(torch.stack(losses).mean())


def test_lr_schedule_warms_up_and_decays():
    lrs = [lr_at(s, 200, 1e-3) for s in range(200)]
    assert lrs[0] < lrs[9] == pytest.approx(1e-3) and lrs[-1] < 0.15e-3 and min(lrs) >= 0.1e-3 - 1e-12


def test_loss_falls_on_a_small_cube(tmp_path, cube_path):
    cfg = run_config(
        model={"mask_ratio": 0.0, "cross_ratio": 0.0}, train={"epochs": 15, "lr": 3e-3, "checkpoint_every": 100}
    )
    events = []
    out = train(cube_path, cfg, tmp_path / "run", progress=events.append, log_every=5)
    assert out == tmp_path / "run" / "model.pt"
    trained, meta = load_checkpoint(out, expect_bands=BANDS)
    torch.manual_seed(0)
    untrained = build_model(cfg.model, group_indices(SOURCES))
    before, after = eval_loss(untrained, cube_path), eval_loss(trained, cube_path)
    assert after < 0.4 * before, (before, after)
    assert events and {"step", "total_steps", "epoch", "loss", "windows_per_s", "lr"} <= set(events[-1])
    assert events[-1]["step"] == events[-1]["total_steps"] == meta["step"] == 15 * 6
    assert meta["optimizer"] is None and meta["extra"]["complete"]
    assert meta["bands"] == BANDS and meta["config"]["train"]["seed"] == 0
    assert (tmp_path / "run" / "checkpoint.pt").exists()


class Interrupt(Exception):
    pass


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, cube_path):
    cfg = run_config(train={"epochs": 2})  # 6 steps per epoch: 12 steps, checkpoints every 2
    ref = train(cube_path, cfg, tmp_path / "ref", log_every=1)

    def stop_at_7(event):
        if event["step"] == 7:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cube_path, cfg, tmp_path / "run", progress=stop_at_7, log_every=1)
    assert not (tmp_path / "run" / "model.pt").exists()
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")[1]["step"] == 6
    seen = []
    out = train(cube_path, cfg, tmp_path / "run", progress=seen.append, log_every=1)
    assert [e["step"] for e in seen] == list(range(7, 13))
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["resumed_from"] == 6
    a, b = load_checkpoint(ref)[0].state_dict(), load_checkpoint(out)[0].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_a_different_run(tmp_path, cube_path):
    train(cube_path, run_config(train={"epochs": 1}), tmp_path / "run")
    with pytest.raises(CheckpointError, match="train.lr.*another output folder"):
        train(cube_path, run_config(train={"epochs": 1, "lr": 1e-3}), tmp_path / "run")


def test_train_from_config(tmp_path, cube_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(run_config(train={"epochs": 1, "steps_per_epoch": 2}).to_yaml())
    out = train_from_config(cfg_file, cube_path, tmp_path / "out")
    assert load_checkpoint(out)[1]["step"] == 2


@pytest.fixture(scope="module")
def client():
    from pipeline.config import ClusterConfig
    from pipeline.run.cluster import make_cluster

    c = make_cluster(ClusterConfig(kind="local", n_workers=2, threads_per_worker=1, memory_limit="2GiB"))
    yield c
    c.close()
    c.cluster.close()


def test_ddp_over_two_dask_workers_matches_one_process(tmp_path, cube_path, client):
    cfg = run_config(train={"epochs": 2, "ddp_workers": 2})
    events = []
    out = train(cube_path, cfg, tmp_path / "ddp", client=client, progress=events.append, log_every=2)
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert summary["dask"] and [r["rank"] for r in summary["ranks"]] == [0, 1]
    assert summary["ranks"][0]["digest"] == summary["ranks"][1]["digest"]  # identical weights on both ranks
    assert [e["step"] for e in events] == [2, 4, 6, 8, 10]  # progress reached the client

    # Same global batches in one process: the two shards simulated side by side.
    single = train(cube_path, cfg, tmp_path / "single", log_every=2)
    torch.manual_seed(0)
    init = build_model(cfg.model, group_indices(SOURCES)).state_dict()
    a, b = load_checkpoint(out)[0].state_dict(), load_checkpoint(single)[0].state_dict()
    moved = sum(float((a[k] - init[k]).norm() ** 2) for k in a) ** 0.5
    diff = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
    assert moved > 0.1 and diff < 1e-3 * moved, (diff, moved)
    hist_ddp = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())["history"]
    hist_one = json.loads((tmp_path / "single" / "train_summary.json").read_text())["history"]
    assert [s for s, _ in hist_ddp] == [s for s, _ in hist_one]
    for (_, l1), (_, l2) in zip(hist_ddp, hist_one):
        assert l1 == pytest.approx(l2, rel=1e-4)


def test_one_rank_as_a_task_on_a_worker(tmp_path, cube_path, client):
    cfg = run_config(train={"epochs": 1, "steps_per_epoch": 3})
    out = train(open_cube(cube_path), cfg, tmp_path / "w", client=client)
    summary = json.loads((tmp_path / "w" / "train_summary.json").read_text())
    assert summary["dask"] and len(summary["ranks"]) == 1
    assert load_checkpoint(out)[1]["step"] == 3


@pytest.mark.reliability(
    "interrupt", "rerun after --force or a rebuilt cube: trains afresh, never 'resumes' a finished checkpoint"
)
def test_train_stage_resumes_only_its_own_interrupted_run(tmp_path, reliability):
    """checkpoint.pt is resumed by a rerun of the same stage; after --force or a rebuilt cube (the stage is
    stale) a finished checkpoint must not stand in for training on the new data."""
    import json

    from pipeline.models.checkpoint import load_checkpoint
    from pipeline.run.runner import train_stage

    out = tmp_path / "run"
    write_test_cube(out / "cube.zarr")
    (out / "stages.json").write_text(json.dumps({"cube": {"key": "k", "built": "first"}}))
    cfg = run_config(train={"epochs": 1})
    logs: list[str] = []
    train_stage(cfg, out, log=logs.append, client=None)
    first = load_checkpoint(out / "checkpoint.pt")[1]["step"]
    assert first > 0

    # the cube is rebuilt with other values: the stage reruns and must train again from step 0
    write_test_cube(out / "cube.zarr", seed=5)
    (out / "stages.json").write_text(
        json.dumps({**json.loads((out / "stages.json").read_text()), "cube": {"key": "k", "built": "second"}})
    )
    logs.clear()
    train_stage(cfg, out, log=logs.append, client=None)
    assert any("starting afresh" in l for l in logs), logs
    w_new = load_checkpoint(out / "model.pt")[0].state_dict()

    # --force: afresh again; same data and seed give the same weights as the run before
    logs.clear()
    train_stage(cfg, out, force=True, log=logs.append, client=None)
    assert any("starting afresh" in l for l in logs), logs
    w_forced = load_checkpoint(out / "model.pt")[0].state_dict()
    for k in w_new:
        torch.testing.assert_close(w_forced[k], w_new[k], rtol=0, atol=0)
    reliability(
        observed="after a cube rebuild and after --force the train stage logs 'starting afresh' and trains "
        "from step 0 (same data and seed give bitwise the same weights); a plain rerun resumes",
        kept="model.pt and checkpoint.pt of the new run",
    )
