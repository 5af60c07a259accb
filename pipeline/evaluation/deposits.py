"""Known deposits: reading them (evaluation only) and placing them on a score map's cells.

Deposits never enter training, normalisation or baselines; they are read here for evaluation and plots.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from pipeline.config import QueryError, safe_query
from pipeline.errors import InputDataError, MPMError

log = logging.getLogger(__name__)

__all__ = [
    "DepositsError",
    "EvaluationError",
    "DepositCells",
    "load_deposits",
    "deposit_xy",
    "rows_cols",
    "deposit_cells",
    "map_values",
    "apply_affine",
]


class DepositsError(InputDataError):
    """The deposits file or table cannot be used (missing file, columns, coordinates, empty selection)."""


class EvaluationError(MPMError, ValueError):
    """A metric cannot be computed from this map and these deposits (the message says why and the fix)."""


def load_deposits(cfg, base_dir: str | Path = ".") -> geopandas.GeoDataFrame:  # noqa: F821
    """Read known deposits as points from a CSV (``x``/``y`` columns + ``crs``) or a vector file.

    ``cfg`` is a :class:`pipeline.config.DepositsConfig`; a relative ``cfg.path`` resolves against
    ``base_dir``. ``cfg.query`` (pandas query syntax) selects rows. Polygon or line features are
    reduced to representative points. A vector file without a CRS takes ``cfg.crs``; a CSV without
    ``crs`` gets none (then :func:`deposit_cells` assumes the map's CRS, with a warning).
    """
    import geopandas as gpd

    path = Path(cfg.path).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    if not path.exists():
        raise DepositsError(
            f"deposits file {str(path)!r} does not exist. Fix: correct 'deposits.path' in the run config "
            "(relative paths resolve against the config file's folder)"
        )
    is_table = path.suffix.lower() in (".csv", ".txt", ".tsv")
    if is_table:
        try:
            df = pd.read_csv(path, sep=None if path.suffix.lower() != ".csv" else ",", engine="python")
        except Exception as exc:
            raise DepositsError(
                f"deposits file {str(path)!r} cannot be read as CSV ({exc}). Fix: check its format"
            ) from None
        if not cfg.x or not cfg.y:
            raise DepositsError(
                f"deposits file {str(path)!r} is a table: give the coordinate columns as 'deposits.x' and "
                f"'deposits.y' (columns are {list(df.columns)})"
            )
        missing = [c for c in (cfg.x, cfg.y) if c not in df.columns]
        if missing:
            raise DepositsError(
                f"deposits file {str(path)!r} has no column(s) {missing}; its columns are {list(df.columns)}. "
                "Fix: set 'deposits.x' / 'deposits.y' to the coordinate column names"
            )
        for c in (cfg.x, cfg.y):
            num = pd.to_numeric(df[c], errors="coerce")
            bad = df.loc[num.isna(), c]
            if len(bad):
                raise DepositsError(
                    f"deposits file {str(path)!r}: column {c!r} has {len(bad)} non-numeric or empty value(s), "
                    f"e.g. {bad.iloc[0]!r} in row {bad.index[0]}. Fix: clean the coordinates or drop those rows "
                    "with 'deposits.query'"
                )
            df[c] = num.astype(float)
        df = _apply_query(df, cfg.query, path)
        gdf = gpd.GeoDataFrame(df, geometry=gpd.points_from_xy(df[cfg.x], df[cfg.y]), crs=cfg.crs)
    else:
        try:
            gdf = gpd.read_file(path, layer=cfg.layer) if cfg.layer else gpd.read_file(path)
        except Exception as exc:
            raise DepositsError(
                f"deposits file {str(path)!r} (layer {cfg.layer!r}) cannot be read as a vector file "
                f"({type(exc).__name__}: {exc}). Fix: check the path and 'deposits.layer'"
            ) from None
        if gdf.crs is None and cfg.crs:
            gdf = gdf.set_crs(cfg.crs)
        gdf = gdf[~(gdf.geometry.isna() | gdf.geometry.is_empty)]
        gdf = _apply_query(gdf, cfg.query, path)
        if not (gdf.geom_type == "Point").all():
            gdf = gdf.set_geometry(gdf.geometry.representative_point())
    gdf = gdf.reset_index(drop=True)
    gdf.attrs["path"] = str(path)  # named by the errors of deposit_cells
    return gdf


def _apply_query(df, query, path):
    n_rows = len(df)
    if query:
        try:  # checked again here: a DepositsConfig built with model_construct skips the validator
            safe_query(query)
        except QueryError as exc:
            raise DepositsError(f"deposits {exc.problem} (in 'deposits.query'). Fix: {exc.fix}") from None
        try:
            df = df.query(query)
        except Exception as exc:
            raise DepositsError(
                f"deposits query {query!r} failed on {str(path)!r} ({type(exc).__name__}: {exc}). "
                f"Fix: use pandas query syntax over the columns {[c for c in df.columns if c != 'geometry']}"
            ) from None
    if len(df) == 0:
        if not query:
            raise DepositsError(
                f"deposits file {str(path)!r} holds no deposit (0 rows). Fix: point 'deposits.path' at the file "
                "of known deposits, or remove the 'deposits' section (nothing is evaluated then)"
            )
        raise DepositsError(
            f"no deposits left in {str(path)!r} after query {query!r} (it selects none of the {n_rows} rows). "
            "Fix: check the query values (e.g. the spelling of the deposit type) against the file"
        )
    return df


def deposit_xy(score: xr.DataArray, deposits, *, warn: bool = True) -> np.ndarray:
    """Deposit coordinates [N, 2] in the map's CRS (``warn``: say so when the deposits have no CRS)."""
    crs = score.rio.crs
    if crs is None:
        raise EvaluationError(
            "the score map has no CRS, so deposits cannot be placed on it. Fix: set it with "
            "score.rio.write_crs(...) (score maps from pipeline.scoring.score / pipeline.evaluation.baselines carry it)"
        )
    if deposits.crs is None:
        if warn:
            warnings.warn(
                f"deposits have no CRS; assuming the map's CRS ({crs}). Set 'deposits.crs' to be explicit",
                stacklevel=3,
            )
    elif deposits.crs != crs:
        deposits = deposits.to_crs(crs)
    geom = deposits.geometry
    if not (geom.geom_type == "Point").all():
        geom = geom.representative_point()
    return np.column_stack([geom.x.to_numpy(float), geom.y.to_numpy(float)])


class DepositCells(tuple):
    """``(rows, cols)`` of the unique valid cells holding deposits, with the bookkeeping as attributes.

    Unpacks like a tuple: ``rows, cols = deposit_cells(score, deposits)``. Attributes: ``n_deposits``
    (input points), ``n_outside`` (outside the map's grid), ``n_invalid`` (on NaN cells),
    ``n_shared`` (sharing a cell with another deposit), ``n_used`` (= len(rows)).
    """

    def __new__(cls, rows, cols, *, n_deposits, n_outside, n_invalid, n_shared):
        obj = super().__new__(cls, (rows, cols))
        obj.n_deposits, obj.n_outside, obj.n_invalid, obj.n_shared = n_deposits, n_outside, n_invalid, n_shared
        obj.n_used = int(len(rows))
        return obj

    @property
    def rows(self) -> np.ndarray:
        return self[0]

    @property
    def cols(self) -> np.ndarray:
        return self[1]


def apply_affine(t, u, v):
    """(x, y) = t * (u, v) for arrays, spelled out (affine's ``*`` on tuples is deprecated)."""
    u, v = np.asarray(u, dtype="float64"), np.asarray(v, dtype="float64")
    return t.a * u + t.b * v + t.c, t.d * u + t.e * v + t.f


def rows_cols(score: xr.DataArray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fractional-free (row, col) of the cells containing points ``xy`` [N, 2]; -1 if outside the grid."""
    cols, rows = apply_affine(~score.rio.transform(recalc=True), xy[:, 0], xy[:, 1])
    rows, cols = np.floor(np.asarray(rows)).astype(np.int64), np.floor(np.asarray(cols)).astype(np.int64)
    h, w = score.sizes["y"], score.sizes["x"]
    outside = (rows < 0) | (rows >= h) | (cols < 0) | (cols >= w) | ~np.isfinite(xy).all(axis=1)
    rows[outside] = -1
    cols[outside] = -1
    return rows, cols


def map_values(score: xr.DataArray) -> np.ndarray:
    if score.dims != ("y", "x"):
        if set(score.dims) == {"y", "x"}:
            score = score.transpose("y", "x")
        else:
            raise EvaluationError(f"score map must have dims ('y', 'x'), got {score.dims}. Fix: select one band")
    return np.asarray(score.values, dtype="float64")


def deposit_cells(score: xr.DataArray, deposits) -> DepositCells:
    """Unique valid cells of ``score`` [H, W] that contain at least one deposit.

    Deposits outside the grid or on NaN (invalid) cells are dropped and counted (logged as a
    warning). Raises :class:`DepositsError` if no deposit falls on a valid cell.
    """
    values = map_values(score)
    xy = deposit_xy(score, deposits, warn=False)
    rows, cols = rows_cols(score, xy)
    inside = rows >= 0
    n_outside = int((~inside).sum())
    if not inside.any():  # the message says it when the deposits have no CRS: no warning line besides it
        raise DepositsError(_all_outside(score, deposits, xy))
    if deposits.crs is None:
        warnings.warn(
            f"deposits have no CRS; assuming the map's CRS ({score.rio.crs}). Set 'deposits.crs' to be explicit",
            stacklevel=2,
        )
    on_valid = inside.copy()
    on_valid[inside] = np.isfinite(values[rows[inside], cols[inside]])
    n_invalid = int((inside & ~on_valid).sum())
    if not on_valid.any():
        raise DepositsError(
            f"none of the {len(xy)} deposits lies on a valid cell of the map ({n_outside} outside the grid, "
            f"{n_invalid} on cells outside the study area). Fix: check the study-area mask and the deposits"
        )
    flat = np.unique(rows[on_valid] * values.shape[1] + cols[on_valid])
    n_shared = int(on_valid.sum()) - len(flat)
    if n_outside or n_invalid:
        log.warning(
            "deposit_cells: dropped %d of %d deposits (%d outside the grid, %d outside the valid area)",
            n_outside + n_invalid,
            len(xy),
            n_outside,
            n_invalid,
        )
    return DepositCells(
        flat // values.shape[1],
        flat % values.shape[1],
        n_deposits=len(xy),
        n_outside=n_outside,
        n_invalid=n_invalid,
        n_shared=n_shared,
    )


def _all_outside(score: xr.DataArray, deposits, xy: np.ndarray) -> str:
    """The message for deposits that all miss the map: the file, both extents, and the likely cause."""

    def box(b):
        return "[" + ", ".join(f"{round(float(v), 6):.9g}" for v in b) + "]"

    src = getattr(deposits, "attrs", {}).get("path")
    what = f"deposits file {src!r}" if src else "deposits"
    fin = xy[np.isfinite(xy).all(axis=1)]
    ext = box([*fin.min(axis=0), *fin.max(axis=0)]) if len(fin) else "(no finite coordinates)"
    crs = score.rio.crs
    if deposits.crs is None:
        cause = (
            f"the deposits have no CRS, so their x/y were taken as {crs} coordinates. Fix: set 'deposits.crs' "
            "to the CRS of the x/y columns (e.g. 'EPSG:4326' for longitude/latitude)"
        )
    else:
        cause = (
            f"their CRS is {deposits.crs.to_string()}. Fix: check 'deposits.crs' (the CRS of the x/y columns), "
            "that 'deposits.x' is the easting/longitude column, and that the deposits belong to this area"
        )
    return (
        f"{what}: all {len(xy)} deposits lie outside the map: their extent {ext} vs the map bounds "
        f"{box(score.rio.bounds())} in {crs}; {cause}"
    )
