"""Target-aware score: the enrichment of a commodity's pathfinders.

A generic anomaly score rises for any misfit, depletion included; an explorer for gold wants the cells
where gold and its pathfinders are higher than their context predicts. :func:`enrichment_score` keeps
the positive part of standardised residuals (observed - predicted, in units of each band's spread) of the
pathfinder bands and averages it over them. The bands come from
:func:`pipeline.data.pathfinders.resolve_target`; no deposit location enters.
"""

from __future__ import annotations

import xarray as xr

from pipeline.errors import ConfigError

__all__ = ["enrichment_score"]


def enrichment_score(residuals: xr.DataArray, bands: list[str]) -> xr.DataArray:
    """Mean over ``bands`` of the positive standardised residuals: [band, y, x] -> [y, x].

    ``residuals`` [band, y, x] are standardised per band (observed minus what the context and the other
    sources predict, divided by the band's residual spread; a plain robust z-score for a baseline without
    a prediction), numpy- or dask-backed. A cell scores ``mean_b max(r_b, 0)``: an enrichment raises it,
    a depletion of equal size leaves it at 0, and co-enrichment of several pathfinders adds up. NaN where
    every selected band is NaN (outside the valid area); a NaN band elsewhere is skipped. Stays lazy on
    dask input; keeps the coordinates and CRS of ``residuals``.
    """
    if "band" not in residuals.dims:
        raise ConfigError(f"enrichment_score: residuals have dims {residuals.dims}; they need a 'band' dimension")
    have = [str(b) for b in residuals["band"].values.tolist()]
    missing = [b for b in bands if b not in have]
    if not bands or missing:
        raise ConfigError(
            f"enrichment_score: pathfinder band(s) {missing or '(none given)'} are not among the residuals' bands "
            f"{have}. Fix: resolve the target against the same cube (pipeline.data.pathfinders.resolve_target)"
        )
    r = residuals.sel(band=list(bands))
    out = r.clip(min=0).mean("band", skipna=True)
    out.name = "enrichment"
    out.attrs = {"long_name": "mean positive standardised residual of the pathfinders", "pathfinders": list(bands)}
    if getattr(residuals, "rio", None) is not None and residuals.rio.crs is not None:
        out = out.rio.write_crs(residuals.rio.crs)
    return out
