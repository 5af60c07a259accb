"""Which torch device a process uses: its own GPU on a GPU worker, never the client's guess.

One rule for training and scoring, as a plain function of what the process can see (:func:`choose_device`),
and its reading of this process (:func:`worker_device`):

- ``cpu`` asked: the CPU.
- A Dask worker that declares GPUs (resources ``GPU >= 1``; the cluster code puts the count in the
  ``MPM_WORKER_GPUS`` environment variable of every worker) must find CUDA: a torch without a CUDA build,
  or with no visible GPU, fails with one line naming the fix instead of training on the CPU at 1/300 the speed.
- A Dask worker that declares no GPU uses the CPU with ``auto``: CPU workers on a GPU box must not all
  pile onto GPU 0.
- A GPU worker uses ``cuda:0`` when ``CUDA_VISIBLE_DEVICES`` is set: dask-cuda rotates the list so that each
  worker's own GPU comes first, and batch schedulers (SLURM ``--gres``, Kubernetes ``nvidia.com/gpu``) show a
  job only its own GPUs.
- Otherwise (one process, several visible GPUs) rank ``r`` uses GPU ``r mod count``.
"""

from __future__ import annotations

import os

import torch

from pipeline.errors import ConfigError

__all__ = ["WORKER_GPUS_ENV", "choose_device", "worker_device", "cuda_build_fix"]

#: Set on every Dask worker by the cluster code (a worker plugin): the worker's ``GPU`` resource count.
WORKER_GPUS_ENV = "MPM_WORKER_GPUS"


def cuda_build_fix() -> str:
    """What to do when GPUs are declared but torch cannot use them."""
    return (
        f"install a CUDA build of torch {torch.__version__.split('+')[0]} on the GPU machines (the CUDA image: "
        "deploy/Dockerfile.cuda), or declare no GPUs (cluster.gpus_per_worker: 0) and train on the CPU"
    )


def choose_device(
    requested: str = "auto",
    *,
    cuda_available: bool,
    device_count: int,
    visible: str | None = None,
    worker_gpus: int | None = None,
    rank: int = 0,
    cuda_build: str | None = "?",
) -> torch.device:
    """The device of one process (rules in the module doc).

    Args:
        requested: 'auto', 'cpu', 'cuda' or 'cuda:N' (train.device, or score's forced device).
        cuda_available, device_count: what torch sees in this process.
        visible: this process's ``CUDA_VISIBLE_DEVICES`` (None when unset).
        worker_gpus: the Dask worker's ``GPU`` resource (None outside a Dask worker).
        rank: the training rank (only used to spread ranks over the GPUs of one process).
        cuda_build: ``torch.version.cuda`` (None for a CPU build), for the message.
    """
    req = str(requested or "auto")
    if req == "cpu":
        return torch.device("cpu")
    if not cuda_available:
        why = "torch is a CPU build" if cuda_build is None else "torch sees no CUDA device"
        if worker_gpus:
            raise ConfigError(
                f"this Dask worker declares GPU={worker_gpus} but {why} (CUDA_VISIBLE_DEVICES={visible!r}). "
                f"Fix: {cuda_build_fix()}"
            )
        if req != "auto":
            raise ConfigError(
                f"device {req!r} was asked but {why}. Fix: set train.device: auto or cpu, or {cuda_build_fix()}"
            )
        return torch.device("cpu")
    if req.startswith("cuda:"):
        return torch.device(req)
    if req == "auto" and worker_gpus == 0:
        return torch.device("cpu")
    if worker_gpus and visible and visible.strip():
        return torch.device("cuda", 0)
    return torch.device("cuda", rank % max(1, device_count))


def worker_device(requested: str = "auto", rank: int = 0) -> torch.device:
    """:func:`choose_device` for this process (its CUDA, ``CUDA_VISIBLE_DEVICES`` and Dask worker GPUs)."""
    declared = os.environ.get(WORKER_GPUS_ENV)
    available = torch.cuda.is_available()
    return choose_device(
        requested,
        cuda_available=available,
        device_count=torch.cuda.device_count() if available else 0,
        visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
        worker_gpus=int(float(declared)) if declared not in (None, "") else None,
        rank=rank,
        cuda_build=torch.version.cuda,
    )
