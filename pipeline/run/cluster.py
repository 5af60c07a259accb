"""Clusters from config, and training on Dask workers (with :mod:`pipeline.run.workers`, the only modules that
import ``distributed``).

Clusters (``cluster.kind``; optional packages are imported only when their kind is used):

- ``local``: a LocalCluster of worker processes on this machine; with ``gpus_per_worker``, dask-cuda's
  LocalCUDACluster, one worker per GPU (it fails in one line when torch has no CUDA build);
- ``address``: an existing scheduler (``tcp://host:8786``), e.g. one a DaskJob or ``dask scheduler`` started;
- ``jobqueue``: dask-jobqueue SLURM/PBS jobs, one worker process per job (per GPU);
- ``gateway``: a Dask Gateway (Pangeo JupyterHub), authenticated;
- ``kubernetes``: a dask-kubernetes operator ``DaskCluster``;
- ``none``: no cluster, run in this process.

A cluster profile (``deploy/profiles/*.yaml``) is a ``cluster`` section in its own file: ``mpm run --cluster
PROFILE`` or ``cluster: {profile: PATH}`` (keys given in the run config then override the profile's).
GPU workers are laid out one worker process per GPU, ``--nthreads 1``, resources ``GPU=1``; each worker's tasks
use that worker's own GPU (:mod:`pipeline.models.device`, :mod:`pipeline.run.workers`).

Training runs as tasks pinned to workers (``workers=[addr]``, no stealing): one task for a single rank, or
``train.ddp_workers`` tasks that form a torch process group. Rank 0's worker picks a free TCP port; every rank
connects to ``tcp://<rank-0 host>:<port>`` (gloo on CPU, NCCL on GPU; timeout: dask config ``mpm.ddp-timeout``).
Each rank's torch threads come from its own worker's CPU affinity. Each rank reads its own shard of regions
straight from the cube store; checkpoints are written by rank 0 into ``out`` (a shared filesystem across
nodes). Progress events travel back through the scheduler's event log (``Worker.log_event`` ->
``Client.subscribe_topic``) and reach the caller's ``progress`` callback on the client side.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dask
import distributed
import yaml
from pydantic import ValidationError

from pipeline.config import ClusterConfig, RunConfig, yaml_error
from pipeline.errors import ConfigError, MPMError, require
from pipeline.models.device import worker_device
from pipeline.models.train import run_training
from pipeline.run.workers import (
    WorkerGpus,
    cpu_affinity,
    ddp_timeout,
    init_rank_group,
    local_cuda_cluster,
    rank_threads,
)

__all__ = [
    "ClusterError",
    "PROFILE_DIR",
    "load_profile",
    "cluster_settings",
    "resolve_profile",
    "worker_args",
    "jobqueue_kwargs",
    "jobqueue_job_script",
    "kubernetes_cluster_spec",
    "build_cluster",
    "make_cluster",
    "cluster_has_gpus",
    "run_training_on_cluster",
]

#: Profiles of a source checkout; the Docker images set MPM_PROFILE_DIR=/opt/mpm/deploy/profiles.
PROFILE_DIR = Path(os.environ.get("MPM_PROFILE_DIR") or Path(__file__).resolve().parents[2] / "deploy" / "profiles")
SCHEMES = ("tcp://", "tls://", "ucx://", "ws://", "wss://", "inproc://")
DEFAULT_WAIT_S = 1800.0  # batch queues and node autoscalers are slow to hand out workers


class ClusterError(MPMError, RuntimeError):
    """The Dask cluster cannot run what was asked of it."""


#: Preloaded into the worker processes of a local cluster (``dask_setup`` below runs in each, restarted
#: workers included).
WORKER_PRELOAD = "pipeline.run.cluster"


def dask_setup(worker) -> None:
    """Worker preload: ignore SIGINT in local worker processes.

    Ctrl-C in a terminal reaches the whole process group: the workers would each raise KeyboardInterrupt in
    the middle of a task and print pages of tracebacks. The client process owns the shutdown: it catches
    the interrupt, closes the cluster (which stops its workers) and prints one line.
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


# -- profiles ------------------------------------------------------------------------------------


def _validate(data: dict, where: str) -> ClusterConfig:
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<top level>'}: {e['msg'].removeprefix('Value error, ')}"
            + ("" if e["type"] == "missing" else f" (got {e.get('input')!r})")
            for e in exc.errors()
        )
        raise ConfigError(f"{where}: {problems}. Fix: see the cluster section of docs/config-reference.md") from None


def _profile_path(spec: str | Path) -> Path | None:
    """An existing profile file: the path itself, or a name among ``PROFILE_DIR`` (``slurm-gpu``)."""
    p = Path(spec).expanduser()
    for cand in (p, PROFILE_DIR / p, PROFILE_DIR / f"{p}.yaml"):
        if cand.is_file():
            return cand
    return None


def load_profile(path: str | Path) -> ClusterConfig:
    """Read a cluster profile: a YAML mapping of ``cluster`` keys (optionally under a top-level ``cluster:``).

    ``path`` is a file, or the name of a profile in ``deploy/profiles/`` (``slurm-gpu``).
    """
    found = _profile_path(path)
    if found is None:
        raise ConfigError(
            f"cluster profile {str(path)!r} does not exist. Fix: pass the path of a profile YAML, or one of "
            f"{sorted(q.stem for q in PROFILE_DIR.glob('*.yaml'))} (deploy/profiles/)"
        )
    try:
        data = yaml.safe_load(found.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_error(found, exc).replace("config file", "cluster profile", 1)) from None
    if isinstance(data, dict) and set(data) == {"cluster"}:
        data = data["cluster"]
    if not isinstance(data, dict):
        raise ConfigError(
            f"cluster profile {str(found)!r} must be a mapping of cluster keys (kind, n_workers, ...), "
            f"got {type(data).__name__}. Fix: see deploy/profiles/ for examples"
        )
    if data.get("profile"):
        raise ConfigError(
            f"cluster profile {str(found)!r} names another profile ({data['profile']!r}). "
            "Fix: remove its 'profile' key; profiles do not chain"
        )
    return _validate(data, f"cluster profile {str(found)!r}")


def cluster_settings(spec: str, current: ClusterConfig | None = None) -> dict[str, Any]:
    """The ``cluster`` section that ``mpm run --cluster SPEC`` puts in place of the config's.

    ``SPEC``: 'local' or 'none' (keeping the config's worker counts and sizes), a scheduler address
    ('tcp://host:8786'), or a cluster profile (a YAML path or a name in ``deploy/profiles/``), which replaces
    the whole section.
    """
    current = current or ClusterConfig()
    spec = str(spec).strip()
    if spec in ("local", "none"):
        return {"kind": spec, "profile": None}
    if spec.startswith(SCHEMES):
        return {"kind": "address", "address": spec, "profile": None}
    if _profile_path(spec) is None:
        raise ConfigError(
            f"--cluster {spec!r} is not 'local', 'none', a scheduler address or an existing profile file. Fix: "
            "pass e.g. --cluster local, --cluster tcp://10.0.0.5:8786 or --cluster deploy/profiles/slurm-gpu.yaml"
        )
    return load_profile(spec).model_dump(mode="python")


def resolve_profile(cfg: ClusterConfig) -> ClusterConfig:
    """``cfg`` with its ``profile`` applied: the profile's keys, overridden by the keys set in ``cfg``."""
    if cfg.profile is None:
        return cfg
    base = load_profile(cfg.profile).model_dump(mode="python")
    base.update({k: getattr(cfg, k) for k in cfg.model_fields_set if k != "profile"})
    base["profile"] = None
    return _validate(base, f"cluster (with profile {str(cfg.profile)!r})")


# -- worker layout -------------------------------------------------------------------------------


def worker_args(cfg: ClusterConfig) -> list[str]:
    """``dask worker`` arguments of one worker: threads, memory, and ``--resources GPU=n`` on GPU workers.

    GPU workers: one worker process per GPU (the cluster asks one GPU per job/pod) and one thread, so that
    one training or scoring task holds the device at a time.
    """
    args = ["--nthreads", str(cfg.threads_per_worker), "--memory-limit", cfg.memory_limit]
    if cfg.gpus_per_worker:
        args += ["--resources", f"GPU={cfg.gpus_per_worker}"]
    return args


def _resources_arg(args: list[str], gpus: int) -> list[str]:
    if gpus and "--resources" not in args:
        return [*args, "--resources", f"GPU={gpus}"]
    return list(args)


_JOBQUEUE_OWN = ("system", "adapt", "wait_timeout")


def jobqueue_kwargs(cfg: ClusterConfig) -> tuple[str, dict[str, Any]]:
    """(system, keyword arguments of the dask-jobqueue cluster/job class) for a 'jobqueue' cluster.

    ``cluster.jobqueue`` holds ``system`` (slurm | pbs) and any dask-jobqueue argument (queue, account,
    walltime, job_cpu, job_extra_directives, resource_spec, job_script_prologue, python, ...). Filled in from
    the cluster keys unless given: ``processes=1`` (one worker per job), ``cores=threads_per_worker`` (the
    worker's threads; book more CPUs for data loading with ``job_cpu`` / ``resource_spec``),
    ``memory=memory_limit``, and ``--resources GPU=n`` when ``gpus_per_worker`` > 0.
    """
    opts = dict(cfg.jobqueue)
    system = str(opts.get("system", "slurm")).lower()
    if system not in ("slurm", "pbs"):
        raise ConfigError(f"cluster.jobqueue.system is {system!r}. Fix: use 'slurm' or 'pbs'")
    kw = {k: v for k, v in opts.items() if k not in _JOBQUEUE_OWN}
    kw.setdefault("processes", 1)
    kw.setdefault("cores", cfg.threads_per_worker * kw["processes"])
    kw.setdefault("memory", cfg.memory_limit)
    kw["worker_extra_args"] = _resources_arg(list(kw.get("worker_extra_args") or []), cfg.gpus_per_worker)
    if cfg.gpus_per_worker and kw["processes"] != 1:
        raise ConfigError(
            f"cluster.jobqueue.processes is {kw['processes']} with GPU workers. Fix: use processes: 1 "
            "(one worker per job, one GPU per job)"
        )
    return system, kw


def _jobqueue_classes(system: str):
    jq = require("dask_jobqueue", "cluster kind 'jobqueue'")
    return {"slurm": (jq.SLURMCluster, jq.slurm.SLURMJob), "pbs": (jq.PBSCluster, jq.pbs.PBSJob)}[system]


def jobqueue_job_script(cfg: ClusterConfig, scheduler: str = "tcp://SCHEDULER:8786") -> str:
    """The batch script one worker job would be submitted with (no scheduler started, nothing submitted)."""
    cfg = resolve_profile(cfg)
    system, kw = jobqueue_kwargs(cfg)
    _, job_cls = _jobqueue_classes(system)
    return job_cls(scheduler=scheduler, name="mpm-worker", **kw).job_script()


def _k8s_quantity(mem: str) -> str:
    """Dask memory ('60GiB', '4GB') as a Kubernetes quantity ('60Gi', '4G')."""
    m = mem.strip().replace(" ", "")
    units = {"KiB": "Ki", "MiB": "Mi", "GiB": "Gi", "TiB": "Ti", "kB": "k", "KB": "k", "MB": "M", "GB": "G", "TB": "T"}
    for dask_unit, k8s_unit in units.items():
        if m.endswith(dask_unit):
            return m[: -len(dask_unit)] + k8s_unit
    return m


def kubernetes_cluster_spec(cfg: ClusterConfig, name: str = "mpm") -> dict:
    """The ``DaskCluster`` resource (dask-kubernetes operator) of a 'kubernetes' cluster, built with
    ``dask_kubernetes.operator.make_cluster_spec``.

    ``cluster.kubernetes``: ``image`` (required), ``namespace``, ``env`` (mapping), ``scheduler_resources``,
    ``worker_cpu`` (CPUs requested per worker, default threads_per_worker), ``node_selector``,
    ``tolerations``, ``pvc`` + ``mount_path`` (a shared volume on the workers), ``scheduler_service_type`` (default ClusterIP: reach it through the dashboard proxy or
    port-forwarding, never a public LoadBalancer). Workers: ``n_workers`` replicas, each
    ``dask-worker --nthreads T --memory-limit M [--resources GPU=n]`` with ``nvidia.com/gpu: n`` limits;
    the scheduler gets no GPU.
    """
    op = require("dask_kubernetes.operator", "cluster kind 'kubernetes'")
    k = dict(cfg.kubernetes)
    if not k.get("image"):
        raise ConfigError(
            "cluster.kubernetes.image is missing. Fix: give the worker image built from "
            "deploy/Dockerfile.cuda (GPU) or deploy/Dockerfile.cpu, e.g. image: registry.example/mpm:0.1.0-cuda"
        )
    mem = _k8s_quantity(cfg.memory_limit)
    limits: dict[str, Any] = {"memory": mem}
    requests: dict[str, Any] = {"cpu": str(k.get("worker_cpu", cfg.threads_per_worker)), "memory": mem}
    if cfg.gpus_per_worker:
        limits["nvidia.com/gpu"] = str(cfg.gpus_per_worker)
    env = {"DASK_DISTRIBUTED__WORKER__DAEMON": "False", **{str(a): str(b) for a, b in (k.get("env") or {}).items()}}
    spec = op.make_cluster_spec(
        name=name,
        image=k["image"],
        n_workers=cfg.n_workers,
        resources={"limits": limits, "requests": requests},
        env=env,
        worker_command=["dask", "worker", *worker_args(cfg)],
        scheduler_service_type=k.get("scheduler_service_type", "ClusterIP"),
        idle_timeout=int(k.get("idle_timeout", 0)),
    )
    # make_cluster_spec gives the scheduler the workers' resources (it needs no GPU and less memory) and the
    # 'dask-scheduler' script, which distributed no longer installs
    sched = spec["spec"]["scheduler"]["spec"]["containers"][0]
    sched["resources"] = k.get("scheduler_resources") or {
        "limits": {"memory": "4Gi"},
        "requests": {"cpu": "1", "memory": "4Gi"},
    }
    sched["args"] = ["dask", "scheduler", *sched["args"][1:]]
    pod = spec["spec"]["worker"]["spec"]
    if k.get("pvc"):  # a shared volume for the cube, checkpoints and outputs (rank 0 writes, all ranks read)
        pod["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": k["pvc"]}}]
        pod["containers"][0]["volumeMounts"] = [{"name": "data", "mountPath": k.get("mount_path", "/data")}]
    if k.get("node_selector"):
        pod["nodeSelector"] = dict(k["node_selector"])
    if k.get("tolerations"):
        pod["tolerations"] = [dict(t) for t in k["tolerations"]]
    if k.get("namespace"):
        spec["metadata"]["namespace"] = k["namespace"]
    return spec


# -- clusters ------------------------------------------------------------------------------------


def build_cluster(cfg: ClusterConfig):
    """The cluster object of ``cfg`` (not scaled: no job or pod is asked for yet), or None for kinds
    'address' and 'none', which have no cluster object of ours."""
    cfg = resolve_profile(cfg)
    if cfg.kind in ("none", "address"):
        return None
    if cfg.kind == "local":
        if cfg.gpus_per_worker:
            return local_cuda_cluster(cfg, preload=[WORKER_PRELOAD])
        return distributed.LocalCluster(
            n_workers=cfg.n_workers,
            threads_per_worker=cfg.threads_per_worker,
            processes=True,
            memory_limit=cfg.memory_limit,
            dashboard_address="127.0.0.1:0",
            preload=[WORKER_PRELOAD],
        )
    if cfg.kind == "jobqueue":
        system, kw = jobqueue_kwargs(cfg)
        cluster_cls, _ = _jobqueue_classes(system)
        return cluster_cls(**kw)
    if cfg.kind == "gateway":
        return _gateway_cluster(cfg)
    if cfg.kind == "kubernetes":
        op = require("dask_kubernetes.operator", "cluster kind 'kubernetes'")
        spec = kubernetes_cluster_spec(cfg, name=cfg.kubernetes.get("name", "mpm"))
        try:
            return op.KubeCluster(
                custom_cluster_spec=spec, namespace=cfg.kubernetes.get("namespace"), shutdown_on_close=True
            )
        except Exception as exc:  # kubeconfig missing, operator not installed, RBAC ...
            raise ClusterError(
                f"cannot create the DaskCluster {spec['metadata']['name']!r} on Kubernetes: {exc}. Fix: check "
                "kubectl access and that the dask-kubernetes operator is installed (deploy/README.md)"
            ) from exc
    raise ConfigError(
        f"unknown cluster.kind {cfg.kind!r}. Fix: use local, address, jobqueue, gateway, kubernetes or none"
    )


def _gateway_cluster(cfg: ClusterConfig):
    """A new Dask Gateway cluster. ``cluster.gateway``: ``address`` (else dask config ``gateway.address``, as set
    on Pangeo hubs), ``proxy_address``, ``public_address``, ``auth`` (jupyterhub | kerberos | basic; else the
    dask config's), ``cluster_options`` (e.g. {worker_gpus: 1, worker_memory: 60, image: ...})."""
    dg = require("dask_gateway", "cluster kind 'gateway'")
    g = dict(cfg.gateway)
    address = g.get("address") or dask.config.get("gateway.address", None)
    if not address:
        raise ConfigError(
            "cluster.gateway.address is missing and dask config 'gateway.address' is unset. Fix: give "
            "the gateway's address, e.g. gateway: {address: 'https://hub.example.org/services/dask-gateway'}"
        )
    try:
        gateway = dg.Gateway(
            address=address,
            proxy_address=g.get("proxy_address"),
            public_address=g.get("public_address"),
            auth=g.get("auth"),
        )
        options = gateway.cluster_options()
        for key, val in (g.get("cluster_options") or {}).items():
            if key not in options:
                raise ConfigError(
                    f"cluster.gateway.cluster_options has {key!r}, which gateway {address!r} does not "
                    f"offer. Fix: use some of {sorted(options)}"
                )
            options[key] = val
        return gateway.new_cluster(options, shutdown_on_close=True)
    except MPMError:
        raise
    except Exception as exc:  # unreachable, refused, unauthenticated
        raise ClusterError(
            f"cannot start a cluster on Dask Gateway {address!r}: {type(exc).__name__}: {exc}. Fix: check "
            "the address and that you are logged in (auth: jupyterhub needs JUPYTERHUB_API_TOKEN)"
        ) from exc


def _wait(client: distributed.Client, n: int, timeout: float, what: str) -> None:
    if timeout <= 0:
        return
    try:
        client.wait_for_workers(n, timeout=timeout)
    except TimeoutError as exc:
        have = len(_workers(client))
        raise ClusterError(
            f"{what}: {have} of {n} worker(s) arrived within {timeout:.0f} s. Fix: check the queue or "
            "pods (deploy/README.md), or raise wait_timeout in the cluster profile"
        ) from exc


def make_cluster(cfg: ClusterConfig) -> distributed.Client | None:
    """A Dask client for ``cluster`` settings (see the module doc), or None for kind 'none'.

    Batch kinds (jobqueue, gateway, kubernetes) are scaled to ``n_workers`` (or adapt between
    ``adapt: {minimum, maximum}`` of their section) and waited for up to ``wait_timeout`` seconds of their
    section (default 1800; 0 = do not wait). ``client.cluster`` is the cluster object: close it after the client.
    """
    cfg = resolve_profile(cfg)
    if cfg.kind == "none":
        return None
    if cfg.kind == "address":
        if not cfg.address:
            raise ConfigError(
                "cluster.kind is 'address' but cluster.address is empty. Fix: give the scheduler "
                "address, e.g. cluster: {kind: address, address: 'tcp://10.0.0.5:8786'}"
            )
        try:
            return _with_device_env(distributed.Client(cfg.address))  # waits distributed.comm.timeouts.connect
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"cannot reach the Dask scheduler at {cfg.address!r}: {exc}. Fix: check the address "
                "and that the scheduler is running (dask scheduler / a DaskCluster)"
            ) from exc
    cluster = build_cluster(cfg)
    if cfg.kind == "local":
        return _with_device_env(distributed.Client(cluster))
    section = getattr(cfg, cfg.kind)
    adapt = section.get("adapt")
    try:
        if adapt:
            cluster.adapt(minimum=adapt.get("minimum", 0), maximum=adapt.get("maximum", cfg.n_workers))
        else:
            cluster.scale(cfg.n_workers)
        client = cluster.get_client() if hasattr(cluster, "get_client") else distributed.Client(cluster)
        want = adapt.get("minimum", 0) if adapt else cfg.n_workers
        _wait(client, max(want, 1), float(section.get("wait_timeout", DEFAULT_WAIT_S)), f"cluster kind {cfg.kind!r}")
    except BaseException:
        cluster.close()
        raise
    return _with_device_env(client)


def _with_device_env(client: distributed.Client) -> distributed.Client:
    """Every worker, present and future, learns its GPU count (the device choice reads it)."""
    client.register_plugin(WorkerGpus(), name=WorkerGpus.name)
    return client


def _workers(client: distributed.Client) -> dict:
    """The scheduler's workers now, asked of the scheduler itself: ``client.scheduler_info()`` returns a
    cached identity that the client's periodic refresh overwrites with a copy listing no worker, so that a
    worker may seem to be missing from it."""
    return client.sync(client.scheduler.identity, n_workers=-1)["workers"]


def cluster_has_gpus(client: distributed.Client) -> bool:
    """True when some worker advertises a 'GPU' resource."""
    return any(w.get("resources", {}).get("GPU", 0) > 0 for w in _workers(client).values())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _rank_task(
    cube,
    cfg_json: dict,
    base_dir: str,
    out: str,
    rank: int,
    world: int,
    host: str | None,
    port: int | None,
    topic: str,
    log_every: int,
    threads: int,
    timeout_s: float,
) -> dict:
    """Runs on a Dask worker: one rank of the training (process group set up around the plain loop)."""
    import torch

    cfg = RunConfig.from_dict(cfg_json, base_dir=base_dir)
    worker = distributed.get_worker()
    torch.set_num_threads(threads)

    def report(event: dict) -> None:
        worker.log_event(topic, {**event, "worker": worker.address})

    # Reads inside the task use local threads, never this cluster: its worker threads are busy training.
    with dask.config.set(scheduler="threads"):
        if world == 1:
            return run_training(cube, cfg, out, ranks=[0], report=report, log_every=log_every)
        return _ddp_rank(cube, cfg, out, rank, world, host, port, report, log_every, timeout_s)


def _ddp_rank(cube, cfg: RunConfig, out: str, rank, world, host, port, report, log_every, timeout_s) -> dict:
    import torch.distributed as dist

    init_rank_group(worker_device(cfg.train.device, rank), host, port, rank, world, timeout_s)
    try:
        return run_training(cube, cfg, out, ranks=[rank], ddp=True, report=report, log_every=log_every)
    except RuntimeError as exc:
        text = str(exc)
        if not (
            isinstance(exc, getattr(dist, "DistBackendError", ()))
            or "gloo" in text
            or "NCCL" in text
            or "Connection reset" in text
            or "Connection closed" in text
        ):
            raise
        # A peer rank is gone (its process died): say so in the result rather than as a task error, which
        # the worker would log as a page of traceback. The client side turns it into one ClusterError line.
        return {"rank": rank, "transport_error": f"{type(exc).__name__}: {text.splitlines()[0][:300]}"}
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # a broken group: nothing left to tear down
            pass


def _cube_for_workers(cube):
    """Workers read the store themselves: pass a path where the Dataset came from one."""
    if isinstance(cube, (str, Path)):
        return str(Path(cube).resolve())
    src = cube.encoding.get("source") if hasattr(cube, "encoding") else None
    return str(src) if src else cube


WATCH_S = 1.0  # how often training on a cluster checks that its workers are alive
LOST_GRACE_S = 10.0  # a worker missing from the scheduler this long is lost
LOST_SETTLE_S = 10.0  # how long the surviving ranks get to stop after a rank was lost


def _raise_if_lost(client, chosen: list[str], futures, world: int, out: Path, wait: float) -> None:
    deadline = time.monotonic() + wait
    while True:
        alive = set(_workers(client))
        lost = [(r, a) for r, a in enumerate(chosen) if a not in alive]
        if lost:
            _raise_lost(client, futures, lost, world, out)
        if time.monotonic() >= deadline:
            return
        time.sleep(0.5)


def _raise_lost(client, futures, lost: list[tuple[int, str]], world: int, out: Path) -> None:
    """The surviving ranks stop at their next collective: wait for that (10 s at most), so that the
    checkpoint named in the message is the one a rerun resumes from; then cancel everything and raise."""
    gone = {r for r, _ in lost}
    others = [f for r, f in enumerate(futures) if r not in gone]
    if others:
        try:
            distributed.wait(others, timeout=LOST_SETTLE_S)
        except TimeoutError:
            pass
    client.cancel(futures)
    raise ClusterError(_lost_rank_message(lost, world, out))


def _lost_rank_message(lost: list[tuple[int, str]], world: int, out: Path) -> str:
    ranks = ", ".join(f"rank {r} ({a})" for r, a in lost)
    ckpt = out / "checkpoint.pt"
    where = "no checkpoint was written yet, so a rerun starts the training afresh"
    if ckpt.is_file():
        try:
            import torch

            blob = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
            where = (
                f"the last checkpoint, step {int(blob['step'])} of "
                f"{int(blob.get('extra', {}).get('total_steps', 0)) or '?'}, is kept in {ckpt} and a rerun "
                "resumes from it"
            )
        except Exception:  # unreadable: load_checkpoint will say so on the rerun
            where = f"a rerun resumes from the last checkpoint in {ckpt}"
    return (
        f"training lost the Dask worker of {ranks} of {world} (the worker process died: killed, out of memory, "
        f"or its node was lost); {where}. Fix: rerun the same command (check the workers' memory limit if it "
        "happens again)"
    )


def run_training_on_cluster(
    client: distributed.Client, cube, cfg: RunConfig, out, *, progress, log_every: int = 10
) -> list[dict]:
    """Train on the cluster's workers (see module doc); returns the per-rank summaries, rank order."""
    world = cfg.train.ddp_workers
    info = _workers(client)
    gpus = cluster_has_gpus(client)
    candidates = sorted(a for a, w in info.items() if not gpus or w.get("resources", {}).get("GPU", 0) >= 1)
    if len(candidates) < world:
        raise ClusterError(
            f"train.ddp_workers is {world} but the cluster has {len(candidates)} "
            f"{'GPU ' if gpus else ''}worker(s). Fix: lower train.ddp_workers or add workers (cluster.n_workers)"
        )
    chosen = candidates[:world]
    hosts = [urlparse(a).hostname for a in chosen]
    affinity = client.run(cpu_affinity, workers=chosen)  # run on each worker: its own CPUs
    cpu_per_rank = rank_threads(hosts, [affinity[a] for a in chosen])
    timeout_s = ddp_timeout()
    host = port = None
    if world > 1:
        host = hosts[0]
        port = client.submit(_free_port, workers=[chosen[0]], allow_other_workers=False, pure=False).result()
    topic = f"mpm-train-{uuid.uuid4().hex[:8]}"

    def handler(event) -> None:
        _, msg = event
        progress(msg)

    client.subscribe_topic(topic, handler)
    cfg_json = cfg.model_dump(mode="json", exclude={"base_dir"})
    cube = _cube_for_workers(cube)
    futures = [
        client.submit(
            _rank_task,
            cube,
            cfg_json,
            str(cfg.base_dir),
            str(Path(out).resolve()),
            r,
            world,
            host,
            port,
            topic,
            log_every,
            cpu_per_rank[r],
            timeout_s,
            workers=[addr],
            allow_other_workers=False,
            pure=False,
            resources={"GPU": 1} if gpus else None,
            key=f"{topic}-rank{r}",
        )
        for r, addr in enumerate(chosen)
    ]
    missing_since: dict[str, float] = {}
    try:
        pending = set(futures)
        while pending:  # fail fast: a rank's error surfaces while the others still wait on collectives
            try:
                done, pending = distributed.wait(pending, timeout=WATCH_S, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            # A rank whose worker died never finishes (its task is pinned to that worker), and the other ranks
            # block in collectives or fail with a transport error: stop, and say so, at once.
            alive = set(_workers(client))
            now = time.monotonic()
            for a in chosen:
                if a in alive:
                    missing_since.pop(a, None)
                else:
                    missing_since.setdefault(a, now)
            failed = [f for f in done if f.status == "error"]
            # gone for LOST_GRACE_S (a worker the scheduler dropped for a moment comes back under its address),
            # or gone while another rank fails (its collectives broke because of it)
            lost = [
                (r, a)
                for r, a in enumerate(chosen)
                if a in missing_since and (failed or now - missing_since[a] >= LOST_GRACE_S)
            ]
            if lost:
                _raise_lost(client, futures, lost, world, Path(out))
            for f in done:
                res = f.result() if f.status == "finished" else None
                if isinstance(res, dict) and "transport_error" in res:
                    _raise_if_lost(client, chosen, futures, world, Path(out), wait=5.0)
                    client.cancel(futures)
                    raise ClusterError(
                        f"training rank {res['rank']} of {world} lost its connection to the other ranks "
                        f"({res['transport_error']}). Fix: rerun the same command; it resumes from the last "
                        f"checkpoint ({Path(out) / 'checkpoint.pt'})"
                    )
            for f in failed:
                if not isinstance(f.exception(), MPMError):
                    # a transport error in a collective: give the scheduler a moment to notice a dead peer
                    _raise_if_lost(client, chosen, futures, world, Path(out), wait=5.0)
                client.cancel(list(pending))
                f.result()  # re-raises the worker's exception here
        results = client.gather(futures)
        time.sleep(0.2)  # let the last progress events arrive
    finally:
        client.unsubscribe_topic(topic)
    return sorted(results, key=lambda r: r["rank"])
