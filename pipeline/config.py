"""The run configuration: one YAML file, validated into frozen pydantic models.

Each stage receives only its own sub-config (``cfg.grid``, ``cfg.layers``, ``cfg.model`` ...).
Relative paths resolve against the folder of the YAML file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError
from pipeline.storage import Location, is_url, redact
from pipeline.untrusted import (  # noqa: F401  (QueryError, safe_query, yaml_error: used through this module too)
    BAND_BAD_CHARS,
    QUERY_FIX,
    QueryError,
    YAMLLimitError,
    check_name,
    finite,
    load_yaml,
    safe_query,
    short_repr,
    yaml_error,
)

SOURCES_HINT = "geochemistry, geophysics, geology (or any group name of your own)"
KINDS = ("continuous", "categorical", "distance", "indicator", "points")
TRANSFORMS = ("none", "log", "log10", "clr")
SCALINGS = ("robust", "standard", "none")
RESAMPLINGS = ("nearest", "bilinear", "cubic", "average", "mode", "min", "max", "med")
_CHOICES = {"kind": KINDS, "transform": TRANSFORMS, "scaling": SCALINGS, "resampling": RESAMPLINGS}


class _Frozen(BaseModel):
    # NaN and inf are refused in every float field but the few that name sentinels (LayerConfig.nodata, missing)
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class GridConfig(_Frozen):
    """The target grid every layer is aligned onto.

    Give ``crs`` + ``resolution`` (+ ``bounds``), or ``like`` (a raster whose grid is copied; ``crs``,
    ``resolution`` and ``bounds`` then override its values). Without ``bounds`` the grid covers the
    union of the raster layers' footprints.
    """

    crs: str | None = Field(None, description="Target CRS, e.g. 'EPSG:32650'.")
    resolution: float | tuple[float, float] | None = Field(
        None, description="Pixel size in CRS units; one number or [x, y]."
    )
    bounds: tuple[float, float, float, float] | None = Field(
        None, description="[xmin, ymin, xmax, ymax] in the target CRS."
    )
    like: Location | None = Field(None, description="A raster whose CRS, resolution and bounds define the grid.")
    mask: Location | None = Field(
        None,
        description="Study area: a polygon file (inside = valid) or a raster (valid where not nodata and non-zero).",
    )
    mask_layers: tuple[str, ...] = Field(
        (), description="Study area from the footprint of these layers (valid where all of them have data)."
    )
    chunk: int = Field(512, ge=16, description="Chunk size of the cube in pixels (all bands in one chunk).")
    max_pixels: int = Field(
        2_000_000_000,
        ge=1,
        description="Refuse a grid of more pixels than this before any work (a typo in resolution or bounds).",
    )
    max_cube_gib: float = Field(
        512.0, gt=0, description="Refuse a cube larger than this (GiB: pixels x bands x 4 bytes) before any work."
    )

    @field_validator("resolution", "bounds", mode="before")
    @classmethod
    def _finite(cls, v, info):
        fix = (
            "give the pixel size in CRS units, e.g. 100"
            if info.field_name == "resolution"
            else "write [xmin, ymin, xmax, ymax] as four finite numbers in the grid's CRS"
        )
        return v if v is None else finite(v, info.field_name, fix)

    @field_validator("resolution")
    @classmethod
    def _positive_resolution(cls, v):
        vals = (v,) if isinstance(v, (int, float)) else v
        if v is not None and any(r <= 0 for r in vals):
            raise ValueError("resolution must be positive. Fix: give the pixel size in CRS units, e.g. 100")
        return v

    @field_validator("bounds")
    @classmethod
    def _ordered_bounds(cls, v):
        if v is not None and (v[0] >= v[2] or v[1] >= v[3]):
            bad = " and ".join(
                n for n, lo, hi in (("xmin >= xmax", v[0], v[2]), ("ymin >= ymax", v[1], v[3])) if lo >= hi
            )
            raise ValueError(
                f"bounds are not ordered ({bad}). Fix: write [xmin, ymin, xmax, ymax] with xmin < xmax and ymin < ymax"
            )
        return v

    @model_validator(mode="after")
    def _enough_to_define(self):
        if self.like is None and (self.crs is None or self.resolution is None):
            raise ValueError("the grid is undefined. Fix: give either 'like: <raster>' or both 'crs' and 'resolution'")
        return self


class InterpolationConfig(_Frozen):
    """Gridding of point samples."""

    method: Literal["idw", "nearest"] = "idw"
    power: float = Field(2.0, gt=0)
    radius: float | None = Field(None, gt=0, description="Search radius in target-CRS units (None = unlimited).")
    k: int = Field(12, ge=1, description="Number of nearest samples used per pixel.")
    max_distance: float | None = Field(
        None, gt=0, description="Pixels farther than this from any sample are nodata (None = radius, or keep all)."
    )


class LayerConfig(_Frozen):
    """One evidence layer. ``kind`` decides how it is read and resampled."""

    name: str = Field(..., min_length=1)
    path: Location
    source: str = Field("geochemistry", description=f"Source group: {SOURCES_HINT}.")
    kind: str = "continuous"
    transform: str = "none"
    scaling: str = "robust"
    # rasters
    band: int = Field(1, ge=1, description="1-based raster band.")
    nodata: float | None = Field(None, allow_inf_nan=True, description="Overrides the file's nodata value.")
    resampling: str | None = Field(None, description="Overrides the resampling chosen from the kind.")
    # vectors
    layer: str | None = Field(None, description="Layer inside a multi-layer vector file (GeoPackage).")
    attribute: str | None = None
    classes: tuple[Any, ...] | None = None
    query: str | None = Field(
        None,
        description="pandas query selecting features or samples: comparisons of columns with values, "
        "combined with and/or/not (no calls or attribute access), e.g. \"type == 'chromite' and Cr > 10\".",
    )
    # points
    x: str | None = None
    y: str | None = None
    crs: str | None = Field(None, description="CRS of the file when it has none (CSV points, bare rasters).")
    columns: tuple[str, ...] | None = None
    missing: tuple[Annotated[float, AllowInfNan(True)], ...] = Field(
        (-9999.0,), description="Sentinel values meaning missing."
    )
    below_detection: Literal["half", "nan", "value"] = Field(
        "half", description="Negative values in point samples mean '< |v|': replaced by |v|/2 ('half')."
    )
    zeros: Literal["error", "half_min"] = Field(
        "error",
        description="Zeros before a log/CLR transform: 'error', or replace by half the smallest positive value "
        "(per column for point samples; reads the source raster once for rasters).",
    )
    interpolation: InterpolationConfig = InterpolationConfig()

    @field_validator("kind", "transform", "scaling", "resampling")
    @classmethod
    def _known_choice(cls, v, info):
        allowed = _CHOICES[info.field_name]
        if v is not None and v not in allowed:
            raise ValueError(f"unknown {info.field_name} {v!r}. Fix: use one of {', '.join(allowed)}")
        return v

    @field_validator("query")
    @classmethod
    def _safe_query(cls, v):
        return None if v is None else safe_query(v)

    @field_validator("name", "source")
    @classmethod
    def _safe_name(cls, v, info):
        return check_name(v, f"{info.field_name}")

    @model_validator(mode="after")
    def _kind_needs(self):
        if self.kind == "points":
            missing = [k for k in ("x", "y", "columns") if getattr(self, k) in (None, ())]
            if missing:
                raise ValueError(
                    f"kind 'points' needs {', '.join(missing)}. Fix: add the x/y column names and the value columns"
                )
        if self.kind == "categorical" and not self.classes:
            raise ValueError("kind 'categorical' needs 'classes'. Fix: list the class values (one band each)")
        names = self.band_names
        bad = next((b for b in names if BAND_BAD_CHARS.search(b) or len(b) > 128), None)
        if bad is not None:
            what = "classes" if self.kind == "categorical" else "columns"
            raise ValueError(
                f"band name {short_repr(bad)} (from '{what}') holds '/', '$', a backtick or a control character, or "
                f"is over 128 characters: not every output can carry it. Fix: rename that value in the file, or "
                f"drop it from '{what}'"
            )
        dupes = sorted({b for b in names if names.count(b) > 1})
        if dupes:
            what = "classes" if self.kind == "categorical" else "columns"
            raise ValueError(
                f"{what} {list(getattr(self, what))} give the band name(s) {dupes} more than once. "
                f"Fix: list each value once in '{what}'"
            )
        if self.kind in ("categorical", "indicator", "distance") and self.transform in ("log", "log10", "clr"):
            raise ValueError(
                f"transform {self.transform!r} does not apply to kind {self.kind!r}. Fix: use transform 'none'"
            )
        return self

    @property
    def band_names(self) -> list[str]:
        """Names of the cube bands this layer produces."""
        if self.kind == "points":
            return [f"{self.name}_{c}" if len(self.columns) > 1 else self.name for c in self.columns]
        if self.kind == "categorical":
            return [f"{self.name}_{c}" for c in self.classes]
        return [self.name]


class DepositsConfig(_Frozen):
    """Known deposits: evaluation only, never training or normalisation."""

    path: Location
    x: str | None = None
    y: str | None = None
    crs: str | None = None
    layer: str | None = None
    query: str | None = Field(
        None,
        description="pandas query selecting deposits (comparisons of columns with values, "
        "and/or/not; no calls or attribute access).",
    )

    @field_validator("query")
    @classmethod
    def _safe_query(cls, v):
        return None if v is None else safe_query(v)


class ModelConfig(_Frozen):
    window: int = Field(32, ge=4)
    patch: int = Field(4, ge=1)
    stem_channels: int = Field(16, ge=1, description="Channels of each source group's conv stem.")
    fusion_channels: int = Field(32, ge=1)
    dim: int = Field(192, ge=8)
    depth: int = Field(6, ge=1)
    heads: int = Field(3, ge=1)
    decoder_dim: int = Field(128, ge=8)
    decoder_depth: int = Field(2, ge=0)
    mask_ratio: float = Field(0.5, ge=0.0, lt=1.0, description="Tokens whose every source is hidden in training.")
    cross_ratio: float = Field(
        0.25,
        ge=0.0,
        lt=1.0,
        description="Chance that one source (group; band when there is one group) is hidden at a token in "
        "training, the others visible: the model learns to predict each source from the others (0 = ablation).",
    )
    fusion: bool = Field(True, description="False = ablation without the fusion layer.")

    @model_validator(mode="after")
    def _shapes(self):
        if self.window % self.patch:
            raise ValueError(
                f"window {self.window} is not a multiple of patch {self.patch}. Fix: pick e.g. window 32, patch 4"
            )
        if self.dim % self.heads:
            raise ValueError(
                f"dim {self.dim} is not divisible by heads {self.heads}. Fix: e.g. dim 192 with 3 or 6 heads"
            )
        return self


class TrainConfig(_Frozen):
    epochs: int = Field(20, ge=1)
    steps_per_epoch: int | None = Field(None, ge=1, description="Cap on steps per epoch (None = one pass).")
    batch_size: int = Field(256, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    seed: int = 0
    min_valid_fraction: float = Field(0.5, ge=0, le=1)
    train_stride: int | None = Field(None, ge=1, description="Stride between training windows (None = window/2).")
    checkpoint_every: int = Field(200, ge=1, description="Steps between checkpoints.")
    ddp_workers: int = Field(1, ge=1, description="Data-parallel ranks (Dask workers) for training.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    holdout_fraction: float = Field(
        0.2, ge=0, lt=1, description="Share of spatial blocks held out for the validation loss (0 = none)."
    )
    holdout_block: int | None = Field(None, ge=4, description="Side of a held-out block in pixels (None = 2 windows).")
    patience: int = Field(
        3, ge=0, description="Epochs without a better validation loss before training stops (0 = never stop early)."
    )
    augment: bool = Field(True, description="Random flips and rot90 of training batches.")
    nodata_augment: float = Field(0.25, ge=0, le=1, description="Share of training windows given a nodata hole.")
    validation_windows: int = Field(512, ge=1, description="Held-out windows for the validation loss and calibration.")
    seeds: int = Field(
        1, ge=1, description="Seed ensemble size: the map is the mean over the models, 'uncertainty' their std."
    )


class ScoreConfig(_Frozen):
    stride: int = Field(16, ge=1)
    batch_size: int = Field(512, ge=1)
    mode: Literal["both", "cross", "spatial"] = Field(
        "both",
        description="'cross': each source predicted with it hidden and the other sources visible; 'spatial': "
        "every source of a token hidden (context only); 'both': the mean of the two.",
    )
    standardise: Literal["none", "mahalanobis"] = Field(
        "none",
        description="'none': a group's anomaly is its bands' mean squared residual (the cube's normalised units); "
        "'mahalanobis': residuals standardised per band (robust scale) and combined by a Mahalanobis distance "
        "per group, fitted on held-out windows (lost to 'none' on the synthetic province: see docs/case-studies.md).",
    )
    partitions: int = Field(4, ge=1, description="Complementary token partitions per window (each token hidden once).")
    shifts: int = Field(
        2, ge=1, description="Token-grid phases averaged (0, patch/2, ...), each with its own random partitions."
    )
    combine: dict[str, float] | None = Field(
        None, description="Weights of the per-group errors in prospectivity (None = all bands equally)."
    )


class ClusterConfig(_Frozen):
    """Where train and score run (see deploy/README.md and deploy/profiles/)."""

    kind: Literal["local", "address", "jobqueue", "gateway", "kubernetes", "none"] = "local"
    n_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str = "4GiB"
    address: str | None = None
    gpus_per_worker: int = Field(0, ge=0)
    profile: Path | None = Field(
        None, description="A cluster profile YAML (deploy/profiles/); keys set beside it override its own."
    )
    jobqueue: dict[str, Any] = Field(
        default_factory=dict, description="kind 'jobqueue': system (slurm|pbs) and dask-jobqueue cluster arguments."
    )
    gateway: dict[str, Any] = Field(
        default_factory=dict, description="kind 'gateway': address, auth and cluster options of a Dask Gateway."
    )
    kubernetes: dict[str, Any] = Field(
        default_factory=dict,
        description="kind 'kubernetes': image, namespace, resources of a dask-kubernetes KubeCluster.",
    )


class EvaluateConfig(_Frozen):
    protocol: Literal["raster", "points"] = Field(
        "raster", description="'raster': deposit cells vs the valid area; 'points': OpenGADBench sample protocol."
    )
    buffer: float | None = Field(None, ge=0, description="Negatives at least this far from deposits (CRS units).")
    min_dist_km: float = Field(5.0, ge=0, description="Point protocol: negatives at least this far from deposits.")
    repeats: int = Field(20, ge=1)
    seed: int = 42
    null: Literal["rigid", "uniform"] = Field(
        "rigid",
        description="Random-placement null: 'rigid' rotates and shifts the whole deposit set (keeps its "
        "clustering); 'uniform' places deposits independently (anti-conservative).",
    )
    block: int | None = Field(
        None, ge=1, description="Cells per side of the spatial bootstrap's blocks (None = the model window)."
    )


class TargetConfig(_Frozen):
    """The commodity explored for: selects the pathfinder elements (knowledge, never deposit locations)."""

    commodity: str = Field(..., min_length=1, description="Element symbol of the commodity, e.g. Au, Li, Cu, Cr, Ni.")
    deposit_model: str | None = Field(
        None, description="Deposit model of the pathfinder table, e.g. orogenic, porphyry, lct_pegmatite."
    )
    pathfinders: tuple[str, ...] | None = Field(
        None, description="Pathfinder elements; None = the table's list for commodity and deposit_model."
    )
    lead: Literal["target", "generic"] = Field("target", description="Which map the report leads with.")


class RunConfig(_Frozen):
    name: str = "run"
    grid: GridConfig
    layers: tuple[LayerConfig, ...] = Field(..., min_length=1)
    deposits: DepositsConfig | None = None
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    score: ScoreConfig = ScoreConfig()
    cluster: ClusterConfig = ClusterConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    target: TargetConfig | None = None
    base_dir: Path = Field(Path("."), description="Folder relative paths resolve against (set by from_yaml).")

    @model_validator(mode="after")
    def _unique_names(self):
        seen: dict[str, str] = {}
        for layer in self.layers:
            for b in [layer.name, *layer.band_names]:
                if b in seen and seen[b] != layer.name:
                    raise ValueError(
                        f"band name {b!r} of layer {layer.name!r} clashes with layer {seen[b]!r}. Fix: rename one of them"
                    )
                seen[b] = layer.name
        names = [l.name for l in self.layers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate layer name(s) {dupes}. Fix: give every layer a unique 'name'")
        unknown = [m for m in self.grid.mask_layers if m not in names]
        if unknown:
            raise ValueError(f"grid.mask_layers names unknown layer(s) {unknown}. Fix: use names among {names}")
        return self

    # -- paths ---------------------------------------------------------------------------------
    def resolve(self, p: Path | str | None) -> Path | str | None:
        """Resolve a path from the config against the config file's folder (a URL is returned as it is)."""
        if p is None:
            return None
        if is_url(p):
            return str(p)
        p = Path(p).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def band_names(self) -> list[str]:
        return [b for layer in self.layers for b in layer.band_names]

    # -- I/O -----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, base_dir: Path | str = ".") -> RunConfig:
        if not isinstance(data, dict):
            got = "an empty document" if data is None else f"a {type(data).__name__} ({short_repr(data, 60)})"
            raise ConfigError(
                f"the run config must be a mapping of keys (name, grid, layers, ...), but it is {got}. "
                "Fix: start from configs/*.yaml or the output of `mpm synth` (keys at the top level, no leading '-')"
            )
        data = {**data, "base_dir": Path(base_dir).resolve()}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_format_validation_error(exc, data)) from None

    @classmethod
    def from_yaml(cls, path: Path | str) -> RunConfig:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a folder. Fix: pass the path of a run-config YAML")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist. Fix: pass the path of a run-config YAML")
        try:
            data = load_yaml(path)
        except yaml.YAMLError as exc:
            raise ConfigError(yaml_error(path, exc)) from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"config file {str(path)!r} is not a text file ({exc.reason} at byte {exc.start}). "
                "Fix: pass the run-config YAML (UTF-8 text)"
            ) from None
        if data is None or not isinstance(data, dict):
            got = "empty" if data is None else f"a {type(data).__name__}, not a mapping of keys"
            raise ConfigError(
                f"config file {str(path)!r} is {got}. Fix: write the keys name, grid, layers, ... at the top level "
                "(see configs/*.yaml or `mpm synth`)"
            )
        return cls.from_dict(data, base_dir=path.parent)

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude={"base_dir"})
        return yaml.safe_dump(data, sort_keys=False)

    def with_updates(self, **sections) -> RunConfig:
        """Copy with some sections replaced, e.g. ``cfg.with_updates(train={'epochs': 1})``."""
        data = self.model_dump(mode="python")
        for key, val in sections.items():
            if isinstance(val, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **val}
            else:
                data[key] = val
        return RunConfig.from_dict(data, base_dir=self.base_dir)


def _loc_str(loc: tuple, data: dict) -> str:
    parts: list[str] = []
    node: Any = data
    for item in loc:
        if isinstance(item, int):
            label = ""
            if isinstance(node, (list, tuple)) and item < len(node) and isinstance(node[item], dict):
                label = f" (name: {short_repr(node[item].get('name'), 60)})" if node[item].get("name") else ""
            parts[-1] = f"{parts[-1]}[{item}]{label}" if parts else f"[{item}]"
            node = node[item] if isinstance(node, (list, tuple)) and item < len(node) else None
        else:
            parts.append(short_repr(item, 60).strip("'") if not isinstance(item, str) or len(item) > 60 else item)
            node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts)


def _close_key(key: str) -> str | None:
    """The known config key closest to a misspelt one (any section), or None."""
    import difflib

    known = sorted(
        {
            f
            for m in (
                RunConfig,
                GridConfig,
                InterpolationConfig,
                LayerConfig,
                DepositsConfig,
                ModelConfig,
                TrainConfig,
                ScoreConfig,
                ClusterConfig,
                EvaluateConfig,
            )
            for f in m.model_fields
        }
        - {"base_dir"}
    )
    hit = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    return hit[0] if hit else None


def _format_validation_error(exc: ValidationError, data: dict) -> str:
    lines = []
    errors = exc.errors()
    for err in errors:
        if err["type"] == "too_short" and any(
            len(o["loc"]) > len(err["loc"]) and tuple(o["loc"][: len(err["loc"])]) == tuple(err["loc"]) for o in errors
        ):
            continue  # a list emptied by the failure of its items: the items' errors say it
        loc = _loc_str(tuple(err["loc"]), data)
        loc = f"{loc}: " if loc else ""
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "finite_number":
            msg = "must be a finite number. Fix: give a number (not .nan or .inf)"
        if err["type"] == "extra_forbidden":
            near = _close_key(str(err["loc"][-1])[:100])
            hint = f"did you mean {near!r}? Otherwise " if near else ""
            msg = f"unknown key. Fix: {hint}check its spelling against docs/config-reference.md"
        elif err["type"] == "missing":
            msg = "required key is missing. Fix: add it"
        value = err.get("input")
        value = redact(value) if isinstance(value, str) else value  # never a URL's user:secret@
        text = short_repr(value)
        shown = "" if err["type"] in ("missing",) or text in msg else f" (got {text})"
        if isinstance(value, dict):
            shown = ""
        if ". Fix:" in msg:
            problem, fix = msg.split(". Fix:", 1)
            lines.append(f"{loc}{problem}{shown}. Fix:{fix}")
        else:
            lines.append(f"{loc}{msg}{shown}. Fix: see docs/config-reference.md")
    return "invalid run config:\n  " + "\n  ".join(lines)
