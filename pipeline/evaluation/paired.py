"""Paired comparison of two score maps on the same cells, and a spatially aware random-placement null.

Two maps evaluated against the same deposits share their positives and negatives, so their AUCs are
correlated; comparing two AUCs as if independent (or by their spread over model seeds) misjudges the
difference. Here:

- :func:`delong_test` - DeLong, DeLong & Clarke-Pearson (1988), "Comparing the areas under two or more
  correlated receiver operating characteristic curves", Biometrics 44, 837-845: the variance of the AUC
  difference from the structural components (placement values), computed with midranks in
  O(N log N) (Sun & Xu 2014, IEEE Signal Processing Letters 21, 1389-1393). Assumes independent cells.
- :func:`block_bootstrap_auc_diff` - neighbouring cells are not independent (a deposit and the cells
  around it share a smooth anomaly), so the cells are resampled in square blocks of ``block`` cells a side
  (at least the model window), the same blocks for both maps: a percentile CI of the AUC difference.
- :func:`rigid_placements` - the random-placement null of :func:`pipeline.evaluation.evaluate.random_placement_test`:
  the whole deposit set rotated by a random angle and shifted by a random vector, accepted when every
  deposit lands on a valid cell. A rigid motion keeps every distance between deposits, so the null keeps
  their clustering (independent uniform placements do not, and are anti-conservative).

Deposits only evaluate here; nothing is fitted.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from pipeline.evaluation.deposits import EvaluationError, apply_affine, deposit_cells, map_values, rows_cols

__all__ = [
    "placement_values",
    "delong_test",
    "paired_cells",
    "delong_maps",
    "block_bootstrap_auc_diff",
    "rigid_placements",
    "nearest_neighbour_distances",
    "point_paired",
]


# ------------------------------------------------------------------------------------------------
# DeLong
# ------------------------------------------------------------------------------------------------


def placement_values(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components of one score: ``(v10 [P], v01 [N])``.

    ``v10[i]`` = share of negatives below positive i (ties count one half); ``v01[j]`` = share of
    positives above negative j. ``v10.mean() == v01.mean() == AUC``.
    """
    pos, neg = np.asarray(pos, dtype="float64"), np.asarray(neg, dtype="float64")
    sn, sp = np.sort(neg), np.sort(pos)
    v10 = (np.searchsorted(sn, pos, side="left") + np.searchsorted(sn, pos, side="right")) / (2.0 * sn.size)
    v01 = 1.0 - (np.searchsorted(sp, neg, side="left") + np.searchsorted(sp, neg, side="right")) / (2.0 * sp.size)
    return v10, v01


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def delong_test(pos_a, neg_a, pos_b, neg_b) -> dict:
    """DeLong's test of ``AUC(a) - AUC(b)`` for two scores of the same positives and negatives.

    ``pos_x`` [P] and ``neg_x`` [N] are the scores of method x on the positives and negatives, in the
    same order for both methods. Returns ``{"auc_a", "auc_b", "diff", "se", "z", "p_value",
    "ci_low", "ci_high"}`` (two-sided p; 95 % normal CI of the difference).
    """
    pa, na, pb, nb = (np.asarray(v, dtype="float64").ravel() for v in (pos_a, neg_a, pos_b, neg_b))
    if pa.size != pb.size or na.size != nb.size:
        raise EvaluationError(
            f"DeLong's test pairs cells: got {pa.size}/{pb.size} positives and {na.size}/{nb.size} negatives. "
            "Fix: score both methods on the same cells"
        )
    if pa.size < 2 or na.size < 2:
        raise EvaluationError(
            f"DeLong's test needs at least 2 positives and 2 negatives (got {pa.size} and {na.size}). "
            "Fix: evaluate against more deposits"
        )
    v10a, v01a = placement_values(pa, na)
    v10b, v01b = placement_values(pb, nb)
    auc_a, auc_b = float(v10a.mean()), float(v10b.mean())
    s10 = np.cov(np.vstack([v10a, v10b]))
    s01 = np.cov(np.vstack([v01a, v01b]))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / pa.size + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / na.size
    se = float(math.sqrt(max(var, 0.0)))
    diff = auc_a - auc_b
    if se == 0.0:
        z, p = (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    else:
        z = diff / se
        p = min(1.0, 2.0 * _normal_sf(abs(z)))
    return {
        "auc_a": auc_a,
        "auc_b": auc_b,
        "diff": diff,
        "se": se,
        "z": float(z),
        "p_value": float(p),
        "ci_low": diff - 1.959964 * se,
        "ci_high": diff + 1.959964 * se,
    }


def paired_cells(score_a: xr.DataArray, score_b: xr.DataArray, deposits) -> tuple[np.ndarray, ...]:
    """The cells both maps score: ``(values_a [H, W], values_b [H, W], common valid [H, W], deposit cells [H, W])``.

    The maps must share the grid; a cell counts when both are finite there (the same cells for both).
    """
    a, b = map_values(score_a), map_values(score_b)
    if a.shape != b.shape:
        raise EvaluationError(
            f"paired comparison: the maps have shapes {a.shape} and {b.shape}. Fix: score both on the same cube"
        )
    valid = np.isfinite(a) & np.isfinite(b)
    cells = deposit_cells(score_a, deposits)
    dep = np.zeros_like(valid)
    dep[cells.rows, cells.cols] = True
    dep &= valid
    if not dep.any() or dep.sum() == valid.sum():
        raise EvaluationError(
            f"paired comparison: {int(dep.sum())} deposit cells among {int(valid.sum())} cells valid in both maps. "
            "Fix: check that the deposits lie inside the maps' common valid area"
        )
    return a, b, valid, dep


def delong_maps(score_a: xr.DataArray, score_b: xr.DataArray, deposits) -> dict:
    """:func:`delong_test` of two maps of one grid: deposit cells vs every other cell valid in both."""
    a, b, valid, dep = paired_cells(score_a, score_b, deposits)
    neg = valid & ~dep
    return delong_test(a[dep], a[neg], b[dep], b[neg])


# ------------------------------------------------------------------------------------------------
# spatial block bootstrap
# ------------------------------------------------------------------------------------------------


def _block_counts(values: np.ndarray, pos_mask: np.ndarray, neg_mask: np.ndarray, block_id: np.ndarray, nb: int):
    """[P, nb] matrix: for each positive, the negatives of each block below it (ties one half)."""
    negv, negb = values[neg_mask], block_id[neg_mask]
    posv = values[pos_mask]
    # rank every value once, then sort negatives by (block, rank): one vectorised searchsorted per pair
    _, inv = np.unique(np.r_[negv, posv], return_inverse=True)
    rn, rp = inv[: negv.size].astype(np.int64), inv[negv.size :].astype(np.int64)
    span = int(inv.max()) + 2
    keys = np.sort(negb.astype(np.int64) * span + rn)
    base = np.arange(nb, dtype=np.int64)[None, :] * span  # [1, nb]
    q = base + rp[:, None]  # [P, nb]
    below = np.searchsorted(keys, q, side="left")
    upto = np.searchsorted(keys, q, side="right")
    start = np.searchsorted(keys, base, side="left")
    return (below - start) + 0.5 * (upto - below)


def block_bootstrap_auc_diff(
    score_a: xr.DataArray,
    score_b: xr.DataArray,
    deposits,
    block: int,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Spatial block bootstrap of ``AUC(a) - AUC(b)`` on the cells valid in both maps.

    The grid is cut into square blocks of ``block`` x ``block`` cells (use at least the model window,
    the scale of the maps' spatial correlation); each replicate draws as many blocks as hold a valid
    cell, with replacement, and takes every cell of each drawn block (deposit cells and the others) as
    many times as it was drawn; both maps are resampled with the same blocks. Returns ``{"diff" (on the
    data), "ci_low", "ci_high" (percentile, ``level``), "se", "p_value" (two-sided: twice the share of
    replicates on the other side of 0), "block", "n_blocks", "n_boot"}``.
    """
    if block < 1:
        raise EvaluationError(f"block bootstrap: block={block} cells; use a positive size such as the model window")
    if n_boot < 10:
        raise EvaluationError(f"block bootstrap: n_boot={n_boot} is too few replicates; use e.g. 1000")
    a, b, valid, dep = paired_cells(score_a, score_b, deposits)
    h, w = valid.shape
    nbx = -(-w // block)
    rr, cc = np.indices((h, w))
    raw_block = (rr // block) * nbx + cc // block
    used, block_id = np.unique(raw_block[valid], return_inverse=True)
    bid = np.full((h, w), -1, dtype=np.int64)
    bid[valid] = block_id
    nb = used.size
    neg = valid & ~dep
    pos_block = bid[dep]  # [P]
    n_neg_block = np.bincount(bid[neg], minlength=nb).astype("float64")  # [nb]
    ca = _block_counts(a, dep, neg, bid, nb)  # [P, nb]
    cb = _block_counts(b, dep, neg, bid, nb)

    def auc_of(k):  # k [R, nb] block multiplicities -> AUCs [R] of a and b
        wpos = k[:, pos_block]  # [R, P]
        n_pairs = wpos.sum(axis=1) * (k @ n_neg_block)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (np.einsum("rp,rp->r", wpos, k @ ca.T) / n_pairs, np.einsum("rp,rp->r", wpos, k @ cb.T) / n_pairs)

    full = np.ones((1, nb))
    a0, b0 = auc_of(full)
    diff0 = float(a0[0] - b0[0])
    rng = np.random.default_rng(seed)
    diffs = []
    for r0 in range(0, n_boot, 100):
        r = min(100, n_boot - r0)
        k = np.stack([np.bincount(rng.integers(0, nb, nb), minlength=nb) for _ in range(r)]).astype("float64")
        da_, db_ = auc_of(k)
        diffs.append(da_ - db_)
    d = np.concatenate(diffs)
    d = d[np.isfinite(d)]  # a replicate without any deposit block has no AUC
    if d.size < 10:
        raise EvaluationError(
            f"block bootstrap: only {d.size} replicates drew a deposit block. Fix: use a smaller block than {block}"
        )
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(d, [alpha, 1.0 - alpha])
    p = min(1.0, 2.0 * min((d <= 0).mean(), (d >= 0).mean()))
    return {
        "diff": diff0,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "se": float(d.std(ddof=1)),
        "p_value": float(p),
        "block": int(block),
        "n_blocks": int(nb),
        "n_boot": int(d.size),
    }


# ------------------------------------------------------------------------------------------------
# random placement that keeps the clustering
# ------------------------------------------------------------------------------------------------


def nearest_neighbour_distances(xy: np.ndarray) -> np.ndarray:
    """Distance of each point [D, 2] to its nearest other point, [D] (sorted ascending)."""
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, dtype="float64")
    d, _ = cKDTree(xy).query(xy, k=2)
    return np.sort(d[:, 1])


def rigid_placements(
    score: xr.DataArray,
    xy: np.ndarray,
    n: int,
    *,
    seed: int = 0,
    max_tries: int = 200,
) -> tuple[list[np.ndarray], dict]:
    """``n`` random rigid placements of the deposit set ``xy`` [D, 2] (map CRS) inside the map's valid area.

    Each placement rotates the set about its centroid by an angle uniform in [0, 2 pi) and moves the
    centroid to a point uniform in the bounding box of the valid cells; it is accepted when every
    deposit lands on a valid cell. When fewer than ``n`` of ``max_tries * n`` attempts succeed (a set
    spread over most of an irregular area), placements with at least 90 %, then 75 %, of the deposits
    on valid cells are accepted too (the others are dropped from that placement), and the share used
    is reported. Returns ``(placements, {"min_inside", "acceptance"})``; each placement is [D', 2].
    """
    values = map_values(score)
    valid = np.isfinite(values)
    xy = np.asarray(xy, dtype="float64")
    xy = xy[np.isfinite(xy).all(axis=1)]
    if len(xy) == 0:
        raise EvaluationError("random placement: no deposit with finite coordinates. Fix: check the deposits file")
    transform = score.rio.transform(recalc=True)
    rows, cols = np.nonzero(valid)
    bx, by = apply_affine(transform, np.r_[cols.min(), cols.max() + 1], np.r_[rows.min(), rows.max() + 1])
    centre = xy.mean(axis=0)
    rel = xy - centre
    rng = np.random.default_rng(seed)
    h, w = valid.shape
    batch = max(64, 4 * n)
    found: dict[float, list[np.ndarray]] = {1.0: [], 0.9: [], 0.75: []}
    tries = 0
    while len(found[1.0]) < n and tries < max_tries * n:
        theta = rng.uniform(0, 2 * np.pi, batch)
        cx = rng.uniform(min(bx), max(bx), batch)
        cy = rng.uniform(min(by), max(by), batch)
        cos, sin = np.cos(theta), np.sin(theta)
        px = cx[:, None] + cos[:, None] * rel[None, :, 0] - sin[:, None] * rel[None, :, 1]  # [B, D]
        py = cy[:, None] + sin[:, None] * rel[None, :, 0] + cos[:, None] * rel[None, :, 1]
        r, c = rows_cols(score, np.column_stack([px.ravel(), py.ravel()]))
        r, c = r.reshape(px.shape), c.reshape(px.shape)
        ok = r >= 0
        ok[ok] = valid[np.clip(r[ok], 0, h - 1), np.clip(c[ok], 0, w - 1)]
        share = ok.mean(axis=1)
        for i in range(batch):
            for level in found:
                if share[i] >= level:
                    if len(found[level]) < n:
                        found[level].append(np.column_stack([px[i, ok[i]], py[i, ok[i]]]))
                    break
        tries += batch
    min_inside = 1.0
    placements = list(found[1.0])
    for level in (0.9, 0.75):
        if len(placements) >= n:
            break
        min_inside = level
        placements += found[level][: n - len(placements)]
    if len(placements) < n:
        raise EvaluationError(
            f"random placement: only {len(placements)} of {n} rigid placements keep 75 % of the {len(xy)} deposits "
            "inside the valid area. Fix: evaluate on a larger study area, or set evaluate.null: uniform"
        )
    return placements[:n], {"min_inside": min_inside, "acceptance": len(found[1.0]) / max(tries, 1)}


# ------------------------------------------------------------------------------------------------
# point samples (the OpenGADBench protocol)
# ------------------------------------------------------------------------------------------------


def _weighted_auc(pos, wpos, neg, wneg) -> np.ndarray:
    """AUCs [R] of weighted positives [P] / negatives [N] under R weightings ``wpos`` [R, P], ``wneg`` [R, N]."""
    order = np.argsort(neg, kind="stable")
    sn = neg[order]
    cw = np.concatenate([np.zeros((wneg.shape[0], 1)), np.cumsum(wneg[:, order], axis=1)], axis=1)  # [R, N + 1]
    lo, hi = np.searchsorted(sn, pos, side="left"), np.searchsorted(sn, pos, side="right")
    below = cw[:, lo] + 0.5 * (cw[:, hi] - cw[:, lo])  # [R, P]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (wpos * below).sum(axis=1) / (wpos.sum(axis=1) * wneg.sum(axis=1))


def point_paired(
    scores_a,
    scores_b,
    sample_xy,
    deposit_xy,
    *,
    min_dist_km: float = 5.0,
    block: float,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Paired comparison of two sample scores [N] under the point-sample protocol.

    Positives: the nearest sample to each deposit (duplicates kept); negatives: every sample at least
    ``min_dist_km`` from every deposit (all samples when none is), the population the protocol draws
    from, so the AUCs are the protocol's in expectation. Returns DeLong's ``{"auc_a", "auc_b", "diff",
    "se", "p_value"}`` plus a spatial block bootstrap (square blocks of ``block`` CRS units, metres):
    ``"ci_low", "ci_high", "p_boot", "block", "n_blocks"``.
    """
    from scipy.spatial import cKDTree

    sa, sb = np.asarray(scores_a, "float64").ravel(), np.asarray(scores_b, "float64").ravel()
    sxy = np.asarray(sample_xy, "float64").reshape(-1, 2)
    dxy = np.asarray(deposit_xy, "float64").reshape(-1, 2)
    keep = np.isfinite(sa) & np.isfinite(sb) & np.isfinite(sxy).all(axis=1)
    sa, sb, sxy = sa[keep], sb[keep], sxy[keep]
    dxy = dxy[np.isfinite(dxy).all(axis=1)]
    if sa.size < 4 or len(dxy) < 2:
        raise EvaluationError(
            f"paired point comparison: {sa.size} samples scored by both methods and {len(dxy)} deposits. "
            "Fix: check the sample scores and the deposits"
        )
    _, near = cKDTree(sxy).query(dxy, k=1)
    d_min, _ = cKDTree(dxy).query(sxy, k=1)
    elig = np.nonzero(d_min >= min_dist_km * 1000.0)[0]
    if elig.size == 0:
        elig = np.arange(sa.size)
    out = delong_test(sa[near], sa[elig], sb[near], sb[elig])
    cell = np.floor((sxy - sxy.min(axis=0)) / float(block)).astype(np.int64)
    _, bid = np.unique(cell[:, 0] * (cell[:, 1].max() + 1) + cell[:, 1], return_inverse=True)
    nb = int(bid.max()) + 1
    rng = np.random.default_rng(seed)
    diffs = []
    for r0 in range(0, n_boot, 200):
        r = min(200, n_boot - r0)
        k = np.stack([np.bincount(rng.integers(0, nb, nb), minlength=nb) for _ in range(r)]).astype("float64")
        wp, wn = k[:, bid[near]], k[:, bid[elig]]
        diffs.append(_weighted_auc(sa[near], wp, sa[elig], wn) - _weighted_auc(sb[near], wp, sb[elig], wn))
    d = np.concatenate(diffs)
    d = d[np.isfinite(d)]
    if d.size < 10:
        raise EvaluationError(f"paired point comparison: too few bootstrap replicates; use a block below {block:g}")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(d, [alpha, 1.0 - alpha])
    return {
        **out,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "p_boot": float(min(1.0, 2.0 * min((d <= 0).mean(), (d >= 0).mean()))),
        "block": float(block),
        "n_blocks": nb,
    }
