"""A seeded synthetic ophiolite-hosted chromite province: the embedded default for the demo and the tests.

The province imitates the setting of the paper's Heishantou case (Xinjiang, UTM zone 46N):

- NE-trending suture belts (one per 192 px across strike), each an ophiolite sequence: a core of
  elongated **ultramafic** lenses inside **gabbro**, flanked by pillow **basalt**, in **sediment**;
- **faults**: the suture itself (in segments), a secondary suture-parallel fault, NW cross faults;
- **chromite deposits** inside ultramafic lenses *and* within 5 px of a fault, each with a strong
  Cr-Ni-Co(-MgO-Fe2O3) halo a few pixels wide in the stream sediments;
- distractors, one set per 192 x 192 px "tile" along each belt: a **barren ultramafic body** far
  from every fault (high Cr, Ni, MgO and magnetics, but no deposit and no halo), a **town/smelter**
  Cr-Ni-Cu-Pb-Zn contamination blob outside the ultramafics, a **granite** with a Cu-Au showing on
  its margin, a Cu-Zn showing in the basalt, a Pb-Zn anomaly in the sediments, gold along a few
  cross faults; spatially correlated backgrounds (Gaussian random fields) and log-normal noise.

Geometry is defined in pixels (so a province looks alike at any ``resolution``), counts of bodies,
deposits and samples scale with the area. Every random draw comes from a stream named after what it
draws (``_rng(seed, "sites")``), so fields do not depend on the order they are computed in.

:func:`generate_fields` returns the truth in memory; :func:`write_province` writes the input files
of a run (point samples CSV, GeoTIFFs in two CRSs, GeoPackages) and a ready ``province.yaml``.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import RunConfig
from pipeline.errors import ConfigError

__all__ = [
    "CRS",
    "GEOGRAPHIC_CRS",
    "ROCKTYPES",
    "ELEMENTS",
    "NODATA",
    "MISSING",
    "Province",
    "generate_fields",
    "write_province",
]

CRS = "EPSG:32646"  # UTM 46N, as in the Heishantou paper
GEOGRAPHIC_CRS = "EPSG:4326"  # CSVs and the gravity grid
# Grid centre in metres (about 91.1 E, 45.1 N): off the central meridian, so the UTM grid is rotated
# ~1.4 degrees against lon/lat and aligning the gravity grid is a real resampling.
CENTRE = (350_000.0, 5_000_000.0)
ROCKTYPES = ("ultramafic", "gabbro", "basalt", "sediment", "granite")  # lithology codes 1..5
NODATA = -99999.0  # raster nodata
MISSING = -9999.0  # missing value in the point samples
TILE = 192  # px: spacing of belts across strike and of distractor sets along strike
SAMPLE_STEP = 2.6  # px between stream-sediment samples (jittered grid, 12 % dropped: ~1 per 7.7 px)
DEPOSIT_FAULT_PX = 5.0  # deposits lie within this many pixels of a fault
DEPOSIT_SPACING_PX = 8.0
BARREN_CLEARANCE_PX = 12.0  # no fault comes closer than this to a barren body
GRAVITY_CELL = 2.5  # gravity cell size, in main-grid pixels
TIFF_BLOCK = 256
_UM, _GABBRO, _BASALT, _SEDIMENT, _GRANITE = range(1, 6)


@dataclass(frozen=True)
class _Element:
    """How one element's stream-sediment concentration is built (ln offsets relative to sediment)."""

    name: str
    unit: str
    background: float  # median over sediments
    detection_limit: float
    decimals: int
    rock: tuple[float, float, float, float, float]  # ln offset per ROCKTYPES
    chromite: float = 0.0  # ln halo amplitude factor around chromite deposits
    town: float = 0.0
    copper: float = 0.0
    pbzn: float = 0.0
    gold: float = 0.0
    texture: float = 0.25  # std of the ln background random field
    noise: float = 0.25  # std of the ln sampling + analytical noise


_ELEMENT_TABLE = (
    _Element("Cr", "ppm", 60.0, 5.0, 1, (2.3, 0.9, 0.5, 0.0, -0.8), chromite=1.0, town=2.6, texture=0.3, noise=0.3),
    _Element("Ni", "ppm", 25.0, 2.0, 1, (2.5, 0.7, 0.5, 0.0, -0.8), chromite=0.55, town=2.2),
    _Element("Co", "ppm", 12.0, 1.0, 1, (1.2, 0.5, 0.5, 0.0, -0.6), chromite=0.4, town=0.4),
    _Element("MgO", "wt%", 2.0, 0.05, 3, (2.4, 1.2, 0.9, 0.0, -0.7), chromite=0.2, noise=0.15),
    _Element("Fe2O3", "wt%", 4.5, 0.05, 3, (0.6, 0.5, 0.6, 0.0, -0.4), chromite=0.35, noise=0.12),
    _Element("Cu", "ppm", 20.0, 1.0, 1, (0.0, 0.4, 0.5, 0.0, 0.2), town=2.4, copper=2.2, gold=0.3),
    _Element("Pb", "ppm", 18.0, 2.0, 1, (-1.6, -0.7, -0.4, 0.0, 0.7), town=1.6, pbzn=1.9),
    _Element("Zn", "ppm", 60.0, 5.0, 1, (-0.3, 0.1, 0.3, 0.0, 0.3), town=1.2, copper=0.8, pbzn=1.6),
    _Element("Au", "ppb", 1.0, 0.3, 2, (-0.3, 0.0, 0.3, 0.0, 0.2), copper=1.2, gold=2.2, texture=0.4, noise=0.5),
)
ELEMENTS = tuple(e.name for e in _ELEMENT_TABLE)  # columns of the stream-sediment CSV, in order
# Columns the ready config grids: Au is written (many values below detection) but left out, as real
# runs leave out some columns; 8 geochemistry + 2 geophysics + 3 geology = 13 bands.
CONFIG_COLUMNS = ("Cr", "Ni", "Co", "MgO", "Fe2O3", "Cu", "Pb", "Zn")


def _rng(seed: int, stream: str) -> np.random.Generator:
    """An independent random stream per (seed, purpose), stable across Python runs."""
    return np.random.default_rng([int(seed), zlib.crc32(stream.encode())])


# -- grid ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    size: int
    resolution: float

    @property
    def shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    @property
    def half(self) -> float:
        return self.size * self.resolution / 2

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return (CENTRE[0] - self.half, CENTRE[1] - self.half, CENTRE[0] + self.half, CENTRE[1] + self.half)

    @property
    def transform(self):
        from rasterio.transform import from_origin

        return from_origin(self.bounds[0], self.bounds[3], self.resolution, self.resolution)

    @property
    def x(self) -> np.ndarray:
        return self.bounds[0] + (np.arange(self.size) + 0.5) * self.resolution

    @property
    def y(self) -> np.ndarray:
        return self.bounds[3] - (np.arange(self.size) + 0.5) * self.resolution

    def to_map(self, px, py):
        """Pixel frame (east, north, in pixels from the grid centre) -> map metres."""
        return CENTRE[0] + np.asarray(px) * self.resolution, CENTRE[1] + np.asarray(py) * self.resolution

    def to_colrow(self, px, py):
        """Pixel frame -> continuous (col, row); pixel (i, j) spans [j, j+1) x [i, i+1)."""
        return np.asarray(px) + self.size / 2, self.size / 2 - np.asarray(py)

    def dataarray(self, values: np.ndarray, name: str, **attrs):
        import rioxarray  # noqa: F401  (registers .rio)
        import xarray as xr

        da = xr.DataArray(values, dims=("y", "x"), coords={"y": self.y, "x": self.x}, name=name, attrs=attrs)
        return da.rio.write_crs(CRS)


# -- geology ------------------------------------------------------------------------------------


@dataclass
class _Stamps:
    """Gaussian bumps: positions in continuous (col, row), ln amplitude, sigma in px."""

    cols: np.ndarray
    rows: np.ndarray
    amps: np.ndarray
    sigmas: np.ndarray


@dataclass
class _Geology:
    """Everything the fields are built from: vectors (map metres), truth rasters, anomaly centres.

    Smoothed rock indicators and stamped anomalies are cached (``_cache``); clear it to free memory.
    """

    grid: _Grid
    lithology: Any  # GeoDataFrame: ROCKTYPE polygons covering the grid
    faults: Any  # GeoDataFrame: LineStrings
    study_area: Any  # shapely Polygon (map metres)
    lenses: list  # ultramafic lens polygons (map metres), barren ones included
    barren: list  # barren ultramafic polygons
    deposits: pd.DataFrame  # x, y (map), type, ID
    litho_codes: np.ndarray  # (H, W) uint8, 1..5 = ROCKTYPES
    fault_mask: np.ndarray  # (H, W) bool
    fault_distance_px: np.ndarray  # (H, W) float32
    barren_mask: np.ndarray  # (H, W) bool
    study_mask: np.ndarray  # (H, W) bool
    stamps: dict[str, _Stamps]
    features: pd.DataFrame  # distractor positions: kind, x, y
    _cache: dict = field(default_factory=dict)

    def dispersed(self, code: int) -> np.ndarray:
        """Indicator of rock ``code`` smoothed over ~1.5 px, as stream sediments disperse bedrock; (H, W) float32.

        Smoothing is linear, so each element's ln offsets combine these (4 filters, not one per element).
        """
        key = f"dispersed:{code}"
        if key not in self._cache:
            from scipy import ndimage

            self._cache[key] = ndimage.gaussian_filter((self.litho_codes == code).astype("float32"), 1.5)
        return self._cache[key]

    def stamp_field(self, kind: str) -> np.ndarray:
        if kind not in self._cache:
            s = self.stamps[kind]
            self._cache[kind] = _stamp(self.grid.shape, s.cols, s.rows, s.amps, s.sigmas)
        return self._cache[kind]


def _lens(centre, a, b, angle, rng, n=48):
    """Irregular ellipse in the pixel frame: semi-axes a (along ``angle``) and b, [n, 2]."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    e3, p3, e5, p5 = rng.uniform(0, 0.08), rng.uniform(0, 6.3), rng.uniform(0, 0.05), rng.uniform(0, 6.3)
    eps = e3 * np.cos(3 * t + p3) + e5 * np.cos(5 * t + p5)
    xl, yl = a * np.cos(t) * (1 + eps), b * np.sin(t) * (1 + eps)
    s = np.array([np.sin(angle), np.cos(angle)])  # azimuth from north, clockwise
    nrm = np.array([np.cos(angle), -np.sin(angle)])
    return np.asarray(centre) + xl[:, None] * s + yl[:, None] * nrm


def _polygon(grid: _Grid, pts):
    import shapely

    x, y = grid.to_map(pts[:, 0], pts[:, 1])
    return shapely.make_valid(shapely.Polygon(np.column_stack([x, y])))


def _line(grid: _Grid, pts):
    import shapely

    x, y = grid.to_map(pts[:, 0], pts[:, 1])
    return shapely.LineString(np.column_stack([x, y]))


def _study_polygon(grid: _Grid, rng):
    """Most of the grid: the square with its four corners cut off irregularly, edges slightly inset."""
    h, s = grid.size / 2 - 0.5, grid.size
    corners = np.array([(-h, h), (h, h), (h, -h), (-h, -h)])  # NW, NE, SE, SW (clockwise)
    cuts = rng.uniform(0.06, 0.16, 4) * s
    pts = []
    for i in range(4):
        a, b = corners[i], corners[(i + 1) % 4]
        d = (b - a) / np.linalg.norm(b - a)
        inward = np.array([-d[1], d[0]])
        inward = inward if np.dot(inward, -(a + b)) > 0 else -inward
        pts.append(a + cuts[i] * d)
        for f in (1 / 3, 2 / 3):
            pts.append(a + f * (b - a) + inward * rng.uniform(0, 0.025) * s)
        pts.append(b - cuts[(i + 1) % 4] * d)
    return _polygon(grid, np.array(pts))


def _build_geology(grid: _Grid, seed: int) -> _Geology:
    import geopandas as gpd
    import shapely
    from rasterio.features import rasterize
    from scipy import ndimage

    rng = _rng(seed, "geology")
    S, res = grid.size, grid.resolution
    half_diag = S / math.sqrt(2)
    box = shapely.box(*grid.bounds)
    study = _study_polygon(grid, _rng(seed, "study_area"))

    theta = np.deg2rad(rng.uniform(35, 55))  # strike azimuth: NE
    s_dir = np.array([np.sin(theta), np.cos(theta)])
    n_dir = np.array([np.cos(theta), -np.sin(theta)])  # across strike, towards SE

    def at(u, v):
        u, v = np.broadcast_arrays(np.asarray(u, float), np.asarray(v, float))
        return u[..., None] * s_dir + v[..., None] * n_dir

    v0 = rng.uniform(-10, 10)
    kmax = math.ceil(half_diag / TILE)
    belts = [v0 + k * TILE for k in range(-kmax, kmax + 1) if abs(v0 + k * TILE) < half_diag - 16]
    u_line = np.arange(-half_diag - 24, half_diag + 24.1, 4.0)

    lenses, gabbro_zones, basalt_zones, granites, barren = [], [], [], [], []
    suture_lines, cross_lines, feats = [], [], []
    stamps: dict[str, list] = {k: [] for k in ("town", "copper", "pbzn", "gold")}
    off_b, off_g = min(55.0, 0.3 * S), min(60.0, 0.33 * S)  # barren / granite distance from the belt
    off_t, off_u = min(40.0, 0.24 * S), min(50.0, 0.3 * S)

    for vk in belts:
        p = rng.uniform(0, 2 * np.pi, 6)
        l1, l2 = rng.uniform(120, 200), rng.uniform(50, 80)

        def vc(u, vk=vk, p=p, l1=l1, l2=l2):
            u = np.asarray(u, float)
            return vk + 5 * np.sin(2 * np.pi * u / l1 + p[0]) + 2 * np.sin(2 * np.pi * u / l2 + p[1])

        centre_v = vc(u_line)
        for width, zones, phase in ((15.0, gabbro_zones, p[2]), (32.0, basalt_zones, p[3])):
            w = width * (1 + 0.18 * np.sin(2 * np.pi * u_line / rng.uniform(60, 140) + phase))
            ring = np.concatenate([at(u_line, centre_v - w), at(u_line, centre_v + w)[::-1]])
            zones.append(_polygon(grid, ring))

        # ultramafic lenses strung along the suture
        u = -half_diag + rng.uniform(0, 40)
        while u < half_diag:
            a, b = rng.uniform(12, 28), rng.uniform(4.5, 8.5)
            c = at(u, vc(u) + rng.uniform(-3, 3))
            poly = _polygon(grid, _lens(c, a, b, theta + np.deg2rad(rng.uniform(-10, 10)), rng))
            if poly.intersects(box):
                lenses.append(poly)
            u += rng.uniform(38, 70)

        # the suture fault, in segments, and a secondary suture-parallel fault
        shift = rng.uniform(-2, 2)
        breaks = np.sort(rng.uniform(-half_diag, half_diag, rng.integers(1, 4)))
        edges = np.concatenate([[u_line[0]], breaks, [u_line[-1]]])
        for lo, hi in zip(edges[:-1], edges[1:]):
            uu = u_line[(u_line >= lo + 1.5) & (u_line <= hi - 1.5)]
            if len(uu) >= 2:
                suture_lines.append(_line(grid, at(uu, vc(uu) + shift)))
        side = rng.choice([-1.0, 1.0])
        span = rng.uniform(0.4, 0.7) * 2 * half_diag
        start = rng.uniform(-half_diag, half_diag - span)
        uu = u_line[(u_line >= start) & (u_line <= start + span)]
        if len(uu) >= 2:
            suture_lines.append(_line(grid, at(uu, vc(uu) + side * rng.uniform(19, 25))))

        # NW cross faults
        u = -half_diag + rng.uniform(0, 35)
        while u < half_diag:
            c = at(u, vc(u) + rng.uniform(-6, 6))
            ang = np.deg2rad(rng.uniform(-25, 25))
            d = np.cos(ang) * n_dir + np.sin(ang) * s_dir
            hl = rng.uniform(12, 35)
            cross_lines.append(_line(grid, np.array([c - hl * d, c + hl * d])))
            u += rng.uniform(35, 70)

        # one set of distractors per tile along the belt
        u0 = rng.uniform(-12, 12)
        jmax = math.ceil(half_diag / TILE)
        for j in range(-jmax, jmax + 1):
            uj = u0 + j * TILE
            if abs(uj) >= half_diag:
                continue
            bpoly = _polygon(
                grid,
                _lens(
                    at(uj + rng.uniform(-8, 8), vk + off_b + rng.uniform(-3, 3)),
                    rng.uniform(15, 21),
                    rng.uniform(6, 8),
                    theta,
                    rng,
                ),
            )
            if study.buffer(-3 * res).contains(bpoly):
                barren.append(bpoly)
            r = min(rng.uniform(13, 18), 0.1 * S)
            gc = at(uj + rng.uniform(-10, 10), vk - off_g + rng.uniform(-3, 3))
            gpoly = _polygon(grid, _lens(gc, r * rng.uniform(1.0, 1.3), r, theta + rng.uniform(0, 3), rng))
            if gpoly.intersects(box):
                granites.append(gpoly)
            # Cu-Au showing on the granite margin (facing away from the belt), Cu-Zn showing in basalt
            ang = rng.uniform(-0.8, 0.8)
            margin = gc + (r + 1.5) * (-np.cos(ang) * n_dir + np.sin(ang) * s_dir)
            vms = at(uj + off_u * rng.uniform(0.8, 1.0), vc(uj + off_u) - 24 + rng.uniform(-2, 2))
            town = at(uj - off_u + rng.uniform(-5, 5), vk + off_t + rng.uniform(-3, 3))
            pbzn = at(uj + rng.uniform(-20, 20), vk + 0.5 * TILE + rng.uniform(-8, 8))
            feats += [("copper", *margin), ("copper", *vms), ("town", *town), ("pbzn", *pbzn)]

    # gold along a third of the cross faults
    for ln_ in cross_lines:
        if rng.random() < 0.33:
            x, y = np.asarray(ln_.coords).T
            for f in rng.uniform(0.2, 0.8, 2):
                px, py = (x[0] + f * (x[1] - x[0]) - CENTRE[0]) / res, (y[0] + f * (y[1] - y[0]) - CENTRE[1]) / res
                feats.append(("gold", px, py))

    # faults, clipped to the grid and kept clear of the barren bodies
    clear = shapely.union_all([b.buffer(BARREN_CLEARANCE_PX * res) for b in barren]) if barren else None
    fault_geoms, fault_kinds = [], []
    for kind, lines in (("suture", suture_lines), ("cross", cross_lines)):
        geoms = shapely.intersection(np.array(lines, dtype=object), box)
        if clear is not None:
            geoms = shapely.difference(geoms, clear)
        for g in geoms:
            for part in shapely.get_parts(g):
                if isinstance(part, shapely.LineString) and part.length > 1.5 * res:
                    fault_geoms.append(part)
                    fault_kinds.append(kind)

    # lithology: a partition of the grid, ultramafic > granite > gabbro > basalt > sediment
    def union(geoms):
        return shapely.intersection(shapely.union_all(geoms), box) if geoms else shapely.Polygon()

    um = union(lenses + barren)
    gr = shapely.difference(union(granites), um)
    upper = shapely.union_all([um, gr])
    gb_all, bs_all = union(gabbro_zones), union(basalt_zones)
    gb = shapely.difference(gb_all, upper)
    bs = shapely.difference(bs_all, shapely.union_all([gb_all, upper]))
    sd = shapely.difference(box, shapely.union_all([bs_all, gb_all, upper]))
    rows = []
    for code, geom in ((_UM, um), (_GRANITE, gr), (_GABBRO, gb), (_BASALT, bs), (_SEDIMENT, sd)):
        for part in shapely.get_parts(geom):
            if isinstance(part, shapely.Polygon) and part.area > 0.25 * res * res:
                rows.append((ROCKTYPES[code - 1], part))
    litho_gdf = gpd.GeoDataFrame(
        {"UNIT_ID": np.arange(1, len(rows) + 1, dtype="int32"), "ROCKTYPE": [r[0] for r in rows]},
        geometry=[r[1] for r in rows],
        crs=CRS,
    )
    faults_gdf = gpd.GeoDataFrame(
        {"FAULT_ID": np.arange(1, len(fault_geoms) + 1, dtype="int32"), "TYPE": fault_kinds},
        geometry=fault_geoms,
        crs=CRS,
    )

    # rasters of the truth (pixel-centre rule, as a categorical ingest would do)
    tr, shape = grid.transform, grid.shape
    # Burning the simple source shapes in priority order equals rasterising the partition (same
    # pixel-centre rule) and avoids the sediment polygon with its thousands of holes.
    litho_codes = rasterize(
        [(z, _BASALT) for z in basalt_zones]
        + [(z, _GABBRO) for z in gabbro_zones]
        + [(z, _GRANITE) for z in granites]
        + [(z, _UM) for z in lenses + barren],
        out_shape=shape,
        transform=tr,
        fill=_SEDIMENT,
        dtype="uint8",
    )
    fault_mask = rasterize(
        ((g, 1) for g in fault_geoms), out_shape=shape, transform=tr, fill=0, all_touched=True, dtype="uint8"
    ).astype(bool)
    fault_distance_px = ndimage.distance_transform_edt(~fault_mask).astype("float32")
    barren_mask = np.zeros(shape, bool)
    if barren:
        barren_mask = rasterize(((g, 1) for g in barren), out_shape=shape, transform=tr, fill=0, dtype="uint8") > 0
    study_mask = rasterize([(study, 1)], out_shape=shape, transform=tr, fill=0, dtype="uint8").astype(bool)

    deposits = _place_deposits(grid, seed, litho_codes, barren_mask, fault_distance_px, study_mask, um)

    feat = pd.DataFrame(feats, columns=["kind", "px", "py"])
    fx, fy = grid.to_map(feat.px.to_numpy(), feat.py.to_numpy())
    features = pd.DataFrame({"kind": feat.kind, "x": fx, "y": fy})
    copper = features[features.kind == "copper"].reset_index(drop=True)
    deposits = pd.concat([deposits, pd.DataFrame({"x": copper.x, "y": copper.y, "type": "copper"})], ignore_index=True)
    prefix = deposits.type.map({"chromite": "CR", "copper": "CU"})
    deposits.insert(0, "ID", prefix + "-" + (deposits.groupby("type").cumcount() + 1).map("{:05d}".format))

    stamp_rng = _rng(seed, "stamps")

    def to_stamps(kind, amp, sigma):
        sel = feat[feat.kind == kind]
        c, r = grid.to_colrow(sel.px.to_numpy(), sel.py.to_numpy())
        n = len(sel)
        return _Stamps(c, r, stamp_rng.uniform(*amp, n), stamp_rng.uniform(*sigma, n))

    dep_c, dep_r = grid.to_colrow(
        (deposits.x[deposits.type == "chromite"].to_numpy() - CENTRE[0]) / res,
        (deposits.y[deposits.type == "chromite"].to_numpy() - CENTRE[1]) / res,
    )
    nd = len(dep_c)
    stamps = {
        # chromite halos: ln amplitude ~1.2-2.0 (x3-7 on Cr), a few pixels wide
        "chromite": _Stamps(dep_c, dep_r, stamp_rng.uniform(1.2, 2.0, nd), stamp_rng.uniform(1.5, 3.0, nd)),
        "town": to_stamps("town", (0.9, 1.1), (3.0, 5.0)),
        "copper": to_stamps("copper", (0.8, 1.2), (2.0, 3.5)),
        "pbzn": to_stamps("pbzn", (0.8, 1.1), (4.0, 7.0)),
        "gold": to_stamps("gold", (0.6, 1.0), (1.5, 2.5)),
    }
    return _Geology(
        grid=grid,
        lithology=litho_gdf,
        faults=faults_gdf,
        study_area=study,
        lenses=lenses,
        barren=barren,
        deposits=deposits,
        litho_codes=litho_codes,
        fault_mask=fault_mask,
        fault_distance_px=fault_distance_px,
        barren_mask=barren_mask,
        study_mask=study_mask,
        stamps=stamps,
        features=features,
    )


def _place_deposits(grid, seed, litho_codes, barren_mask, fault_distance_px, study_mask, um_geom) -> pd.DataFrame:
    """Chromite deposits: inside (non-barren) ultramafic lenses, within DEPOSIT_FAULT_PX of a fault."""
    import shapely
    from scipy import ndimage

    rng = _rng(seed, "deposits")
    S, res = grid.size, grid.resolution
    um = ndimage.binary_erosion(litho_codes == _UM)  # a pixel of margin keeps the jittered point inside
    cand = um & ~barren_mask & (fault_distance_px <= DEPOSIT_FAULT_PX) & study_mask
    m = 3
    cand[:m], cand[-m:], cand[:, :m], cand[:, -m:] = False, False, False, False
    r, c = np.nonzero(cand)
    n_target = max(1, round(int(rng.integers(12, 26)) * S * S / TILE**2))
    if len(r) == 0:
        raise ConfigError(
            f"synthetic province of size {S} has no room for deposits; use size >= 64 (e.g. the default 192)"
        )
    # Poisson-disk thinning: one random candidate per cell, then greedy with a neighbour check
    order = rng.permutation(len(r))
    r, c = r[order], c[order]
    cell = int(DEPOSIT_SPACING_PX)
    key = (r // cell) * (S // cell + 1) + (c // cell)
    _, first = np.unique(key, return_index=True)
    first = np.sort(first)  # keep the random order
    taken: dict[tuple[int, int], list[tuple[int, int]]] = {}
    chosen = []
    for i in first:
        ri, ci = int(r[i]), int(c[i])
        cr, cc = ri // cell, ci // cell
        ok = True
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                for pr, pc in taken.get((cr + dr, cc + dc), ()):
                    if (pr - ri) ** 2 + (pc - ci) ** 2 < DEPOSIT_SPACING_PX**2:
                        ok = False
        if ok:
            taken.setdefault((cr, cc), []).append((ri, ci))
            chosen.append((ri, ci))
            if len(chosen) >= n_target:
                break
    rows, cols = np.array(chosen, float).T
    cols = cols + 0.5 + rng.uniform(-0.3, 0.3, len(cols))
    rows = rows + 0.5 + rng.uniform(-0.3, 0.3, len(rows))
    x = grid.bounds[0] + cols * res
    y = grid.bounds[3] - rows * res
    inside = shapely.contains_xy(um_geom, x, y)
    return pd.DataFrame({"x": x[inside], "y": y[inside], "type": "chromite"})


# -- fields -------------------------------------------------------------------------------------


def _stamp(shape, cols, rows, amps, sigmas, batch: int = 4096) -> np.ndarray:
    """Max-composite of Gaussian bumps ``amp * exp(-d^2 / 2 sigma^2)``; (H, W) float32."""
    out = np.zeros(shape, "float32")
    if len(cols) == 0:
        return out
    R = int(math.ceil(3.5 * float(np.max(sigmas))))
    d = np.arange(-R, R + 1)
    H, W = shape
    for s in range(0, len(cols), batch):
        c, r = cols[s : s + batch], rows[s : s + batch]
        a, sg = amps[s : s + batch], sigmas[s : s + batch]
        ci, ri = np.floor(c).astype(int), np.floor(r).astype(int)
        rr = np.broadcast_to(ri[:, None, None] + d[None, :, None], (len(c), d.size, d.size))
        cc = np.broadcast_to(ci[:, None, None] + d[None, None, :], (len(c), d.size, d.size))
        d2 = (rr + 0.5 - r[:, None, None]) ** 2 + (cc + 0.5 - c[:, None, None]) ** 2
        val = (a[:, None, None] * np.exp(-d2 / (2 * sg[:, None, None] ** 2))).astype("float32")
        ok = (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
        np.maximum.at(out, (rr[ok], cc[ok]), val[ok])
    return out


def _grf(rng: np.random.Generator, shape, scale_px: float) -> np.ndarray:
    """Unit-variance smooth Gaussian random field with correlation length ~scale_px; (H, W) float32.

    White noise is smoothed on a grid ~scale/3 coarser, then upsampled bilinearly: cheap at 4096^2.
    """
    from scipy import ndimage

    H, W = shape
    f = max(1, int(scale_px // 3))
    sigma = scale_px / f
    pad = int(4 * sigma + 0.5)  # the filter's radius: no wrap-around on grids smaller than the scale
    coarse = rng.standard_normal((H // f + 3 + 2 * pad, W // f + 3 + 2 * pad), dtype="float32")
    coarse = ndimage.gaussian_filter(coarse, sigma)[pad:-pad, pad:-pad]
    # Divide by the filter's theoretical std, not the sample std: over a grid smaller than the
    # correlation length the field should look like a gentle trend with a random offset.
    delta = np.zeros(2 * pad + 1)
    delta[pad] = 1.0
    coarse /= np.float32(np.sum(ndimage.gaussian_filter1d(delta, sigma) ** 2))
    if f == 1:
        return np.ascontiguousarray(coarse[:H, :W])
    return _upsample(coarse, f, H, W)


def _upsample(coarse: np.ndarray, f: int, H: int, W: int) -> np.ndarray:
    """Separable bilinear upsampling by an integer factor, cropped to (H, W); float32.

    Two broadcast passes: ~10x faster than ``ndimage.zoom(order=1)`` at 4096^2.
    """
    t = np.arange(max(H, W), dtype="float32") / f
    i0 = t.astype(np.int64)
    w = (t - i0).astype("float32")
    r0, rw = i0[:H], w[:H, None]
    rows = coarse[r0] * (1 - rw) + coarse[r0 + 1] * rw  # (H, w)
    c0, cw = i0[:W], w[None, :W]
    out = rows[:, c0]
    out *= 1 - cw
    out += rows[:, c0 + 1] * cw
    return out


def _element_field(geo: _Geology, el: _Element, seed: int) -> np.ndarray:
    """True stream-sediment concentration of ``el`` at every pixel; (H, W) float32, in el.unit."""
    rng = _rng(seed, f"field:{el.name}")
    log = np.zeros(geo.grid.shape, "float32")
    for code, offset in enumerate(el.rock, start=1):
        if offset:
            log += np.float32(offset) * geo.dispersed(code)
    log += el.texture * (0.75 * _grf(rng, geo.grid.shape, 40) + 0.66 * _grf(rng, geo.grid.shape, 6))
    for kind in ("chromite", "town", "copper", "pbzn", "gold"):
        k = getattr(el, kind)
        if k:
            log += k * geo.stamp_field(kind)
    np.exp(log, out=log)
    log *= el.background
    return log


def _magnetic(geo: _Geology, seed: int) -> np.ndarray:
    """Total magnetic intensity anomaly (nT); (H, W) float32. Serpentinised ultramafics are strongly magnetic."""
    from rasterio.features import rasterize
    from scipy import ndimage

    rng = _rng(seed, "magnetic")
    g = geo.grid
    amps = rng.uniform(250, 650, len(geo.lenses) + len(geo.barren))
    src = rasterize(
        ((p, float(a)) for p, a in zip(geo.lenses + geo.barren, amps)),
        out_shape=g.shape,
        transform=g.transform,
        fill=0,
        dtype="float32",
    )
    lut = np.array([0, 0, 70, 35, 0, -40], "float32")
    src += lut[geo.litho_codes]
    field = ndimage.gaussian_filter(src, 2.0)
    field += 25 * _grf(rng, g.shape, 20)
    field += _regional(g, rng, (4, 10), cap=150, wavy=40, base=0.0)
    field += 3 * rng.standard_normal(g.shape, dtype="float32")
    town = geo.stamps["town"]  # cultural noise: the smelter's steel
    ones = np.ones(len(town.cols))
    field += 150 * _stamp(g.shape, town.cols, town.rows, ones, ones)
    return field


def _gravity(geo: _Geology, seed: int) -> np.ndarray:
    """Bouguer gravity (mGal) on the main grid; (H, W) float32. Smoother than magnetics."""
    from scipy import ndimage

    rng = _rng(seed, "gravity")
    g = geo.grid
    lut = np.array([0, 9, 4, 2.5, 0, -5], "float32")
    field = ndimage.gaussian_filter(lut[geo.litho_codes], 4.0)
    field += 0.6 * _grf(rng, g.shape, 40)
    field += _regional(g, rng, (0.4, 0.9), cap=15, wavy=4, base=-135.0)
    field += 0.05 * rng.standard_normal(g.shape, dtype="float32")
    return field


def _regional(g: _Grid, rng, per_km: tuple[float, float], *, cap: float, wavy: float, base: float) -> np.ndarray:
    """Regional field: a planar trend of ``per_km`` units per km (at most ``cap`` across the grid) in a
    random direction, plus long-wavelength undulation of std ``wavy``; (H, W) float32.

    The cap keeps a 400 km province's trend from swamping its anomalies, as a linear trend would.
    """
    grad = min(rng.uniform(*per_km) * g.resolution / 1000.0, cap / g.size)
    a = rng.uniform(0, 2 * np.pi)
    px = (np.arange(g.size, dtype="float32") - g.size / 2) * np.float32(grad * np.cos(a))
    py = (g.size / 2 - np.arange(g.size, dtype="float32")) * np.float32(grad * np.sin(a))
    field = np.float32(wavy) * _grf(rng, g.shape, 150)
    field += py[:, None]
    field += px[None, :]
    field += np.float32(base)
    return field


def _sample_sites(g: _Grid, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stream-sediment sample positions, continuous (col, row): a jittered grid with 12 % dropped."""
    rng = _rng(seed, "sites")
    n = max(2, int(g.size / SAMPLE_STEP))
    step = g.size / n
    centres = (np.arange(n) + 0.5) * step
    cols, rows = np.meshgrid(centres, centres)
    cols = cols.ravel() + rng.uniform(-0.42, 0.42, n * n) * step
    rows = rows.ravel() + rng.uniform(-0.42, 0.42, n * n) * step
    keep = rng.random(n * n) >= 0.12
    return cols[keep], rows[keep]


def _sample(field: np.ndarray, cols, rows, el: _Element, seed: int) -> np.ndarray:
    """Measured values at the sites: bilinear truth x log-normal noise, rounded, '<DL' as -DL, a few missing."""
    from scipy import ndimage

    rng = _rng(seed, f"sample:{el.name}")
    v = ndimage.map_coordinates(field, [rows - 0.5, cols - 0.5], order=1, mode="nearest").astype("float64")
    v *= np.exp(el.noise * rng.standard_normal(len(v)))
    v = np.round(v, el.decimals)
    v[v < el.detection_limit] = -el.detection_limit
    v[rng.random(len(v)) < 0.002] = MISSING
    return v


# -- public API -----------------------------------------------------------------------------------


def _check_args(size: int, resolution: float) -> _Grid:
    if int(size) != size or size < 64:
        raise ConfigError(f"synthetic province size {size!r} is too small; give an integer >= 64 pixels, e.g. 192")
    if not resolution > 0:
        raise ConfigError(f"synthetic province resolution {resolution!r} must be positive metres, e.g. 100")
    return _Grid(int(size), float(resolution))


def generate_fields(size: int = 192, seed: int = 0, resolution: float = 100.0) -> dict[str, Any]:
    """The province's truth in memory, on the main grid (``size`` x ``size`` px, EPSG:32646).

    Returns a dict of:

    - one DataArray per element in :data:`ELEMENTS` ((y, x) float32, true stream-sediment concentration
      before sampling noise; ``attrs['units']``);
    - ``magnetic`` (nT), ``gravity`` (mGal): (y, x) float32 DataArrays on the main grid (the gravity file
      is this field resampled to EPSG:4326);
    - ``lithology`` (y, x) uint8 codes 1..5 = :data:`ROCKTYPES` (``attrs['classes']``);
    - ``ultramafic``, ``barren``, ``faults``, ``study_area``: (y, x) bool DataArrays;
    - ``fault_distance``: (y, x) float32 metres from the rasterised faults;
    - ``deposits``: DataFrame ID, x, y (EPSG:32646), lon, lat, type ('chromite' or 'copper');
    - ``features``: DataFrame kind ('town', 'copper', 'pbzn', 'gold'), x, y: the distractors;
    - ``lithology_polygons``, ``fault_lines``: GeoDataFrames (EPSG:32646); ``study_polygon``: shapely Polygon.

    Every DataArray carries x/y pixel-centre coordinates and the CRS (rioxarray).
    """
    g = _check_args(size, resolution)
    geo = _build_geology(g, seed)
    out: dict[str, Any] = {}
    for el in _ELEMENT_TABLE:
        out[el.name] = g.dataarray(
            _element_field(geo, el, seed), el.name, units=el.unit, detection_limit=el.detection_limit
        )
    out["magnetic"] = g.dataarray(_magnetic(geo, seed), "magnetic", units="nT")
    out["gravity"] = g.dataarray(_gravity(geo, seed), "gravity", units="mGal")
    out["lithology"] = g.dataarray(geo.litho_codes, "lithology", classes={i + 1: r for i, r in enumerate(ROCKTYPES)})
    out["ultramafic"] = g.dataarray(geo.litho_codes == _UM, "ultramafic")
    out["barren"] = g.dataarray(geo.barren_mask, "barren")
    out["faults"] = g.dataarray(geo.fault_mask, "faults")
    out["fault_distance"] = g.dataarray(geo.fault_distance_px * np.float32(g.resolution), "fault_distance", units="m")
    out["study_area"] = g.dataarray(geo.study_mask, "study_area")
    out["deposits"] = _with_lonlat(geo.deposits)
    out["features"] = geo.features
    out["lithology_polygons"] = geo.lithology
    out["fault_lines"] = geo.faults
    out["study_polygon"] = geo.study_area
    return out


@dataclass(frozen=True)
class Province:
    """What :func:`write_province` wrote. Paths are absolute; the config refers to them relatively."""

    root: Path
    config_path: Path
    crs: str
    bounds: tuple[float, float, float, float]
    resolution: float
    size: int
    seed: int
    samples_path: Path
    magnetic_path: Path
    gravity_path: Path
    gravity_crs: str
    geology_path: Path
    study_area_path: Path
    deposits_path: Path
    columns: tuple[str, ...]  # element columns of the samples CSV
    config_columns: tuple[str, ...]  # the ones the config grids
    n_samples: int
    n_deposits: int  # chromite deposits (the evaluation targets)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file written."""
        return (
            self.config_path,
            self.samples_path,
            self.magnetic_path,
            self.gravity_path,
            self.geology_path,
            self.study_area_path,
            self.deposits_path,
        )


def write_province(
    out_dir: Path, size: int = 192, seed: int = 0, *, resolution: float = 100.0, chunk: int = 512
) -> Province:
    """Write a synthetic province's input files and its run config under ``out_dir``.

    Layout (relative paths, as in ``province.yaml``)::

        province.yaml                       run config (RunConfig.from_yaml)
        geochemistry/stream_sediment.csv    point samples: ID, X, Y (lon/lat), Cr ... Au
        geophysics/magnetic.tif             nT, EPSG:32646, ``resolution`` m, nodata -99999 on a few edge pixels
        geophysics/gravity.tif              mGal, EPSG:4326, ~2.5 x coarser, nodata -99999 outside the footprint
        geology.gpkg                        layers 'lithology' (ROCKTYPE polygons) and 'faults' (lines)
        study_area.gpkg                     one polygon
        deposits.csv                        ID, X, Y (lon/lat), type ('chromite' / 'copper')

    The same ``seed`` gives byte-identical CSVs and identical raster values.
    """
    g = _check_args(size, resolution)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "geochemistry").mkdir(exist_ok=True)
    (root / "geophysics").mkdir(exist_ok=True)
    geo = _build_geology(g, seed)

    geology_path = root / "geology.gpkg"
    study_path = root / "study_area.gpkg"
    for p in (geology_path, study_path):
        if p.exists():
            p.unlink()
    geo.lithology.to_file(geology_path, layer="lithology", driver="GPKG")
    geo.faults.to_file(geology_path, layer="faults", driver="GPKG")
    import geopandas as gpd

    gpd.GeoDataFrame({"NAME": ["study area"]}, geometry=[geo.study_area], crs=CRS).to_file(
        study_path, layer="study_area", driver="GPKG"
    )

    dep = _with_lonlat(geo.deposits)
    deposits_path = root / "deposits.csv"
    pd.DataFrame({"ID": dep.ID, "X": dep.lon, "Y": dep.lat, "type": dep.type}).to_csv(
        deposits_path, index=False, lineterminator="\n"
    )

    cols, rows = _sample_sites(g, seed)
    lon, lat = _lonlat(g.bounds[0] + cols * g.resolution, g.bounds[3] - rows * g.resolution)
    table = {"ID": np.arange(1, len(cols) + 1), "X": lon, "Y": lat}
    for el in _ELEMENT_TABLE:
        f = _element_field(geo, el, seed)
        table[el.name] = _sample(f, cols, rows, el, seed)
        del f
    geo._cache.clear()
    samples_path = root / "geochemistry" / "stream_sediment.csv"
    decimals = {"ID": 0, "X": 6, "Y": 6, **{el.name: el.decimals for el in _ELEMENT_TABLE}}
    _write_csv(samples_path, {k: (v, decimals[k]) for k, v in table.items()})
    del table

    magnetic_path = root / "geophysics" / "magnetic.tif"
    mag = _magnetic(geo, seed)
    _edge_gaps(mag, _rng(seed, "magnetic:gaps"))
    _write_tif(magnetic_path, mag, g.transform, CRS, units="nT")
    del mag

    gravity_path = root / "geophysics" / "gravity.tif"
    grav, tr = _to_geographic(g, _gravity(geo, seed))
    _write_tif(gravity_path, grav, tr, GEOGRAPHIC_CRS, units="mGal")
    del grav

    config_path = root / "province.yaml"
    config_path.write_text(
        _config_yaml(
            g,
            seed,
            chunk,
            {
                "samples": samples_path,
                "magnetic": magnetic_path,
                "gravity": gravity_path,
                "geology": geology_path,
                "study_area": study_path,
                "deposits": deposits_path,
            },
            root,
        )
    )

    RunConfig.from_yaml(config_path)  # fail here, not in ingest, if the generator and the schema drift apart
    return Province(
        root=root.resolve(),
        config_path=config_path.resolve(),
        crs=CRS,
        bounds=g.bounds,
        resolution=g.resolution,
        size=g.size,
        seed=int(seed),
        samples_path=samples_path.resolve(),
        magnetic_path=magnetic_path.resolve(),
        gravity_path=gravity_path.resolve(),
        gravity_crs=GEOGRAPHIC_CRS,
        geology_path=geology_path.resolve(),
        study_area_path=study_path.resolve(),
        deposits_path=deposits_path.resolve(),
        columns=ELEMENTS,
        config_columns=CONFIG_COLUMNS,
        n_samples=len(cols),
        n_deposits=int((dep.type == "chromite").sum()),
    )


# -- writers --------------------------------------------------------------------------------------


def _lonlat(x, y):
    from pyproj import Transformer

    lon, lat = Transformer.from_crs(CRS, GEOGRAPHIC_CRS, always_xy=True).transform(np.asarray(x), np.asarray(y))
    return np.round(lon, 6), np.round(lat, 6)


def _with_lonlat(dep: pd.DataFrame) -> pd.DataFrame:
    lon, lat = _lonlat(dep.x.to_numpy(), dep.y.to_numpy())
    out = dep.copy()
    out["lon"], out["lat"] = lon, lat
    return out[["ID", "x", "y", "lon", "lat", "type"]]


def _write_csv(path: Path, columns: dict[str, tuple[np.ndarray, int]], block: int = 1 << 18) -> None:
    """Write numeric columns with fixed decimals as CSV, byte-for-byte reproducibly.

    Vectorised: each block of rows is laid out as fixed-width bytes [width, rows] plus a keep-mask
    (leading zeros, unused sign slots); boolean indexing of the transpose compacts it into the text.
    pandas' ``to_csv`` formats floats one by one: ~60 s for the 2 M samples of a 4096^2 province.
    """
    names = list(columns)
    specs = []  # (values, decimals, integer digits) per column
    for name in names:
        values, dec = columns[name]
        values = np.asarray(values, dtype="float64")
        top = int(np.rint(np.abs(values).max(initial=0) * 10.0**dec))
        specs.append((values, dec, max(len(str(top)), dec + 1) - dec))
    width = sum(1 + n_int + (dec + 1 if dec else 0) + 1 for _, dec, n_int in specs)
    n = len(specs[0][0])
    with open(path, "wb") as fh:
        fh.write((",".join(names) + "\n").encode())
        for start in range(0, n, block):
            m = min(block, n - start)
            buf = np.zeros((width, m), np.uint8)
            keep = np.zeros((width, m), bool)
            pos = 0
            for i, (values, dec, n_int) in enumerate(specs):
                v = values[start : start + m]
                buf[pos] = ord("-")
                keep[pos] = v < 0
                pos += 1
                x = np.rint(np.abs(v) * 10.0**dec).astype(np.int64)
                scaled = x.copy()
                slots = list(range(pos, pos + n_int)) + list(range(pos + n_int + 1, pos + n_int + 1 + dec))
                for slot in reversed(slots):  # least significant digit first
                    q = x // 10
                    buf[slot] = (x - q * 10).astype(np.uint8) + ord("0")
                    x = q
                # an integer-part digit shows once a non-zero digit came before it; the last one always
                for k in range(n_int - 1):
                    keep[pos + k] = scaled >= 10 ** (n_int - 1 - k + dec)
                keep[pos + n_int - 1 : pos + n_int + (dec + 1 if dec else 0)] = True
                if dec:
                    buf[pos + n_int] = ord(".")
                pos += n_int + (dec + 1 if dec else 0)
                buf[pos] = ord("\n") if i == len(specs) - 1 else ord(",")
                keep[pos] = True
                pos += 1
            fh.write(buf.T[keep.T].tobytes())


def _edge_gaps(a: np.ndarray, rng) -> None:
    """Blank a short stretch of the top two rows and of the right column (a missing flight-line end)."""
    H, W = a.shape
    L = max(3, W // 20)
    c0 = int(rng.integers(0, W - L))
    a[:2, c0 : c0 + L] = NODATA
    r0 = int(rng.integers(0, H - L))
    a[r0 : r0 + L, -1] = NODATA


def _to_geographic(g: _Grid, field: np.ndarray):
    """Resample a main-grid field onto a lon/lat grid ~GRAVITY_CELL x coarser (area average)."""
    from rasterio.transform import from_origin
    from rasterio.warp import Resampling, reproject, transform_bounds

    w, s, e, n = transform_bounds(CRS, GEOGRAPHIC_CRS, *g.bounds, densify_pts=21)
    lat_mid = math.radians((s + n) / 2)
    dy = GRAVITY_CELL * g.resolution / 111_320.0
    dx = dy / math.cos(lat_mid)
    w, s, e, n = w - dx, s - dy, e + dx, n + dy  # a margin of one cell: nodata beyond the survey edge
    width, height = math.ceil((e - w) / dx), math.ceil((n - s) / dy)
    tr = from_origin(w, n, dx, dy)
    dst = np.full((height, width), NODATA, "float32")
    reproject(
        field,
        dst,
        src_transform=g.transform,
        src_crs=CRS,
        dst_transform=tr,
        dst_crs=GEOGRAPHIC_CRS,
        resampling=Resampling.average,
        src_nodata=None,
        dst_nodata=NODATA,
    )
    return dst, tr


def _write_tif(path: Path, a: np.ndarray, transform, crs: str, units: str) -> None:
    import rasterio

    profile = dict(
        driver="GTiff",
        width=a.shape[1],
        height=a.shape[0],
        count=1,
        dtype="float32",
        crs=crs,
        transform=transform,
        nodata=NODATA,
        tiled=True,
        blockxsize=TIFF_BLOCK,
        blockysize=TIFF_BLOCK,
        compress="deflate",
        predictor=3,
        zlevel=4,
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(a, 1)
        dst.update_tags(1, units=units)


def _config_yaml(g: _Grid, seed: int, chunk: int, paths: dict[str, Path], root: Path) -> str:
    import yaml

    rel = {k: p.relative_to(root).as_posix() for k, p in paths.items()}
    res = g.resolution
    num = lambda v: int(v) if float(v).is_integer() else float(v)  # noqa: E731  (tidy YAML numbers)
    cfg = {
        "name": f"synthetic-chromite-s{g.size}-seed{seed}",
        "grid": {
            "crs": CRS,
            "resolution": num(res),
            "bounds": [num(b) for b in g.bounds],
            "mask": rel["study_area"],
            "chunk": int(chunk),
        },
        "layers": [
            {
                "name": "stream_sediment",
                "path": rel["samples"],
                "source": "geochemistry",
                "kind": "points",
                "x": "X",
                "y": "Y",
                "crs": GEOGRAPHIC_CRS,
                "columns": list(CONFIG_COLUMNS),
                "transform": "clr",
                "missing": [MISSING],
                "below_detection": "half",
                "interpolation": {"method": "idw", "power": 2, "k": 12, "radius": num(8 * res)},
            },
            {"name": "magnetic", "path": rel["magnetic"], "source": "geophysics", "kind": "continuous"},
            {"name": "gravity", "path": rel["gravity"], "source": "geophysics", "kind": "continuous"},
            {
                "name": "lithology",
                "path": rel["geology"],
                "layer": "lithology",
                "source": "geology",
                "kind": "categorical",
                "attribute": "ROCKTYPE",
                "classes": ["ultramafic", "gabbro"],
                "scaling": "none",
            },
            {
                "name": "fault_distance",
                "path": rel["geology"],
                "layer": "faults",
                "source": "geology",
                "kind": "distance",
            },
        ],
        "deposits": {"path": rel["deposits"], "x": "X", "y": "Y", "crs": GEOGRAPHIC_CRS, "query": "type == 'chromite'"},
        "model": {"window": 16, "patch": 4, "dim": 64, "depth": 2, "heads": 4, "mask_ratio": 0.5},
        # stride 4 gives ~2,000 training windows at 192 px (and enough for a batch at 64 px)
        "train": {"epochs": 3, "batch_size": 64, "seed": int(seed), "train_stride": 4},
        "score": {"stride": 8},
        "evaluate": {"buffer": num(10 * res)},
    }
    header = (
        f"# Synthetic ophiolite-hosted chromite province (pipeline.data.synthetic, size {g.size}, seed {seed}).\n"
        "# Paths are relative to this file.\n"
    )
    return header + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=110)
