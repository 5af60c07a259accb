"""Sliding-window scoring: reconstruction error of every pixel = its anomaly (prospectivity) score.

Two layers, as DESIGN.md asks:

- :func:`score_block` is a numpy kernel (no Dask): it reconstructs every window of a block at the
  stride, blends the overlapping reconstructions with a smooth weight, and returns per-band squared
  errors, per-group anomalies and the prospectivity, NaN at invalid pixels.
- :func:`score_cube` wraps it with ``dask.array.map_overlap`` into a lazy Dataset on the cube's grid.
  Nothing is computed until a sink writes it (:func:`score_to_disk`, :mod:`pipeline.scoring.sinks`).

Window positions (the edge formula). Along an axis of ``n`` pixels, window ``w`` and stride ``s``
(``s <= w``), windows start at::

    starts(n) = {0, s, 2s, ..., floor((n - w) / s) * s}  U  {n - w}          (n >= w)
    starts(n) = {0}, the axis padded to w, padded pixels invalid             (n <  w)

so the last window touches the edge and every pixel is covered by at least one window. Positions are
taken on the *global* grid, not per block: a block scores exactly the global windows that lie inside
it, and with a halo of ``w - 1`` pixels every window touching a block's core lies inside the
overlapped block. The result therefore does not depend on the chunking (no seams).

Blending: pixel ``(i, j)`` of a window gets weight ``h(i) h(j)`` with ``h`` a Hann window raised to a
floor (``h = f + (1 - f) hann``, ``f = 0.1``), so window centres dominate but edge pixels of the
image (covered only by window edges) still get a finite, well-defined value. The blended
reconstruction is ``sum_k w_k recon_k / sum_k w_k`` over the windows covering the pixel.

Hidden prediction (:mod:`pipeline.models.residuals`): each window runs K complementary partitions of its
tokens, and in ``cross`` mode one pass per (partition, source): every band at every pixel is predicted with
its source hidden there, from the other sources in place and from the context, so co-enrichment across
sources that the context does not explain enters the score; ``spatial`` hides every source of a token
(context only); ``both`` (the default) averages the two. A group's anomaly is its bands' mean squared
residual; the groups are weighted equally. With ``score.standardise: mahalanobis`` the residuals are first
standardised per band and combined per group by a Mahalanobis distance, with the label-free calibration the
training fitted on held-out blocks (it lost to the plain residual on the synthetic province: robust scales
of near-exact bands such as lithology indicators collapse and amplify noise). Several token-grid phases
(``score.shifts``) are averaged.
"""

from __future__ import annotations

import contextlib
import os
import threading
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from pipeline.config import RunConfig, ScoreConfig
from pipeline.data.cube import normalised, open_cube
from pipeline.data.pathfinders import resolve_target
from pipeline.errors import CheckpointError, ConfigError, MPMError
from pipeline.models import autocast_context, group_indices
from pipeline.models.checkpoint import load_checkpoint
from pipeline.models.device import worker_device
from pipeline.models.residuals import Calibration, predict_hidden, score_partitions, scoring_modes
from pipeline.scoring.sinks import write_cog, write_zarr_resumable
from pipeline.stages import output_complete

__all__ = [
    "window_starts",
    "blend_weight",
    "score_block",
    "score_cube",
    "score_ensemble",
    "score_to_disk",
    "load_model_cached",
]

WEIGHT_FLOOR = 0.1


# -- numpy kernel ----------------------------------------------------------------------------------


def window_starts(n: int, window: int, stride: int) -> np.ndarray:
    """Start offsets of the windows along an axis of ``n`` pixels (formula in the module docstring)."""
    if stride < 1 or stride > window:
        raise ConfigError(
            f"score stride {stride} must be between 1 and the window size {window}, or pixels between "
            f"windows get no score. Fix: set score.stride to e.g. {max(1, window // 2)}"
        )
    if n <= window:
        return np.zeros(1, dtype=np.int64)
    starts = np.arange(0, n - window + 1, stride, dtype=np.int64)
    if starts[-1] != n - window:
        starts = np.append(starts, n - window)
    return starts


def blend_weight(window: int, floor: float = WEIGHT_FLOOR) -> np.ndarray:
    """1-D blending weight [window]: a symmetric Hann window lifted to ``floor`` (> 0 everywhere)."""
    i = np.arange(window, dtype=np.float64)
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * (i + 0.5) / window)
    return (floor + (1.0 - floor) * hann).astype(np.float32)


def _device(device) -> Any:
    """A forced device, else this worker's own (its GPU on a GPU worker; rules in pipeline.models.device)."""
    return worker_device("auto" if device is None else str(device))


def score_block(
    array: np.ndarray,
    valid: np.ndarray,
    model,
    *,
    stride: int,
    groups: dict[str, list[int]],
    batch_size: int = 512,
    device=None,
    combine: dict[str, float] | None = None,
    origin: tuple[int, int] = (0, 0),
    full_shape: tuple[int, int] | None = None,
    calibration: Calibration | dict | None = None,
    mode: str = "both",
    partitions: int = 4,
    shifts: int = 2,
    min_valid_fraction: float = 0.0,
    pathfinders: list[int] | None = None,
) -> dict[str, np.ndarray]:
    """Dense sliding-window residuals of one block, standardised and combined (numpy in, numpy out).

    ``array`` [C, H, W] float32 is normalised evidence (invalid pixels 0), ``valid`` [H, W] bool.
    ``model`` is a :class:`pipeline.models.vit.FusionViTAE`; every (band, pixel) is predicted with its source
    hidden (``mode``: ``spatial``, ``cross`` or ``both``, their mean; ``partitions``:
    :func:`pipeline.models.residuals.predict_hidden`; a model trained
    without masking is scored by plain reconstruction). ``groups`` maps group name -> channel indices.

    ``shifts``: token-grid phases averaged; phase ``s`` moves every window by ``s * patch // shifts`` pixels
    and draws its own partitions, so no pixel's score depends on one partition or on its place in a token.
    ``min_valid_fraction``: the training rule for windows; a pixel's prediction blends only the windows that
    meet it, and falls back to all windows covering the pixel where none does (every valid pixel is scored).

    ``origin`` (global row, col of the block's first pixel) and ``full_shape`` (the global H, W) place
    the windows on the global grid so that a tiled computation equals a whole-array one; the defaults
    treat the block as the whole array. Blocks (arrays) smaller than the window are padded by
    reflection, padded pixels invalid.

    Returns float32 arrays, NaN at invalid pixels: ``contribution`` [C, H, W] the squared standardised
    residual per band; ``anomaly_<group>`` [H, W] the group's squared Mahalanobis distance over its median
    (:class:`pipeline.models.residuals.Calibration`; identity when None); ``prospectivity`` [H, W] the mean of
    the groups' anomalies (equal weights), or ``sum_g c_g anomaly_g / sum_g c_g`` with ``combine``; with
    ``pathfinders`` (band indices of a ``target:``), ``target`` [H, W]: the pathfinders' enrichment, the mean of
    their positive standardised residuals (:func:`pipeline.scoring.enrichment.enrichment_score`'s rule).
    """

    array = np.asarray(array, dtype=np.float32)
    valid = np.asarray(valid, dtype=bool)
    if array.ndim != 3 or valid.shape != array.shape[1:]:
        raise ValueError(f"score_block needs array [C, H, W] and valid [H, W], got {array.shape} and {valid.shape}")
    c, h, w_ = array.shape
    win = int(model.window)
    if int(getattr(model, "in_channels", c)) != c:
        raise CheckpointError(
            f"the model expects {model.in_channels} bands but the block has {c}. "
            "Fix: score the cube the checkpoint was trained on (same bands, same order)"
        )
    weights = _combine_weights(groups, combine)
    full_h, full_w = full_shape if full_shape is not None else (h, w_)
    hp, wp = max(h, win), max(w_, win)
    if (hp, wp) != (h, w_):  # only when the whole axis is shorter than a window
        pad = ((0, 0), (0, hp - h), (0, wp - w_))
        array = np.pad(array, pad, mode="reflect" if min(h, w_) > 1 else "symmetric")
        valid = np.pad(valid, pad[1:], mode="constant", constant_values=False)

    out = {f"anomaly_{g}": np.full((h, w_), np.nan, np.float32) for g in groups}
    contribution = np.full((c, h, w_), np.nan, np.float32)
    result = {"contribution": contribution, **out, "prospectivity": np.full((h, w_), np.nan, np.float32)}
    if pathfinders:
        result["target"] = np.full((h, w_), np.nan, np.float32)
    if not valid.any():
        return result

    dev = _device(device)
    model = model.to(dev).eval()
    modes = scoring_modes(model, mode)
    v = valid[:h, :w_]
    per_mode = []
    for m in modes:
        blended = _blended_prediction(
            model,
            array,
            valid,
            m,
            dev,
            stride=stride,
            partitions=partitions,
            shifts=shifts,
            batch_size=batch_size,
            origin=origin,
            full_shape=(full_h, full_w),
            min_valid_fraction=min_valid_fraction,
        )[:, :h, :w_]
        cal = _calibration_for(calibration, m, groups)
        z = cal.standardise((blended - array[:, :h, :w_])[:, v])  # [C, P]
        per_mode.append((z, cal.group_distances(z)))
    # averaged over the modes (spatial: what the context does not explain; cross: what the other sources
    # in place do not explain)
    contribution[:, v] = np.mean([z**2 for z, _ in per_mode], axis=0)
    for g in groups:
        out[f"anomaly_{g}"][v] = np.mean([d[g] for _, d in per_mode], axis=0)
    if weights is None:
        weights = {g: 1.0 for g in groups}
    total = sum(weights.values())
    acc = np.zeros(int(v.sum()), np.float64)
    for g, cw in weights.items():
        acc += cw * out[f"anomaly_{g}"][v]
    result["prospectivity"][v] = (acc / total).astype(np.float32)
    if pathfinders:  # observed minus predicted: positive = enriched beyond what context and other sources say
        signed = -np.mean([z for z, _ in per_mode], axis=0)[list(pathfinders)]
        result["target"][v] = np.maximum(signed, 0.0).mean(axis=0)
    return result


def _calibration_for(calibration, mode, groups) -> Calibration:
    if calibration is None:
        return Calibration.identity(groups)
    if isinstance(calibration, Calibration):
        return calibration
    return Calibration.for_mode(calibration, mode, groups)


def _blended_prediction(
    model, array, valid, mode, dev, *, stride, partitions, shifts, batch_size, origin, full_shape, min_valid_fraction
) -> np.ndarray:
    """[C, hp, wp] hidden predictions of every window of the (padded) block, blended (module docstring)."""
    import torch

    c, hp, wp = array.shape
    win = int(model.window)
    oy, ox = origin
    full_h, full_w = full_shape
    n_shifts = max(1, int(shifts)) if mode is not None else 1
    sat = np.pad(valid.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    need = max(1, int(np.ceil(min_valid_fraction * win * win - 1e-9)))
    h1 = blend_weight(win)
    autocast = autocast_context(dev)  # bf16 on CUDA, no-op on CPU; the model's head is fp32 regardless
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(array)).to(dev)
        vt = torch.from_numpy(np.ascontiguousarray(valid)).to(dev)
        x_flat, v_flat = x.reshape(c, hp * wp), vt.reshape(hp * wp)
        # canvases: [0] windows meeting the valid rule, [1] all windows (the fallback)
        canvas = torch.zeros(2, c, hp * wp, dtype=torch.float32, device=dev)
        wsum = torch.zeros(2, hp * wp, dtype=torch.float32, device=dev)
        wt = torch.from_numpy(np.outer(h1, h1).reshape(-1)).to(dev)
        ar = torch.arange(win, device=dev)
        offs = (ar[:, None] * wp + ar[None, :]).reshape(-1)  # [w*w]
        for s in range(n_shifts):
            shift = s * model.patch // n_shifts
            ys, xs = _starts(full_h, win, stride, shift) - oy, _starts(full_w, win, stride, shift) - ox
            ys = ys[(ys >= 0) & (ys + win <= hp)]
            xs = xs[(xs >= 0) & (xs + win <= wp)]
            if ys.size == 0 or xs.size == 0:
                continue
            yy, xx = np.meshgrid(ys, xs, indexing="ij")
            counts = sat[yy + win, xx + win] - sat[yy, xx + win] - sat[yy + win, xx] + sat[yy, xx]
            keep = counts > 0  # windows without a valid pixel only touch pixels that are NaN anyway (exact)
            good_all = torch.from_numpy(counts[keep] >= need).to(dev)
            base_all = torch.from_numpy(yy[keep] * wp + xx[keep]).to(dev)
            parts = score_partitions(model.n_tokens, partitions, seed=s)
            for b0 in range(0, base_all.numel(), batch_size):
                base, good = base_all[b0 : b0 + batch_size], good_all[b0 : b0 + batch_size]
                n = base.numel()
                idx = (base[:, None] + offs[None, :]).reshape(-1)  # [N*w*w] flat pixel index
                xw = x_flat[:, idx].reshape(c, n, win, win).transpose(0, 1).contiguous()  # [N, C, w, w]
                vw = v_flat[idx].reshape(n, win, win)
                with autocast:
                    pred = predict_hidden(model, xw, vw, parts, mode=mode, seed=s).float()
                tiers = torch.stack([good.float(), torch.ones(n, dtype=torch.float32, device=dev)])  # [2, N]
                wgt = (wt[None, None, :] * tiers[:, :, None]).reshape(2, -1)  # [2, N*w*w]
                contrib = pred.transpose(0, 1).reshape(c, -1)  # [C, N*w*w]
                for tier in (0, 1):
                    canvas[tier].index_add_(1, idx, contrib * wgt[tier][None])
                    wsum[tier].index_add_(0, idx, wgt[tier])
        use_good = wsum[0] > 0
        blended = torch.where(
            use_good[None], canvas[0] / wsum[0].clamp_min(1e-12), canvas[1] / wsum[1].clamp_min(1e-12)
        )
        return blended.reshape(c, hp, wp).cpu().numpy()


def _starts(n: int, window: int, stride: int, shift: int) -> np.ndarray:
    """Window starts of phase ``shift``: the global starts moved by ``shift`` (those that still fit)."""
    starts = window_starts(max(n, window), window, stride)
    if shift:
        starts = starts + shift
        starts = starts[starts + window <= max(n, window)]
    return starts


def _combine_weights(groups: dict[str, list[int]], combine: dict[str, float] | None) -> dict[str, float] | None:
    if combine is None:
        return None
    unknown = [g for g in combine if g not in groups]
    if unknown:
        raise ConfigError(
            f"score.combine names unknown source group(s) {unknown}; the cube's groups are {list(groups)}. "
            "Fix: use those group names as keys"
        )
    if any(v < 0 for v in combine.values()) or sum(combine.values()) <= 0:
        raise ConfigError(
            f"score.combine weights {combine} must be >= 0 with a positive sum. Fix: e.g. "
            + "{"
            + ", ".join(f"{g}: 1.0" for g in groups)
            + "}"
        )
    return {g: float(v) for g, v in combine.items() if v > 0}


# -- per-worker model cache ------------------------------------------------------------------------

_MODEL_CACHE: dict[tuple, tuple[Any, dict]] = {}
_CACHE_LOCK = threading.Lock()


def load_model_cached(checkpoint: str | Path, *, device=None, expect_bands=None) -> tuple[Any, dict]:
    """Load a checkpoint once per process (key: path, mtime, size, device); returns (model, meta).

    Dask tasks carry only the path string; each worker process loads the weights on first use.
    A rewritten checkpoint (new mtime) is reloaded.
    """

    path = Path(checkpoint)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist. Fix: train a model first (`mpm train`) or pass its path"
        ) from None
    dev = _device(device)
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size, str(dev))
    with _CACHE_LOCK:
        hit = _MODEL_CACHE.get(key)
        if hit is None:
            model, meta = load_checkpoint(path, map_location="cpu", expect_bands=expect_bands)
            model = model.to(dev).eval()
            for stale in [k for k in _MODEL_CACHE if k[0] == key[0]]:
                del _MODEL_CACHE[stale]
            hit = _MODEL_CACHE[key] = (model, meta)
    return hit


# -- dask wrapper ----------------------------------------------------------------------------------


def _score_chunk(
    block: np.ndarray,
    *,
    block_info=None,
    checkpoint: str,
    stride: int,
    batch_size: int,
    groups: dict[str, list[int]],
    combine: dict[str, float] | None,
    chunks_y: tuple[int, ...],
    chunks_x: tuple[int, ...],
    depth: tuple[int, int],
    device: str | None,
    mode: str = "cross",
    partitions: int = 4,
    shifts: int = 1,
    pathfinders: list[int] | None = None,
    standardise: str = "none",
) -> np.ndarray:
    """map_overlap task: [C+1, h+halo, w+halo] (normalised bands + valid) -> [C+G+1(+1), h, w] core."""
    iy, ix = block_info[0]["chunk-location"][1:]
    top = depth[0] if iy > 0 else 0
    left = depth[1] if ix > 0 else 0
    origin = (sum(chunks_y[:iy]) - top, sum(chunks_x[:ix]) - left)
    model, meta = load_model_cached(checkpoint, device=device)
    res = score_block(
        block[:-1],
        block[-1] > 0.5,
        model,
        stride=stride,
        groups=groups,
        batch_size=batch_size,
        device=device,
        combine=combine,
        origin=origin,
        full_shape=(sum(chunks_y), sum(chunks_x)),
        calibration=(meta.get("extra") or {}).get("calibration") if standardise == "mahalanobis" else None,
        mode=mode,
        partitions=partitions,
        shifts=shifts,
        min_valid_fraction=_min_valid(meta),
        pathfinders=pathfinders,
    )
    core = (slice(top, top + chunks_y[iy]), slice(left, left + chunks_x[ix]))
    layers = [res["contribution"]] + [res[f"anomaly_{g}"][None] for g in groups] + [res["prospectivity"][None]]
    if pathfinders:
        layers.append(res["target"][None])
    return np.concatenate(layers, axis=0)[(slice(None), *core)]


def _min_valid(meta: dict) -> float:
    """The training rule for windows (``train.min_valid_fraction``) recorded in the checkpoint."""
    try:
        return float(meta["config"]["train"]["min_valid_fraction"])
    except (KeyError, TypeError):
        return 0.0


def score_cube(
    cube: xr.Dataset,
    checkpoint: str | Path,
    cfg: ScoreConfig,
    *,
    model_cfg_window: int | None = None,
    gpu: bool = False,
    device: str | None = None,
    target: tuple[str, list[str]] | None = None,
) -> xr.Dataset:
    """Lazy prospectivity Dataset of a cube, on the cube's grid and CRS.

    ``cube`` is an opened cube (:func:`pipeline.data.cube.open_cube`) and ``checkpoint`` a model saved by
    :func:`pipeline.models.checkpoint.save_checkpoint` for the same bands. The evidence is normalised with the
    checkpoint's statistics. Returns (all dask-backed, nothing computed)::

        prospectivity      (y, x)        float32   NaN outside ``valid``
        anomaly_<group>    (y, x)        float32   one per source group
        contribution       (band, y, x)  float32   squared reconstruction error per band
        valid              (y, x)        uint8     the cube's mask

    Chunks follow the cube's (y, x) chunks (raised to at least the halo, ``window - 1``).
    ``model_cfg_window``: the window the run config expects; a checkpoint with another window raises
    CheckpointError. ``gpu=True`` annotates the scoring tasks with Dask resources ``{'GPU': 1}`` (the
    cluster's workers must declare that resource); ``device`` forces a torch device on the workers.
    """
    import dask
    import dask.array as da
    from dask.array.overlap import ensure_minimum_chunksize

    ckpt = str(Path(checkpoint).resolve())
    bands = [str(b) for b in cube["band"].values.tolist()]
    # The client loads the checkpoint once (cached) for its metadata; tasks reload by path on workers.
    model, meta = load_model_cached(ckpt, device="cpu", expect_bands=bands)
    if list(meta.get("bands", bands)) != bands:
        raise CheckpointError(
            f"checkpoint {ckpt!r} was trained on bands {list(meta['bands'])}, the cube has {bands}. "
            "Fix: score the cube the model was trained on, or retrain"
        )
    win = int(model.window)
    if model_cfg_window is not None and int(model_cfg_window) != win:
        raise CheckpointError(
            f"checkpoint {ckpt!r} has window {win} but the config says model.window={model_cfg_window}. "
            "Fix: set model.window to the checkpoint's window or retrain"
        )
    window_starts(win, win, cfg.stride)  # validates the stride

    if meta.get("groups"):
        groups = {str(g): [int(i) for i in idx] for g, idx in meta["groups"].items()}
    else:
        groups = group_indices([str(s) for s in cube["source"].values.tolist()])
    _combine_weights(groups, cfg.combine)

    stats = {}
    for key in ("center", "scale"):
        if meta.get(key) is not None:
            stats[key] = ("band", np.asarray(meta[key], dtype="float64"))
    z = normalised(cube.assign_coords(stats) if stats else cube)
    valid = cube["valid"]
    stacked = da.concatenate([z.data, valid.data.astype("float32")[None]], axis=0)
    c = len(bands)
    stacked = stacked.rechunk({0: c + 1})

    halo = win - 1
    depth = []
    new_chunks = []
    for axis in (1, 2):
        chunks = stacked.chunks[axis]
        if len(chunks) == 1:  # a single chunk needs no halo (and may be shorter than a window)
            depth.append(0)
            new_chunks.append(chunks)
        else:
            depth.append(halo)
            new_chunks.append(ensure_minimum_chunksize(halo, chunks))
    stacked = stacked.rechunk((c + 1, *new_chunks))
    pathfinders = [bands.index(b) for b in target[1]] if target else None
    n_out = c + len(groups) + 1 + (1 if pathfinders else 0)
    fn = partial(
        _score_chunk,
        checkpoint=ckpt,
        stride=cfg.stride,
        batch_size=cfg.batch_size,
        groups=groups,
        combine=cfg.combine,
        chunks_y=tuple(stacked.chunks[1]),
        chunks_x=tuple(stacked.chunks[2]),
        depth=(depth[0], depth[1]),
        mode=cfg.mode,
        partitions=cfg.partitions,
        shifts=cfg.shifts,
        device=device,
        pathfinders=pathfinders,
        standardise=cfg.standardise,
    )
    ctx = dask.annotate(resources={"GPU": 1}) if gpu else contextlib.nullcontext()
    with ctx:
        scored = da.map_overlap(
            fn,
            stacked,
            depth={0: 0, 1: depth[0], 2: depth[1]},
            boundary="none",
            trim=False,
            chunks=((n_out,), *stacked.chunks[1:]),
            dtype=np.float32,
            meta=np.empty((0, 0, 0), np.float32),
        )

    dims2 = ("y", "x")
    data_vars = {"prospectivity": (dims2, scored[c + len(groups)])}
    if pathfinders:
        data_vars[f"prospectivity_{target[0]}"] = (dims2, scored[c + len(groups) + 1])
    for i, g in enumerate(groups):
        data_vars[f"anomaly_{g}"] = (dims2, scored[c + i])
    data_vars["contribution"] = (("band", "y", "x"), scored[:c])
    data_vars["valid"] = (dims2, valid.data.rechunk(stacked.chunks[1:]))
    coords = {"y": cube["y"], "x": cube["x"], "band": cube["band"]}
    for k in ("source",):
        if k in cube.coords:
            coords[k] = cube[k]
    ds = xr.Dataset(
        data_vars,
        coords=coords,
        attrs={
            "mpm_product": "prospectivity",
            "checkpoint": ckpt,
            "window": win,
            "stride": cfg.stride,
            "combine": str(cfg.combine) if cfg.combine else "source groups weighted equally",
            "score": "residuals of hidden predictions (overlapping windows blended, Hann floor 0.1); per group: "
            + (
                "squared Mahalanobis distance / its median on held-out windows"
                if cfg.standardise == "mahalanobis"
                else "mean squared residual of its bands"
            ),
            "mode": ",".join(str(m) for m in scoring_modes(model, cfg.mode)),
            "partitions": cfg.partitions,
            "shifts": cfg.shifts,
        },
    )
    ds["prospectivity"].attrs = {"long_name": "prospectivity (mean of the source groups' anomalies)", "units": "1"}
    for g in groups:
        ds[f"anomaly_{g}"].attrs = {"long_name": f"{g} residual anomaly (1 = typical)", "units": "1"}
    ds = ds.rio.write_crs(cube.rio.crs)
    for v in ds.data_vars:
        ds[v] = ds[v].rio.write_grid_mapping("spatial_ref")
    return ds


# -- CLI entry -------------------------------------------------------------------------------------


def score_ensemble(cube: xr.Dataset, checkpoints: list[str | Path], cfg: ScoreConfig, **kwargs) -> xr.Dataset:
    """Lazy scores of a seed ensemble: every variable is the mean over the models of :func:`score_cube`, and
    ``uncertainty`` (y, x) is the standard deviation of their prospectivity maps (sample std, NaN for one
    model). Each model's scores are calibrated to a median of 1, so their mean is on the same scale."""
    runs = [score_cube(cube, c, cfg, **kwargs) for c in checkpoints]
    if len(runs) == 1:
        ds = runs[0]
        ds["uncertainty"] = xr.full_like(ds["prospectivity"], np.nan)
    else:
        stacked = xr.concat([r.drop_vars("valid") for r in runs], dim="seed", coords="minimal", compat="override")
        ds = stacked.mean("seed", keep_attrs=True)
        ds["uncertainty"] = stacked["prospectivity"].std("seed", ddof=1)
        ds["valid"] = runs[0]["valid"]
        ds.attrs = {**runs[0].attrs, "checkpoint": [str(c) for c in checkpoints], "ensemble": len(runs)}
    ds["uncertainty"].attrs = {"long_name": "standard deviation of prospectivity over the seed ensemble", "units": "1"}
    ds = ds.rio.write_crs(cube.rio.crs)
    for v in ds.data_vars:
        ds[v] = ds[v].rio.write_grid_mapping("spatial_ref")
    return ds


def score_to_disk(
    cube_path: str | Path,
    checkpoint_path: str | Path | list,
    cfg: RunConfig,
    out_dir: str | Path,
    client=None,
    *,
    regions_per_batch: int = 32,
) -> dict[str, Path]:
    """Score a cube on disk and write ``prospectivity.zarr`` (resumable) and ``prospectivity.tif`` (COG).

    ``checkpoint_path``: one model, or a list (a seed ensemble: :func:`score_ensemble`).
    ``client`` (a distributed Client) runs the computation when given; otherwise the default scheduler.
    A rerun after an interruption resumes the Zarr write. Returns
    ``{'prospectivity_zarr': Path, 'prospectivity_tif': Path}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cube = open_cube(cube_path)
    gpu = cfg.cluster.gpus_per_worker > 0
    ckpts = [Path(c) for c in (checkpoint_path if isinstance(checkpoint_path, (list, tuple)) else [checkpoint_path])]
    target = None
    if cfg.target is not None:  # the commodity's pathfinders: knowledge, never deposit locations
        target = (cfg.target.commodity, resolve_target(cfg.target, [str(b) for b in cube["band"].values.tolist()]))
    scores = score_ensemble(cube, ckpts, cfg.score, model_cfg_window=cfg.model.window, gpu=gpu, target=target)
    stamps = "|".join(f"{c.resolve()}|{os.stat(c).st_mtime_ns}|{os.stat(c).st_size}" for c in ckpts)
    token = f"{Path(cube_path).resolve()}|{stamps}|{cfg.score.model_dump_json()}"
    zpath = write_zarr_resumable(
        scores, out_dir / "prospectivity.zarr", fingerprint=token, scheduler=client, regions_per_batch=regions_per_batch
    )
    written = xr.open_zarr(zpath, decode_coords="all", consolidated=False)
    tif = write_cog(written["prospectivity"], out_dir / "prospectivity.tif", scheduler=client)
    return {"prospectivity_zarr": zpath, "prospectivity_tif": tif}


def open_scores(path: Path):
    """The prospectivity Dataset written by the score stage (lazy, with its CRS)."""
    import warnings

    if not output_complete(Path(path)):
        raise MPMError(
            f"{str(path)!r} is missing or incomplete (its score stage was interrupted or has not run). "
            "Fix: rerun the same `mpm run` command; it resumes the score stage"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return xr.open_zarr(path, decode_coords="all", consolidated=False)
