"""Known-truth signatures that only a context- or cross-source-aware detector can find (seeded, in memory).

The synthetic province (:mod:`pipeline.data.synthetic`) plants deposits whose halo is a strong co-enrichment,
which any pixel detector ranks high. This module builds a small two-source cube whose targets are *made of
individually normal values*:

- **cross-source targets**: the geochemistry depends on the geophysics in place, nonlinearly
  (``a1 = b1^2 - 1``, ``a2 = |b2| - m``, plus noise). At a target the geochemistry takes the values it has
  elsewhere, but paired with geophysics that predicts otherwise (``b1`` near 0 with ``a1`` high). Every value
  lies inside its band's range and the pairs have no linear correlation to break, so RX (a Mahalanobis
  distance) sees nothing unusual; a model that predicts the geochemistry from the geophysics does.
- **context targets**: a small patch whose values are copied from another part of the map (each pixel and
  each band vector is normal), but which breaks the smooth spatial pattern around it; the smooth fields are
  predictable from their context.

``known_truth_cube(size, seed)`` returns the cube (as :func:`pipeline.data.cube.from_arrays` builds it:
write it with :func:`pipeline.data.cube.write_cube`, which adds the statistics) and the target locations as a DataFrame of map
coordinates with a ``type`` column ('cross' or 'context').
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.data.cube import from_arrays

__all__ = ["known_truth_cube", "KNOWN_TRUTH_BANDS", "KNOWN_TRUTH_SOURCES"]

KNOWN_TRUTH_BANDS = ["a1", "a2", "b1", "b2"]
KNOWN_TRUTH_SOURCES = ["geochemistry", "geochemistry", "geophysics", "geophysics"]
CRS = "EPSG:32650"
RES = 100.0


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """A unit-variance Gaussian random field with correlation length ``scale`` pixels (FFT filter)."""
    h, w = shape
    noise = rng.standard_normal((h, w))
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    filt = np.exp(-0.5 * (fy**2 + fx**2) * (2 * np.pi * scale) ** 2)
    f = np.real(np.fft.ifft2(np.fft.fft2(noise) * filt))
    return (f - f.mean()) / f.std()


def known_truth_cube(size: int = 96, seed: int = 0, n_targets: int = 12, chunk: int = 64):
    """(cube Dataset, targets DataFrame with x, y, type): see the module docstring."""
    rng = np.random.default_rng([seed, 2718])
    h = w = int(size)
    b1 = _smooth_field(rng, (h, w), 6.0)
    b2 = _smooth_field(rng, (h, w), 9.0)
    noise = 0.15
    a1 = b1**2 - 1.0 + noise * rng.standard_normal((h, w))
    m = np.abs(b2).mean()
    a2 = np.abs(b2) - m + noise * rng.standard_normal((h, w))

    margin = 10
    cells = []
    # cross-source targets: where b1 is near 0 (a1 should be near -1), a1 takes a common high value;
    # where |b2| is large (a2 should be high), a2 takes a common low value
    near0 = np.argwhere((np.abs(b1) < 0.3) & (np.abs(b2) > 0.8))
    near0 = near0[(near0.min(axis=1) >= margin) & (near0.max(axis=1) < size - margin)]
    picks = _spread(rng, near0, n_targets, min_dist=8)
    q1, q2 = np.quantile(a1, 0.80), np.quantile(a2, 0.20)
    for r, c in picks:
        a1[r - 1 : r + 2, c - 1 : c + 2] = q1 + noise * rng.standard_normal((3, 3))
        a2[r - 1 : r + 2, c - 1 : c + 2] = q2 + noise * rng.standard_normal((3, 3))
        cells.append((r, c, "cross"))
    # context targets: a 3x3 patch of every band copied from a far-away place
    taken = np.array(picks) if len(picks) else np.zeros((0, 2), int)
    cand = np.argwhere(np.ones((h, w), bool))
    cand = cand[(cand.min(axis=1) >= margin) & (cand.max(axis=1) < size - margin)]
    if len(taken):
        d = np.min(np.abs(cand[:, None, :] - taken[None]).max(axis=2), axis=1)
        cand = cand[d >= 8]
    for r, c in _spread(rng, cand, n_targets // 2, min_dist=8):
        sr, sc = (r + size // 2) % (size - 2 * margin) + margin, (c + size // 2) % (size - 2 * margin) + margin
        for band in (a1, a2, b1, b2):
            band[r - 1 : r + 2, c - 1 : c + 2] = band[sr - 1 : sr + 2, sc - 1 : sc + 2].copy()
        cells.append((r, c, "context"))

    evidence = np.stack([a1, a2, b1, b2]).astype("float32")
    x = 500_000 + RES * (np.arange(w) + 0.5)
    y = 4_000_000 - RES * (np.arange(h) + 0.5)
    cube = from_arrays(
        evidence,
        bands=KNOWN_TRUTH_BANDS,
        sources=KNOWN_TRUTH_SOURCES,
        x=x,
        y=y,
        crs=CRS,
        valid=np.ones((h, w), bool),
        chunk=chunk,
    )
    targets = pd.DataFrame(
        {"x": [x[c] for _, c, _ in cells], "y": [y[r] for r, _, _ in cells], "type": [t for _, _, t in cells]}
    )
    return cube, targets


def _spread(rng: np.random.Generator, cand: np.ndarray, n: int, min_dist: int) -> list[tuple[int, int]]:
    """Up to ``n`` cells of ``cand`` (seeded order), at least ``min_dist`` apart (Chebyshev)."""
    out: list[tuple[int, int]] = []
    for i in rng.permutation(len(cand)):
        r, c = map(int, cand[i])
        if all(max(abs(r - a), abs(c - b)) >= min_dist for a, b in out):
            out.append((r, c))
            if len(out) == n:
                break
    return out
