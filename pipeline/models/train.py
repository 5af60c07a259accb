"""Training loop: in-process, as one task on a Dask worker, or DDP across Dask workers (see cluster.py).

The loop itself (:func:`run_training`) knows nothing of Dask. Determinism, so that a resumed run equals an
uninterrupted one and DDP equals single-process training on the same global batches:

- weights are initialised from ``torch.manual_seed(train.seed)`` (same on every rank);
- batch ``step`` of ``epoch`` is a pure function of ``(seed, epoch, step, rank)`` (see :mod:`pipeline.models.patches`);
- each rank's token masks come from a generator seeded with ``(seed, epoch, step, rank)``, not the global RNG;
- the learning rate is a function of the global step (linear warm-up, cosine decay to 10 %).

``train.ddp_workers = W`` fixes the data order: W shards of regions, W local batches of ``batch_size / W``
windows per step. Without a Dask client, the W shards are simulated in one process (the global batch is the
concatenation of the W local batches), which is exactly what DDP averages.

Files in ``out``: ``checkpoint.pt`` (training state, every ``checkpoint_every`` steps and at the end),
``model.pt`` (final weights, the input of scoring), ``train_summary.json`` (per-rank weight digests, losses).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from pipeline.config import RunConfig
from pipeline.data.cube import open_cube
from pipeline.errors import CheckpointError, ConfigError
from pipeline.io import atomic_write_json, clear_stale
from pipeline.models import autocast_context, build_model, group_indices, group_masked_mse, sample_hide
from pipeline.models.checkpoint import load_checkpoint, save_checkpoint
from pipeline.models.device import worker_device
from pipeline.models.patches import WindowFeed
from pipeline.models.regime import (
    augment,
    block_windows,
    calibrate_modes,
    holdout_mask,
    split_cube,
    validation_batches,
    validation_error,
)

log = logging.getLogger(__name__)

__all__ = ["train", "train_from_config", "run_training", "lr_at", "weights_digest", "resolve_device"]

# Train settings a resumed run must share with its checkpoint (others, e.g. checkpoint_every, may change).
_RESUME_KEYS = (
    "epochs",
    "steps_per_epoch",
    "batch_size",
    "lr",
    "weight_decay",
    "seed",
    "min_valid_fraction",
    "train_stride",
    "ddp_workers",
)


MIN_IMPROVEMENT = 1e-3  # a held-out loss must fall by 0.1 % to count as better (early stopping, best weights)

# runs training elsewhere (a Dask cluster): (cube, cfg, out, progress=, log_every=) -> one result dict per rank
Launcher = Callable[..., list]


def resolve_device(name: str = "auto", rank: int = 0) -> torch.device:
    """The training device of this process: its own GPU on a GPU worker (rules: :mod:`pipeline.models.device`)."""
    return worker_device(name, rank)


def lr_at(step: int, total: int, base_lr: float) -> float:
    """Linear warm-up over min(100, 5 % of the steps), then cosine decay to 10 % of ``base_lr``."""
    warm = max(1, min(100, total // 20))
    if step < warm:
        return base_lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the parameters (key order): equal digests = bit-identical weights."""
    module = getattr(model, "module", model)
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _mask_generator(seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    s = np.random.SeedSequence([seed, epoch, step, rank, 104729]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(s))


def _log_progress(event: dict) -> None:
    log.info(
        "step %d/%d epoch %d loss %.4f %.0f windows/s",
        event["step"],
        event["total_steps"],
        event["epoch"],
        event["loss"],
        event["windows_per_s"],
    )


def _fitting_batch(ds: xr.Dataset, mc, tc, world: int, ranks: list[int]) -> int:
    """The local batch: ``batch_size / world``, shrunk (with a warning) when a rank has fewer windows."""
    want = tc.batch_size // world
    probe = WindowFeed(
        ds,
        window=mc.window,
        stride=tc.train_stride,
        batch_size=1,
        min_valid_fraction=tc.min_valid_fraction,
        seed=tc.seed,
        rank=0,
        world_size=world,
    )
    have = min(probe.windows_per_rank)
    if have >= want:
        return want
    if have < 1:
        raise ConfigError(
            f"no training window of {mc.window} px with >= {tc.min_valid_fraction:.0%} valid pixels on a rank "
            f"({probe.windows_per_rank} per rank). Fix: lower model.window, train.min_valid_fraction or "
            "train.holdout_fraction, or use fewer ddp_workers"
        )
    shrunk = 1 << (have.bit_length() - 1)
    log.warning("train.batch_size %d is more than the %d training windows per rank: using %d", want, have, shrunk)
    return shrunk


def _validation_windows(ds: xr.Dataset, mc, tc, device) -> list:
    """Windows wholly inside the held-out blocks (none without held-out blocks, or in a small study area)."""
    block = tc.holdout_block or 2 * mc.window
    if tc.holdout_fraction <= 0 or block < mc.window:
        return []
    hold = holdout_mask(tuple(ds["valid"].shape), block, tc.holdout_fraction, tc.seed)
    return block_windows(ds, hold, block, mc.window, tc.min_valid_fraction, tc.validation_windows, device, tc.seed)


def _calibration_windows(ds: xr.Dataset, mc, tc, device) -> list:
    """Without held-out blocks: training windows (the calibration then sees pixels the model trained on)."""
    kw = dict(window=mc.window, stride=max(1, mc.window // 2), min_valid_fraction=tc.min_valid_fraction, seed=tc.seed)
    try:
        n = WindowFeed(ds, batch_size=1, **kw).n_windows
        feed = WindowFeed(ds, batch_size=min(64, n), **kw)
    except ConfigError:
        return []
    return validation_batches(feed, tc.validation_windows, device)


def _resumed_extra(ckpt_path: Path) -> dict:
    """The ``extra`` record of the checkpoint a run resumes from ({} when there is none)."""
    if not ckpt_path.exists():
        return {}
    try:
        return load_checkpoint(ckpt_path, map_location="cpu")[1].get("extra", {}) or {}
    except CheckpointError:
        return {}


def run_training(
    cube: xr.Dataset | str | Path,
    cfg: RunConfig,
    out: str | Path,
    *,
    ranks: list[int] | None = None,
    ddp: bool = False,
    report: Callable[[dict], None] | None = None,
    log_every: int = 10,
) -> dict:
    """The training loop for the given ``ranks`` of ``cfg.train.ddp_workers`` (default: all, simulated).

    With ``ddp=True`` the torch process group is already initialised and ``ranks == [dist.get_rank()]``.
    ``report(event)`` receives dicts with step, total_steps, epoch, loss, windows_per_s, lr (rank 0 only).
    Returns a summary dict (rank, digest of the final weights, steps, loss history).
    """
    tc, mc = cfg.train, cfg.model
    world = tc.ddp_workers
    ranks = list(range(world)) if ranks is None else list(ranks)
    if tc.batch_size % world:
        raise ConfigError(
            f"train.batch_size {tc.batch_size} is not divisible by train.ddp_workers {world}. "
            f"Fix: use a batch_size that is a multiple of {world}"
        )
    out = Path(out)
    ds = open_cube(cube) if isinstance(cube, (str, Path)) else cube
    lead = ranks[0] == 0
    device = resolve_device(tc.device, ranks[0])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    block = tc.holdout_block or 2 * mc.window
    train_ds, val_ds = split_cube(ds, block, tc.holdout_fraction, tc.seed)
    local_batch = _fitting_batch(train_ds, mc, tc, world, ranks)
    feeds = [
        WindowFeed(
            train_ds,
            window=mc.window,
            stride=tc.train_stride,
            batch_size=local_batch,
            min_valid_fraction=tc.min_valid_fraction,
            seed=tc.seed,
            rank=r,
            world_size=world,
            device=device,
            random_offsets=tc.augment,  # windows at a new seeded offset each epoch, not one fixed grid
        )
        for r in ranks
    ]
    spe = feeds[0].steps_per_epoch
    if tc.steps_per_epoch:
        spe = min(spe, tc.steps_per_epoch)
    total = tc.epochs * spe
    # every rank holds the same validation windows, so early stopping decides alike on all ranks
    val_batches = _validation_windows(ds, mc, tc, device) if val_ds is not None else []

    bands = [str(b) for b in ds["band"].values.tolist()]
    sources = [str(s) for s in ds["source"].values.tolist()]
    groups = group_indices(sources)
    torch.manual_seed(tc.seed)
    model = build_model(mc, groups).to(device)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=tc.lr,
        weight_decay=tc.weight_decay,
        betas=(0.9, 0.95),
        **({"fused": True} if device.type == "cuda" else {}),
    )
    ckpt_path = out / "checkpoint.pt"
    config = cfg.model_dump(mode="json", exclude={"base_dir"})
    start, history = _resume(ckpt_path, model, opt, config, bands)
    base = model  # the bare model (DDP wraps it below): helpers and the saved weights use it
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = torch.compile(model) if tc.compile else model
    meta = dict(
        model_cfg=mc,
        bands=bands,
        sources=sources,
        center=ds["center"].values.tolist(),
        scale=ds["scale"].values.tolist(),
        groups=groups,
        config=config,
    )

    def save(path: Path, step: int, final: bool, calibration: dict | None = None) -> None:
        save_checkpoint(
            path,
            base,
            **meta,
            optimizer=None if final else opt,
            step=step,
            epoch=step // spe,
            extra={
                "total_steps": total,
                "history": history,
                "validation": val_history,
                "complete": step >= total,
                "calibration": calibration,
                "best": best,
            },
        )

    # a resumed run continues the validation record; its best weights restart from the resumed ones
    extra = _resumed_extra(ckpt_path) if start else {}  # one read of the checkpoint, not one per key
    val_history = list(extra.get("validation") or [])
    best = dict(extra.get("best") or {})
    best_state = {k: v.detach().clone() for k, v in base.state_dict().items()} if best else None
    done = start
    model.train()
    iters, cur_epoch = None, -1
    stopped = False
    t0, n0 = time.perf_counter(), start
    loss_sum, loss_n = torch.zeros((), device=device), 0
    n_tokens = (mc.window // mc.patch) ** 2
    for gstep in range(start, total):
        epoch, step = divmod(gstep, spe)
        if epoch != cur_epoch:
            iters = [f.batches(epoch, start=step, stop=spe) for f in feeds]
            cur_epoch = epoch
        batch = [next(it) for it in iters]
        xs, vs, hides = [], [], []
        for r, b in zip(ranks, batch):
            gen = _mask_generator(tc.seed, epoch, step, r)
            xb, vb = augment(b[0], b[1], gen, flips=tc.augment, nodata_fraction=tc.nodata_augment)
            xs.append(xb)
            vs.append(vb)
            hides.append(sample_hide(len(xb), base.n_units, n_tokens, mc.mask_ratio, mc.cross_ratio, generator=gen))
        x = torch.cat(xs).to(device, non_blocking=True)
        valid = torch.cat(vs).to(device, non_blocking=True)
        hide = torch.cat(hides).to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(gstep, total, tc.lr)
        with autocast_context(device):
            recon = step_model(x, valid=valid, hide=hide)
        hidden = base.hidden_channels(hide) if (mc.mask_ratio > 0 or mc.cross_ratio > 0) else None
        loss = group_masked_mse(recon, x, valid, hidden, base.group_matrix)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach()
        loss_n += 1

        done = gstep + 1
        if done % log_every == 0 or done == total:
            mean = loss_sum / loss_n
            if ddp:
                import torch.distributed as dist

                dist.all_reduce(mean)  # SUM: gloo has no AVG
                mean = mean / dist.get_world_size()
            elapsed = time.perf_counter() - t0
            event = {
                "step": done,
                "total_steps": total,
                "epoch": epoch,
                "loss": float(mean),
                "windows_per_s": (done - n0) * tc.batch_size / max(elapsed, 1e-9),
                "lr": opt.param_groups[0]["lr"],
                "validation_loss": val_history[-1][1] if val_history else None,
            }
            history.append([done, event["loss"]])
            loss_sum.zero_()
            loss_n = 0
            t0, n0 = time.perf_counter(), done
            if lead and report is not None:
                report(event)
        if (done % spe == 0 or done == total) and val_batches:  # end of an epoch: validation, early stopping
            err = validation_error(base, val_batches)
            val_history.append([done, err])
            if not best or err < best["loss"] * (1 - MIN_IMPROVEMENT):
                best = {"loss": err, "step": done}
                best_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
            elif tc.patience and (done - best["step"]) >= tc.patience * spe:
                stopped = True
        if lead and (done % tc.checkpoint_every == 0 or done == total or stopped):
            save(ckpt_path, done, final=False)
        if stopped:
            break
    if best_state is not None:
        base.load_state_dict(best_state)
    if lead:
        cal_batches = val_batches or _calibration_windows(train_ds, mc, tc, device)
        save(out / "model.pt", total, final=True, calibration=calibrate_modes(base, cal_batches, seed=tc.seed))
    return {
        "rank": ranks[0],
        "ranks": ranks,
        "digest": weights_digest(base),
        "steps": total,
        "stopped_early_at": done if stopped else None,
        "validation": val_history,
        "best": best,
        "resumed_from": start,
        "history": history,
        "device": str(device),
    }


def _resume(ckpt_path: Path, model, opt, config: dict, bands: list[str]) -> tuple[int, list]:
    """Load ``checkpoint.pt`` when present; returns (global step to start from, loss history)."""
    if not ckpt_path.exists():
        return 0, []
    try:
        old, meta = load_checkpoint(ckpt_path, expect_bands=bands)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. (Resuming from {ckpt_path}; delete it to start afresh)") from None
    prev = meta.get("config") or {}
    diffs = [f"model.{k}" for k in config["model"] if prev.get("model", {}).get(k) != config["model"][k]]
    diffs += [f"train.{k}" for k in _RESUME_KEYS if prev.get("train", {}).get(k) != config["train"][k]]
    if diffs:
        raise CheckpointError(
            f"{ckpt_path} was written by a run with different {', '.join(diffs)}; it cannot be resumed. "
            "Fix: use another output folder, or delete that checkpoint to start afresh"
        )
    model.load_state_dict(old.state_dict())
    if meta["optimizer"] is not None:
        opt.load_state_dict(meta["optimizer"])
    log.info("resuming from %s at step %d", ckpt_path, meta["step"])
    return int(meta["step"]), list(meta["extra"].get("history", []))


def train(
    cube: xr.Dataset | str | Path,
    cfg: RunConfig,
    out: str | Path,
    launcher: Launcher | None = None,
    progress: Callable[[dict], None] | None = None,
    *,
    log_every: int = 10,
) -> Path:
    """Train the fusion-conv ViT autoencoder on ``cube``; returns the path of ``out/model.pt``.

    ``launcher=None``: in this process. Otherwise ``launcher(cube, cfg, out, progress=..., log_every=...)``
    runs the training elsewhere and returns one result per rank (the run layer passes one that runs on a
    Dask cluster: one task pinned to a worker, or ``train.ddp_workers`` tasks running torch DDP).
    ``progress(event)`` is called on this side every ``log_every`` steps (default: a log line).
    An interrupted run resumes from ``out/checkpoint.pt``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("checkpoint.pt", "model.pt", "train_summary.json"):  # left by a killed writer
        clear_stale(out / name)
    progress = progress or _log_progress
    if launcher is None:
        results = [run_training(cube, cfg, out, report=progress, log_every=log_every)]
    else:
        results = launcher(cube, cfg, out, progress=progress, log_every=log_every)
    summary = {
        "ranks": [{k: r[k] for k in ("rank", "ranks", "digest", "device")} for r in results],
        "steps": results[0]["steps"],
        "resumed_from": results[0]["resumed_from"],
        "history": results[0]["history"],
        "validation": results[0].get("validation", []),
        "best": results[0].get("best", {}),
        "stopped_early_at": results[0].get("stopped_early_at"),
        "ddp_workers": cfg.train.ddp_workers,
        "dask": launcher is not None,
    }
    atomic_write_json(out / "train_summary.json", summary, indent=1)
    return out / "model.pt"


def train_from_config(
    config_path: str | Path,
    cube_path: str | Path,
    out_dir: str | Path,
    launcher: Launcher | None = None,
    progress: Callable[[dict], None] | None = None,
) -> Path:
    """``mpm train`` entry: read the run config, train on the cube store, write ``out_dir/model.pt``."""
    cfg = RunConfig.from_yaml(config_path)
    return train(Path(cube_path), cfg, Path(out_dir), launcher=launcher, progress=progress)
