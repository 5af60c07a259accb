"""Evaluation of a prospectivity (anomaly-score) map against known deposits.

Known deposits are used here only: never for training, normalisation or baselines.

Inputs keep their georeferencing: a score map is an ``xr.DataArray`` (y, x) with a rioxarray CRS and
NaN outside the valid area (any monotone score: higher = more prospective); deposits are a
GeoDataFrame of points in any CRS (reprojected to the map's CRS here). A deposit counts in the cell
that contains it; several deposits in one cell count once ("deposit cells").

Metrics (all invariant to strictly increasing transforms of the score, except the reported
thresholds themselves):

- ROC AUC of deposit cells against every other valid cell, and against random negatives drawn
  beyond a buffer around every deposit (repeated, mean and std);
- success-rate (capture-efficiency) curve: fraction of deposit cells captured vs fraction of the
  valid area, taken in decreasing score order; its area (0.5 = random, 1 = perfect);
- prediction-area (P-A) curves vs threshold and their intersection, where prediction rate P equals
  1 - occupied area A; normalised density = P / A there (Yousefi & Carranza 2015);
- a random-placement test of the mean deposit-cell percentile (Monte Carlo p-value);
- the point-sample protocol of the OpenGADBench benchmark (samples, not cells).
"""

from __future__ import annotations

import logging
import math
import warnings
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from pipeline.config import EvaluateConfig, ModelConfig, RunConfig
from pipeline.data.points import read_points
from pipeline.evaluation.deposits import (
    DepositCells,
    DepositsError,
    EvaluationError,
    apply_affine,
    deposit_cells,
    deposit_xy,
    load_deposits,
    map_values,
    rows_cols,
)
from pipeline.evaluation.paired import block_bootstrap_auc_diff, delong_maps, point_paired, rigid_placements
from pipeline.io import atomic_write_json

log = logging.getLogger(__name__)

__all__ = [
    "DepositsError",
    "EvaluationError",
    "DepositCells",
    "PredictionArea",
    "load_deposits",
    "deposit_cells",
    "roc_curve",
    "roc_auc_all",
    "roc_auc_buffered",
    "success_rate_curve",
    "prediction_area",
    "random_placement_test",
    "point_protocol_auc",
    "sample_map_at_points",
    "default_buffer",
    "evaluate_map",
    "write_metrics",
    "evaluate_scores",
    "paired_scores",
]


# ------------------------------------------------------------------------------------------------
# deposits
# ------------------------------------------------------------------------------------------------


class _Split(NamedTuple):
    pos: np.ndarray  # [P] scores of deposit cells
    neg: np.ndarray  # [N] scores of the other valid cells
    valid: np.ndarray  # [H, W] bool
    dep: np.ndarray  # [H, W] bool, deposit cells
    cells: DepositCells
    values: np.ndarray  # [H, W] float64
    xy: np.ndarray  # [D, 2] deposits in the map's CRS


# evaluate_map computes the split once and shares it between the metrics (keyed by object ids).
_SPLIT_CACHE: ContextVar[dict | None] = ContextVar("_SPLIT_CACHE", default=None)


def _split(score: xr.DataArray, deposits) -> _Split:
    cache = _SPLIT_CACHE.get()
    key = (id(score), id(deposits))
    if cache is not None and key in cache:
        return cache[key]
    values = map_values(score)
    cells = deposit_cells(score, deposits)
    valid = np.isfinite(values)
    dep = np.zeros_like(valid)
    dep[cells.rows, cells.cols] = True
    pos = values[dep]
    neg = values[valid & ~dep]
    if neg.size == 0:
        raise EvaluationError("every valid cell holds a deposit: there are no negatives to compare against")
    out = _Split(pos, neg, valid, dep, cells, values, deposit_xy(score, deposits, warn=False))
    if cache is not None:
        cache[key] = out
    return out


def _sorted_valid(sp: _Split) -> np.ndarray:
    """Sorted scores of every valid cell [N + P] (shared by the curve metrics in evaluate_map)."""
    cache = _SPLIT_CACHE.get()
    key = ("sorted", id(sp.values))
    if cache is not None and key in cache:
        return cache[key]
    out = np.sort(sp.values[sp.valid])
    if cache is not None:
        cache[key] = out
    return out


# ------------------------------------------------------------------------------------------------
# ROC
# ------------------------------------------------------------------------------------------------


def roc_curve(score: xr.DataArray, deposits) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC of deposit cells vs every other valid cell: ``(fpr, tpr, auc)``."""
    from sklearn.metrics import roc_auc_score
    from sklearn.metrics import roc_curve as _roc

    pos, neg, *_ = _split(score, deposits)
    y = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    s = np.r_[pos, neg]
    fpr, tpr, _ = _roc(y, s)
    return fpr, tpr, float(roc_auc_score(y, s))


def roc_auc_all(score: xr.DataArray, deposits) -> float:
    """ROC AUC of deposit cells against all other valid cells (ties count one half)."""
    from sklearn.metrics import roc_auc_score

    pos, neg, *_ = _split(score, deposits)
    return float(roc_auc_score(np.r_[np.ones(pos.size), np.zeros(neg.size)], np.r_[pos, neg]))


def _distance_to_deposits(score: xr.DataArray, xy: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Distance (CRS units) from each valid cell centre to the nearest deposit point, [M] over valid cells."""
    from scipy.spatial import cKDTree

    rows, cols = np.nonzero(valid)
    cx, cy = apply_affine(score.rio.transform(recalc=True), cols + 0.5, rows + 0.5)
    finite = np.isfinite(xy).all(axis=1)
    d, _ = cKDTree(xy[finite]).query(np.column_stack([cx, cy]), k=1, workers=-1)
    return d


def roc_auc_buffered(
    score: xr.DataArray,
    deposits,
    buffer: float,
    repeats: int = 20,
    seed: int = 42,
    ratio: float = 1.0,
) -> tuple[float, float]:
    """ROC AUC of deposit cells vs random valid cells farther than ``buffer`` from every deposit.

    ``buffer`` is in CRS units (centre of the cell to the deposit point, so every deposit counts,
    also those on invalid cells). Each repeat draws ``round(ratio * P)`` negatives without
    replacement (all eligible cells when fewer); returns ``(mean, std)`` over ``repeats``.
    """
    from sklearn.metrics import roc_auc_score

    pos, _, valid, dep, _, values, xy = _split(score, deposits)
    dist = _distance_to_deposits(score, xy, valid)
    pool = values[valid][(dist > buffer) & ~dep[valid]]
    if pool.size == 0:
        raise EvaluationError(
            f"no valid cell lies farther than buffer={buffer:g} (CRS units) from every deposit. "
            "Fix: reduce 'evaluate.buffer'"
        )
    k = min(pool.size, max(1, int(round(ratio * pos.size))))
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(pos.size), np.zeros(k)]
    aucs = [roc_auc_score(y, np.r_[pos, rng.choice(pool, size=k, replace=False)]) for _ in range(repeats)]
    return float(np.mean(aucs)), float(np.std(aucs))


# ------------------------------------------------------------------------------------------------
# success rate and prediction-area
# ------------------------------------------------------------------------------------------------


def success_rate_curve(score: xr.DataArray, deposits) -> tuple[np.ndarray, np.ndarray, float]:
    """Success-rate (capture-efficiency) curve: ``(area_fraction, deposit_fraction, area_under)``.

    Valid cells are taken in decreasing score order; ``area_fraction`` is the share of the valid area
    with score >= t and ``deposit_fraction`` the share of deposit cells captured, at every distinct
    deposit-cell score t (cells tied with a deposit cell enter together: a diagonal step), from (0, 0)
    to (1, 1). The area under it equals P(random valid cell scores below a deposit cell) + half the
    ties: 0.5 for a random map, ``1 - P / (2 N)`` for deposits on the top ``P`` of ``N`` cells.
    """
    sp = _split(score, deposits)
    pos, allv = sp.pos, _sorted_valid(sp)
    n = allv.size
    thr = np.unique(pos)[::-1]  # decreasing
    pos_sorted = np.sort(pos)
    # just above each threshold (strictly greater) and at it (greater or equal)
    a_gt = (n - np.searchsorted(allv, thr, side="right")) / n
    a_ge = (n - np.searchsorted(allv, thr, side="left")) / n
    d_gt = (pos.size - np.searchsorted(pos_sorted, thr, side="right")) / pos.size
    d_ge = (pos.size - np.searchsorted(pos_sorted, thr, side="left")) / pos.size
    area = np.r_[0.0, np.column_stack([a_gt, a_ge]).ravel(), 1.0]
    dep = np.r_[0.0, np.column_stack([d_gt, d_ge]).ravel(), 1.0]
    return area, dep, float(np.trapezoid(dep, area))


@dataclass(frozen=True)
class PredictionArea:
    """Prediction-area curves vs score threshold and their intersection.

    ``thresholds`` increase; ``prediction_rate`` = share of deposit cells with score >= t;
    ``occupied_area`` = share of the valid area with score >= t. At the intersection P = 1 - A.
    """

    thresholds: np.ndarray
    prediction_rate: np.ndarray
    occupied_area: np.ndarray
    threshold: float
    rate: float
    area: float
    normalised_density: float
    percentiles: np.ndarray = field(repr=False, default=None)

    def intersection(self) -> dict:
        return {
            "threshold": self.threshold,
            "prediction_rate": self.rate,
            "occupied_area": self.area,
            "normalised_density": self.normalised_density,
        }


def prediction_area(score: xr.DataArray, deposits, n_thresholds: int = 1001) -> PredictionArea:
    """P-A analysis: curves at ``n_thresholds`` score quantiles (plus every deposit-cell score).

    Thresholds are actual score values (no interpolation between scores), so the rates do not
    change under a monotone transform of the score. The intersection is linearly interpolated
    between the two thresholds where ``P + A - 1`` changes sign. Normalised density = P / A there
    (> 1: the map concentrates deposits in less area than their share).
    """
    sp = _split(score, deposits)
    pos, allv = sp.pos, _sorted_valid(sp)
    n = allv.size
    idx = np.unique(np.linspace(0, n - 1, n_thresholds).round().astype(np.int64))
    thr = np.unique(np.r_[allv[idx], pos])
    pos_sorted = np.sort(pos)
    rate = (pos.size - np.searchsorted(pos_sorted, thr, side="left")) / pos.size
    area = (n - np.searchsorted(allv, thr, side="left")) / n
    f = rate + area - 1.0  # non-increasing in the threshold
    above = np.nonzero(f >= 0)[0]
    i = int(above[-1])
    if i == len(thr) - 1 or f[i] == 0:
        t_x, p_x, a_x = thr[i], rate[i], area[i]
    else:
        w = f[i] / (f[i] - f[i + 1])
        t_x = thr[i] + w * (thr[i + 1] - thr[i])
        p_x = rate[i] + w * (rate[i + 1] - rate[i])
        a_x = area[i] + w * (area[i + 1] - area[i])
    nd = float(p_x / a_x) if a_x > 0 else float("inf")
    percentiles = np.searchsorted(allv, thr, side="left") / n
    return PredictionArea(thr, rate, area, float(t_x), float(p_x), float(a_x), nd, percentiles)


# ------------------------------------------------------------------------------------------------
# significance
# ------------------------------------------------------------------------------------------------


def random_placement_test(score: xr.DataArray, deposits, n: int = 999, seed: int = 0, null: str = "rigid") -> dict:
    """Monte Carlo test: are deposit cells ranked higher than random placements of the deposits?

    Statistic: mean percentile of the deposit cells' scores within the valid area (mid-rank for
    ties, 0..1). Null ``"rigid"`` (default): ``n`` random rotations + shifts of the whole deposit set
    inside the valid area (:func:`pipeline.evaluation.paired.rigid_placements`), which keep the
    distances between deposits, hence their clustering; ``"uniform"``: the same number of cells drawn
    independently (ignores clustering: anti-conservative, kept for comparison). Returns
    ``{"statistic", "null_mean", "null_std", "p_value", "null", ...}`` with
    ``p = (1 + #{null >= observed}) / (n + 1)``. When fewer than ``n`` rigid placements fit the valid
    area, the uniform null is used and ``null`` says ``"uniform (fallback)"``.
    """
    if null not in ("rigid", "uniform"):
        raise EvaluationError(f"random placement: null={null!r} is unknown. Fix: use 'rigid' or 'uniform'")
    sp = _split(score, deposits)
    pos, allv = sp.pos, _sorted_valid(sp)
    total = allv.size

    def pct(v):
        return (np.searchsorted(allv, v, side="left") + np.searchsorted(allv, v, side="right")) / (2.0 * total)

    observed = float(pct(pos).mean())
    rng = np.random.default_rng(seed)
    null_stats = np.empty(n)
    extra: dict = {}
    if null == "uniform":
        for i in range(n):
            null_stats[i] = pct(allv[rng.choice(total, size=pos.size, replace=False)]).mean()
    else:
        try:
            placements, extra = rigid_placements(score, sp.xy, n, seed=seed)
        except EvaluationError as exc:  # a set spread over most of a small, irregular area
            log.warning("random placement: %s; falling back to the uniform null", exc)
            return {**random_placement_test(score, deposits, n, seed, "uniform"), "null": "uniform (fallback)"}
        w = sp.values.shape[1]
        for i, xy in enumerate(placements):
            r, c = rows_cols(score, xy)
            flat = np.unique(r[r >= 0] * w + c[r >= 0])
            null_stats[i] = pct(sp.values.ravel()[flat]).mean()
    p = (1 + int((null_stats >= observed - 1e-12).sum())) / (n + 1)
    return {
        "statistic": observed,
        "null_mean": float(null_stats.mean()),
        "null_std": float(null_stats.std()),
        "p_value": p,
        "null": null,
        **extra,
    }


# ------------------------------------------------------------------------------------------------
# point-sample protocol (OpenGADBench)
# ------------------------------------------------------------------------------------------------


def point_protocol_auc(
    sample_scores,
    sample_xy,
    deposit_xy,
    min_dist_km: float = 5.0,
    draws: int = 20,
    seed: int = 42,
    *,
    return_all: bool = False,
):
    """ROC AUC of the OpenGADBench point-sample protocol (DESIGN.md section 5).

    ``sample_scores`` [N] (higher = more anomalous), ``sample_xy`` [N, 2] and ``deposit_xy`` [D, 2] in
    the same projected CRS, metres. Positives: the score of the nearest sample to each deposit (one
    per deposit, duplicates kept). Negatives: D samples drawn at random, with replacement, among the
    samples at least ``min_dist_km`` from every deposit (all samples when none qualify). One
    generator seeded with ``seed`` serves all ``draws``; returns the mean AUC (or, with
    ``return_all``, ``{"auc_mean", "auc_std", "aucs", "n_eligible", "fallback"}``).
    """
    from scipy.spatial import cKDTree
    from sklearn.metrics import roc_auc_score

    s = np.asarray(sample_scores, dtype="float64").ravel()
    sxy = np.asarray(sample_xy, dtype="float64").reshape(-1, 2)
    dxy = np.asarray(deposit_xy, dtype="float64").reshape(-1, 2)
    if s.size != len(sxy):
        raise EvaluationError(f"point protocol: {s.size} scores but {len(sxy)} sample locations; they must match")
    keep = np.isfinite(s) & np.isfinite(sxy).all(axis=1)
    if not keep.all():
        log.warning("point protocol: dropping %d samples with a NaN score or location", int((~keep).sum()))
        s, sxy = s[keep], sxy[keep]
    dxy = dxy[np.isfinite(dxy).all(axis=1)]
    if s.size == 0 or len(dxy) == 0:
        raise EvaluationError(
            f"point protocol needs samples and deposits with finite values (got {s.size} samples, {len(dxy)} "
            "deposits). Fix: check the score column and the coordinates"
        )
    if np.abs(sxy).max() <= 360 and np.ptp(sxy, axis=0).max() < 10:
        warnings.warn(
            "point protocol: sample coordinates look like degrees; distances are taken in metres. "
            "Reproject samples and deposits to a projected CRS first",
            stacklevel=2,
        )
    tree = cKDTree(sxy)
    _, nearest = tree.query(dxy, k=1)
    positives = s[nearest]
    d_min, _ = cKDTree(dxy).query(sxy, k=1)
    eligible = np.nonzero(d_min >= min_dist_km * 1000.0)[0]
    fallback = eligible.size == 0
    if fallback:
        log.warning(
            "point protocol: no sample lies >= %g km from every deposit; negatives drawn from all samples", min_dist_km
        )
        eligible = np.arange(s.size)
    rng = np.random.default_rng(seed)
    k = positives.size
    y = np.r_[np.ones(k), np.zeros(k)]
    aucs = np.array(
        [roc_auc_score(y, np.r_[positives, s[rng.choice(eligible, size=k, replace=True)]]) for _ in range(draws)]
    )
    if return_all:
        return {
            "auc_mean": float(aucs.mean()),
            "auc_std": float(aucs.std()),
            "aucs": aucs.tolist(),
            "n_eligible": int(eligible.size),
            "fallback": bool(fallback),
        }
    return float(aucs.mean())


def sample_map_at_points(score_da: xr.DataArray, points_gdf) -> np.ndarray:
    """Map values at point locations [N] (the containing cell; NaN outside the grid or on NaN cells)."""
    values = map_values(score_da)
    xy = deposit_xy(score_da, points_gdf)
    rows, cols = rows_cols(score_da, xy)
    out = np.full(len(xy), np.nan)
    inside = rows >= 0
    out[inside] = values[rows[inside], cols[inside]]
    return out


# ------------------------------------------------------------------------------------------------
# all together
# ------------------------------------------------------------------------------------------------


def default_buffer(score: xr.DataArray, window: int | None = None) -> float:
    """The buffered AUC's default buffer: ``window`` cells (the model window, default 32) of the larger
    cell side, in CRS units. Negatives closer than that share a window with a deposit, so their scores
    see the deposit's evidence: the buffered AUC asks whether the map tells deposits from far cells."""
    if window is None:
        window = int(ModelConfig.model_fields["window"].default)
    rx, ry = score.rio.resolution(recalc=True)
    return float(window * max(abs(rx), abs(ry)))


def evaluate_map(
    score: xr.DataArray, deposits, cfg=None, *, n_permutations: int = 999, window: int | None = None
) -> dict:
    """Every raster metric of one score map, as a JSON-serialisable dict.

    ``cfg`` is a :class:`pipeline.config.EvaluateConfig` (None = defaults). With ``cfg.buffer`` None
    the buffered AUC uses :func:`default_buffer` (``window`` cells; halved, with a warning, while no
    valid cell lies that far from every deposit). ``success_rate_area`` stays in the dict for old
    readers but equals the AUC up to ties: it is no separate evidence (the report shows the curve only).
    """
    if cfg is None:
        cfg = EvaluateConfig()
    score = score.load() if hasattr(score.data, "dask") else score
    token = _SPLIT_CACHE.set({})
    try:
        return _evaluate_map(score, deposits, cfg, n_permutations, window)
    finally:
        _SPLIT_CACHE.reset(token)


def _evaluate_map(score, deposits, cfg, n_permutations, window) -> dict:
    split = _split(score, deposits)
    cells = split.cells
    if cfg.buffer is None:
        buffer = default_buffer(score, window)
        rx, ry = score.rio.resolution(recalc=True)
        floor = float(math.hypot(rx, ry))
        while True:
            try:
                b_mean, b_std = roc_auc_buffered(score, deposits, buffer, repeats=cfg.repeats, seed=cfg.seed)
                break
            except EvaluationError:
                if buffer <= floor:  # every valid cell touches a deposit: no far negatives to draw
                    log.warning("buffered AUC: every valid cell lies within %g of a deposit; not computed", buffer)
                    b_mean = b_std = float("nan")
                    break
                log.warning("buffered AUC: no valid cell lies %g from every deposit; halving the buffer", buffer)
                buffer = max(floor, buffer / 2)
    else:
        buffer = float(cfg.buffer)
        b_mean, b_std = roc_auc_buffered(score, deposits, buffer, repeats=cfg.repeats, seed=cfg.seed)
    auc = roc_auc_all(score, deposits)
    _, _, sr_area = success_rate_curve(score, deposits)
    pa = prediction_area(score, deposits)
    rp = random_placement_test(score, deposits, n=n_permutations, seed=cfg.seed, null=cfg.null)
    return {
        "auc": auc,
        "auc_buffered_mean": b_mean,
        "auc_buffered_std": b_std,
        "buffer": buffer,
        "success_rate_area": sr_area,
        "pa_intersection": pa.intersection(),
        "normalised_density": pa.normalised_density,
        "p_value": rp["p_value"],
        "null": rp["null"],
        "mean_deposit_percentile": rp["statistic"],
        "n_deposits": int(cells.n_deposits),
        "n_deposits_used": int(cells.n_deposits - cells.n_outside - cells.n_invalid),
        "n_deposit_cells": int(cells.n_used),
        "n_valid_cells": int(split.valid.sum()),
    }


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None  # JSON has no NaN/inf
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_metrics(metrics: dict, path: str | Path) -> Path:
    """Write ``metrics`` as JSON atomically (temporary file + rename); NaN/inf become null."""

    return atomic_write_json(path, _jsonable(metrics), allow_nan=False)


_EVAL_INPUTS: dict = {}


def _evaluation_inputs(cfg: RunConfig, crs):
    """Deposits and, for the point protocol, sample locations in ``crs``, read once per process.

    Comparisons evaluate dozens of maps against the same files; the key includes the files' mtimes so
    that an edited file is read again.
    """

    paths = [cfg.resolve(cfg.deposits.path)]
    points = next((l for l in cfg.layers if l.kind == "points"), None) if cfg.evaluate.protocol == "points" else None
    if points is not None:
        paths.append(cfg.resolve(points.path))
    key = (
        cfg.deposits.model_dump_json(),
        str(cfg.base_dir),
        points.model_dump_json() if points else None,
        str(crs),
        tuple(p.stat().st_mtime_ns if p.exists() else None for p in paths),
    )
    if key not in _EVAL_INPUTS:
        deposits = load_deposits(cfg.deposits, cfg.base_dir)
        samples = None
        if points is not None:
            px, py, _ = read_points(points, cfg, crs)
            samples = np.column_stack([px, py])
        if len(_EVAL_INPUTS) > 8:
            _EVAL_INPUTS.clear()
        _EVAL_INPUTS[key] = (deposits, samples)
    return _EVAL_INPUTS[key]


def evaluate_scores(cfg: RunConfig, score) -> dict:
    """Metrics of one score map (y, x) against the config's deposits, with the config's protocol."""

    if cfg.deposits is None:
        return {"note": "no deposits in the config: nothing to evaluate"}
    score = score.load()
    deposits, samples = _evaluation_inputs(cfg, score.rio.crs)
    if cfg.evaluate.protocol == "points":
        import geopandas as gpd

        pts = gpd.GeoDataFrame(geometry=gpd.points_from_xy(samples[:, 0], samples[:, 1]), crs=score.rio.crs)
        s = sample_map_at_points(score, pts)
        dep = deposits.to_crs(score.rio.crs)
        res = point_protocol_auc(
            s,
            samples,
            np.column_stack([dep.geometry.x, dep.geometry.y]),
            min_dist_km=cfg.evaluate.min_dist_km,
            draws=cfg.evaluate.repeats,
            seed=cfg.evaluate.seed,
            return_all=True,
        )
        return {
            "protocol": "points",
            "auc": res["auc_mean"],
            "auc_std": res["auc_std"],
            "n_samples": int(len(s)),
            "n_deposits": int(len(dep)),
            "n_eligible_negatives": res["n_eligible"],
            "fallback": res["fallback"],
        }
    metrics = evaluate_map(score, deposits, cfg.evaluate, window=cfg.model.window)
    metrics["protocol"] = "raster"
    return metrics


def paired_scores(cfg: RunConfig, score, reference, *, n_boot: int = 1000) -> dict:
    """Paired comparison of ``score`` against ``reference`` (same grid) with the config's protocol.

    Same cells (raster) or samples (points) for both maps: ``d_auc`` = AUC(score) - AUC(reference),
    DeLong's ``se`` and ``p_delong``, and a spatial block bootstrap CI ``ci_low``/``ci_high`` with its
    ``p_boot`` (blocks of ``evaluate.block`` cells, default the model window). Deposits only evaluate.
    """
    if cfg.deposits is None:
        return {}
    score, reference = score.load(), reference.load()
    deposits, samples = _evaluation_inputs(cfg, score.rio.crs)
    block = int(cfg.evaluate.block or cfg.model.window)
    if cfg.evaluate.protocol == "points":
        import geopandas as gpd

        pts = gpd.GeoDataFrame(geometry=gpd.points_from_xy(samples[:, 0], samples[:, 1]), crs=score.rio.crs)
        dep = deposits.to_crs(score.rio.crs)
        rx, ry = score.rio.resolution(recalc=True)
        res = point_paired(
            sample_map_at_points(score, pts),
            sample_map_at_points(reference, pts),
            samples,
            np.column_stack([dep.geometry.x, dep.geometry.y]),
            min_dist_km=cfg.evaluate.min_dist_km,
            block=block * max(abs(rx), abs(ry)),
            n_boot=n_boot,
            seed=cfg.evaluate.seed,
        )
        boot = {"ci_low": res["ci_low"], "ci_high": res["ci_high"], "p_value": res["p_boot"]}
    else:
        res = delong_maps(score, reference, deposits)
        boot = block_bootstrap_auc_diff(score, reference, deposits, block, n_boot=n_boot, seed=cfg.evaluate.seed)
    return {
        "d_auc": res["diff"],
        "se_delong": res["se"],
        "p_delong": res["p_value"],
        "ci_low": boot["ci_low"],
        "ci_high": boot["ci_high"],
        "p_boot": boot["p_value"],
        "block": block,
    }
