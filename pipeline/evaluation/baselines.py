"""Seven comparison methods behind one interface: ``score_baseline(name, cube) -> score map``.

Every method sees the model's input, :func:`pipeline.data.cube.normalised` (robust-scaled evidence,
invalid pixels filled with 0), is fitted on a seeded random subsample of valid pixels (deposits are
never used), and scores every valid pixel; higher = more anomalous. The output is an
``xr.DataArray`` (y, x) float32 with the cube's coordinates and CRS, NaN outside ``valid``.

=========  ======================================================================================
name       score
=========  ======================================================================================
pca        squared reconstruction error from the first k principal components (k explains ~90 %)
rx         Mahalanobis distance (Reed-Xiaoli); ``robust=True`` uses the MCD covariance
iforest    isolation forest: negative ``score_samples``
lof        local outlier factor (``novelty=True``), fitted on the subsample
ocsvm      one-class SVM (RBF), an alternative to lof (not in the default seven)
dense_ae   per-pixel MLP autoencoder (torch): mean squared reconstruction error over bands
conv_ae    fully convolutional autoencoder over windows (torch): dense per-pixel error map
vae        per-pixel variational autoencoder (torch): negative ELBO (``score='recon'``: error only)
rx_focal   rx on a focal stack: each band's mean and std over the ``window`` x ``window`` neighbourhood
iforest_focal  isolation forest on the same focal stack
=========  ======================================================================================

The focal controls see each pixel's context at the ViT's window size but no learned model of it: if
they match the ViT, the context (not the transformer) carries the signal.

Memory: the cube is read in row blocks of ``block`` rows (full width, all bands), so a
4096 x 4096 cube is scored without holding it whole; the training sample is gathered block by block
too. The score map itself is held in memory (float32, 64 MiB for 4096 x 4096).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext as _nullcontext

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from pipeline.data.cube import normalised
from pipeline.errors import ConfigError, CubeError, require
from pipeline.models.nets import CONV_AE_HALO, CONV_AE_MULTIPLE, ConvAE, PixelAE, PixelVAE
from pipeline.scoring.enrichment import enrichment_score

log = logging.getLogger(__name__)

__all__ = [
    "BASELINES",
    "DEFAULT_BASELINES",
    "FOCAL_BASELINES",
    "TORCH_BASELINES",
    "list_baselines",
    "score_baseline",
    "train_sample",
    "focal_stack",
    "pca_enrichment",
]

# The seven comparison methods of the paper's protocol, in report order.
DEFAULT_BASELINES = ("pca", "rx", "iforest", "lof", "dense_ae", "conv_ae", "vae")
# Controls that say whether context matters: pixel detectors on a focal mean + std stack.
FOCAL_BASELINES = ("rx_focal", "iforest_focal")


# ------------------------------------------------------------------------------------------------
# data access: seeded training sample, block-wise scoring
# ------------------------------------------------------------------------------------------------


def _valid_mask(cube: xr.Dataset) -> np.ndarray:
    valid = np.asarray(cube["valid"].values).astype(bool)
    if not valid.any():
        raise CubeError("the cube has no valid pixel to fit a baseline on. Fix: check its study-area mask")
    return valid


def _row_blocks(h: int, block: int):
    for r0 in range(0, h, block):
        yield r0, min(h, r0 + block)


def train_sample(cube: xr.Dataset, n: int, seed: int, *, block: int = 512) -> np.ndarray:
    """Seeded random sample of ``min(n, n_valid)`` valid pixels of the normalised cube, [N, C] float32.

    The same seed gives the same pixels whatever ``block`` is (indices are drawn over the whole
    valid mask first, then gathered one row block at a time).
    """
    valid = _valid_mask(cube)
    flat_valid = np.flatnonzero(valid)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(flat_valid, size=min(n, flat_valid.size), replace=False))
    rows, cols = np.divmod(pick, valid.shape[1])
    z = normalised(cube)
    out = np.empty((pick.size, z.sizes["band"]), dtype="float32")
    for r0, r1 in _row_blocks(valid.shape[0], block):
        sel = (rows >= r0) & (rows < r1)
        if sel.any():
            zb = np.asarray(z.isel(y=slice(r0, r1)).values)  # [C, h, W]
            out[sel] = zb[:, rows[sel] - r0, cols[sel]].T
    return out


def _score_pixels(cube: xr.Dataset, fn: Callable[[np.ndarray], np.ndarray], block: int) -> np.ndarray:
    """Apply a pixel scorer ``fn([M, C]) -> [M]`` to every valid pixel, one row block at a time; [H, W]."""
    valid = _valid_mask(cube)
    z = normalised(cube)
    out = np.full(valid.shape, np.nan, dtype="float32")
    for r0, r1 in _row_blocks(valid.shape[0], block):
        vb = valid[r0:r1]
        if not vb.any():
            continue
        zb = np.asarray(z.isel(y=slice(r0, r1)).values)  # [C, h, W]
        x = zb[:, vb].T  # [M, C]
        scores = np.empty(x.shape[0], dtype="float32")
        for i in range(0, x.shape[0], 65536):  # bound the scorer's temporaries
            scores[i : i + 65536] = fn(x[i : i + 65536])
        ob = out[r0:r1]
        ob[vb] = scores
    return out


def _as_map(cube: xr.Dataset, values: np.ndarray, name: str, attrs: dict) -> xr.DataArray:
    da = xr.DataArray(
        values.astype("float32"),
        dims=("y", "x"),
        coords={"y": cube["y"].values, "x": cube["x"].values},
        name=f"score_{name}",
        attrs={"baseline": name, "long_name": f"anomaly score ({name})", **attrs},
    )
    return da.rio.write_crs(cube.rio.crs)


# ------------------------------------------------------------------------------------------------
# classical methods
# ------------------------------------------------------------------------------------------------


def _fit_pca(x: np.ndarray, seed: int, variance: float = 0.9, n_components: int | None = None):
    from sklearn.decomposition import PCA

    c = x.shape[1]
    full = PCA(random_state=seed).fit(x)
    if n_components is None:
        k = int(np.searchsorted(np.cumsum(full.explained_variance_ratio_), variance) + 1)
    else:
        k = int(n_components)
    k = max(1, min(k, c - 1))  # keep at least one residual direction, or every error is 0
    comps, mean = full.components_[:k], full.mean_

    def score(v):
        d = v - mean
        return ((d - (d @ comps.T) @ comps) ** 2).sum(axis=1)

    return score, {"n_components": k, "explained_variance": float(full.explained_variance_ratio_[:k].sum())}


def pca_enrichment(
    cube: xr.Dataset,
    bands: list[str],
    *,
    seed: int = 0,
    max_train_pixels: int = 20000,
    block: int = 512,
    variance: float = 0.9,
) -> xr.DataArray:
    """Target-aware PCA: fitted on every band, scored by the enrichment of the ``bands`` (pathfinders).

    A pixel's residual is its evidence minus the PCA reconstruction from the leading components of all
    bands (what the other bands predict), divided by each band's residual std over the training sample;
    the score is :func:`pipeline.scoring.enrichment.enrichment_score` of the pathfinder residuals, the
    combination the ViT's target-aware map uses. [H, W] float32, NaN outside ``valid``.
    """
    from sklearn.decomposition import PCA

    all_bands = [str(b) for b in cube["band"].values.tolist()]
    missing = [b for b in bands if b not in all_bands]
    if missing or not bands:
        raise ConfigError(f"pca_enrichment: band(s) {missing or '(none)'} are not in the cube's bands {all_bands}")
    t0 = time.perf_counter()
    x = train_sample(cube, max_train_pixels, seed, block=block)
    full = PCA(random_state=seed).fit(x)
    k = max(1, min(int(np.searchsorted(np.cumsum(full.explained_variance_ratio_), variance) + 1), x.shape[1] - 1))
    comps, mean = full.components_[:k], full.mean_

    def residual(v):
        d = v - mean
        return d - (d @ comps.T) @ comps

    spread = residual(x).std(axis=0)
    spread[spread == 0] = 1.0

    def score(v):
        r = residual(v) / spread  # [M, C]
        da = xr.DataArray(r.T[:, :, None], dims=("band", "y", "x"), coords={"band": all_bands})
        return np.asarray(enrichment_score(da, list(bands)).values[:, 0], dtype="float32")

    values = _score_pixels(cube, score, block)
    info = {
        "n_components": k,
        "n_train": int(x.shape[0]),
        "pathfinders": list(bands),
        "fit_s": time.perf_counter() - t0,
    }
    return _as_map(cube, values, "pca_enrichment", {**info, "seed": seed})


def _fit_rx(x: np.ndarray, seed: int, robust: bool = False):
    from scipy.linalg import pinvh
    from sklearn.covariance import EmpiricalCovariance, MinCovDet

    est = MinCovDet(random_state=seed).fit(x) if robust else EmpiricalCovariance().fit(x)
    mean, prec = est.location_, pinvh(est.covariance_)

    def score(v):
        d = v - mean
        return ((d @ prec) * d).sum(axis=1)  # einsum without a BLAS path was 2x slower than PCA

    return score, {"robust": bool(robust)}


def _fit_iforest(x: np.ndarray, seed: int, n_estimators: int = 200, n_jobs: int | None = None):
    from sklearn.ensemble import IsolationForest

    model = IsolationForest(n_estimators=n_estimators, random_state=seed, n_jobs=n_jobs).fit(x)
    return (lambda v: -model.score_samples(v)), {"n_estimators": n_estimators}


def _fit_lof(x: np.ndarray, seed: int, n_neighbors: int = 100, max_fit: int = 10000, n_jobs: int | None = None):
    from sklearn.neighbors import LocalOutlierFactor

    if x.shape[0] > max_fit:  # scoring cost grows with the fitted set (k-NN queries)
        x = x[np.random.default_rng(seed).choice(x.shape[0], max_fit, replace=False)]

    # n_neighbors must exceed the size of an anomalous cluster in the training sample, else that
    # cluster is locally dense and looks normal (k=20 missed 3x3 planted blobs in the tests).

    # the slowest method by far (k-NN queries of every pixel: ~2,400 pixels/s on 2 busy cores);
    # n_jobs=-1 spreads the queries over the machine's cores
    model = LocalOutlierFactor(n_neighbors=n_neighbors, novelty=True, n_jobs=n_jobs).fit(x)
    return (lambda v: -model.score_samples(v)), {"n_neighbors": n_neighbors, "n_fit": int(x.shape[0])}


def _fit_ocsvm(x: np.ndarray, seed: int, nu: float = 0.05, max_fit: int = 5000):
    from sklearn.svm import OneClassSVM

    # kernel SVM fitting is quadratic in samples: cap it
    if x.shape[0] > max_fit:
        x = x[np.random.default_rng(seed).choice(x.shape[0], max_fit, replace=False)]
    model = OneClassSVM(nu=nu, gamma="scale").fit(x)
    return (lambda v: -model.score_samples(v)), {"nu": nu, "n_fit": int(x.shape[0])}


# ------------------------------------------------------------------------------------------------
# torch methods
# ------------------------------------------------------------------------------------------------


def _torch():
    return require("torch", "the deep baselines (dense_ae, conv_ae, vae)")


def _train(model, batches: Callable, loss_fn: Callable, steps: int, lr: float, seed: int):
    """Plain Adam loop: ``batches(step) -> tensor(s)``, ``loss_fn(model, batch) -> scalar``."""
    torch = _torch()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        loss = loss_fn(model, batches(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    model.eval()
    return float(torch.stack(losses[-max(1, steps // 10) :]).mean())


class _torch_threads:
    """Run tiny models on ``n`` intra-op threads: on a busy 2-core box, torch's default threads spin
    against each other and a 400-step MLP fit took 44 s instead of 3.5 s (measured)."""

    def __init__(self, n: int = 1):
        self.n = n

    def __enter__(self):
        torch = _torch()
        self.prev = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        _torch().set_num_threads(self.prev)


def _bottleneck(x: np.ndarray, variance: float = 0.9) -> int:
    """Latent width: the number of principal components explaining ``variance`` (at most C - 1).

    A wider bottleneck learns the anomalies too (latent 3 on a 2-factor, 6-band test cube
    reconstructed the planted anomalies: AUC 0.71 instead of 0.99).
    """
    ev = np.linalg.eigvalsh(np.cov(x, rowvar=False))[::-1].clip(min=0)
    k = int(np.searchsorted(np.cumsum(ev) / max(ev.sum(), 1e-12), variance) + 1)
    return max(1, min(k, x.shape[1] - 1))


def _fit_dense_ae(
    x: np.ndarray,
    seed: int,
    steps: int = 400,
    batch_size: int = 256,
    lr: float = 3e-3,
    hidden: tuple[int, ...] = (32, 16),
    latent: int | None = None,
):
    torch = _torch()

    torch.manual_seed(seed)
    c = x.shape[1]
    latent = latent or _bottleneck(x)
    model = PixelAE(c, hidden=tuple(hidden), latent=latent)
    xt = torch.from_numpy(np.ascontiguousarray(x))
    g = torch.Generator().manual_seed(seed)

    def batches(_):
        return xt[torch.randint(0, xt.shape[0], (batch_size,), generator=g)]

    final = _train(model, batches, lambda m, b: ((m(b) - b) ** 2).mean(), steps, lr, seed)

    @torch.no_grad()
    def score(v):
        t = torch.from_numpy(np.ascontiguousarray(v, dtype="float32"))
        return ((model(t) - t) ** 2).mean(dim=1).numpy()

    return score, {"steps": steps, "batch_size": batch_size, "latent": latent, "final_loss": final}


def _fit_vae(
    x: np.ndarray,
    seed: int,
    steps: int = 500,
    batch_size: int = 256,
    lr: float = 3e-3,
    hidden: int = 32,
    latent: int | None = None,
    beta: float = 1.0,
    score: str = "elbo",
):
    torch = _torch()

    if score not in ("elbo", "recon"):
        raise ConfigError(f"vae: score={score!r} is unknown; use 'elbo' (negative ELBO) or 'recon'")
    torch.manual_seed(seed)
    c = x.shape[1]
    latent = latent or _bottleneck(x)
    model = PixelVAE(c, hidden=hidden, latent=latent)
    xt = torch.from_numpy(np.ascontiguousarray(x))
    g = torch.Generator().manual_seed(seed)

    def batches(_):
        return xt[torch.randint(0, xt.shape[0], (batch_size,), generator=g)]

    def loss_fn(m, b):
        recon, mu, logvar = m(b)
        # Gaussian decoder with unit variance: -log p(x|z) = 0.5 * ||x - recon||^2 + const
        return (0.5 * ((recon - b) ** 2).sum(dim=1) + beta * m.kl(mu, logvar)).mean()

    final = _train(model, batches, loss_fn, steps, lr, seed)

    @torch.no_grad()
    def score_fn(v):
        t = torch.from_numpy(np.ascontiguousarray(v, dtype="float32"))
        recon, mu, logvar = model(t)
        err = 0.5 * ((recon - t) ** 2).sum(dim=1)
        return (err + beta * model.kl(mu, logvar) if score == "elbo" else err).numpy()

    return score_fn, {"steps": steps, "batch_size": batch_size, "latent": latent, "score": score, "final_loss": final}


def _conv_ae_map(
    cube: xr.Dataset,
    *,
    seed: int,
    max_train_pixels: int,
    block: int,
    window: int = 16,
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 3e-3,
    width: int = 32,
    latent: int = 4,
    min_valid_fraction: float = 0.5,
):
    """Train :class:`ConvAE` on random windows and reconstruct every row block (with a halo)."""
    torch = _torch()

    if window % CONV_AE_MULTIPLE:
        raise ConfigError(f"conv_ae: window={window} must be a multiple of {CONV_AE_MULTIPLE}, e.g. 16")
    valid = _valid_mask(cube)
    h, w = valid.shape
    if h < window or w < window:
        raise ConfigError(f"conv_ae: the cube ({h} x {w}) is smaller than window={window}; pass a smaller window")
    z = normalised(cube)
    c = z.sizes["band"]

    # Training windows: seeded top-left corners whose window is mostly valid; the window count is
    # max_train_pixels / window (overlapping windows: ~window x more pixel visits than that).
    frac = _box_mean(valid.astype("float32"), window)  # [h - window + 1, w - window + 1]
    corners = np.flatnonzero(frac >= min_valid_fraction)
    if corners.size == 0:
        raise CubeError(
            f"conv_ae: no {window} x {window} window is {min_valid_fraction:.0%} valid; use a smaller window"
        )
    rng = np.random.default_rng(seed)
    n_win = int(min(corners.size, max(64, max_train_pixels // window)))
    pick = np.sort(rng.choice(corners, size=n_win, replace=False))
    r0s, c0s = np.divmod(pick, frac.shape[1])
    xs = np.empty((n_win, c, window, window), dtype="float32")
    ms = np.empty((n_win, 1, window, window), dtype="float32")
    for b0, b1 in _row_blocks(h, block):
        sel = np.flatnonzero((r0s >= b0) & (r0s < b1))
        if sel.size == 0:
            continue
        top = min(h, b1 + window)
        zb = np.asarray(z.isel(y=slice(b0, top)).values)
        for i in sel:
            r, cc = r0s[i] - b0, c0s[i]
            xs[i] = zb[:, r : r + window, cc : cc + window]
            ms[i, 0] = valid[r0s[i] : r0s[i] + window, cc : cc + window]

    torch.manual_seed(seed)
    model = ConvAE(c, width=width, latent=latent)
    xt, mt = torch.from_numpy(xs), torch.from_numpy(ms)
    g = torch.Generator().manual_seed(seed)

    def batches(_):
        idx = torch.randint(0, n_win, (batch_size,), generator=g)
        return xt[idx], mt[idx]

    def loss_fn(m, batch):
        xb, mb = batch
        err = ((m(xb) - xb) ** 2).mean(dim=1, keepdim=True)
        return (err * mb).sum() / mb.sum().clamp_min(1.0)  # invalid pixels carry no target

    final = _train(model, batches, loss_fn, steps, lr, seed)

    # Dense reconstruction of row blocks with a halo; block edges on multiples of 4 keep the
    # stride-2 grid aligned, so the map does not depend on the block size.
    halo = CONV_AE_HALO
    # at most 256 rows: activations are width x rows x W floats per layer (~0.3 GB at W = 4096)
    step_rows = max(CONV_AE_MULTIPLE, min(block, 256) - min(block, 256) % CONV_AE_MULTIPLE)
    out = np.full((h, w), np.nan, dtype="float32")
    pad_w = (-w - 2 * halo) % CONV_AE_MULTIPLE
    with torch.no_grad():
        for b0, b1 in _row_blocks(h, step_rows):
            if not valid[b0:b1].any():
                continue
            t0, t1 = max(0, b0 - halo), min(h, b1 + halo)
            zb = np.asarray(z.isel(y=slice(t0, t1)).values)  # [C, hb, W]
            top, bottom = halo - (b0 - t0), halo - (t1 - b1)
            bottom += (-(zb.shape[1] + top + bottom)) % CONV_AE_MULTIPLE
            zb = np.pad(zb, ((0, 0), (top, bottom), (halo, halo + pad_w)))  # zeros = the invalid fill
            t = torch.from_numpy(np.ascontiguousarray(zb))[None]
            err = ((model(t) - t) ** 2).mean(dim=1)[0].numpy()  # [hb', W']
            core = err[halo : halo + (b1 - b0), halo : halo + w]
            out[b0:b1] = np.where(valid[b0:b1], core, np.nan)
    return out, {
        "window": window,
        "steps": steps,
        "batch_size": batch_size,
        "n_windows": n_win,
        "final_loss": final,
        "halo": halo,
    }


def _box_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Mean of every k x k window (valid positions only), via a summed-area table."""
    s = np.pad(a, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return (s[k:, k:] - s[:-k, k:] - s[k:, :-k] + s[:-k, :-k]) / (k * k)


# ------------------------------------------------------------------------------------------------
# focal controls
# ------------------------------------------------------------------------------------------------


def focal_stack(z: np.ndarray, valid: np.ndarray, window: int) -> np.ndarray:
    """Focal mean and std of every band over the ``window`` x ``window`` neighbourhood: [C, H, W] -> [2C, H, W].

    Only valid pixels enter a neighbourhood (a valid-weighted box filter; zero padding outside the
    array); ``z`` [C, H, W] float32, ``valid`` [H, W] bool. Pixels without a valid neighbour get 0.
    """
    from scipy.ndimage import uniform_filter

    v = valid.astype("float64")
    n = uniform_filter(v, window, mode="constant")
    out = np.empty((2 * z.shape[0], *z.shape[1:]), dtype="float32")
    with np.errstate(invalid="ignore", divide="ignore"):
        for i, band in enumerate(z.astype("float64")):
            bw = np.where(valid, band, 0.0)
            mean = uniform_filter(bw, window, mode="constant") / n
            sq = uniform_filter(bw * bw, window, mode="constant") / n
            out[i] = np.nan_to_num(mean)
            out[z.shape[0] + i] = np.nan_to_num(np.sqrt(np.clip(sq - mean * mean, 0, None)))
    return out


def _focal_baseline(name: str) -> Callable[..., xr.DataArray]:
    pixel = name.removesuffix("_focal")
    fitter = _PIXEL_FITTERS[pixel]

    def run(cube: xr.Dataset, *, seed: int = 0, max_train_pixels: int = 20000, block: int = 512, window=32, **kw):
        """Focal stack by row blocks with a halo of ``window`` rows, then the pixel method on it."""
        k = int(window)
        if k < 1:
            raise ConfigError(f"{name}: window={window}; use the model window in pixels, e.g. 32")
        t0 = time.perf_counter()
        _check_options(name, fitter, kw)
        valid = _valid_mask(cube)
        h = valid.shape[0]
        z = normalised(cube)
        halo = k

        def focal_rows(r0, r1):
            t0_, t1_ = max(0, r0 - halo), min(h, r1 + halo)
            f = focal_stack(np.asarray(z.isel(y=slice(t0_, t1_)).values), valid[t0_:t1_], k)
            return f[:, r0 - t0_ : r1 - t0_]

        flat_valid = np.flatnonzero(valid)
        pick = np.sort(np.random.default_rng(seed).choice(flat_valid, min(max_train_pixels, flat_valid.size), False))
        rows, cols = np.divmod(pick, valid.shape[1])
        x = np.empty((pick.size, 2 * z.sizes["band"]), dtype="float32")
        for r0, r1 in _row_blocks(h, block):
            sel = (rows >= r0) & (rows < r1)
            if sel.any():
                x[sel] = focal_rows(r0, r1)[:, rows[sel] - r0, cols[sel]].T
        fn, info = fitter(x, seed, **kw)
        t1 = time.perf_counter()
        out = np.full(valid.shape, np.nan, dtype="float32")
        for r0, r1 in _row_blocks(h, block):
            vb = valid[r0:r1]
            if vb.any():
                out[r0:r1][vb] = fn(focal_rows(r0, r1)[:, vb].T)
        info = {**info, "window": k, "n_train": int(x.shape[0]), "fit_s": t1 - t0}
        return _as_map(cube, out, name, {**info, "score_s": time.perf_counter() - t1, "seed": seed})

    run.__name__ = f"score_{name}"
    return run


# ------------------------------------------------------------------------------------------------
# registry and the one interface
# ------------------------------------------------------------------------------------------------

TORCH_BASELINES = ("dense_ae", "conv_ae", "vae")
_TORCH_BASELINES = TORCH_BASELINES
_PIXEL_FITTERS = {
    "pca": _fit_pca,
    "rx": _fit_rx,
    "iforest": _fit_iforest,
    "lof": _fit_lof,
    "ocsvm": _fit_ocsvm,
    "dense_ae": _fit_dense_ae,
    "vae": _fit_vae,
}


def _check_options(name: str, fn: Callable, kw: dict) -> None:
    import inspect

    allowed = [
        p for p in inspect.signature(fn).parameters if p not in ("x", "seed", "cube", "max_train_pixels", "block")
    ]
    bad = sorted(set(kw) - set(allowed))
    if bad:
        raise ConfigError(
            f"baseline {name!r}: unknown option(s) {bad}; its options are {allowed + ['torch_threads'] if name in _TORCH_BASELINES else allowed}"
        )


def _pixel_baseline(name: str) -> Callable[..., xr.DataArray]:
    fitter = _PIXEL_FITTERS[name]

    def run(cube: xr.Dataset, *, seed: int = 0, max_train_pixels: int = 20000, block: int = 512, **kw):
        t0 = time.perf_counter()
        x = train_sample(cube, max_train_pixels, seed, block=block)
        threads = kw.pop("torch_threads", 1)
        with _torch_threads(threads) if name in _TORCH_BASELINES else _nullcontext():
            _check_options(name, fitter, kw)
            fn, info = fitter(x, seed, **kw)
            t1 = time.perf_counter()
            values = _score_pixels(cube, fn, block)
        info = {**info, "n_train": int(x.shape[0]), "fit_s": t1 - t0, "score_s": time.perf_counter() - t1}
        return _as_map(cube, values, name, {**info, "seed": seed})

    run.__name__ = f"score_{name}"
    run.__doc__ = f"Score map of the {name!r} baseline (see pipeline.evaluation.baselines)."
    return run


def _conv_baseline(cube: xr.Dataset, *, seed: int = 0, max_train_pixels: int = 20000, block: int = 512, **kw):
    t0 = time.perf_counter()
    threads = kw.pop("torch_threads", 1)
    _check_options("conv_ae", _conv_ae_map, kw)
    with _torch_threads(threads):
        values, info = _conv_ae_map(cube, seed=seed, max_train_pixels=max_train_pixels, block=block, **kw)
    return _as_map(cube, values, "conv_ae", {**info, "seed": seed, "total_s": time.perf_counter() - t0})


BASELINES: dict[str, Callable[..., xr.DataArray]] = {
    **{n: _pixel_baseline(n) for n in ("pca", "rx", "iforest", "lof", "ocsvm", "dense_ae", "vae")},
    "conv_ae": _conv_baseline,
    **{n: _focal_baseline(n) for n in FOCAL_BASELINES},
}


def list_baselines(include_alternatives: bool = False, focal: bool = False) -> list[str]:
    """Names of the seven comparison methods (plus the focal controls with ``focal``, and 'ocsvm' and
    the focal controls with ``include_alternatives``)."""
    names = list(DEFAULT_BASELINES) + (list(FOCAL_BASELINES) if focal else [])
    if include_alternatives:
        names += [n for n in BASELINES if n not in names]
    return names


def score_baseline(
    name: str,
    cube: xr.Dataset,
    *,
    seed: int = 0,
    max_train_pixels: int = 20000,
    block: int = 512,
    **kw,
) -> xr.DataArray:
    """Fit baseline ``name`` on a seeded subsample of valid pixels and score every valid pixel.

    ``cube`` is an evidence cube (:func:`pipeline.data.cube.open_cube`); ``block`` rows are read at a
    time; ``kw`` go to the method (e.g. ``variance=0.95`` for pca, ``robust=True`` for rx,
    ``steps=200`` for the torch ones, which also take ``torch_threads``, default 1: these models are
    too small to gain from more). Returns [H, W] float32 with the cube's CRS, NaN outside
    ``valid``; fitting details are in ``.attrs``.
    """
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; use one of {', '.join(list_baselines(True))}")
    if max_train_pixels < 2:
        raise ConfigError(f"max_train_pixels={max_train_pixels} is too small; use e.g. 20000")
    log.info("baseline %s: fitting on up to %d pixels (seed %d)", name, max_train_pixels, seed)
    return BASELINES[name](cube, seed=seed, max_train_pixels=max_train_pixels, block=block, **kw)
