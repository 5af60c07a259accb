"""The only module that imports ``distributed``: clusters from config, and training on Dask workers.

Training runs as tasks pinned to workers (``workers=[addr]``, no stealing): one task for a single rank, or
``train.ddp_workers`` tasks that form a torch process group. Rank 0's worker picks a free TCP port; every rank
connects to ``tcp://<rank-0 host>:<port>`` (gloo on CPU, NCCL on GPU). Each rank reads its own shard of regions
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
from urllib.parse import urlparse

import dask
import distributed

from .config import ClusterConfig, RunConfig
from .errors import ConfigError, MPMError

__all__ = ["ClusterError", "make_cluster", "cluster_has_gpus", "run_training_on_cluster"]


class ClusterError(MPMError, RuntimeError):
    """The Dask cluster cannot run what was asked of it."""


def make_cluster(cfg: ClusterConfig) -> distributed.Client | None:
    """A Dask client for ``cluster`` settings: 'local' (LocalCluster of worker processes), 'address' (an existing
    scheduler), 'none' (returns None: run in this process). Others are not implemented yet."""
    if cfg.kind == "none":
        return None
    if cfg.kind == "local":
        resources = {"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else None
        cluster = distributed.LocalCluster(
            n_workers=cfg.n_workers,
            threads_per_worker=cfg.threads_per_worker,
            processes=True,
            memory_limit=cfg.memory_limit,
            resources=resources,
            dashboard_address=":0",
        )
        return distributed.Client(cluster)
    if cfg.kind == "address":
        if not cfg.address:
            raise ConfigError("cluster.kind is 'address' but cluster.address is empty. Fix: give the scheduler "
                              "address, e.g. cluster: {kind: address, address: 'tcp://10.0.0.5:8786'}")
        return distributed.Client(cfg.address)
    raise NotImplementedError(
        f"cluster.kind {cfg.kind!r} is not implemented yet. Fix: start the cluster yourself (dask-jobqueue, "
        "Dask Gateway or dask-kubernetes) and use cluster: {kind: address, address: <scheduler address>}"
    )


def cluster_has_gpus(client: distributed.Client) -> bool:
    """True when some worker advertises a 'GPU' resource."""
    return any(w.get("resources", {}).get("GPU", 0) > 0 for w in client.scheduler_info(n_workers=-1)["workers"].values())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _rank_task(cube, cfg_json: dict, base_dir: str, out: str, rank: int, world: int, host: str | None,
               port: int | None, topic: str, log_every: int, threads: int) -> dict:
    """Runs on a Dask worker: one rank of the training (process group set up around the plain loop)."""
    import torch

    from .train import run_training

    cfg = RunConfig.from_dict(cfg_json, base_dir=base_dir)
    worker = distributed.get_worker()
    torch.set_num_threads(threads)

    def report(event: dict) -> None:
        worker.log_event(topic, {**event, "worker": worker.address})

    # Reads inside the task use local threads, never this cluster: its worker threads are busy training.
    with dask.config.set(scheduler="threads"):
        if world == 1:
            return run_training(cube, cfg, out, ranks=[0], report=report, log_every=log_every)
        return _ddp_rank(cube, cfg, out, rank, world, host, port, report, log_every)


def _ddp_rank(cube, cfg: RunConfig, out: str, rank: int, world: int, host, port, report, log_every: int) -> dict:
    import datetime

    import torch.distributed as dist

    from .train import resolve_device, run_training

    backend = "nccl" if resolve_device(cfg.train.device, rank).type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        return run_training(cube, cfg, out, ranks=[rank], ddp=True, report=report, log_every=log_every)
    finally:
        dist.destroy_process_group()


def _cube_for_workers(cube):
    """Workers read the store themselves: pass a path where the Dataset came from one."""
    if isinstance(cube, (str, Path)):
        return str(Path(cube).resolve())
    src = cube.encoding.get("source") if hasattr(cube, "encoding") else None
    return str(src) if src else cube


def run_training_on_cluster(client: distributed.Client, cube, cfg: RunConfig, out, *, progress, log_every: int = 10) -> list[dict]:
    """Train on the cluster's workers (see module doc); returns the per-rank summaries, rank order."""
    world = cfg.train.ddp_workers
    info = client.scheduler_info(n_workers=-1)["workers"]
    gpus = cluster_has_gpus(client)
    candidates = sorted(a for a, w in info.items() if not gpus or w.get("resources", {}).get("GPU", 0) >= 1)
    if len(candidates) < world:
        raise ClusterError(
            f"train.ddp_workers is {world} but the cluster has {len(candidates)} "
            f"{'GPU ' if gpus else ''}worker(s). Fix: lower train.ddp_workers or add workers (cluster.n_workers)"
        )
    chosen = candidates[:world]
    hosts = [urlparse(a).hostname for a in chosen]
    cpu_per_rank = [max(1, (os.cpu_count() or 1) // hosts.count(h)) for h in hosts]
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
            _rank_task, cube, cfg_json, str(cfg.base_dir), str(Path(out).resolve()), r, world, host, port, topic,
            log_every, cpu_per_rank[r], workers=[addr], allow_other_workers=False, pure=False,
            resources={"GPU": 1} if gpus else None, key=f"{topic}-rank{r}",
        )
        for r, addr in enumerate(chosen)
    ]
    try:
        pending = set(futures)
        while pending:  # fail fast: a rank's error surfaces while the others still wait on collectives
            done, pending = distributed.wait(pending, return_when="FIRST_COMPLETED")
            for f in done:
                if f.status == "error":
                    client.cancel(list(pending))
                    f.result()  # re-raises the worker's exception here
        results = client.gather(futures)
        time.sleep(0.2)  # let the last progress events arrive
    finally:
        client.unsubscribe_topic(topic)
    return sorted(results, key=lambda r: r["rank"])
