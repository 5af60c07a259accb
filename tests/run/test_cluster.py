"""Clusters from config and profiles: local/address for real, the batch kinds as far as this box allows
(job scripts, Kubernetes specs, unreachable gateways, missing optional packages)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from pipeline.config import ClusterConfig
from pipeline.errors import ConfigError, DependencyError
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
    assert "export DASK_DISTRIBUTED__WORKER__DAEMON=False" in script
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


def test_local_gpu_profile_gives_gpu_resources_and_address_connects():
    """A real LocalCluster from a profile (GPU resource advertised, no GPU used) and a second client by address."""
    from pipeline.run.cluster import cluster_has_gpus

    cfg = load_profile("local-gpu").model_copy(update={"memory_limit": "1GiB"})
    client = make_cluster(cfg)
    try:
        assert cluster_has_gpus(client)
        info = client.scheduler_info(n_workers=-1)["workers"]
        assert len(info) == 1 and all(w["nthreads"] == 1 for w in info.values())
        other = make_cluster(ClusterConfig(kind="address", address=client.scheduler.address))
        try:
            assert other.submit(sum, [1, 2], resources={"GPU": 1}).result(timeout=30) == 3
        finally:
            other.close()
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
