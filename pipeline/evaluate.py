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
import pandas as pd
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from .errors import InputDataError, MPMError

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
    "evaluate_map",
    "write_metrics",
]


class DepositsError(InputDataError):
    """The deposits file or table cannot be used (missing file, columns, coordinates, empty selection)."""


class EvaluationError(MPMError, ValueError):
    """A metric cannot be computed from this map and these deposits (the message says why and the fix)."""


# ------------------------------------------------------------------------------------------------
# deposits
# ------------------------------------------------------------------------------------------------


def load_deposits(cfg, base_dir: str | Path = ".") -> "geopandas.GeoDataFrame":  # noqa: F821
    """Read known deposits as points from a CSV (``x``/``y`` columns + ``crs``) or a vector file.

    ``cfg`` is a :class:`pipeline.config.DepositsConfig`; a relative ``cfg.path`` resolves against
    ``base_dir``. ``cfg.query`` (pandas query syntax) selects rows. Polygon or line features are
    reduced to representative points. A vector file without a CRS takes ``cfg.crs``; a CSV without
    ``crs`` gets none (then :func:`deposit_cells` assumes the map's CRS, with a warning).
    """
    import geopandas as gpd

    path = Path(cfg.path).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    if not path.exists():
        raise DepositsError(
            f"deposits file {str(path)!r} does not exist. Fix: correct 'deposits.path' in the run config "
            "(relative paths resolve against the config file's folder)"
        )
    is_table = path.suffix.lower() in (".csv", ".txt", ".tsv")
    if is_table:
        try:
            df = pd.read_csv(path, sep=None if path.suffix.lower() != ".csv" else ",", engine="python")
        except Exception as exc:
            raise DepositsError(f"deposits file {str(path)!r} cannot be read as CSV ({exc}). Fix: check its format") from None
        if not cfg.x or not cfg.y:
            raise DepositsError(
                f"deposits file {str(path)!r} is a table: give the coordinate columns as 'deposits.x' and "
                f"'deposits.y' (columns are {list(df.columns)})"
            )
        missing = [c for c in (cfg.x, cfg.y) if c not in df.columns]
        if missing:
            raise DepositsError(
                f"deposits file {str(path)!r} has no column(s) {missing}; its columns are {list(df.columns)}. "
                "Fix: set 'deposits.x' / 'deposits.y' to the coordinate column names"
            )
        for c in (cfg.x, cfg.y):
            num = pd.to_numeric(df[c], errors="coerce")
            bad = df.loc[num.isna(), c]
            if len(bad):
                raise DepositsError(
                    f"deposits file {str(path)!r}: column {c!r} has {len(bad)} non-numeric or empty value(s), "
                    f"e.g. {bad.iloc[0]!r} in row {bad.index[0]}. Fix: clean the coordinates or drop those rows "
                    "with 'deposits.query'"
                )
            df[c] = num.astype(float)
        df = _apply_query(df, cfg.query, path)
        gdf = gpd.GeoDataFrame(df, geometry=gpd.points_from_xy(df[cfg.x], df[cfg.y]), crs=cfg.crs)
    else:
        try:
            gdf = gpd.read_file(path, layer=cfg.layer) if cfg.layer else gpd.read_file(path)
        except Exception as exc:
            raise DepositsError(
                f"deposits file {str(path)!r} (layer {cfg.layer!r}) cannot be read as a vector file "
                f"({type(exc).__name__}: {exc}). Fix: check the path and 'deposits.layer'"
            ) from None
        if gdf.crs is None and cfg.crs:
            gdf = gdf.set_crs(cfg.crs)
        gdf = gdf[~(gdf.geometry.isna() | gdf.geometry.is_empty)]
        gdf = _apply_query(gdf, cfg.query, path)
        if not (gdf.geom_type == "Point").all():
            gdf = gdf.set_geometry(gdf.geometry.representative_point())
    gdf = gdf.reset_index(drop=True)
    gdf.attrs["path"] = str(path)  # named by the errors of deposit_cells
    return gdf


def _apply_query(df, query, path):
    from .config import QueryError, safe_query

    n_rows = len(df)
    if query:
        try:  # checked again here: a DepositsConfig built with model_construct skips the validator
            safe_query(query)
        except QueryError as exc:
            raise DepositsError(f"deposits {exc.problem} (in 'deposits.query'). Fix: {exc.fix}") from None
        try:
            df = df.query(query)
        except Exception as exc:
            raise DepositsError(
                f"deposits query {query!r} failed on {str(path)!r} ({type(exc).__name__}: {exc}). "
                f"Fix: use pandas query syntax over the columns {[c for c in df.columns if c != 'geometry']}"
            ) from None
    if len(df) == 0:
        if not query:
            raise DepositsError(
                f"deposits file {str(path)!r} holds no deposit (0 rows). Fix: point 'deposits.path' at the file "
                "of known deposits, or remove the 'deposits' section (nothing is evaluated then)"
            )
        raise DepositsError(
            f"no deposits left in {str(path)!r} after query {query!r} (it selects none of the {n_rows} rows). "
            "Fix: check the query values (e.g. the spelling of the deposit type) against the file"
        )
    return df


def _deposit_xy(score: xr.DataArray, deposits, *, warn: bool = True) -> np.ndarray:
    """Deposit coordinates [N, 2] in the map's CRS (``warn``: say so when the deposits have no CRS)."""
    crs = score.rio.crs
    if crs is None:
        raise EvaluationError(
            "the score map has no CRS, so deposits cannot be placed on it. Fix: set it with "
            "score.rio.write_crs(...) (score maps from pipeline.score / pipeline.baselines carry it)"
        )
    if deposits.crs is None:
        if warn:
            warnings.warn(
                f"deposits have no CRS; assuming the map's CRS ({crs}). Set 'deposits.crs' to be explicit",
                stacklevel=3,
            )
    elif deposits.crs != crs:
        deposits = deposits.to_crs(crs)
    geom = deposits.geometry
    if not (geom.geom_type == "Point").all():
        geom = geom.representative_point()
    return np.column_stack([geom.x.to_numpy(float), geom.y.to_numpy(float)])


class DepositCells(tuple):
    """``(rows, cols)`` of the unique valid cells holding deposits, with the bookkeeping as attributes.

    Unpacks like a tuple: ``rows, cols = deposit_cells(score, deposits)``. Attributes: ``n_deposits``
    (input points), ``n_outside`` (outside the map's grid), ``n_invalid`` (on NaN cells),
    ``n_shared`` (sharing a cell with another deposit), ``n_used`` (= len(rows)).
    """

    def __new__(cls, rows, cols, *, n_deposits, n_outside, n_invalid, n_shared):
        obj = super().__new__(cls, (rows, cols))
        obj.n_deposits, obj.n_outside, obj.n_invalid, obj.n_shared = n_deposits, n_outside, n_invalid, n_shared
        obj.n_used = int(len(rows))
        return obj

    @property
    def rows(self) -> np.ndarray:
        return self[0]

    @property
    def cols(self) -> np.ndarray:
        return self[1]


def _apply_affine(t, u, v):
    """(x, y) = t * (u, v) for arrays, spelled out (affine's ``*`` on tuples is deprecated)."""
    u, v = np.asarray(u, dtype="float64"), np.asarray(v, dtype="float64")
    return t.a * u + t.b * v + t.c, t.d * u + t.e * v + t.f


def _rows_cols(score: xr.DataArray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fractional-free (row, col) of the cells containing points ``xy`` [N, 2]; -1 if outside the grid."""
    cols, rows = _apply_affine(~score.rio.transform(recalc=True), xy[:, 0], xy[:, 1])
    rows, cols = np.floor(np.asarray(rows)).astype(np.int64), np.floor(np.asarray(cols)).astype(np.int64)
    h, w = score.sizes["y"], score.sizes["x"]
    outside = (rows < 0) | (rows >= h) | (cols < 0) | (cols >= w) | ~np.isfinite(xy).all(axis=1)
    rows[outside] = -1
    cols[outside] = -1
    return rows, cols


def _values(score: xr.DataArray) -> np.ndarray:
    if score.dims != ("y", "x"):
        if set(score.dims) == {"y", "x"}:
            score = score.transpose("y", "x")
        else:
            raise EvaluationError(f"score map must have dims ('y', 'x'), got {score.dims}. Fix: select one band")
    return np.asarray(score.values, dtype="float64")


def deposit_cells(score: xr.DataArray, deposits) -> DepositCells:
    """Unique valid cells of ``score`` [H, W] that contain at least one deposit.

    Deposits outside the grid or on NaN (invalid) cells are dropped and counted (logged as a
    warning). Raises :class:`DepositsError` if no deposit falls on a valid cell.
    """
    values = _values(score)
    xy = _deposit_xy(score, deposits, warn=False)
    rows, cols = _rows_cols(score, xy)
    inside = rows >= 0
    n_outside = int((~inside).sum())
    if not inside.any():  # the message says it when the deposits have no CRS: no warning line besides it
        raise DepositsError(_all_outside(score, deposits, xy))
    if deposits.crs is None:
        warnings.warn(
            f"deposits have no CRS; assuming the map's CRS ({score.rio.crs}). Set 'deposits.crs' to be explicit",
            stacklevel=2,
        )
    on_valid = inside.copy()
    on_valid[inside] = np.isfinite(values[rows[inside], cols[inside]])
    n_invalid = int((inside & ~on_valid).sum())
    if not on_valid.any():
        raise DepositsError(
            f"none of the {len(xy)} deposits lies on a valid cell of the map ({n_outside} outside the grid, "
            f"{n_invalid} on cells outside the study area). Fix: check the study-area mask and the deposits"
        )
    flat = np.unique(rows[on_valid] * values.shape[1] + cols[on_valid])
    n_shared = int(on_valid.sum()) - len(flat)
    if n_outside or n_invalid:
        log.warning(
            "deposit_cells: dropped %d of %d deposits (%d outside the grid, %d outside the valid area)",
            n_outside + n_invalid, len(xy), n_outside, n_invalid,
        )
    return DepositCells(
        flat // values.shape[1], flat % values.shape[1],
        n_deposits=len(xy), n_outside=n_outside, n_invalid=n_invalid, n_shared=n_shared,
    )


def _all_outside(score: xr.DataArray, deposits, xy: np.ndarray) -> str:
    """The message for deposits that all miss the map: the file, both extents, and the likely cause."""

    def box(b):
        return "[" + ", ".join(f"{round(float(v), 6):.9g}" for v in b) + "]"

    src = getattr(deposits, "attrs", {}).get("path")
    what = f"deposits file {src!r}" if src else "deposits"
    fin = xy[np.isfinite(xy).all(axis=1)]
    ext = box([*fin.min(axis=0), *fin.max(axis=0)]) if len(fin) else "(no finite coordinates)"
    crs = score.rio.crs
    if deposits.crs is None:
        cause = (f"the deposits have no CRS, so their x/y were taken as {crs} coordinates. Fix: set 'deposits.crs' "
                 "to the CRS of the x/y columns (e.g. 'EPSG:4326' for longitude/latitude)")
    else:
        cause = (f"their CRS is {deposits.crs.to_string()}. Fix: check 'deposits.crs' (the CRS of the x/y columns), "
                 "that 'deposits.x' is the easting/longitude column, and that the deposits belong to this area")
    return (f"{what}: all {len(xy)} deposits lie outside the map: their extent {ext} vs the map bounds "
            f"{box(score.rio.bounds())} in {crs}; {cause}")


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
    values = _values(score)
    cells = deposit_cells(score, deposits)
    valid = np.isfinite(values)
    dep = np.zeros_like(valid)
    dep[cells.rows, cells.cols] = True
    pos = values[dep]
    neg = values[valid & ~dep]
    if neg.size == 0:
        raise EvaluationError("every valid cell holds a deposit: there are no negatives to compare against")
    out = _Split(pos, neg, valid, dep, cells, values, _deposit_xy(score, deposits, warn=False))
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
    cx, cy = _apply_affine(score.rio.transform(recalc=True), cols + 0.5, rows + 0.5)
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


def random_placement_test(score: xr.DataArray, deposits, n: int = 999, seed: int = 0) -> dict:
    """Monte Carlo test: are deposit cells ranked higher than random cells of the valid area?

    Statistic: mean percentile of the deposit cells' scores within the valid area (mid-rank for
    ties, 0..1). Null: ``n`` placements of the same number of cells at random (without replacement)
    in the valid area. Returns ``{"statistic", "null_mean", "null_std", "p_value"}`` with
    ``p = (1 + #{null >= observed}) / (n + 1)``.
    """
    sp = _split(score, deposits)
    pos, allv = sp.pos, _sorted_valid(sp)
    total = allv.size

    def pct(v):
        return (np.searchsorted(allv, v, side="left") + np.searchsorted(allv, v, side="right")) / (2.0 * total)

    observed = float(pct(pos).mean())
    rng = np.random.default_rng(seed)
    k = pos.size
    null = np.empty(n)
    for i in range(n):
        null[i] = pct(allv[rng.choice(total, size=k, replace=False)]).mean()
    p = (1 + int((null >= observed - 1e-12).sum())) / (n + 1)
    return {"statistic": observed, "null_mean": float(null.mean()), "null_std": float(null.std()), "p_value": p}


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
        log.warning("point protocol: no sample lies >= %g km from every deposit; negatives drawn from all samples",
                    min_dist_km)
        eligible = np.arange(s.size)
    rng = np.random.default_rng(seed)
    k = positives.size
    y = np.r_[np.ones(k), np.zeros(k)]
    aucs = np.array([roc_auc_score(y, np.r_[positives, s[rng.choice(eligible, size=k, replace=True)]])
                     for _ in range(draws)])
    if return_all:
        return {"auc_mean": float(aucs.mean()), "auc_std": float(aucs.std()), "aucs": aucs.tolist(),
                "n_eligible": int(eligible.size), "fallback": bool(fallback)}
    return float(aucs.mean())


def sample_map_at_points(score_da: xr.DataArray, points_gdf) -> np.ndarray:
    """Map values at point locations [N] (the containing cell; NaN outside the grid or on NaN cells)."""
    values = _values(score_da)
    xy = _deposit_xy(score_da, points_gdf)
    rows, cols = _rows_cols(score_da, xy)
    out = np.full(len(xy), np.nan)
    inside = rows >= 0
    out[inside] = values[rows[inside], cols[inside]]
    return out


# ------------------------------------------------------------------------------------------------
# all together
# ------------------------------------------------------------------------------------------------


def evaluate_map(score: xr.DataArray, deposits, cfg=None, *, n_permutations: int = 999) -> dict:
    """Every raster metric of one score map, as a JSON-serialisable dict.

    ``cfg`` is a :class:`pipeline.config.EvaluateConfig` (None = defaults). With ``cfg.buffer`` None
    the buffered AUC uses a buffer of one cell diagonal (negatives never touch a deposit's cell).
    """
    if cfg is None:
        from .config import EvaluateConfig

        cfg = EvaluateConfig()
    score = score.load() if hasattr(score.data, "dask") else score
    token = _SPLIT_CACHE.set({})
    try:
        return _evaluate_map(score, deposits, cfg, n_permutations)
    finally:
        _SPLIT_CACHE.reset(token)


def _evaluate_map(score, deposits, cfg, n_permutations) -> dict:
    split = _split(score, deposits)
    cells = split.cells
    if cfg.buffer is None:
        rx, ry = score.rio.resolution(recalc=True)
        buffer = float(math.hypot(rx, ry))
    else:
        buffer = float(cfg.buffer)
    auc = roc_auc_all(score, deposits)
    b_mean, b_std = roc_auc_buffered(score, deposits, buffer, repeats=cfg.repeats, seed=cfg.seed)
    _, _, sr_area = success_rate_curve(score, deposits)
    pa = prediction_area(score, deposits)
    rp = random_placement_test(score, deposits, n=n_permutations, seed=cfg.seed)
    return {
        "auc": auc,
        "auc_buffered_mean": b_mean,
        "auc_buffered_std": b_std,
        "buffer": buffer,
        "success_rate_area": sr_area,
        "pa_intersection": pa.intersection(),
        "normalised_density": pa.normalised_density,
        "p_value": rp["p_value"],
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
    from .io import atomic_write_json

    return atomic_write_json(path, _jsonable(metrics), allow_nan=False)
