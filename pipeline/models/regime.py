"""The training regime around the loop: held-out blocks, augmentation, validation loss and calibration.

- Held-out blocks (:func:`holdout_mask`): the grid is cut into square blocks (two windows a side by
  default) and a seeded fraction of them is held out. Training windows see held-out pixels as nodata; the
  validation windows lie inside held-out blocks. Deposits play no part in it.
- Augmentation (:func:`augment`): a random flip and rot90 of each batch, and a random nodata rectangle in a
  fraction of the windows, so the model learns what missing data looks like (edges stop lighting up).
- Validation (:func:`validation_error`): the scoring protocol itself (:func:`pipeline.models.residuals.
  predict_hidden`) on the held-out windows: the error of every band predicted with its source hidden, each
  source group weighted equally. It does not depend on the training mask ratio, so it compares models
  trained with different windows, mask ratios and objectives (``mpm tune``).
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from pipeline.data.cube import normalised
from pipeline.models.residuals import (
    Calibration,
    fit_calibration,
    predict_hidden,
    score_partitions,
    scoring_mode,
    scoring_modes,
)

__all__ = [
    "holdout_mask",
    "split_cube",
    "augment",
    "block_windows",
    "validation_error",
    "calibrate",
    "calibrate_modes",
    "VALIDATION_PARTITIONS",
]

VALIDATION_PARTITIONS = 4


def holdout_mask(shape: tuple[int, int], block: int, fraction: float, seed: int) -> np.ndarray:
    """[H, W] bool: True in held-out blocks (``fraction`` of the ``block``-sided blocks, seeded)."""
    h, w = shape
    by, bx = -(-h // block), -(-w // block)
    n = by * bx
    k = int(round(fraction * n))
    if fraction <= 0 or n < 4 or k < 1:
        return np.zeros(shape, bool)
    chosen = np.zeros(n, bool)
    chosen[np.random.default_rng([int(seed), 31337]).choice(n, k, replace=False)] = True
    grid = chosen.reshape(by, bx)
    return np.repeat(np.repeat(grid, block, 0), block, 1)[:h, :w]


def split_cube(ds: xr.Dataset, block: int, fraction: float, seed: int) -> tuple[xr.Dataset, xr.Dataset | None]:
    """(training cube, validation cube or None): the same cube with ``valid`` restricted to the kept and
    the held-out blocks. Evidence is untouched (invalid pixels are zeroed by normalisation). The held-out
    mask is ``holdout_mask(shape, block, fraction, seed)``."""
    valid = np.asarray(ds["valid"].values, bool)
    hold = holdout_mask(valid.shape, block, fraction, seed)
    if not (hold & valid).any():
        return ds, None
    dims = ds["valid"].dims
    train = ds.assign(valid=(dims, (valid & ~hold).astype(ds["valid"].dtype)))
    val = ds.assign(valid=(dims, (valid & hold).astype(ds["valid"].dtype)))
    return train, val


def block_windows(
    ds: xr.Dataset,
    mask: np.ndarray,
    block: int,
    window: int,
    min_valid_fraction: float,
    max_windows: int,
    device,
    seed: int = 0,
) -> list[tuple[Tensor, Tensor]]:
    """Windows lying wholly inside the blocks of ``mask`` (held-out blocks), at a stride of half a window.

    Every pixel a validation window shows was held out of training, and the window is not cut by the block's
    edge, so its residuals are those of ordinary pixels the model never saw. Batches of up to 64, on
    ``device``; at most ``max_windows`` (blocks in a seeded order).
    """
    valid = np.asarray(ds["valid"].values, bool)
    h, w = valid.shape
    z = normalised(ds)
    need = max(1, int(np.ceil(min_valid_fraction * window * window - 1e-9)))
    starts = []
    rows, cols = np.nonzero(mask[::block, ::block])
    for k in np.random.default_rng([int(seed), 4241]).permutation(len(rows)):
        r0, c0 = int(rows[k]) * block, int(cols[k]) * block
        r1, c1 = min(r0 + block, h), min(c0 + block, w)
        for r in range(r0, r1 - window + 1, max(1, window // 2)):
            for c in range(c0, c1 - window + 1, max(1, window // 2)):
                if valid[r : r + window, c : c + window].sum() >= need:
                    starts.append((r, c))
        if len(starts) >= max_windows:
            break
    starts = starts[:max_windows]
    out = []
    for b in range(0, len(starts), 64):
        chunk = starts[b : b + 64]
        xs = [np.asarray(z[:, r : r + window, c : c + window].values, np.float32) for r, c in chunk]
        vs = [valid[r : r + window, c : c + window] for r, c in chunk]
        out.append((torch.from_numpy(np.stack(xs)).to(device), torch.from_numpy(np.stack(vs)).to(device)))
    return out


def augment(x: Tensor, valid: Tensor, generator: torch.Generator, *, flips: bool, nodata_fraction: float):
    """A random dihedral transform of the batch (``flips``) and a random nodata rectangle in about
    ``nodata_fraction`` of the windows. x [B, C, w, w], valid [B, w, w] -> the same shapes (new tensors)."""
    if flips:
        k = int(torch.randint(4, (1,), generator=generator))
        flip = bool(torch.randint(2, (1,), generator=generator))
        x, valid = torch.rot90(x, k, dims=(-2, -1)), torch.rot90(valid, k, dims=(-2, -1))
        if flip:
            x, valid = torch.flip(x, dims=(-1,)), torch.flip(valid, dims=(-1,))
    if nodata_fraction > 0:
        b, w = valid.shape[0], valid.shape[-1]
        hit = torch.rand(b, generator=generator) < nodata_fraction
        size = torch.randint(w // 4, w // 2 + 1, (b, 2), generator=generator)
        start = (torch.rand(b, 2, generator=generator) * (w - size + 1)).long()
        ar = torch.arange(w)
        rows = (ar[None] >= start[:, :1]) & (ar[None] < (start[:, :1] + size[:, :1]))
        cols = (ar[None] >= start[:, 1:]) & (ar[None] < (start[:, 1:] + size[:, 1:]))
        hole = (rows[:, :, None] & cols[:, None, :]) & hit[:, None, None]
        valid = valid & ~hole.to(valid.device)
    return x.contiguous(), valid.contiguous()


def _windows(feed, max_windows: int, device) -> list[tuple[Tensor, Tensor]]:
    out, n = [], 0
    for x, v in feed.batches(0):
        out.append((x.to(device), v.to(device)))
        n += len(x)
        if n >= max_windows:
            break
    return out


def validation_batches(feed, max_windows: int, device) -> list[tuple[Tensor, Tensor]]:
    """Up to ``max_windows`` fixed windows of a (validation) feed, on ``device`` (epoch 0 order, seeded)."""
    return _windows(feed, max_windows, device)


@torch.no_grad()
def validation_error(model, batches, mode: str = "cross") -> float:
    """Mean squared error of the hidden predictions over valid pixels, source groups weighted equally.

    ``mode`` is the requested scoring mode; a model trained without (cross-source) masking is validated
    the way it is scored (:func:`pipeline.models.residuals.scoring_mode`)."""
    if not batches:
        return float("nan")
    was = model.training
    model.eval()
    parts = score_partitions(model.n_tokens, VALIDATION_PARTITIONS, seed=0)
    num = torch.zeros(len(model.groups), dtype=torch.float64)
    den = torch.zeros(len(model.groups), dtype=torch.float64)
    gm = model.group_matrix.double().cpu()
    for x, v in batches:
        pred = predict_hidden(model, x, v, parts, mode=scoring_mode(model, mode))
        w = v[:, None].to(torch.float32)
        err = ((pred - x.float()) ** 2 * w).sum(dim=(0, 2, 3)).double().cpu()
        cnt = w.expand_as(x).sum(dim=(0, 2, 3)).double().cpu()
        num += err @ gm
        den += cnt @ gm
    model.train(was)
    ok = den > 0
    return float((num[ok] / den[ok]).mean()) if ok.any() else float("nan")


def calibrate_modes(model, batches, seed: int = 0) -> dict:
    """``{mode: calibration record}`` for every way the model can be scored (see ``scoring_modes``)."""
    return {str(m): calibrate(model, batches, mode=m, seed=seed).to_meta() for m in scoring_modes(model, "both")}


@torch.no_grad()
def calibrate(model, batches, mode: str | None = "cross", seed: int = 0) -> Calibration:
    """Fit the residual calibration of one scoring mode on held-out windows (valid pixels only)."""
    was = model.training
    model.eval()
    parts = score_partitions(model.n_tokens, VALIDATION_PARTITIONS, seed=seed)
    res = []
    for x, v in batches:
        pred = predict_hidden(model, x, v, parts, mode=mode, seed=seed)
        r = (pred - x.float()).permute(0, 2, 3, 1)[v]  # [P, C]
        res.append(r.cpu().numpy())
    model.train(was)
    if not res:
        return Calibration.identity(model.groups)
    return fit_calibration(np.concatenate(res), model.groups, seed=seed)
