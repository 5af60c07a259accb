"""What each Dask worker runs on: its own GPU, its own CPUs, and the process group of a DDP rank.

- **GPU**: a local cluster that declares GPUs is dask-cuda's ``LocalCUDACluster`` (one worker per GPU, each
  with its own ``CUDA_VISIBLE_DEVICES`` and the CPU affinity of its GPU's NUMA node). Every worker of every
  cluster kind gets its ``GPU`` resource count in ``MPM_WORKER_GPUS`` (a worker plugin), from which
  :func:`pipeline.models.device.worker_device` picks the worker's own device or fails in one line.
- **CPUs**: threads per rank come from each worker's own CPU affinity (``os.sched_getaffinity`` run *on* the
  worker), shared among the ranks on the same host whose affinities overlap: :func:`rank_threads`.
- **Process group**: on CUDA, ``torch.cuda.set_device`` comes before ``init_process_group``, which is given
  ``device_id`` (NCCL binds the communicator to that GPU at once instead of guessing cuda:0); the timeout is
  the dask config key ``mpm.ddp-timeout`` (default 30 minutes: a first compiled step can take minutes, and a
  collective waits for the slowest rank). On the CPU the same code runs with gloo.
"""

from __future__ import annotations

import datetime
import os

import dask
import distributed
import torch
from dask.utils import parse_timedelta

from pipeline.config import ClusterConfig
from pipeline.errors import ConfigError, DependencyError
from pipeline.models.device import WORKER_GPUS_ENV, cuda_build_fix

__all__ = [
    "DDP_TIMEOUT_KEY",
    "WorkerGpus",
    "local_cuda_cluster",
    "require_cuda_build",
    "cpu_affinity",
    "rank_threads",
    "ddp_timeout",
    "process_group_options",
    "init_rank_group",
]

DDP_TIMEOUT_KEY = "mpm.ddp-timeout"
DEFAULT_DDP_TIMEOUT = "30 minutes"


class WorkerGpus(distributed.WorkerPlugin):
    """Puts the worker's ``GPU`` resource count in ``MPM_WORKER_GPUS`` (read by the device choice)."""

    name = "mpm-worker-gpus"

    def setup(self, worker) -> None:
        os.environ[WORKER_GPUS_ENV] = str(int(worker.state.total_resources.get("GPU", 0)))


def require_cuda_build(
    cfg: ClusterConfig, *, cuda_available: bool | None = None, device_count: int | None = None
) -> int:
    """The number of GPUs this machine offers a local GPU cluster, or ConfigError naming the fix."""
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not available:
        why = "torch is a CPU build" if torch.version.cuda is None else "torch sees no CUDA device"
        raise ConfigError(
            f"cluster.gpus_per_worker is {cfg.gpus_per_worker} but {why} on this machine. Fix: {cuda_build_fix()}"
        )
    count = torch.cuda.device_count() if device_count is None else device_count
    if cfg.gpus_per_worker != 1:
        raise ConfigError(
            f"cluster.gpus_per_worker is {cfg.gpus_per_worker} on a local cluster, which gives each worker one GPU. "
            f"Fix: use gpus_per_worker: 1 and n_workers: {count} (one worker per GPU)"
        )
    if cfg.n_workers > count:
        raise ConfigError(
            f"cluster.n_workers is {cfg.n_workers} but this machine has {count} GPU(s) (one worker per GPU). "
            f"Fix: set cluster.n_workers to at most {count}"
        )
    return count


def local_cuda_cluster(cfg: ClusterConfig, preload: list[str]):
    """dask-cuda's ``LocalCUDACluster``: ``n_workers`` workers, one GPU each, resources ``GPU=1``."""
    require_cuda_build(cfg)
    try:
        import dask_cuda
    except ImportError:
        raise DependencyError(
            "a local cluster with gpus_per_worker needs the optional package 'dask_cuda' (one worker per GPU), "
            "which is not installed. Fix: pip install dask-cuda (in the environment of the workers)"
        ) from None
    return dask_cuda.LocalCUDACluster(
        n_workers=cfg.n_workers,
        threads_per_worker=cfg.threads_per_worker,
        memory_limit=cfg.memory_limit,
        resources={"GPU": 1},
        dashboard_address="127.0.0.1:0",
        preload=preload,
    )


def cpu_affinity() -> list[int]:
    """The CPUs this process may run on (runs on a worker: its job's cgroup, its GPU's NUMA node)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS and Windows have no affinity call
        return list(range(os.cpu_count() or 1))


def rank_threads(hosts: list[str], affinities: list[list[int]]) -> list[int]:
    """torch threads of each rank: its worker's CPUs, divided among the ranks on the same host that share them.

    ``hosts[r]`` and ``affinities[r]`` belong to rank ``r``'s worker. Ranks whose affinities are disjoint
    (dask-cuda pins each GPU worker to its NUMA node; batch jobs get their own cgroup) keep all their CPUs.
    """
    out = []
    for host, cpus in zip(hosts, affinities):
        mine = set(cpus)
        sharing = sum(1 for h, other in zip(hosts, affinities) if h == host and mine & set(other))
        out.append(max(1, len(mine) // max(1, sharing)))
    return out


def ddp_timeout() -> float:
    """Seconds a collective may wait (dask config ``mpm.ddp-timeout``, e.g. ``DASK_MPM__DDP_TIMEOUT=1h``)."""
    value = dask.config.get(DDP_TIMEOUT_KEY, DEFAULT_DDP_TIMEOUT)
    try:
        seconds = float(parse_timedelta(value, default="seconds"))
    except (TypeError, ValueError, KeyError):
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(
            f"dask config {DDP_TIMEOUT_KEY!r} is {value!r}. Fix: give a positive duration, e.g. '30 minutes' or 1800"
        )
    return seconds


def process_group_options(device: torch.device, timeout_s: float) -> tuple[str, dict]:
    """(backend, extra keyword arguments of ``init_process_group``) for a rank on ``device``."""
    kw: dict = {"timeout": datetime.timedelta(seconds=timeout_s)}
    if device.type == "cuda":
        kw["device_id"] = device
        return "nccl", kw
    return "gloo", kw


def init_rank_group(device: torch.device, host: str, port: int, rank: int, world: int, timeout_s: float) -> str:
    """Join the process group of ``world`` ranks at ``tcp://host:port`` on ``device``; returns the backend."""
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the group: NCCL's communicator is bound to the current device
    backend, kw = process_group_options(device, timeout_s)
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world, **kw)
    return backend
