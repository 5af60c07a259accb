"""The run report: one self-contained HTML file (figures embedded as base64 PNG, no external asset).

:func:`report_stage` writes ``DIR/targets.gpkg`` (:mod:`pipeline.evaluation.targets`) and ``DIR/report.html`` with,
as far as the run folder holds them:

- the prospectivity map with known deposits, and one anomaly map per source group;
- the uncertainty map (std of the per-run percentile maps, from ``DIR/reliability``);
- the strongest per-band contributions: mean squared error of each band over the top 5 % of the
  valid area vs the whole valid area (bars), and the band that dominates the error in each target cell;
- ROC, success-rate and prediction-area plots (:mod:`pipeline.evaluation.plotting`), the target polygons;
- the comparison of methods (``DIR/compare/comparison.csv``), the reliability summary and the
  sensitivity table; ``metrics.json``;
- the run config (YAML) and provenance: package versions, git commit, input file hashes, stage times.

Every text from files or the config is HTML-escaped. Nothing in the page is fetched from elsewhere.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xarray as xr

from pipeline.config import RunConfig
from pipeline.data.cube import open_cube
from pipeline.errors import MPMError
from pipeline.evaluation.evaluate import deposit_xy, load_deposits
from pipeline.evaluation.plotting import (
    decimate_map,
    map_extent,
    map_origin,
    new_figure,
    plot_auc_differences,
    plot_comparison_bars,
    plot_map,
    plot_prediction_area,
    plot_roc,
    plot_success_rate,
)
from pipeline.evaluation.targets import target_polygons, write_targets
from pipeline.io import atomic_write_text
from pipeline.scoring.score import open_scores
from pipeline.stages import run_stage

__all__ = [
    "ReportError",
    "report_stage",
    "build_report",
    "write_report",
    "package_versions",
    "git_commit",
    "TOP_FRACTION",
]

TOP_FRACTION = 0.05  # the "target" area whose per-band contributions the report ranks


class ReportError(MPMError, ValueError):
    """The report cannot be written from this run folder (the message says what is missing and the fix)."""


PACKAGES = (
    "mpm-pipeline",
    "numpy",
    "xarray",
    "dask",
    "distributed",
    "zarr",
    "rioxarray",
    "rasterio",
    "odc-geo",
    "geopandas",
    "pyogrio",
    "shapely",
    "pyproj",
    "scipy",
    "scikit-learn",
    "torch",
    "xbatcher",
    "matplotlib",
    "pydantic",
)


# ------------------------------------------------------------------------------------------------
# provenance
# ------------------------------------------------------------------------------------------------


def package_versions(names=PACKAGES) -> dict[str, str]:
    """Installed versions (importlib.metadata) of ``names``, 'not installed' for the missing ones."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "not installed"
    return out


def git_commit(folder: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` of the package's checkout (+ ' (modified)' with local changes); 'unknown'
    when git or the repository is absent (an installed wheel)."""
    folder = Path(folder or Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return "unknown"
        commit = head.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return commit + (" (modified)" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------
# html helpers
# ------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1200px;
padding:1rem 2rem;color:#222;line-height:1.45}
h1{margin-bottom:.2rem} h2{border-bottom:1px solid #ccc;padding-bottom:.2rem;margin-top:2rem}
.sub{color:#666;margin-top:0}
.figs{display:flex;flex-wrap:wrap;gap:1rem}
figure{margin:0;flex:0 1 auto} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85rem;color:#555;max-width:640px}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right} th{background:#f4f4f4}
td.l,th.l{text-align:left}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:.6rem;overflow-x:auto;font-size:.8rem}
.kpi{display:flex;gap:1.5rem;flex-wrap:wrap}
.kpi div{background:#f4f7fb;border:1px solid #dce4ef;border-radius:4px;padding:.4rem .8rem}
.kpi b{display:block;font-size:1.3rem}
.note{color:#8a6d3b} .tw{overflow-x:auto;max-width:100%}
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _png(fig, dpi: int = 90) -> str:
    """A Figure as base64 PNG text (the figure is closed: Agg figures hold no global state)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{b64}" alt="{_e(alt)}">{cap}</figure>'


def _fig(fig, alt: str, caption: str = "", dpi: int = 90) -> str:
    return _img(_png(fig, dpi), alt, caption)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(float(v)):
            return "-"
        return f"{float(v):.4g}" if abs(float(v)) >= 1e-3 or v == 0 else f"{float(v):.2e}"
    return str(v)


def _table(rows: list[dict], columns: list[str] | None = None, left: tuple[str, ...] = ()) -> str:
    if not rows:
        return "<p class='note'>(empty)</p>"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th class='{'l' if c in left else ''}'>{_e(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td class='{'l' if c in left else ''}'>{_e(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return f"<div class='tw'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif not isinstance(v, (list, tuple)):
            out[key] = v
    return out


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# ------------------------------------------------------------------------------------------------
# figures that pipeline.evaluation.plotting does not have
# ------------------------------------------------------------------------------------------------


def _top_mask(values: np.ndarray, fraction: float) -> np.ndarray:
    """The top ``fraction`` of the finite cells of ``values`` [H, W] (exact count, ties by position)."""
    flat = np.flatnonzero(np.isfinite(values))
    k = max(1, int(round(fraction * flat.size)))
    order = flat[np.argsort(-values.ravel()[flat], kind="stable")[:k]]
    mask = np.zeros(values.size, dtype=bool)
    mask[order] = True
    return mask.reshape(values.shape)


def band_contributions(scores: xr.Dataset, fraction: float = TOP_FRACTION) -> list[dict]:
    """Per band: mean squared reconstruction error over the top ``fraction`` of the prospectivity map
    and over the whole valid area, their ratio and the band's share of the top area's error.

    ``scores`` is the prospectivity Dataset (``prospectivity`` [y, x], ``contribution`` [band, y, x]);
    the contribution cube is reduced lazily (dask), only the (y, x) map is held in memory.
    """
    prosp = np.asarray(scores["prospectivity"].values, dtype="float64")
    top = xr.DataArray(_top_mask(prosp, fraction), dims=("y", "x"))
    valid = xr.DataArray(np.isfinite(prosp), dims=("y", "x"))
    contrib = scores["contribution"]
    import dask

    top_mean, all_mean = dask.compute(contrib.where(top).mean(("y", "x")), contrib.where(valid).mean(("y", "x")))
    top_mean, all_mean = np.asarray(top_mean.values, float), np.asarray(all_mean.values, float)
    sources = scores["source"].values.tolist() if "source" in scores.coords else [""] * len(top_mean)
    total = np.nansum(top_mean)
    rows = [
        {
            "band": str(b),
            "source": str(s),
            "mean_error_top": t,
            "mean_error_all": a,
            "ratio": t / a if a > 0 else float("nan"),
            "share_of_top_error": t / total if total > 0 else float("nan"),
        }
        for b, s, t, a in zip(scores["band"].values.tolist(), sources, top_mean, all_mean)
    ]
    return sorted(rows, key=lambda r: -r["mean_error_top"])


def plot_contribution_bars(rows: list[dict], fraction: float = TOP_FRACTION, max_bands: int = 20):
    """Bars of each band's mean error over the top area vs the whole valid area (one axes)."""

    rows = rows[:max_bands]
    names = [f"{r['band']} ({r['source']})" for r in rows]
    y = np.arange(len(rows))
    fig = new_figure((7.0, 0.32 * len(rows) + 1.6))
    ax = fig.add_subplot()
    ax.barh(
        y - 0.2,
        [r["mean_error_top"] for r in rows],
        height=0.4,
        color="tab:red",
        label=f"top {fraction:.0%} of the map",
    )
    ax.barh(y + 0.2, [r["mean_error_all"] for r in rows], height=0.4, color="tab:grey", label="whole valid area")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mean squared reconstruction error (normalised units)")
    ax.set_title("Per-band contribution to the anomaly")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_dominant_band(scores: xr.Dataset, deposits=None, fraction: float = 0.10, max_pixels: int = 600):
    """Map of the band with the largest reconstruction error, inside the top ``fraction`` of the map.

    Decimated to ``max_pixels`` a side before loading (stride sampling). One axes plus a legend.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    prosp = decimate_map(scores["prospectivity"], max_pixels)
    contrib = decimate_map(scores["contribution"], max_pixels)
    p = np.asarray(prosp.values, dtype="float64")
    c = np.asarray(contrib.values, dtype="float64")  # [C, h, w]
    top = _top_mask(p, fraction)
    dom = np.where(top, np.argmax(np.nan_to_num(c, nan=-np.inf), axis=0), -1).astype(float)
    bands = [str(b) for b in scores["band"].values.tolist()]
    present = sorted(int(i) for i in np.unique(dom[dom >= 0]))
    import matplotlib

    base = matplotlib.colormaps["tab20"]
    colours = [base(i % 20) for i in range(len(bands))]
    img = np.full(dom.shape, np.nan)
    img[top] = dom[top]
    fig = new_figure((7.5, 5.5))
    ax = fig.add_subplot()
    ext, org = map_extent(prosp), map_origin(prosp)
    ax.imshow(
        np.where(np.isfinite(p), 0.0, np.nan),
        extent=ext,
        origin=org,
        cmap="Greys",
        vmin=0,
        vmax=4,
        interpolation="nearest",
    )
    ax.imshow(
        img,
        extent=ext,
        origin=org,
        cmap=ListedColormap(colours),
        vmin=-0.5,
        vmax=len(bands) - 0.5,
        interpolation="nearest",
    )
    if deposits is not None and len(deposits):
        xy = deposit_xy(scores["prospectivity"], deposits)
        ax.scatter(xy[:, 0], xy[:, 1], s=22, marker="^", facecolor="none", edgecolor="black", linewidth=0.8)
        ax.set_xlim(ext[0], ext[1])
        ax.set_ylim(ext[2], ext[3])
    ax.legend(
        handles=[Patch(color=colours[i], label=bands[i]) for i in present],
        fontsize=7,
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        title="dominant band",
        title_fontsize=8,
    )
    ax.set_title(f"Band with the largest error, top {fraction:.0%} of the map")
    ax.ticklabel_format(style="plain", useOffset=False)
    ax.tick_params(labelsize=7)
    return fig


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------


def build_report(cfg: RunConfig, out: str | Path, *, targets=None, log: Callable[[str], None] = print) -> str:
    """The report of the run folder ``out`` as one HTML string (figures embedded)."""

    out = Path(out)
    sections: list[str] = []
    scores = open_scores(out / "prospectivity.zarr")
    prosp = scores["prospectivity"].load()
    deposits = load_deposits(cfg.deposits, cfg.base_dir) if cfg.deposits is not None else None
    metrics = _read_json(out / "metrics.json") or {}
    groups = [str(v) for v in scores.data_vars if str(v).startswith("anomaly_")]

    # the target-aware map leads when the config asks for it and the scorer wrote it
    lead = "prospectivity"
    if cfg.target is not None and cfg.target.lead == "target" and f"prospectivity_{cfg.target.commodity}" in scores:
        lead = f"prospectivity_{cfg.target.commodity}"

    # -- headline
    m = metrics.get(lead, metrics.get("prospectivity", {}))
    kpis = []
    for label, key in (
        ("ROC AUC", "auc"),
        ("buffered AUC", "auc_buffered_mean"),
        ("normalised density", "normalised_density"),
    ):
        if m.get(key) is not None:
            kpis.append(f"<div>{_e(label)}<b>{_e(_fmt(m[key]))}</b></div>")
    if m.get("n_deposits_used") is not None:
        kpis.append(f"<div>deposits used<b>{_e(m['n_deposits_used'])} / {_e(m.get('n_deposits'))}</b></div>")
    kpis.append(f"<div>grid<b>{prosp.sizes['y']} x {prosp.sizes['x']}</b></div>")
    sections.append(f"<div class='kpi'>{''.join(kpis)}</div>")

    # -- maps
    figs = (
        []
        if lead == "prospectivity"
        else [
            _fig(
                plot_map(
                    scores[lead].load(), deposits, title=f"Target-aware map: {lead}", label="pathfinder enrichment"
                ),
                "target-aware map",
                "Mean positive standardised residual of the target's pathfinders (pipeline.data.pathfinders): "
                "enrichment, not any misfit. Triangles: known deposits (evaluation only).",
            )
        ]
    )
    figs += [
        _fig(
            plot_map(prosp, deposits, title="Prospectivity (reconstruction error)", label="reconstruction error"),
            "prospectivity map",
            "Higher = the evidence fits the learned regional background worse. Triangles: known deposits "
            "(evaluation only, never used in training).",
        )
    ]
    for g in groups:
        figs.append(
            _fig(
                plot_map(
                    scores[g],
                    deposits,
                    title=g.replace("_", " "),
                    cmap="viridis",
                    label="reconstruction error",
                    figsize=(5.2, 4.4),
                ),
                f"{g} map",
            )
        )
    sections.append("<h2>Prospectivity and anomaly maps</h2><div class='figs'>" + "".join(figs) + "</div>")

    # -- uncertainty
    rel_zarr, rel_json = out / "reliability" / "reliability.zarr", out / "reliability" / "reliability.json"
    if rel_zarr.exists():
        rel = open_scores(rel_zarr)
        rel_sum = _read_json(rel_json) or {}
        body = [
            _fig(
                plot_map(
                    rel["std"],
                    deposits,
                    title="Uncertainty: std of the percentile rank over runs",
                    cmap="cividis",
                    label="std of percentile rank",
                    stretch=(1.0, 99.0),
                ),
                "uncertainty map",
                f"Runs with seeds {rel_sum.get('seeds', '?')}; a pixel's percentile rank "
                "within the valid area varies by this much between runs.",
            ),
            _fig(
                plot_map(
                    rel["mean"],
                    deposits,
                    title="Mean percentile rank over runs",
                    label="mean percentile rank",
                    stretch=None,
                ),
                "mean map",
            ),
        ]
        txt = ""
        if rel_sum:
            runs = [
                {k: r.get(k) for k in ("seed", "auc", "success_rate_area", "normalised_density", "wall_s")}
                for r in rel_sum.get("runs", [])
            ]
            txt = (
                f"<p>ROC AUC over {len(runs)} runs: <b>{_e(_fmt(rel_sum.get('auc_mean')))} &plusmn; "
                f"{_e(_fmt(rel_sum.get('auc_std')))}</b> (sample std); AUC of the mean map "
                f"{_e(_fmt(rel_sum.get('auc_of_mean_map')))}; Spearman rank correlation between runs: mean "
                f"{_e(_fmt(rel_sum.get('spearman_mean')))}, min {_e(_fmt(rel_sum.get('spearman_min')))} "
                f"(on {_e(rel_sum.get('spearman_pixels'))} valid pixels).</p>" + _table(runs)
            )
        sections.append("<h2>Reliability (repeated runs)</h2><div class='figs'>" + "".join(body) + "</div>" + txt)
    sens = out / "reliability" / "sensitivity.csv"
    if sens.exists():
        import pandas as pd

        df = pd.read_csv(sens)
        pivot = df.pivot(index="window", columns="mask_ratio", values="auc")
        rows = [{"window": int(w), **{f"mask {c:g}": pivot.loc[w, c] for c in pivot.columns}} for w in pivot.index]
        sections.append("<h2>Sensitivity: ROC AUC vs window size and mask ratio</h2>" + _table(rows))

    # -- contributions
    if "contribution" in scores:
        rows = band_contributions(scores, TOP_FRACTION)
        figs = [
            _fig(
                plot_contribution_bars(rows, TOP_FRACTION),
                "per-band contributions",
                f"Mean squared error of each band over the top {TOP_FRACTION:.0%} of the map vs the whole "
                "valid area (normalised units: comparable across bands).",
            ),
            _fig(
                plot_dominant_band(scores, deposits),
                "dominant band map",
                "Inside the top 10 % of the map: the band whose reconstruction error is largest.",
            ),
        ]
        sections.append(
            "<h2>What drives the anomaly</h2><div class='figs'>"
            + "".join(figs)
            + "</div>"
            + _table(
                rows[:10],
                ["band", "source", "mean_error_top", "mean_error_all", "ratio", "share_of_top_error"],
                left=("band", "source"),
            )
        )

    # -- evaluation curves
    if deposits is not None and cfg.evaluate.protocol == "raster":
        curves = {"prospectivity": prosp, **{g.removeprefix("anomaly_"): scores[g].load() for g in groups}}
        figs = [
            _fig(plot_roc(curves, deposits), "ROC curves"),
            _fig(plot_success_rate(curves, deposits), "success-rate curves"),
            _fig(plot_prediction_area(prosp, deposits), "prediction-area plot"),
        ]
        sections.append("<h2>Evaluation against known deposits</h2><div class='figs'>" + "".join(figs) + "</div>")
    elif deposits is not None:
        sections.append(
            "<h2>Evaluation against known deposits</h2><p>Point-sample protocol: see the metrics "
            "below (curves over raster cells do not apply).</p>"
        )
    if metrics:
        rows = [{"map": k, **_flatten(v)} for k, v in metrics.items() if isinstance(v, dict)]
        cols = ["map"] + [
            c
            for c in (
                "auc",
                "auc_std",
                "auc_buffered_mean",
                "auc_buffered_std",
                "pa_intersection.prediction_rate",
                "pa_intersection.occupied_area",
                "normalised_density",
                "p_value",
                "n_deposits_used",
                "n_deposit_cells",
            )
            if any(c in r for r in rows)
        ]
        sections.append("<h3>Metrics (metrics.json)</h3>" + _table(rows, cols, left=("map",)))

    # -- comparison
    comp = out / "compare" / "comparison.csv"
    if comp.exists():
        import pandas as pd

        df = pd.read_csv(comp)
        metric_cols = [c for c in ("auc_mean", "auc_buffered_mean") if c in df.columns]
        figs = _fig(
            plot_comparison_bars(
                df.set_index("method"), metrics=metric_cols, highlight="vit", title="Comparison of methods"
            ),
            "comparison bars",
        )
        if "d_auc" in df.columns and df["d_auc"].notna().any():
            figs += _fig(
                plot_auc_differences(df),
                "paired AUC differences",
                "Each method against the ViT on the same cells: AUC difference with its 95 % spatial block "
                "bootstrap CI; a CI across 0 is no evidence of a difference. Filled: DeLong p < 0.05.",
            )
        sections.append(
            "<h2>Comparison of methods</h2><p>Same cube, same deposits, same evaluation protocol "
            "for every method; mean over seeds, auc_std = sample std over seeds; paired columns (d_auc, CI, "
            "p-values) against the ViT of the first seed. The success-rate area equals the ROC AUC up to ties, "
            "so it is not shown as separate evidence (its curve is above).</p>"
            + _table(df.to_dict("records"), list(df.columns), left=("method", "kind"))
            + "<div class='figs'>"
            + figs
            + "</div>"
        )

    # -- targets
    if targets is not None and len(targets):
        rows = []
        for level, sub in targets.groupby("level", sort=True):
            rows.append(
                {
                    "level": f"top {level:.0%}",
                    "polygons": len(sub),
                    "area_km2": sub["area_km2"].sum(),
                    "deposits inside": int(sub["n_deposits"].sum()),
                    "best polygon: mean score": sub["mean_score"].iloc[0],
                    "best polygon: area_km2": sub["area_km2"].iloc[0],
                }
            )
        best = targets[targets["level"] == targets["level"].min()].head(10)
        top_rows = [
            {k: r[k] for k in ("rank", "mean_score", "max_score", "area_km2", "n_deposits")}
            | {"centroid": f"{r.geometry.centroid.x:.0f}, {r.geometry.centroid.y:.0f}"}
            for _, r in best.iterrows()
        ]
        sections.append(
            "<h2>Target polygons (targets.gpkg)</h2>"
            + _table(rows, left=("level",))
            + f"<h3>Best targets, top {targets['level'].min():.0%}</h3>"
            + _table(top_rows, left=("centroid",))
        )

    # -- evidence
    bands_png = out / "bands.png"
    if bands_png.exists():
        sections.append(
            "<h2>Evidence layers</h2><div class='figs'>"
            + _img(base64.b64encode(bands_png.read_bytes()).decode("ascii"), "evidence bands")
            + "</div>"
        )

    # -- config and provenance
    sections.append("<h2>Run configuration</h2><pre>" + _e(cfg.to_yaml()) + "</pre>")
    prov_rows = [
        {"item": "generated", "value": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")},
        {"item": "git commit", "value": git_commit()},
        {"item": "platform", "value": platform.platform()},
    ]
    prov_rows += [{"item": k, "value": v} for k, v in package_versions().items()]
    inputs = []
    cube_path = out / "cube.zarr"
    if cube_path.exists():
        try:
            prov = json.loads(open_cube(cube_path, validate=False).attrs.get("provenance", "{}") or "{}")
        except Exception as exc:  # a report must not fail on a provenance attribute
            log(f"[report] cube provenance unreadable: {exc}")
            prov = {}
        for name, rec in (prov.get("inputs") or {}).items():
            inputs.append({"layer": name, "path": rec.get("path"), "hash": rec.get("hash")})
    stages = _read_json(out / "stages.json") or {}
    stage_rows = [{"stage": k, "seconds": v.get("seconds"), "key": v.get("key")} for k, v in stages.items()]
    sections.append(
        "<h2>Provenance</h2>"
        + _table(prov_rows, ["item", "value"], left=("item", "value"))
        + "<h3>Input files</h3>"
        + _table(inputs, ["layer", "path", "hash"], left=("layer", "path", "hash"))
        + "<h3>Stages</h3>"
        + _table(stage_rows, ["stage", "seconds", "key"], left=("stage", "key"))
    )

    title = f"Prospectivity report: {cfg.name}"
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><p class='sub'>Unsupervised fusion-conv ViT autoencoder; output folder "
        f"{_e(out.resolve())}</p>" + "\n".join(sections) + "</body></html>\n"
    )


def write_report(text: str, path: str | Path) -> Path:
    """Write the HTML atomically (temporary file + ``os.replace``)."""

    return atomic_write_text(path, text)


def report_stage(cfg: RunConfig, out: Path, *, force: bool = False, log=print, client=None) -> dict:
    """Stage: ``DIR/targets.gpkg`` and ``DIR/report.html`` from the run folder's outputs.

    Needs ``DIR/prospectivity.zarr`` (the score stage). Rebuilt when the score, evaluate, compare,
    reliability or sensitivity stage was rerun. Returns ``{"report": Path, "targets": Path}``.
    """

    out = Path(out)
    report, targets = out / "report.html", out / "targets.gpkg"
    if not (out / "prospectivity.zarr").exists():
        raise ReportError(
            f"no prospectivity map at {str(out / 'prospectivity.zarr')!r} to report on. "
            "Fix: run the score stage first (`mpm run CONFIG --out DIR --stages cube,train,score,evaluate,report`)"
        )

    def go():
        deposits = load_deposits(cfg.deposits, cfg.base_dir) if cfg.deposits is not None else None
        gdf = target_polygons(open_scores(out / "prospectivity.zarr")["prospectivity"], deposits)
        write_targets(gdf, targets)
        write_report(build_report(cfg, out, targets=gdf, log=log), report)
        log(f"[report] {report} ({report.stat().st_size / 1e6:.1f} MB), {len(gdf)} target polygons -> {targets}")

    run_stage(
        "report",
        cfg,
        out,
        [report, targets],
        ("deposits", "evaluate", "score"),
        go,
        force=force,
        log=log,
        upstream=("score", "evaluate", "compare", "reliability", "sensitivity"),
    )
    return {"report": report, "targets": targets}
