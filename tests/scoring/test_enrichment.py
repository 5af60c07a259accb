"""Enrichment scoring on planted truth: an enrichment ranks above an equal depletion."""

from __future__ import annotations

import numpy as np
import pytest
import rioxarray  # noqa: F401
import xarray as xr

from pipeline.errors import ConfigError
from pipeline.scoring.enrichment import enrichment_score


def _residuals(values: np.ndarray, bands) -> xr.DataArray:
    c, h, w = values.shape
    da = xr.DataArray(
        values.astype("float32"),
        dims=("band", "y", "x"),
        coords={"band": list(bands), "y": 1000.0 - np.arange(h) - 0.5, "x": np.arange(w) + 0.5},
    )
    return da.rio.write_crs("EPSG:32650")


def test_planted_enrichment_ranks_above_an_equal_depletion():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(4, 40, 50))
    r[:2, 5:8, 5:8] += 3.0  # two pathfinders enriched together
    r[:2, 30:33, 30:33] -= 3.0  # the same two depleted by as much
    r[3, 20:23, 40:43] += 3.0  # a band that is no pathfinder
    res = _residuals(r, ["Au", "As", "Sb", "Fe"])
    s = enrichment_score(res, ["Au", "As", "Sb"])
    v = s.values
    assert s.dims == ("y", "x") and s.rio.crs is not None
    enriched, depleted, other = v[5:8, 5:8].mean(), v[30:33, 30:33].mean(), v[20:23, 40:43].mean()
    assert enriched > depleted + 1.0
    assert enriched > np.quantile(v, 0.99)
    assert depleted < np.median(v)  # a depletion scores below the background, never above it
    assert abs(other - np.median(v)) < 0.3  # a non-pathfinder anomaly does not count
    # a generic (absolute) score cannot tell them apart: that is the point of the target-aware map
    generic = np.abs(r[:3]).mean(axis=0)
    assert generic[5:8, 5:8].mean() == pytest.approx(generic[30:33, 30:33].mean(), rel=0.15)


def test_nan_outside_and_lazy_on_dask():
    r = np.ones((2, 6, 7))
    r[:, 0, :] = np.nan
    r[0, 1, 1] = np.nan  # one band missing at a cell: the other one scores it
    res = _residuals(r, ["Li", "Be"])
    s = enrichment_score(res, ["Li", "Be"])
    assert np.isnan(s.values[0]).all() and s.values[1, 1] == pytest.approx(1.0)
    lazy = enrichment_score(res.chunk({"y": 3}), ["Li", "Be"])
    assert lazy.chunks is not None
    np.testing.assert_array_equal(lazy.values, s.values)


def test_unknown_band_names_the_fix():
    res = _residuals(np.zeros((1, 2, 2)), ["Li"])
    with pytest.raises(ConfigError, match=r"\['Au'\].*Fix"):
        enrichment_score(res, ["Au"])
