"""The pathfinder table gives the documented elements; targets resolve to the cube's band names."""

from __future__ import annotations

import pytest

from pipeline.config import RunConfig, TargetConfig
from pipeline.data import pathfinders as P
from pipeline.errors import ConfigError

# the elements each cited source documents (see the table's references)
DOCUMENTED = {
    "chromite_ophiolite": ("Cr", {"Cr", "Ni", "Co", "Mg", "Fe"}),
    "orogenic": ("Au", {"Au", "As", "Sb", "W", "Bi", "Te", "Ag", "Mo"}),
    "porphyry": ("Cu", {"Cu", "Mo", "Au", "Ag", "W", "Bi", "Te"}),
    "lct_pegmatite": ("Li", {"Li", "Cs", "Ta", "Rb", "Be", "Sn", "Nb"}),
    "magmatic_ni_cu": ("Ni", {"Ni", "Cu", "Co", "Pt", "Pd"}),
}


@pytest.mark.parametrize("key", sorted(DOCUMENTED))
def test_table_gives_the_documented_elements(key):
    commodity, must = DOCUMENTED[key]
    model = P.deposit_model(key)
    assert model.commodity == commodity and model.pathfinders[0] == commodity
    assert must <= set(model.pathfinders)
    assert len(model.references) >= 2 and all(len(r) > 40 for r in model.references)
    # the commodity alone selects its model
    assert P.pathfinder_elements(commodity) == model.pathfinders


def test_aliases_user_lists_and_unknown_models():
    assert P.deposit_model("LCT pegmatite").key == "lct_pegmatite"
    assert P.deposit_model("Ophiolite").key == "chromite_ophiolite"
    assert P.pathfinder_elements("Au", pathfinders=["As", "Au", "Sb"]) == ("Au", "As", "Sb")
    assert P.pathfinder_elements("U") == ("U",)  # outside the table: the commodity itself
    # a commodity sought in another model's system: itself first, then that model's pathfinders
    assert P.pathfinder_elements("Ag", "porphyry")[:2] == ("Ag", "Cu")
    with pytest.raises(ConfigError, match="'skarn'.*Fix: use one of"):
        P.deposit_model("skarn")


@pytest.mark.parametrize(
    ("element", "band", "expected"),
    [
        ("Au", "Au_ppb", True),
        ("au", "soil_Au_ppm", True),
        ("Li", "Idw_Li", True),
        ("Mg", "MgO", True),
        ("Fe", "Fe2O3", True),
        ("K", "K2O", True),
        ("Co", "CaO", False),
        ("B", "Au_ppb", False),
        ("S", "SiO2", False),
        ("Ni", "Nb", False),
        ("Au", "Aux", False),
    ],
)
def test_element_matches(element, band, expected):
    assert P.element_matches(element, band) is expected


CN_SOUTH_LI = ["Ag", "Al2O3", "As", "Au", "B", "Be", "Bi", "CaO", "Co", "F", "Fe2O3", "Li", "MgO", "Nb", "Sn", "W"]


def test_resolve_target_to_band_names():
    assert P.resolve_target(TargetConfig(commodity="Li"), CN_SOUTH_LI) == ["B", "Be", "F", "Li", "Nb", "Sn"]
    soil = [f"soil_{c}" for c in ("Au_ppm", "Ag_ppm", "Co_ppm", "Cu_ppm", "Ni_ppm", "Pb_ppm", "Zn_ppm", "Pd_ppb")]
    assert P.resolve_target(TargetConfig(commodity="Au", deposit_model="orogenic"), soil) == [
        "soil_Au_ppm",
        "soil_Ag_ppm",
    ]
    assert P.resolve_target(TargetConfig(commodity="Au", pathfinders=("Cu",)), soil) == ["soil_Au_ppm", "soil_Cu_ppm"]
    with pytest.raises(ConfigError, match="none of the pathfinders.*Fix"):
        P.resolve_target(TargetConfig(commodity="Li"), soil)


def test_target_section_in_a_run_config():
    cfg = RunConfig.from_dict(
        {
            "grid": {"crs": "EPSG:32650", "resolution": 100},
            "layers": [{"name": "Li", "path": "li.tif", "source": "geochemistry"}],
            "target": {"commodity": "Li", "deposit_model": "lct_pegmatite"},
        }
    )
    assert cfg.target.commodity == "Li" and cfg.target.lead == "target"
    assert P.resolve_target(cfg.target, cfg.band_names) == ["Li"]
