"""Clusters from config and profiles: local/address for real, the batch kinds as far as this box allows
(job scripts, Kubernetes specs, unreachable gateways, missing optional packages); what each worker runs on
(its device, its CPUs, its process group) with real workers and a real gloo group."""

from __future__ import annotations

import datetime
import os
import socket
import sys
from pathlib import Path

import dask
import distributed
import pytest
import torch

from pipeline.config import ClusterConfig
from pipeline.errors import ConfigError, DependencyError
from pipeline.models.device import WORKER_GPUS_ENV, worker_device
from pipeline.run.cluster import (
    PROFILE_DIR,
    ClusterError,
    build_cluster,
    cluster_settings,
    jobqueue_job_script,
    jobqueue_kwargs,
    load_profile,
    make_cluster,
    resolve_profile,
    worker_args,
)
from pipeline.run.workers import (
    DDP_TIMEOUT_KEY,
    WorkerGpus,
    cpu_affinity,
    ddp_timeout,
    init_rank_group,
    process_group_options,
    rank_threads,
    require_cuda_build,
)

ROOT = Path(__file__).resolve().parents[2]


def test_profile_dir_is_the_checkouts():
    assert PROFILE_DIR == ROOT / "deploy" / "profiles"
    assert {p.stem for p in PROFILE_DIR.glob("*.yaml")} >= {
        "local",
        "slurm-gpu",
        "pbs-gpu",
        "gateway-gpu",
        "kubernetes-gpu",
    }


@pytest.mark.parametrize("path", sorted((ROOT / "deploy" / "profiles").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_profile_validates(path):
    cfg = load_profile(path)
    assert cfg.kind in ("local", "jobqueue", "gateway", "kubernetes")
    if cfg.gpus_per_worker:
        assert cfg.threads_per_worker == 1  # one worker per GPU, one task on it at a time


def test_cluster_settings_forms():
    assert cluster_settings("local") == {"kind": "local", "profile": None}
    assert cluster_settings("none")["kind"] == "none"
    assert cluster_settings("tcp://10.0.0.5:8786") == {
        "kind": "address",
        "address": "tcp://10.0.0.5:8786",
        "profile": None,
    }
    by_name = cluster_settings("slurm-gpu")
    by_path = cluster_settings(str(PROFILE_DIR / "slurm-gpu.yaml"))
    assert by_name == by_path and by_name["kind"] == "jobqueue" and by_name["jobqueue"]["system"] == "slurm"
    with pytest.raises(ConfigError, match=r"--cluster 'slurm-typo'.*Fix: pass e.g. --cluster local"):
        cluster_settings("slurm-typo")


def test_bad_profiles_name_key_value_and_fix(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: jobqueue\nn_workers: 0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*n_workers.*\(got 0\).*Fix"):
        load_profile(bad)
    bad.write_text("kind: slurm\n")
    with pytest.raises(ConfigError, match=r"kind.*'slurm'.*Fix"):
        load_profile(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_profile(bad)
    chained = tmp_path / "chained.yaml"
    chained.write_text(f"kind: local\nprofile: {bad}\n")
    with pytest.raises(ConfigError, match="do not chain"):
        load_profile(chained)
    with pytest.raises(ConfigError, match=r"does not exist.*slurm-gpu"):
        load_profile(tmp_path / "missing.yaml")


def test_profile_in_config_is_overridden_by_keys_set_beside_it():
    cfg = ClusterConfig(profile=PROFILE_DIR / "slurm-gpu.yaml", n_workers=7)
    r = resolve_profile(cfg)
    assert r.kind == "jobqueue" and r.n_workers == 7 and r.gpus_per_worker == 1 and r.profile is None
    assert resolve_profile(ClusterConfig()) == ClusterConfig()


def test_cli_cluster_option_overrides_config(tmp_path):
    from pipeline.config import RunConfig
    from pipeline.run.cli import _with_cluster, build_parser

    cfg = RunConfig.from_dict(
        {
            "grid": {"crs": "EPSG:32646", "resolution": 100},
            "layers": [{"name": "a", "path": "a.tif"}],
            "cluster": {"kind": "local", "n_workers": 3},
        }
    )
    args = build_parser().parse_args(["run", "x.yaml", "--out", str(tmp_path), "--cluster", "tcp://127.0.0.1:8786"])
    c = _with_cluster(cfg, args).cluster
    assert (c.kind, c.address, c.n_workers) == ("address", "tcp://127.0.0.1:8786", 3)
    args = build_parser().parse_args(["demo", "--out", str(tmp_path), "--cluster", "pbs-gpu"])
    c = _with_cluster(cfg, args).cluster
    assert c.kind == "jobqueue" and c.jobqueue["system"] == "pbs" and c.n_workers == 4  # the profile replaces all


def test_worker_args_gpu_layout():
    assert worker_args(ClusterConfig(threads_per_worker=2, memory_limit="8GiB")) == [
        "--nthreads",
        "2",
        "--memory-limit",
        "8GiB",
    ]
    assert worker_args(ClusterConfig(gpus_per_worker=1))[-2:] == ["--resources", "GPU=1"]


@pytest.mark.parametrize("name, directive", [("slurm-gpu", "#SBATCH --gres=gpu:1"), ("pbs-gpu", "ngpus=1")])
def test_jobqueue_profile_produces_a_job_script(name, directive):
    pytest.importorskip("dask_jobqueue")
    script = jobqueue_job_script(load_profile(name), scheduler="tcp://10.1.2.3:8786")
    assert directive in script
    assert "dask_worker tcp://10.1.2.3:8786" in script
    assert "--nthreads 1" in script and "--resources GPU=1" in script
    assert "DAEMON" not in script  # no DataLoader worker processes: the feed prefetches on a thread
    if name == "slurm-gpu":
        assert "#SBATCH --cpus-per-task=8" in script and "#SBATCH -p gpu" in script


def test_jobqueue_cluster_object_without_submission():
    """The real SLURMCluster (a scheduler in this process, no job submitted since it is not scaled)."""
    pytest.importorskip("dask_jobqueue")
    cluster = build_cluster(
        load_profile("slurm-gpu").model_copy(
            update={
                "jobqueue": {
                    **load_profile("slurm-gpu").jobqueue,
                    "log_directory": None,
                    "scheduler_options": {"dashboard_address": ":0"},
                }
            }
        )
    )
    try:
        assert type(cluster).__name__ == "SLURMCluster"
        script = cluster.job_script()
        assert "#SBATCH --gres=gpu:1" in script and "--resources GPU=1" in script
        assert cluster.scheduler_address in script
        assert len(cluster.workers) == 0
    finally:
        cluster.close()


def test_jobqueue_rejects_bad_settings():
    with pytest.raises(ConfigError, match=r"system is 'sge'.*Fix: use 'slurm' or 'pbs'"):
        jobqueue_kwargs(ClusterConfig(kind="jobqueue", jobqueue={"system": "sge"}))
    with pytest.raises(ConfigError, match=r"processes is 2 with GPU workers.*Fix"):
        jobqueue_kwargs(ClusterConfig(kind="jobqueue", gpus_per_worker=1, jobqueue={"processes": 2}))


@pytest.mark.parametrize(
    "kind, module",
    [("jobqueue", "dask_jobqueue"), ("gateway", "dask_gateway"), ("kubernetes", "dask_kubernetes.operator")],
)
def test_missing_optional_package_says_what_to_install(monkeypatch, kind, module):
    monkeypatch.setitem(sys.modules, module, None)  # import of a None entry raises ImportError
    cfg = ClusterConfig(kind=kind, gateway={"address": "http://127.0.0.1:1"}, kubernetes={"image": "mpm:x"})
    with pytest.raises(
        DependencyError, match=rf"cluster kind '{kind}' needs the optional package '{module}'.*Fix: pip install"
    ):
        make_cluster(cfg)


def test_gateway_unreachable_is_a_cluster_error():
    pytest.importorskip("dask_gateway")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ClusterConfig(kind="gateway", gateway={"address": f"http://127.0.0.1:{port}", "auth": "basic"})
    with pytest.raises(ClusterError, match=rf"Dask Gateway 'http://127.0.0.1:{port}'.*Fix: check the address"):
        make_cluster(cfg)


def test_gateway_needs_an_address():
    pytest.importorskip("dask_gateway")
    import dask

    with dask.config.set({"gateway.address": None}):
        with pytest.raises(ConfigError, match=r"gateway.address is missing.*Fix"):
            make_cluster(ClusterConfig(kind="gateway"))


def test_kubernetes_needs_an_image():
    pytest.importorskip("dask_kubernetes")
    from pipeline.run.cluster import kubernetes_cluster_spec

    with pytest.raises(ConfigError, match=r"kubernetes.image is missing.*Fix"):
        kubernetes_cluster_spec(ClusterConfig(kind="kubernetes"))


def test_address_unreachable_is_a_cluster_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        with pytest.raises(ClusterError, match=rf"tcp://127.0.0.1:{port}.*Fix"):
            make_cluster(ClusterConfig(kind="address", address=f"tcp://127.0.0.1:{port}"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-build failure")
def test_local_gpu_profile_without_cuda_fails_in_one_line_naming_the_fix():
    cfg = load_profile("local-gpu")
    assert (cfg.kind, cfg.gpus_per_worker, cfg.threads_per_worker) == ("local", 1, 1)
    with pytest.raises(
        ConfigError, match=r"gpus_per_worker is 1 but torch is a CPU build.*Fix: install a CUDA build"
    ) as e:
        make_cluster(cfg)
    assert "\n" not in str(e.value)


def test_local_gpu_cluster_layout_rules():
    cfg = ClusterConfig(kind="local", n_workers=2, gpus_per_worker=1)
    assert require_cuda_build(cfg, cuda_available=True, device_count=4) == 4
    with pytest.raises(ConfigError, match=r"n_workers is 2 but this machine has 1 GPU.*Fix: set cluster.n_workers"):
        require_cuda_build(cfg, cuda_available=True, device_count=1)
    with pytest.raises(ConfigError, match=r"gpus_per_worker is 2 on a local cluster.*Fix: use gpus_per_worker: 1"):
        require_cuda_build(cfg.model_copy(update={"gpus_per_worker": 2}), cuda_available=True, device_count=4)


def test_missing_dask_cuda_says_what_to_install(monkeypatch):
    from pipeline.run.workers import local_cuda_cluster

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the CUDA check, to the import
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setitem(sys.modules, "dask_cuda", None)
    with pytest.raises(DependencyError, match=r"needs the optional package 'dask_cuda'.*Fix: pip install dask-cuda"):
        local_cuda_cluster(ClusterConfig(kind="local", n_workers=1, gpus_per_worker=1), preload=[])


def test_workers_learn_their_gpus_and_use_their_own_device():
    """Real worker processes: a CPU worker of make_cluster gets GPU=0 and the CPU; a worker that declares a
    GPU on a CPU build of torch fails in one line instead of training on the CPU."""
    client = make_cluster(ClusterConfig(kind="local", n_workers=1, memory_limit="1GiB"))
    try:
        assert list(client.run(lambda: os.environ.get(WORKER_GPUS_ENV)).values()) == ["0"]
        assert client.submit(worker_device, "auto", pure=False).result(timeout=60) == torch.device("cpu")
        other = make_cluster(ClusterConfig(kind="address", address=client.scheduler.address))
        try:
            assert other.submit(sum, [1, 2]).result(timeout=30) == 3
        finally:
            other.close()
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    if torch.cuda.is_available():
        return
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None, resources={"GPU": 1}
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.register_plugin(WorkerGpus(), name=WorkerGpus.name)
        fut = client.submit(worker_device, "auto", resources={"GPU": 1}, pure=False)
        with pytest.raises(ConfigError, match=r"worker declares GPU=1 but torch is a CPU build.*Fix: install a CUDA"):
            fut.result(timeout=60)


def test_threads_per_rank_come_from_each_workers_affinity():
    # a 128-CPU login node running two ranks unpinned: half each; two GPU workers pinned to their NUMA nodes
    # keep their own CPUs; ranks on other hosts do not count
    node = list(range(128))
    assert rank_threads(["login", "login"], [node, node]) == [64, 64]
    assert rank_threads(["g", "g"], [list(range(0, 8)), list(range(8, 16))]) == [8, 8]
    assert rank_threads(["a", "b"], [list(range(8)), list(range(8))]) == [8, 8]
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c,
        distributed.Client(c) as client,
    ):
        first = sorted(client.scheduler_info()["workers"])[0]
        client.run(os.sched_setaffinity, 0, {0}, workers=[first])  # as a batch job's cgroup would
        got = client.run(cpu_affinity)
        assert got[first] == [0]
        assert all(v == sorted(os.sched_getaffinity(0)) for a, v in got.items() if a != first)


def test_ddp_timeout_is_configurable():
    assert ddp_timeout() == 1800
    with dask.config.set({DDP_TIMEOUT_KEY: "2 hours"}):
        assert ddp_timeout() == 7200
    with dask.config.set({DDP_TIMEOUT_KEY: "soon"}):
        with pytest.raises(ConfigError, match=r"'mpm.ddp-timeout' is 'soon'.*Fix: give a positive duration"):
            ddp_timeout()


def test_nccl_gets_its_device_and_gloo_runs_the_same_path():
    backend, kw = process_group_options(torch.device("cuda", 0), 90.0)
    assert backend == "nccl" and kw == {"device_id": torch.device("cuda", 0), "timeout": datetime.timedelta(seconds=90)}
    backend, kw = process_group_options(torch.device("cpu"), 90.0)
    assert backend == "gloo" and "device_id" not in kw
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert init_rank_group(torch.device("cpu"), "127.0.0.1", port, 0, 1, 30.0) == "gloo"
    try:
        t = torch.ones(3)
        dist.all_reduce(t)
        assert dist.get_backend() == "gloo" and torch.equal(t, torch.ones(3))
    finally:
        dist.destroy_process_group()
