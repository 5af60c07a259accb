"""Residuals of hidden predictions, and their label-free calibration into anomaly scores.

The scoring protocol, shared by training (validation loss, calibration) and scoring:

- :func:`score_partitions`: K complementary token partitions; each token is hidden in exactly one.
- :func:`predict_hidden`: every (band, pixel) of a window predicted with its hiding unit hidden at its token
  (``cross``: that unit only, the other sources visible, so the prediction uses the other sources in place
  and the context; ``spatial``: every unit of the token hidden, so the prediction uses the context only).
  U x K forward passes (U units) for ``cross``, K for ``spatial``.
- :class:`Calibration`: per band, the median and robust scale (1.4826 MAD) of the residual
  ``prediction - observation``; per source group, the Ledoit-Wolf shrunk covariance of the standardised
  residuals and the median of the squared Mahalanobis distance. It is fitted on held-out windows after
  training (never on deposits) and stored in the checkpoint, so a score map is a per-pixel function and
  stays lazy.

An anomaly of group ``g`` is ``d2_g / median(d2_g)`` (1 = a typical pixel), so groups of 3 and 39 bands
are on one scale, and the prospectivity is their weighted mean (equal weights by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from pipeline.models.vit import token_mask_to_pixels

__all__ = [
    "score_partitions",
    "predict_hidden",
    "scoring_mode",
    "scoring_modes",
    "Calibration",
    "fit_calibration",
    "MODES",
]

MODES = ("cross", "spatial")  # what predict_hidden hides; a score may average both ("both")
MAD_TO_SD = 1.4826
CLIP = 5.0  # standardised residuals winsorised at +-CLIP when the covariance is fitted (robustness)


def score_partitions(n_tokens: int, k: int, *, seed: int = 0) -> Tensor:
    """[K, L] bool: a seeded random partition of the tokens into ``k`` sets of (nearly) equal size."""
    k = max(1, min(int(k), n_tokens))
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n_tokens, generator=g)
    masks = torch.zeros(k, n_tokens, dtype=torch.bool)
    masks[torch.arange(n_tokens) % k, perm] = True
    return masks


def _context_hide(partition: Tensor, ratio: float, generator: torch.Generator) -> Tensor:
    """[L] bool: ``partition`` plus random other tokens, so that ``ratio`` of the tokens are hidden (the
    context the model saw in training at its mask ratio)."""
    n_tok = partition.numel()
    extra = int(round(ratio * n_tok)) - int(partition.sum())
    if extra <= 0:
        return partition
    rest = (~partition).nonzero().flatten()
    extra = min(extra, rest.numel() - 1)  # keep at least one token fully visible
    if extra <= 0:
        return partition
    pick = rest[torch.randperm(rest.numel(), generator=generator)[:extra]]
    out = partition.clone()
    out[pick] = True
    return out


@torch.no_grad()
def predict_hidden(
    model, x: Tensor, valid: Tensor, partitions: Tensor, *, mode: str | None = "cross", seed: int = 0
) -> Tensor:
    """[N, C, w, w] fp32: each (band, pixel) predicted with its unit hidden at its token.

    x: [N, C, w, w] normalised evidence; valid: [N, w, w] bool; partitions: [K, L] bool (a partition of the
    tokens). ``mode``: ``cross`` or ``spatial`` (module docstring). Besides the tokens predicted, every unit
    of random other tokens is hidden so that the model's training ``mask_ratio`` of the tokens is hidden,
    as in training (the ratio the model was trained with is the ratio it is scored with).
    """
    if mode is None:  # a model trained without masking: plain reconstruction
        return model(x, valid=valid).float()
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    n = x.shape[0]
    units, n_units, n_tok = model.units, model.n_units, model.n_tokens
    ratio = float(getattr(model, "mask_ratio", 0.0))
    gen = torch.Generator().manual_seed(int(seed) + 1009)
    partitions = partitions.cpu()
    pix = token_mask_to_pixels(partitions, model.patch).to(device=x.device, dtype=torch.float32)  # [K, w, w]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for k in range(partitions.shape[0]):
        if mode == "spatial":
            tokens = _context_hide(partitions[k], ratio, gen).to(x.device)
            hide = tokens[None, None, :].expand(n, n_units, n_tok)
            out += model(x, valid=valid, hide=hide).float() * pix[k]
            continue
        context = _context_hide(torch.zeros(n_tok, dtype=torch.bool), ratio, gen)
        context = (context & ~partitions[k]).to(x.device)
        for u, chans in enumerate(units):
            hide = context[None, None, :].expand(n, n_units, n_tok).clone()
            hide[:, u, :] |= partitions[k].to(x.device)
            pred = model(x, valid=valid, hide=hide).float()
            idx = torch.as_tensor(chans, device=x.device)
            out[:, idx] += pred[:, idx] * pix[k]
    return out


def scoring_mode(model, requested: str) -> str | None:
    """The hiding a model is scored with: None (plain reconstruction) for a model trained without any
    masking, ``spatial`` for one trained without cross-source masking, else ``requested``."""
    if float(getattr(model, "mask_ratio", 0.0)) <= 0 and float(getattr(model, "cross_ratio", 0.0)) <= 0:
        return None
    if float(getattr(model, "cross_ratio", 0.0)) <= 0:
        return "spatial"
    if requested == "spatial" and float(getattr(model, "mask_ratio", 0.0)) <= 0:
        return "cross"  # never trained to predict a whole token from its context
    return requested


def scoring_modes(model, requested: str) -> list[str | None]:
    """The hidings a score averages: ``both`` = spatial and cross, as far as the model was trained for them."""
    wanted = ("spatial", "cross") if requested == "both" else (requested,)
    out: list[str | None] = []
    for m in wanted:
        got = scoring_mode(model, m)
        if got not in out:
            out.append(got)
    return out


@dataclass
class Calibration:
    """Label-free standardisation of residuals (module docstring). Arrays are float64."""

    center: np.ndarray  # [C]
    scale: np.ndarray  # [C]
    groups: dict[str, list[int]]
    precision: dict[str, np.ndarray] = field(default_factory=dict)  # g -> [n_g, n_g]
    median: dict[str, float] = field(default_factory=dict)  # g -> median squared distance
    n_pixels: int = 0

    @classmethod
    def identity(cls, groups: dict[str, list[int]]) -> Calibration:
        """No calibration (old checkpoints): unit scale, identity covariance, median 1."""
        c = sum(len(v) for v in groups.values())
        return cls(
            np.zeros(c),
            np.ones(c),
            groups,
            {g: np.eye(len(i)) for g, i in groups.items()},
            {g: float(len(i)) for g, i in groups.items()},
        )

    def to_meta(self) -> dict:
        """Plain containers for a weights-only checkpoint."""
        return {
            "center": self.center.tolist(),
            "scale": self.scale.tolist(),
            "groups": self.groups,
            "precision": {g: p.tolist() for g, p in self.precision.items()},
            "median": dict(self.median),
            "n_pixels": int(self.n_pixels),
        }

    @classmethod
    def for_mode(cls, meta: dict | None, mode: str | None, groups: dict[str, list[int]]) -> Calibration:
        """The calibration of one scoring mode from a checkpoint's ``{mode: calibration}`` record."""
        if meta and "center" not in meta:
            meta = meta.get(str(mode))
        return cls.from_meta(meta, groups)

    @classmethod
    def from_meta(cls, meta: dict | None, groups: dict[str, list[int]]) -> Calibration:
        """A calibration from :meth:`to_meta`'s record (identity when None: an uncalibrated model)."""
        if not meta:
            return cls.identity(groups)
        return cls(
            np.asarray(meta["center"], np.float64),
            np.asarray(meta["scale"], np.float64),
            {str(g): list(map(int, i)) for g, i in meta["groups"].items()},
            {g: np.asarray(p, np.float64) for g, p in meta["precision"].items()},
            {g: float(v) for g, v in meta["median"].items()},
            int(meta.get("n_pixels", 0)),
        )

    def standardise(self, residual: np.ndarray) -> np.ndarray:
        """[C, P] residuals -> [C, P] standardised residuals (float32)."""
        return ((residual - self.center[:, None]) / self.scale[:, None]).astype(np.float32)

    def group_distances(self, z: np.ndarray) -> dict[str, np.ndarray]:
        """[C, P] standardised residuals -> {group: [P] squared Mahalanobis distance / its median}."""
        out = {}
        for g, idx in self.groups.items():
            zg = z[idx].astype(np.float64)
            d2 = np.einsum("ip,ij,jp->p", zg, self.precision[g], zg)
            out[g] = (d2 / max(self.median[g], 1e-12)).astype(np.float32)
        return out


def fit_calibration(
    residual: np.ndarray, groups: dict[str, list[int]], *, max_pixels: int = 200_000, seed: int = 0
) -> Calibration:
    """Fit a :class:`Calibration` on residuals [P, C] of valid pixels of held-out windows."""
    from sklearn.covariance import LedoitWolf  # heavy: imported only when a model is calibrated

    r = np.asarray(residual, np.float64)
    r = r[np.all(np.isfinite(r), axis=1)]
    if len(r) > max_pixels:
        r = r[np.random.default_rng(seed).choice(len(r), max_pixels, replace=False)]
    if len(r) < 10:
        cal = Calibration.identity(groups)
        return cal
    center = np.median(r, axis=0)
    scale = MAD_TO_SD * np.median(np.abs(r - center), axis=0)
    sd = r.std(axis=0)
    scale = np.where(scale > 1e-9, scale, np.where(sd > 1e-9, sd, 1.0))  # constant bands: no division by 0
    z = (r - center) / scale
    cal = Calibration(center, scale, {str(g): list(map(int, i)) for g, i in groups.items()}, n_pixels=len(r))
    for g, idx in cal.groups.items():
        zg = np.clip(z[:, idx], -CLIP, CLIP)
        if len(idx) == 1:
            prec = np.ones((1, 1))
        else:
            prec = LedoitWolf(assume_centered=True).fit(zg).precision_
        d2 = np.einsum("pi,ij,pj->p", z[:, idx], prec, z[:, idx])
        cal.precision[g] = prec
        cal.median[g] = float(max(np.median(d2), 1e-9))
    return cal
