"""Figures for cubes, score maps and evaluation curves.

Every function returns a :class:`matplotlib.figure.Figure` built on the Agg canvas (no pyplot state,
never ``plt.show``): save it with ``fig.savefig(path)``. Large rasters are decimated to at most
``max_pixels`` a side before they are loaded, so a province-scale cube plots in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor used by cube.normalised)
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.data.cube import normalised
from pipeline.errors import CubeError
from pipeline.evaluation.evaluate import PredictionArea, deposit_xy, prediction_area, roc_curve, success_rate_curve

__all__ = [
    "plot_bands",
    "plot_map",
    "plot_roc",
    "plot_success_rate",
    "plot_auc_differences",
    "plot_prediction_area",
    "plot_comparison_bars",
]

MAX_PIXELS = 800


def new_figure(figsize) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)  # Agg canvas: savefig works, no display backend is touched
    return fig


def decimate_map(da: xr.DataArray, max_pixels: int) -> xr.DataArray:
    """Stride-subsample (y, x) so neither side exceeds ``max_pixels`` (nearest, cheap on dask)."""
    step = max(1, math.ceil(max(da.sizes["y"], da.sizes["x"]) / max_pixels))
    return da.isel(y=slice(None, None, step), x=slice(None, None, step)) if step > 1 else da


def map_extent(da: xr.DataArray) -> tuple[float, float, float, float]:
    """imshow extent (left, right, bottom, top) from pixel-centre coordinates."""
    x = np.asarray(da["x"].values, dtype=float)
    y = np.asarray(da["y"].values, dtype=float)
    dx = abs(x[1] - x[0]) if x.size > 1 else 1.0
    dy = abs(y[1] - y[0]) if y.size > 1 else 1.0
    return (x.min() - dx / 2, x.max() + dx / 2, y.min() - dy / 2, y.max() + dy / 2)


def map_origin(da: xr.DataArray) -> str:
    y = np.asarray(da["y"].values)
    return "upper" if y.size < 2 or y[0] > y[-1] else "lower"


def _robust_limits(values: np.ndarray, lo: float = 2.0, hi: float = 98.0) -> tuple[float | None, float | None]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None, None
    vmin, vmax = np.percentile(finite, [lo, hi])
    if vmin == vmax:  # near-constant or mostly one value (indicator bands): use the full range
        vmin, vmax = finite.min(), finite.max()
        if vmin == vmax:
            vmax = vmin + 1.0
    return float(vmin), float(vmax)


def plot_bands(
    cube: xr.Dataset,
    *,
    bands: Sequence[str] | None = None,
    normalise: bool = False,
    ncols: int = 4,
    cmap: str = "viridis",
    max_pixels: int = MAX_PIXELS,
    title: str | None = None,
    panel_size: float = 2.6,
) -> Figure:
    """Quick-look grid of every band of a cube (or ``bands``), plus the valid mask as the last panel.

    Pixels outside ``valid`` are blank; colour limits are each band's 2-98 % percentiles inside the
    valid area. ``normalise=True`` shows ``pipeline.data.cube.normalised`` values (needs the cube's
    statistics, i.e. a written cube). Axes: one per band plus one for the mask (extra grid cells are
    removed); each band panel has a colour bar, which adds one axes each.
    """
    names = [str(b) for b in cube["band"].values.tolist()] if bands is None else [str(b) for b in bands]
    missing = [b for b in names if b not in set(map(str, cube["band"].values.tolist()))]
    if missing:
        raise CubeError(
            f"plot_bands: band(s) {missing} are not in the cube; its bands are {cube['band'].values.tolist()}. "
            "Fix: pass names from cube.band"
        )
    if normalise:
        ev = normalised(cube, fill=np.nan)
    else:
        ev = cube["evidence"]
    ev = decimate_map(ev.sel(band=names), max_pixels)
    valid = decimate_map(cube["valid"], max_pixels)
    ev_np = np.asarray(ev.values, dtype="float32")
    valid_np = np.asarray(valid.values).astype(bool)
    sources = cube["source"].sel(band=names).values.tolist() if "source" in cube.coords else [""] * len(names)

    n_panels = len(names) + 1
    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = new_figure((panel_size * ncols + 0.6, panel_size * nrows + (0.4 if title else 0)))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    extent, origin = map_extent(valid), map_origin(valid)
    for i, name in enumerate(names):
        ax = axes[i]
        img = np.where(valid_np, ev_np[i], np.nan)
        vmin, vmax = _robust_limits(img)
        im = ax.imshow(img, extent=extent, origin=origin, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(f"{name}\n({sources[i]})", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.8)
    ax = axes[len(names)]
    ax.imshow(
        valid_np.astype("uint8"), extent=extent, origin=origin, cmap="gray", vmin=0, vmax=1, interpolation="nearest"
    )
    ax.set_title(f"valid mask\n({valid_np.mean():.0%} valid)", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    for ax in axes[n_panels:]:
        fig.delaxes(ax)
    if title:
        fig.suptitle(title)
    return fig


# ------------------------------------------------------------------------------------------------
# score maps and evaluation curves
# ------------------------------------------------------------------------------------------------


def _deposit_xy_on(score: xr.DataArray, deposits) -> np.ndarray:
    return deposit_xy(score, deposits)


def plot_map(
    score_da: xr.DataArray,
    deposits=None,
    *,
    title: str | None = None,
    cmap: str = "magma",
    stretch: tuple[float, float] | None = (2.0, 99.5),
    max_pixels: int = MAX_PIXELS,
    label: str = "score",
    figsize: tuple[float, float] = (6.5, 5.5),
) -> Figure:
    """A score map (NaN = blank) with known deposits as markers (reprojected to the map's CRS).

    ``stretch`` = percentiles for the colour limits (None = full range). Axes: the map and its colour bar.
    """
    da = decimate_map(score_da, max_pixels)
    vals = np.asarray(da.values, dtype="float32")
    vmin, vmax = _robust_limits(vals, *stretch) if stretch else (np.nanmin(vals), np.nanmax(vals))
    fig = new_figure(figsize)
    ax = fig.add_subplot()
    im = ax.imshow(
        vals, extent=map_extent(da), origin=map_origin(da), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest"
    )
    fig.colorbar(im, ax=ax, shrink=0.85, label=label)
    if deposits is not None and len(deposits):
        xy = _deposit_xy_on(score_da, deposits)
        ax.scatter(
            xy[:, 0],
            xy[:, 1],
            s=28,
            marker="^",
            facecolor="cyan",
            edgecolor="black",
            linewidth=0.6,
            label=f"known deposits ({len(xy)})",
            zorder=3,
        )
        ax.legend(loc="lower right", fontsize=8, framealpha=0.8)
        left, right, bottom, top = map_extent(da)
        ax.set_xlim(left, right)
        ax.set_ylim(bottom, top)
    crs = score_da.rio.crs
    ax.set_xlabel(f"x ({crs})" if crs else "x")
    ax.set_ylabel("y")
    ax.ticklabel_format(style="plain", useOffset=False)
    ax.tick_params(labelsize=7)
    ax.set_title(title or str(score_da.name or "score"))
    return fig


def _as_named(scores) -> dict:
    if isinstance(scores, xr.DataArray):
        return {str(scores.name or "score"): scores}
    return dict(scores)


def plot_roc(
    scores, deposits=None, *, title: str = "ROC: deposit cells vs the rest of the valid area", figsize=(5.5, 5.0)
) -> Figure:
    """ROC curves of one or several maps: ``scores`` is a DataArray, or a mapping name -> DataArray,
    or name -> precomputed ``(fpr, tpr, auc)`` (then ``deposits`` may be None). One axes."""

    fig = new_figure(figsize)
    ax = fig.add_subplot()
    for name, s in _as_named(scores).items():
        fpr, tpr, auc = s if isinstance(s, tuple) else roc_curve(s, deposits)
        ax.plot(fpr, tpr, lw=1.6, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="random (0.5)")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_success_rate(scores, deposits=None, *, title: str = "Success-rate curve", figsize=(5.5, 5.0)) -> Figure:
    """Capture-efficiency curves: share of deposits vs share of the valid area, highest scores first.

    ``scores`` as in :func:`plot_roc` (precomputed values: ``(area_fraction, deposit_fraction, area)``).
    One axes."""

    fig = new_figure(figsize)
    ax = fig.add_subplot()
    for name, s in _as_named(scores).items():
        a, d, auc = s if isinstance(s, tuple) else success_rate_curve(s, deposits)
        ax.plot(100 * a, 100 * d, lw=1.6, label=f"{name} (area {auc:.3f})")
    ax.plot([0, 100], [0, 100], ls="--", color="grey", lw=1, label="random (0.5)")
    ax.set(
        xlim=(0, 100),
        ylim=(0, 101),
        xlabel="area, highest scores first (%)",
        ylabel="known deposits captured (%)",
        title=title,
    )
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_prediction_area(
    score, deposits=None, *, title: str = "Prediction-area plot", x: str = "percentile", figsize=(6.5, 4.5)
) -> Figure:
    """P-A plot: prediction rate (left axis) and occupied area (right axis, reversed) vs threshold.

    ``score`` is a DataArray (with ``deposits``) or a :class:`pipeline.evaluation.evaluate.PredictionArea`.
    ``x='percentile'`` puts the threshold's percentile in the valid area on the x axis (comparable
    across methods); ``x='score'`` the raw score. The curves cross at the intersection point, marked
    with its normalised density. Axes: two (the right one is a twin).
    """

    pa = score if isinstance(score, PredictionArea) else prediction_area(score, deposits)
    if x not in ("percentile", "score"):
        raise ValueError(f"x={x!r}: use 'percentile' or 'score'")
    if x == "percentile":
        xs = 100 * pa.percentiles
        # the intersection's percentile: 1 - occupied area
        x_star = 100 * (1 - pa.area)
        xlabel = "score threshold (percentile of the valid area)"
    else:
        xs, x_star, xlabel = pa.thresholds, pa.threshold, "score threshold"
    fig = new_figure(figsize)
    ax = fig.add_subplot()
    ax.plot(xs, 100 * pa.prediction_rate, color="tab:red", lw=1.6, label="prediction rate")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("known deposits in the area above the threshold (%)", color="tab:red")
    ax.set_ylim(0, 101)
    right = ax.twinx()
    # occupied area on a reversed axis, so that it crosses the prediction rate where P = 1 - A
    right.plot(xs, 100 * pa.occupied_area, color="tab:blue", lw=1.6, label="occupied area")
    right.set_ylim(101, 0)
    right.set_ylabel("occupied area (%)", color="tab:blue")
    ax.plot([x_star], [100 * pa.rate], "ko", ms=6, zorder=4)
    ax.annotate(
        f"P = {100 * pa.rate:.1f} %, A = {100 * pa.area:.1f} %\nNd = {pa.normalised_density:.2f}",
        (x_star, 100 * pa.rate),
        textcoords="offset points",
        fontsize=8,
        xytext=(-110, -34) if x_star > np.nanmean(xs) else (8, -34),  # keep the label inside the axes
    )
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="center left", fontsize=8)
    ax.set_title(title)
    return fig


def plot_comparison_bars(
    table,
    metrics: Sequence[str] = ("auc", "auc_buffered_mean"),
    *,
    highlight: str | None = None,
    title: str | None = "Comparison of methods",
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Horizontal bars of each metric per method; one axes per metric present in ``table``.

    ``table``: a pandas DataFrame (index = method, columns = metrics, e.g. rows of
    :func:`pipeline.evaluation.evaluate.evaluate_map`), or a mapping method -> metrics dict. A column
    ``<metric>_std`` (or ``auc_buffered_std`` for ``auc_buffered_mean``) becomes error bars;
    ``highlight`` names a method drawn in a distinct colour (e.g. the ViT).
    """
    import pandas as pd

    df = table if isinstance(table, pd.DataFrame) else pd.DataFrame.from_dict(dict(table), orient="index")
    present = [m for m in metrics if m in df.columns]
    if not present:
        raise ValueError(
            f"plot_comparison_bars: none of the metrics {list(metrics)} is a column of the table "
            f"(columns: {list(df.columns)})"
        )
    n = len(present)
    fig = new_figure(figsize or (3.6 * n + 1.0, 0.35 * len(df) + 1.6))
    axes = np.atleast_1d(fig.subplots(1, n, sharey=True))
    names = [str(i) for i in df.index]
    ypos = np.arange(len(names))
    for ax, m in zip(axes, present):
        vals = pd.to_numeric(df[m], errors="coerce").to_numpy(float)
        std_col = m[: -len("_mean")] + "_std" if m.endswith("_mean") else f"{m}_std"
        err = pd.to_numeric(df[std_col], errors="coerce").to_numpy(float) if std_col in df.columns else None
        colors = ["tab:orange" if name == highlight else "tab:blue" for name in names]
        ax.barh(ypos, vals, xerr=err, color=colors, capsize=3)
        for yv, v in zip(ypos, vals):
            if np.isfinite(v):
                ax.text(v, yv, f" {v:.3f}", va="center", fontsize=7)
        if m.startswith("auc") or m == "success_rate_area":
            ax.axvline(0.5, color="grey", ls="--", lw=1)
            ax.set_xlim(0, 1.1)
        ax.set_title(m, fontsize=9)
        ax.set_yticks(ypos, names, fontsize=8)
        ax.invert_yaxis()
    if title:
        fig.suptitle(title)
    return fig


def plot_auc_differences(
    table,
    *,
    reference: str = "vit",
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Forest plot of paired AUC differences (method - ``reference``) with their CIs.

    ``table``: a DataFrame with columns ``method``, ``d_auc``, ``ci_low``, ``ci_high`` and optionally
    ``p_delong`` (:func:`pipeline.evaluation.compare.compare_methods`'s table); rows without a difference
    (the reference itself) are left out. A CI that crosses 0 (the dashed line) is no evidence of a
    difference; filled markers: DeLong p < 0.05.
    """
    import pandas as pd

    df = table if isinstance(table, pd.DataFrame) else pd.DataFrame(table)
    need = [c for c in ("method", "d_auc", "ci_low", "ci_high") if c not in df.columns]
    if need:
        raise ValueError(f"plot_auc_differences: the table has no column(s) {need}; use compare's comparison.csv")
    df = df[pd.to_numeric(df["d_auc"], errors="coerce").notna()]
    fig = new_figure(figsize or (6.4, 0.32 * max(len(df), 1) + 1.4))
    ax = fig.subplots()
    y = np.arange(len(df))
    d = df["d_auc"].to_numpy(float)
    lo, hi = df["ci_low"].to_numpy(float), df["ci_high"].to_numpy(float)
    sig = df["p_delong"].to_numpy(float) < 0.05 if "p_delong" in df.columns else np.zeros(len(df), bool)
    ax.hlines(y, lo, hi, color="tab:blue", lw=1.6)
    ax.scatter(d[sig], y[sig], color="tab:blue", zorder=3, label="DeLong p < 0.05")
    ax.scatter(d[~sig], y[~sig], facecolor="white", edgecolor="tab:blue", zorder=3, label="p >= 0.05")
    ax.axvline(0.0, color="grey", ls="--", lw=1)
    ax.set_yticks(y, [str(m) for m in df["method"]], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"AUC(method) - AUC({reference}), 95 % CI")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or f"Paired AUC differences against {reference}")
    return fig
