"""Run-config validation: good configs parse, bad ones name the key, the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import RunConfig
from pipeline.errors import ConfigError

BASE = {
    "name": "t",
    "grid": {"crs": "EPSG:32646", "resolution": 100},
    "layers": [{"name": "mag", "path": "mag.tif", "source": "geophysics"}],
}


def _with(**changes):
    d = yaml.safe_load(yaml.safe_dump(BASE))
    for k, v in changes.items():
        d[k] = v
    return d


def test_paths_resolve_against_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "run.yaml"
    p.write_text(yaml.safe_dump(BASE))
    cfg = RunConfig.from_yaml(p)
    assert cfg.resolve(cfg.layers[0].path) == (tmp_path / "sub" / "mag.tif").resolve()
    assert cfg.resolve("/abs/x.tif") == Path("/abs/x.tif")


def test_defaults_and_band_names():
    d = _with(
        layers=[
            {"name": "lith", "path": "g.gpkg", "kind": "categorical", "classes": ["um", "gb"], "source": "geology"},
            {"name": "ss", "path": "s.csv", "kind": "points", "x": "X", "y": "Y", "columns": ["Cr", "Ni"]},
        ]
    )
    cfg = RunConfig.from_dict(d)
    assert cfg.band_names == ["lith_um", "lith_gb", "ss_Cr", "ss_Ni"]
    assert cfg.model.window % cfg.model.patch == 0 and cfg.cluster.kind == "local"


def test_round_trip_yaml(tmp_path):
    cfg = RunConfig.from_dict(BASE, base_dir=tmp_path)
    again = RunConfig.from_dict(yaml.safe_load(cfg.to_yaml()), base_dir=tmp_path)
    assert again == cfg


def test_with_updates_revalidates():
    cfg = RunConfig.from_dict(BASE)
    assert cfg.with_updates(train={"epochs": 2}).train.epochs == 2
    with pytest.raises(ConfigError, match="train.epochs"):
        cfg.with_updates(train={"epochs": 0})


@pytest.mark.parametrize(
    "data, needles",
    [
        (_with(grid={"resolution": 100}), ["grid", "like", "crs"]),
        (_with(grid={"crs": "EPSG:32646", "resolution": -5}), ["grid.resolution", "-5", "positive"]),
        (_with(grid={"crs": "EPSG:32646", "resolution": 10, "bounds": [5, 0, 1, 1]}), ["grid.bounds", "xmin < xmax"]),
        (_with(model={"window": 30, "patch": 4}), ["model", "window 30", "patch 4"]),
        (_with(train={"batch_size": "many"}), ["train.batch_size", "'many'"]),
        (_with(layers=[{"name": "a", "path": "a.csv", "kind": "points"}]), ["layers[0] (name: 'a')", "x, y, columns"]),
        (_with(layers=[{"name": "a", "path": "a.tif", "kind": "categorical"}]), ["layers[0] (name: 'a')", "classes"]),
        (
            _with(layers=[{"name": "a", "path": "a.tif", "kind": "distance", "transform": "log"}]),
            ["'log'", "'distance'"],
        ),
        (
            _with(grid={"crs": "EPSG:32646", "resolution": 10, "mask_layers": ["nope"]}),
            ["mask_layers", "'nope'", "['mag']"],
        ),
        (_with(layers=[]), ["layers", "at least 1"]),
        (_with(colour="red"), ["colour", "unknown key"]),
    ],
)
def test_bad_configs_name_key_value_and_fix(data, needles):
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_dict(data)
    msg = str(exc.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    assert "Fix:" in msg


def test_yaml_errors(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.from_yaml(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        RunConfig.from_yaml(p)
    # the safe loader refuses arbitrary Python objects
    p.write_text("name: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="Python object tag.*remove the !!python tag"):
        RunConfig.from_yaml(p)


def test_shipped_configs_validate():
    for p in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        cfg = RunConfig.from_yaml(p)
        assert cfg.layers and cfg.deposits is not None, p
