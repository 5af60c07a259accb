"""Label-free model selection (``mpm tune``): window, mask ratio and objective from the held-out-block loss.

The criterion is :func:`pipeline.models.regime.validation_error`: the error of every band predicted with its
source hidden, on windows inside spatial blocks that training never saw, each source group weighted equally.
It is the scoring protocol itself, and it does not depend on the training mask ratio, so it compares models
trained with different settings. All candidates share one held-out split (blocks of twice the largest
candidate window, same seed), so they are judged on the same pixels. Deposits are never read: the search
receives the cube and the model and train sections only.

The search is coordinate-wise, to keep it to a handful of trainings: the window first (at the config's mask
and cross ratios), then the spatial mask ratio at that window, then the cross-source ratio.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import xarray as xr
import yaml

from pipeline.config import RunConfig
from pipeline.data.cube import open_cube
from pipeline.io import atomic_write_text
from pipeline.models.train import train

__all__ = ["tune", "default_candidates", "TUNE_WINDOWS", "TUNE_MASK_RATIOS", "TUNE_CROSS_RATIOS"]

TUNE_WINDOWS = (16, 32)
TUNE_MASK_RATIOS = (0.25, 0.5, 0.75)
TUNE_CROSS_RATIOS = (0.25, 0.5)


def default_candidates(cfg: RunConfig, grid_shape: tuple[int, int]) -> dict[str, list]:
    """The values tried for each setting: windows that fit the grid at least twice per side."""
    patch = cfg.model.patch
    fit = [w for w in TUNE_WINDOWS if w % patch == 0 and 2 * w <= min(grid_shape)]
    return {
        "window": fit or [cfg.model.window],
        "mask_ratio": list(TUNE_MASK_RATIOS),
        "cross_ratio": list(TUNE_CROSS_RATIOS),
    }


def _quiet(_event: dict) -> None:
    pass


def tune(
    cube: xr.Dataset | str | Path,
    cfg: RunConfig,
    out: str | Path,
    *,
    candidates: dict[str, Sequence] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Choose ``model.window``, ``model.mask_ratio`` and ``model.cross_ratio`` by held-out-block loss.

    Trains each candidate in ``out/runs/<key>/`` (kept: a rerun reuses finished runs), writes
    ``out/tune.json`` (every candidate's loss and the choice) and ``out/model.tuned.yaml`` (the model section
    with the chosen settings, to copy into the run config). Returns the tune record.
    """
    out = Path(out)
    ds = open_cube(cube) if isinstance(cube, (str, Path)) else cube
    shape = (int(ds.sizes["y"]), int(ds.sizes["x"]))
    cand = {k: list(v) for k, v in (candidates or default_candidates(cfg, shape)).items()}
    block = 2 * max(cand.get("window", [cfg.model.window]))
    base = cfg.with_updates(train={"holdout_block": block, "seeds": 1})
    if base.train.holdout_fraction <= 0:
        base = base.with_updates(train={"holdout_fraction": 0.2})
    trials: list[dict] = []

    def run(model: dict) -> float:
        c = base.with_updates(model=model)
        key = "-".join(f"{k}{c.model.model_dump()[k]}" for k in ("window", "mask_ratio", "cross_ratio"))
        hit = next((t for t in trials if t["key"] == key), None)
        if hit:
            return hit["loss"]
        run_dir = out / "runs" / key
        summary = run_dir / "train_summary.json"
        if not summary.exists():
            train(ds, c, run_dir, progress=_quiet)
        rec = json.loads(summary.read_text())
        loss = float((rec.get("best") or {}).get("loss", float("nan")))
        trials.append(
            {
                "key": key,
                **{k: c.model.model_dump()[k] for k in ("window", "mask_ratio", "cross_ratio")},
                "loss": loss,
                "steps": rec.get("steps"),
            }
        )
        log(f"[tune] {key}: held-out loss {loss:.4f}")
        return loss

    chosen = {"window": cfg.model.window, "mask_ratio": cfg.model.mask_ratio, "cross_ratio": cfg.model.cross_ratio}
    for setting in ("window", "mask_ratio", "cross_ratio"):
        values = cand.get(setting) or [chosen[setting]]
        losses = {v: run({**chosen, setting: v}) for v in values}
        finite = {v: loss for v, loss in losses.items() if loss == loss}
        if finite:
            chosen[setting] = min(finite, key=finite.get)
    record = {
        "criterion": "held-out-block loss: every band predicted with its source hidden, groups weighted equally",
        "holdout_block": block,
        "holdout_fraction": base.train.holdout_fraction,
        "candidates": cand,
        "trials": trials,
        "choice": chosen,
        "deposits_read": False,
    }
    atomic_write_text(out / "tune.json", json.dumps(record, indent=1))
    tuned = {"model": cfg.with_updates(model=chosen).model.model_dump(mode="json")}
    head = (
        "# written by `mpm tune`: the model section chosen by held-out-block loss (evidence: tune.json).\n"
        "# Copy it into the run config (it replaces the `model:` section).\n"
    )
    atomic_write_text(out / "model.tuned.yaml", head + yaml.safe_dump(tuned, sort_keys=False))
    log(f"[tune] choice: {chosen} -> {out / 'model.tuned.yaml'}")
    return record
