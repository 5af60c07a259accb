"""The GPU path, on a GPU (skipped without CUDA; `make gpu-check` runs these with the GPU benchmarks).

- the device-side feed on CUDA gives exactly the CPU feed's batches;
- a bf16 training step, eager and compiled (the trainer itself, on the worker's own device);
- GPU scoring against CPU scoring, within a stated tolerance;
- DDP over NCCL with every GPU of the box (one rank where there is one) on a LocalCUDACluster;
- a LocalCUDACluster scoring a small cube, every worker on its own GPU.
"""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from _cubes import BANDS, SOURCES, write_test_cube

from pipeline.config import RunConfig
from pipeline.data.cube import open_cube
from pipeline.models.device import worker_device
from pipeline.models.patches import WindowFeed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MODEL = {"window": 16, "patch": 4, "dim": 64, "depth": 2, "heads": 4, "decoder_dim": 32, "decoder_depth": 1}
TRAIN = {"epochs": 2, "batch_size": 32, "lr": 1e-3, "train_stride": 4, "checkpoint_every": 50, "seed": 0}
#: GPU vs CPU scores (bf16 autocast on the GPU, fp32 on the CPU): correlation and worst pixel, in units of the
#: CPU map's standard deviation.
SCORE_MIN_CORR, SCORE_MAX_DIFF_STD = 0.999, 0.05


def run_config(model=None, train=None, cluster=None) -> RunConfig:
    return RunConfig.from_dict(
        {
            "grid": {"crs": "EPSG:32646", "resolution": 100},
            "layers": [{"name": b, "path": f"{b}.tif", "source": s} for b, s in zip(BANDS, SOURCES)],
            "model": {**MODEL, **(model or {})},
            "train": {**TRAIN, **(train or {})},
            "score": {"stride": 8, "batch_size": 256},
            **({"cluster": cluster} if cluster else {}),
        }
    )


@pytest.fixture(scope="module")
def cube_path(tmp_path_factory):
    return write_test_cube(tmp_path_factory.mktemp("gpu") / "cube.zarr", size=96, chunk=32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cube_path):
    from pipeline.run.runner import train

    out = tmp_path_factory.mktemp("trained")
    return train(cube_path, run_config(), out)


@pytest.fixture(scope="module")
def gpu_client():
    from pipeline.run.cluster import load_profile, make_cluster

    n = torch.cuda.device_count()
    client = make_cluster(load_profile("local-gpu").model_copy(update={"n_workers": n, "memory_limit": "16GiB"}))
    yield client
    cluster = client.cluster
    client.close()
    cluster.close()


def test_feed_on_cuda_equals_the_cpu_feed(cube_path):
    kw = dict(window=16, stride=4, batch_size=64, min_valid_fraction=0.5, random_offsets=True, seed=3)
    cpu, gpu = WindowFeed(cube_path, **kw), WindowFeed(cube_path, device="cuda", **kw)
    for epoch in (0, 1):
        for (xc, vc), (xg, vg) in zip(cpu.batches(epoch), gpu.batches(epoch), strict=True):
            assert xg.device.type == "cuda" and vg.dtype == torch.bool
            assert torch.equal(xc, xg.cpu()) and torch.equal(vc, vg.cpu())
    assert gpu.h2d_bytes == cpu.h2d_bytes and gpu.reads == len(gpu.all_regions)  # regions once, then cached


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bf16_training_step(tmp_path, cube_path, compiled):
    from pipeline.run.runner import train

    cfg = run_config(train={"compile": compiled, "epochs": 1, "steps_per_epoch": 6})
    train(cube_path, cfg, tmp_path / "run", log_every=3)
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["ranks"][0]["device"] == "cuda:0"
    losses = [loss for _, loss in summary["history"]]
    assert losses and all(np.isfinite(losses)), losses


def _scores(cube_path, ckpt, device):
    from pipeline.scoring.score import score_cube

    ds = score_cube(open_cube(cube_path), ckpt, run_config().score, device=device)
    return ds["prospectivity"].compute(scheduler="sync").values


def test_gpu_scores_match_cpu_scores(cube_path, trained):
    cpu, gpu = _scores(cube_path, trained, "cpu"), _scores(cube_path, trained, "cuda")
    assert np.array_equal(np.isnan(cpu), np.isnan(gpu))
    ok = ~np.isnan(cpu)
    corr = np.corrcoef(cpu[ok], gpu[ok])[0, 1]
    worst = np.abs(cpu[ok] - gpu[ok]).max() / cpu[ok].std()
    print(f"GPU vs CPU scores: correlation {corr:.6f}, worst pixel {worst:.4f} std")
    assert corr >= SCORE_MIN_CORR and worst <= SCORE_MAX_DIFF_STD, (corr, worst)


def test_each_local_cuda_worker_has_its_own_gpu(gpu_client):
    import os

    seen = gpu_client.run(lambda: (os.environ.get("CUDA_VISIBLE_DEVICES"), str(worker_device("auto"))))
    assert len(seen) == torch.cuda.device_count()
    assert {dev for _, dev in seen.values()} == {"cuda:0"}
    assert len({vis.split(",")[0] for vis, _ in seen.values()}) == len(seen)  # a different first GPU each


def _nccl_rank(host: str, port: int, rank: int, world: int) -> tuple[str, float]:
    import torch.distributed as dist

    from pipeline.run.workers import init_rank_group

    device = worker_device("auto", rank)
    backend = init_rank_group(device, host, port, rank, world, 120.0)
    try:
        t = torch.full((4,), float(rank + 1), device=device)
        dist.all_reduce(t)
        torch.cuda.synchronize(device)
        return backend, float(t[0])
    finally:
        dist.destroy_process_group()


def test_nccl_group_over_every_gpu(gpu_client):
    workers = sorted(gpu_client.scheduler_info(n_workers=-1)["workers"])
    world = len(workers)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    futures = [
        gpu_client.submit(_nccl_rank, "127.0.0.1", port, r, world, workers=[a], pure=False)
        for r, a in enumerate(workers)
    ]
    got = gpu_client.gather(futures)
    assert got == [("nccl", world * (world + 1) / 2)] * world


def test_ddp_training_on_every_gpu(tmp_path, cube_path, gpu_client):
    from pipeline.run.runner import train

    world = torch.cuda.device_count()
    cfg = run_config(train={"ddp_workers": world, "batch_size": 32 * world, "epochs": 1, "steps_per_epoch": 4})
    train(cube_path, cfg, tmp_path / "ddp", client=gpu_client, log_every=2)
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert [r["rank"] for r in summary["ranks"]] == list(range(world))
    assert {r["device"] for r in summary["ranks"]} == {"cuda:0"}  # each rank on its worker's own GPU
    assert len({r["digest"] for r in summary["ranks"]}) == 1  # identical weights on every rank


def test_local_cuda_cluster_scores_a_small_cube(tmp_path, cube_path, trained, gpu_client):
    import xarray as xr

    from pipeline.scoring.score import score_cube
    from pipeline.scoring.sinks import write_zarr_resumable

    ds = score_cube(open_cube(cube_path), trained, run_config().score, gpu=True)
    path = write_zarr_resumable(ds, tmp_path / "p.zarr", scheduler=gpu_client, regions_per_batch=4)
    got = xr.open_zarr(path, consolidated=False)["prospectivity"].values
    ref = _scores(cube_path, trained, "cuda")
    ok = ~np.isnan(ref)
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    assert np.corrcoef(got[ok], ref[ok])[0, 1] >= SCORE_MIN_CORR
