"""Small real cubes for the model / patch / training tests (written to Zarr in tmp_path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.cube import from_arrays, write_cube

BANDS = ["Cr", "Ni", "Co", "MgO", "mag", "grav", "ultramafic", "fault_dist"]
SOURCES = ["geochemistry"] * 4 + ["geophysics"] * 2 + ["geology"] * 2


def make_arrays(size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[8, size, size] float32 evidence with smooth regional structure, two planted anomalies and a
    no-data corner; and the [size, size] bool valid mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    trend = np.sin(3 * xx + 1) + np.cos(2 * yy)
    body = ((xx - 0.3) ** 2 + (yy - 0.6) ** 2 < 0.03).astype("float32")  # an "ultramafic" body
    anomaly = np.exp(-((xx - 0.7) ** 2 + (yy - 0.3) ** 2) / 0.002) + 0.8 * body
    ev = np.empty((len(BANDS), size, size), dtype="float32")
    for i in range(4):
        ev[i] = np.exp(0.5 * trend + (1 + i * 0.2) * anomaly + 0.1 * rng.standard_normal((size, size)))
    ev[4] = trend + 2 * body + 0.05 * rng.standard_normal((size, size))
    ev[5] = np.cos(4 * yy) + 0.05 * rng.standard_normal((size, size))
    ev[6] = body
    ev[7] = np.abs(xx - 0.5 + 0.1 * np.sin(8 * yy))
    valid = np.ones((size, size), dtype=bool)
    valid[: size // 5, : size // 4] = False  # outside the study area
    ev[:, ~valid] = np.nan
    return ev, valid


def write_test_cube(path: Path, size: int = 64, chunk: int = 32, seed: int = 0) -> Path:
    ev, valid = make_arrays(size, seed)
    x = 500_000 + 100 * (np.arange(size) + 0.5)
    y = 4_000_000 - 100 * (np.arange(size) + 0.5)
    ds = from_arrays(ev, bands=BANDS, sources=SOURCES, x=x, y=y, crs="EPSG:32646", valid=valid, chunk=chunk)
    return write_cube(ds, path)
