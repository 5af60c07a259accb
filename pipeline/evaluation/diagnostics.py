"""Label-free diagnostics of a score map: does it light up where the data end?

:func:`border_effect` compares the scores within one window of the study-area edge (or of a nodata hole)
with the interior. A map whose edge band scores far above the interior ranks the survey's outline, not
its geology. No deposit is read here.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy import ndimage

__all__ = ["border_effect"]


def border_effect(score: xr.DataArray, window: int) -> dict:
    """Scores within ``window`` pixels of an invalid pixel or the grid's edge vs the rest of the valid area.

    Returns ``{"edge_median", "interior_median", "median_ratio", "edge_share_of_top_5pct", "edge_share"}``:
    a ratio near 1 and a share of the top 5 % near the edge's share of the area mean no border effect.
    """
    values = np.asarray(score.values, dtype=np.float64)
    valid = np.isfinite(values)
    padded = np.pad(valid, 1, constant_values=False)
    dist = ndimage.distance_transform_cdt(padded, metric="chessboard")[1:-1, 1:-1]
    edge = valid & (dist <= window)
    inner = valid & ~edge
    out = {"edge_pixels": int(edge.sum()), "interior_pixels": int(inner.sum()), "window": int(window)}
    if not edge.any() or not inner.any():
        return {**out, "median_ratio": float("nan")}
    e_med, i_med = float(np.median(values[edge])), float(np.median(values[inner]))
    top = values[valid] >= np.quantile(values[valid], 0.95)
    edge_share = float(edge.sum() / valid.sum())
    return {
        **out,
        "edge_median": e_med,
        "interior_median": i_med,
        "median_ratio": e_med / i_med if i_med > 0 else float("nan"),
        "edge_share": edge_share,
        "edge_share_of_top_5pct": float(edge[valid][top].mean()),
    }
