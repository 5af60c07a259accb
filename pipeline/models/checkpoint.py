"""Self-describing checkpoints (nanoGPT style): weights + model config + band order + normalisation.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(..., weights_only=True)`` (no pickled classes). Writes are atomic (temporary file + ``os.replace``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from pipeline.config import ModelConfig
from pipeline.errors import CheckpointError
from pipeline.io import atomic_path
from pipeline.models import FusionViTAE, build_model

CHECKPOINT_VERSION = 1
META_KEYS = ("model", "bands", "sources", "center", "scale", "groups", "config", "step", "epoch", "optimizer")

__all__ = ["CHECKPOINT_VERSION", "save_checkpoint", "load_checkpoint", "model_for_cube"]


def save_checkpoint(
    path,
    model: FusionViTAE,
    *,
    model_cfg: ModelConfig,
    bands: list[str],
    sources: list[str],
    center: list[float],
    scale: list[float],
    groups: dict[str, list[int]],
    config: dict | None = None,
    optimizer=None,
    step: int = 0,
    epoch: int = 0,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint atomically (``<path>.tmp-*`` then ``os.replace``). Returns the path."""
    path = Path(path)
    module = getattr(model, "module", model)  # unwrap DDP
    module = getattr(module, "_orig_mod", module)  # unwrap torch.compile
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    blob = {
        "mpm_checkpoint": CHECKPOINT_VERSION,
        "state_dict": state,
        "model": model_cfg.model_dump(mode="json"),
        "bands": [str(b) for b in bands],
        "sources": [str(s) for s in sources],
        "center": [float(c) for c in np.asarray(center).ravel()],
        "scale": [float(s) for s in np.asarray(scale).ravel()],
        "groups": {str(k): [int(i) for i in v] for k, v in groups.items()},
        "config": config,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": int(step),
        "epoch": int(epoch),
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    return path


def load_checkpoint(path, *, map_location="cpu", expect_bands: list[str] | None = None) -> tuple[FusionViTAE, dict]:
    """Rebuild the model from a checkpoint; returns ``(model in eval mode, meta)``.

    ``meta`` has keys model (ModelConfig as dict), bands, sources, center, scale, groups, config, step, epoch,
    optimizer (state or None) and extra. Raises CheckpointError for a missing or corrupt file, missing keys,
    or bands that differ from ``expect_bands``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist. Fix: train a model with `mpm train` first")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the pickle protocol of foreign files
            blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(_unreadable(path, exc)) from None
    if not isinstance(blob, dict):
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a {type(blob).__name__}, not a checkpoint of this package. "
            "Fix: pass the model.pt written by `mpm train`, or retrain"
        )
    missing = [k for k in ("state_dict", *META_KEYS) if k not in blob]
    if missing:
        keys = [str(k) for k in list(blob)[:3]]
        raise CheckpointError(
            f"checkpoint {str(path)!r} lacks {', '.join(missing)} (its keys: {keys}{' ...' if len(blob) > 3 else ''}); "
            "it was not written by save_checkpoint (a bare state_dict?). Fix: pass the model.pt written by "
            "`mpm train`, or retrain"
        )
    bands = list(blob["bands"])
    if expect_bands is not None and list(map(str, expect_bands)) != bands:
        raise CheckpointError(_band_mismatch(str(path), bands, list(map(str, expect_bands))))
    try:
        cfg = ModelConfig(**blob["model"])
        model = build_model(cfg, blob["groups"])
        model.load_state_dict(blob["state_dict"], strict=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not rebuild its model ({type(exc).__name__}: {exc}). Fix: retrain"
        ) from None
    model.eval()
    meta = {k: blob[k] for k in META_KEYS}
    meta["extra"] = blob.get("extra", {})
    return model, meta


def _unreadable(path: Path, exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file: pickled code, truncation, or a foreign file."""
    import re
    import zipfile

    text = str(exc)
    fix = "Fix: retrain with `mpm train`, or resume from an intact checkpoint"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        size, head = -1, b""
    glob = re.search(r"GLOBAL ([\w.]+)", text)
    if glob or ("Weights only load failed" in text and head[:1] == b"\x80"):  # \x80: a pickle's first byte
        what = f" (it asks for {glob.group(1)!r})" if glob else ""
        return (
            f"checkpoint {str(path)!r} holds pickled Python objects{what}, which are refused: checkpoints are read "
            "with weights_only=True, so that a file cannot run code. Fix: retrain with `mpm train`; never load this "
            "file with weights_only=False unless you trust where it came from"
        )
    if not zipfile.is_zipfile(path):
        if head == b"PK":
            return (
                f"checkpoint {str(path)!r} is truncated or corrupt ({size} bytes, its zip directory is missing: "
                f"an interrupted copy or write). {fix}"
            )
        return (
            f"checkpoint {str(path)!r} is corrupt or not a checkpoint of this package ({size} bytes that are not "
            f"a torch archive). {fix}"
        )
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return f"checkpoint {str(path)!r} is corrupt ({type(exc).__name__}: {first[:160]}). {fix}"


def _band_mismatch(where: str, have: list[str], want: list[str]) -> str:
    missing = [b for b in have if b not in want]
    new = [b for b in want if b not in have]
    detail = []
    if missing:
        detail.append(f"missing from the cube: {missing}")
    if new:
        detail.append(f"not known to the model: {new}")
    if not detail:
        detail.append("same bands in a different order")
    return (
        f"checkpoint {where} was trained on bands {have}, but the cube has {want} ({'; '.join(detail)}). "
        "Fix: score with the cube the model was trained on, or retrain with `mpm train` on this cube"
    )


def model_for_cube(ckpt_meta: dict, cube: xr.Dataset) -> None:
    """Raise CheckpointError unless ``cube`` has the checkpoint's bands and normalisation statistics."""
    bands = [str(b) for b in cube["band"].values.tolist()]
    if bands != list(ckpt_meta["bands"]):
        raise CheckpointError(_band_mismatch("(model)", list(ckpt_meta["bands"]), bands))
    for key in ("center", "scale"):
        if key not in cube.coords:
            raise CheckpointError(f"the cube has no '{key}' statistics. Fix: rebuild it with `mpm cube`")
        have = np.asarray(cube[key].values, dtype="float64")
        want = np.asarray(ckpt_meta[key], dtype="float64")
        if have.shape != want.shape or not np.allclose(have, want, rtol=1e-6, atol=1e-9):
            bad = [b for b, h, w in zip(bands, have, want) if not np.isclose(h, w, rtol=1e-6, atol=1e-9)]
            raise CheckpointError(
                f"the cube's normalisation '{key}' differs from the model's for band(s) {bad}: the cube was rebuilt "
                "or is another area's cube. Fix: score with the cube the model was trained on, or retrain"
            )
