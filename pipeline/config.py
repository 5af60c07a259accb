"""The run configuration: one YAML file, validated into frozen pydantic models.

Each stage receives only its own sub-config (``cfg.grid``, ``cfg.layers``, ``cfg.model`` ...).
Relative paths resolve against the folder of the YAML file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

SOURCES_HINT = "geochemistry, geophysics, geology (or any group name of your own)"
KINDS = ("continuous", "categorical", "distance", "indicator", "points")
TRANSFORMS = ("none", "log", "log10", "clr")
SCALINGS = ("robust", "standard", "none")
RESAMPLINGS = ("nearest", "bilinear", "cubic", "average", "mode", "min", "max", "med")
_CHOICES = {"kind": KINDS, "transform": TRANSFORMS, "scaling": SCALINGS, "resampling": RESAMPLINGS}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


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
    like: Path | None = Field(None, description="A raster whose CRS, resolution and bounds define the grid.")
    mask: Path | None = Field(
        None,
        description="Study area: a polygon file (inside = valid) or a raster (valid where not nodata and non-zero).",
    )
    mask_layers: tuple[str, ...] = Field(
        (), description="Study area from the footprint of these layers (valid where all of them have data)."
    )
    chunk: int = Field(512, ge=16, description="Chunk size of the cube in pixels (all bands in one chunk).")

    @field_validator("resolution")
    @classmethod
    def _positive_resolution(cls, v):
        vals = (v,) if isinstance(v, (int, float)) else v
        if v is not None and any(r <= 0 for r in vals):
            raise ValueError(f"resolution must be positive. Fix: give the pixel size in CRS units, e.g. 100")
        return v

    @field_validator("bounds")
    @classmethod
    def _ordered_bounds(cls, v):
        if v is not None and (v[0] >= v[2] or v[1] >= v[3]):
            raise ValueError(f"bounds {list(v)} are not ordered. Fix: write [xmin, ymin, xmax, ymax] with xmin < xmax and ymin < ymax")
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
    path: Path
    source: str = Field("geochemistry", description=f"Source group: {SOURCES_HINT}.")
    kind: str = "continuous"
    transform: str = "none"
    scaling: str = "robust"
    # rasters
    band: int = Field(1, ge=1, description="1-based raster band.")
    nodata: float | None = Field(None, description="Overrides the file's nodata value.")
    resampling: str | None = Field(None, description="Overrides the resampling chosen from the kind.")
    # vectors
    layer: str | None = Field(None, description="Layer inside a multi-layer vector file (GeoPackage).")
    attribute: str | None = None
    classes: tuple[Any, ...] | None = None
    query: str | None = Field(None, description="pandas query selecting features or samples.")
    # points
    x: str | None = None
    y: str | None = None
    crs: str | None = Field(None, description="CRS of the file when it has none (CSV points, bare rasters).")
    columns: tuple[str, ...] | None = None
    missing: tuple[float, ...] = Field((-9999.0,), description="Sentinel values meaning missing.")
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

    @model_validator(mode="after")
    def _kind_needs(self):
        if self.kind == "points":
            missing = [k for k in ("x", "y", "columns") if getattr(self, k) in (None, ())]
            if missing:
                raise ValueError(f"kind 'points' needs {', '.join(missing)}. Fix: add the x/y column names and the value columns")
        if self.kind == "categorical" and not self.classes:
            raise ValueError("kind 'categorical' needs 'classes'. Fix: list the class values (one band each)")
        if self.kind in ("categorical", "indicator", "distance") and self.transform in ("log", "log10", "clr"):
            raise ValueError(f"transform {self.transform!r} does not apply to kind {self.kind!r}. Fix: use transform 'none'")
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

    path: Path
    x: str | None = None
    y: str | None = None
    crs: str | None = None
    layer: str | None = None
    query: str | None = None


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
    mask_ratio: float = Field(0.5, ge=0.0, lt=1.0)
    fusion: bool = Field(True, description="False = ablation without the fusion layer.")

    @model_validator(mode="after")
    def _shapes(self):
        if self.window % self.patch:
            raise ValueError(f"window {self.window} is not a multiple of patch {self.patch}. Fix: pick e.g. window 32, patch 4")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}. Fix: e.g. dim 192 with 3 or 6 heads")
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


class ScoreConfig(_Frozen):
    stride: int = Field(16, ge=1)
    batch_size: int = Field(512, ge=1)
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
    profile: Path | None = Field(None, description="A cluster profile YAML (deploy/profiles/); keys set beside it override its own.")
    jobqueue: dict[str, Any] = Field(
        default_factory=dict, description="kind 'jobqueue': system (slurm|pbs) and dask-jobqueue cluster arguments."
    )
    gateway: dict[str, Any] = Field(
        default_factory=dict, description="kind 'gateway': address, auth and cluster options of a Dask Gateway."
    )
    kubernetes: dict[str, Any] = Field(
        default_factory=dict, description="kind 'kubernetes': image, namespace, resources of a dask-kubernetes KubeCluster."
    )


class EvaluateConfig(_Frozen):
    protocol: Literal["raster", "points"] = Field(
        "raster", description="'raster': deposit cells vs the valid area; 'points': OpenGADBench sample protocol."
    )
    buffer: float | None = Field(None, ge=0, description="Negatives at least this far from deposits (CRS units).")
    min_dist_km: float = Field(5.0, ge=0, description="Point protocol: negatives at least this far from deposits.")
    repeats: int = Field(20, ge=1)
    seed: int = 42


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
    base_dir: Path = Field(Path("."), description="Folder relative paths resolve against (set by from_yaml).")

    @model_validator(mode="after")
    def _unique_names(self):
        seen: dict[str, str] = {}
        for layer in self.layers:
            for b in [layer.name, *layer.band_names]:
                if b in seen and seen[b] != layer.name:
                    raise ValueError(f"band name {b!r} of layer {layer.name!r} clashes with layer {seen[b]!r}. Fix: rename one of them")
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
    def resolve(self, p: Path | str | None) -> Path | None:
        """Resolve a path from the config against the config file's folder."""
        if p is None:
            return None
        p = Path(p).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def band_names(self) -> list[str]:
        return [b for layer in self.layers for b in layer.band_names]

    # -- I/O -----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, base_dir: Path | str = ".") -> "RunConfig":
        if not isinstance(data, dict):
            raise ConfigError(
                f"the run config must be a mapping of keys (name, grid, layers, ...), got {type(data).__name__}"
            )
        data = {**data, "base_dir": Path(base_dir).resolve()}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_format_validation_error(exc, data)) from None

    @classmethod
    def from_yaml(cls, path: Path | str) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist. Fix: pass the path of a run-config YAML")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        return cls.from_dict(data, base_dir=path.parent)

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude={"base_dir"})
        return yaml.safe_dump(data, sort_keys=False)

    def with_updates(self, **sections) -> "RunConfig":
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
                label = f" (name: {node[item].get('name')!r})" if node[item].get("name") else ""
            parts[-1] = f"{parts[-1]}[{item}]{label}" if parts else f"[{item}]"
            node = node[item] if isinstance(node, (list, tuple)) and item < len(node) else None
        else:
            parts.append(str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts) or "<top level>"


def _format_validation_error(exc: ValidationError, data: dict) -> str:
    lines = []
    for err in exc.errors():
        loc = _loc_str(tuple(err["loc"]), data)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key. Fix: check its spelling against docs/config-reference.md"
        elif err["type"] == "missing":
            msg = "required key is missing. Fix: add it"
        value = err.get("input")
        shown = "" if err["type"] in ("missing",) or "{value" in msg else f" (got {value!r})"
        if isinstance(value, dict):
            shown = ""
        if ". Fix:" in msg:
            problem, fix = msg.split(". Fix:", 1)
            lines.append(f"{loc}: {problem}{shown}. Fix:{fix}")
        else:
            lines.append(f"{loc}: {msg}{shown}. Fix: see docs/config-reference.md")
    return "invalid run config:\n  " + "\n  ".join(lines)
