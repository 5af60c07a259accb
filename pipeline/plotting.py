"""Figures for cubes, score maps and evaluation curves.

Every function returns a :class:`matplotlib.figure.Figure` built on the Agg canvas (no pyplot state,
never ``plt.show``): save it with ``fig.savefig(path)``. Large rasters are decimated to at most
``max_pixels`` a side before they are loaded, so a province-scale cube plots in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor used by cube.normalised)
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "plot_bands",
    "plot_map",
    "plot_roc",
    "plot_success_rate",
    "plot_prediction_area",
    "plot_comparison_bars",
]

MAX_PIXELS = 800


def _new_figure(figsize) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)  # Agg canvas: savefig works, no display backend is touched
    return fig


def _decimate(da: xr.DataArray, max_pixels: int) -> xr.DataArray:
    """Stride-subsample (y, x) so neither side exceeds ``max_pixels`` (nearest, cheap on dask)."""
    step = max(1, math.ceil(max(da.sizes["y"], da.sizes["x"]) / max_pixels))
    return da.isel(y=slice(None, None, step), x=slice(None, None, step)) if step > 1 else da


def _extent(da: xr.DataArray) -> tuple[float, float, float, float]:
    """imshow extent (left, right, bottom, top) from pixel-centre coordinates."""
    x = np.asarray(da["x"].values, dtype=float)
    y = np.asarray(da["y"].values, dtype=float)
    dx = abs(x[1] - x[0]) if x.size > 1 else 1.0
    dy = abs(y[1] - y[0]) if y.size > 1 else 1.0
    return (x.min() - dx / 2, x.max() + dx / 2, y.min() - dy / 2, y.max() + dy / 2)


def _origin(da: xr.DataArray) -> str:
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
    valid area. ``normalise=True`` shows ``pipeline.cube.normalised`` values (needs the cube's
    statistics, i.e. a written cube). Axes: one per band plus one for the mask (extra grid cells are
    removed); each band panel has a colour bar, which adds one axes each.
    """
    names = [str(b) for b in cube["band"].values.tolist()] if bands is None else [str(b) for b in bands]
    missing = [b for b in names if b not in set(map(str, cube["band"].values.tolist()))]
    if missing:
        from .errors import CubeError

        raise CubeError(
            f"plot_bands: band(s) {missing} are not in the cube; its bands are {cube['band'].values.tolist()}. "
            "Fix: pass names from cube.band"
        )
    if normalise:
        from .cube import normalised

        ev = normalised(cube, fill=np.nan)
    else:
        ev = cube["evidence"]
    ev = _decimate(ev.sel(band=names), max_pixels)
    valid = _decimate(cube["valid"], max_pixels)
    ev_np = np.asarray(ev.values, dtype="float32")
    valid_np = np.asarray(valid.values).astype(bool)
    sources = cube["source"].sel(band=names).values.tolist() if "source" in cube.coords else [""] * len(names)

    n_panels = len(names) + 1
    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = _new_figure((panel_size * ncols + 0.6, panel_size * nrows + (0.4 if title else 0)))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    extent, origin = _extent(valid), _origin(valid)
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
    ax.imshow(valid_np.astype("uint8"), extent=extent, origin=origin, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_title(f"valid mask\n({valid_np.mean():.0%} valid)", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    for ax in axes[n_panels:]:
        fig.delaxes(ax)
    if title:
        fig.suptitle(title)
    return fig
