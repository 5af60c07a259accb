"""The device rule: each worker uses its own GPU, CPU workers stay on the CPU, declared GPUs without CUDA fail
in one line (plain functions of what a process sees; the real workers are in tests/run/test_cluster.py)."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.models.device import WORKER_GPUS_ENV, choose_device, worker_device

CUDA4 = dict(cuda_available=True, device_count=4, cuda_build="13.0")
NO_CUDA = dict(cuda_available=False, device_count=0, cuda_build=None)


def test_dask_cuda_worker_uses_the_first_visible_gpu_whatever_its_rank():
    # dask-cuda gives worker k the list rotated to start at GPU k: its own GPU is cuda:0 in that process
    for rank, visible in enumerate(["0,1,2,3", "1,2,3,0", "2,3,0,1", "3,0,1,2"]):
        assert choose_device("auto", visible=visible, worker_gpus=1, rank=rank, **CUDA4) == torch.device("cuda", 0)
    # a SLURM/Kubernetes job sees its own GPU only
    one = dict(CUDA4, device_count=1)
    assert choose_device("cuda", visible="GPU-9baca7f5", worker_gpus=1, rank=3, **one) == torch.device("cuda", 0)


def test_one_process_spreads_ranks_and_an_explicit_index_wins():
    assert choose_device("auto", rank=5, **CUDA4) == torch.device("cuda", 1)
    assert choose_device("cuda:2", worker_gpus=1, visible="0,1,2,3", **CUDA4) == torch.device("cuda", 2)


def test_cpu_workers_on_a_gpu_box_stay_on_the_cpu():
    assert choose_device("auto", worker_gpus=0, visible=None, **CUDA4) == torch.device("cpu")
    assert choose_device("cpu", worker_gpus=1, visible="0", **CUDA4) == torch.device("cpu")
    assert choose_device("auto", **NO_CUDA) == torch.device("cpu")  # in-process run without CUDA


def test_declared_gpus_without_cuda_fail_in_one_line_naming_the_fix():
    with pytest.raises(ConfigError, match=r"declares GPU=1 but torch is a CPU build.*Fix: install a CUDA build") as e:
        choose_device("auto", worker_gpus=1, visible=None, **NO_CUDA)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"declares GPU=1 but torch sees no CUDA device.*Fix"):
        choose_device("auto", worker_gpus=1, visible="", **dict(NO_CUDA, cuda_build="13.0"))
    with pytest.raises(ConfigError, match=r"device 'cuda' was asked but torch is a CPU build.*Fix: set train.device"):
        choose_device("cuda", **NO_CUDA)


def test_worker_device_reads_this_process(monkeypatch):
    monkeypatch.delenv(WORKER_GPUS_ENV, raising=False)
    want = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert worker_device("auto") == want
    monkeypatch.setenv(WORKER_GPUS_ENV, "0")
    assert worker_device("auto") == torch.device("cpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv(WORKER_GPUS_ENV, "1")
        with pytest.raises(ConfigError, match="declares GPU=1"):
            worker_device("auto")
