"""Pathfinder elements per deposit model, and their bands in a cube.

An explorer knows the commodity sought. ``target: {commodity: Au, deposit_model: orogenic}`` in the run
config selects the pathfinder elements of that deposit model from :data:`DEPOSIT_MODELS`; the target-aware
map scores their enrichment (:func:`pipeline.scoring.enrichment.enrichment_score`). This is knowledge of the
commodity from the literature, never deposit locations: the map stays unsupervised.

Each entry lists the elements that the cited exploration-geochemistry literature reports enriched in the
primary halo or the surface dispersion (soil, stream sediment) of that deposit model, the commodity first.
Depleted elements (e.g. Na in sericitic alteration) are left out: enrichment scoring looks for highs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import ConfigError

__all__ = [
    "DepositModel",
    "DEPOSIT_MODELS",
    "DEFAULT_MODEL",
    "deposit_model",
    "pathfinder_elements",
    "element_matches",
    "pathfinder_bands",
    "resolve_target",
]


@dataclass(frozen=True)
class DepositModel:
    """One deposit model: its key, commodity, pathfinder elements (commodity first) and sources."""

    key: str
    commodity: str
    name: str
    pathfinders: tuple[str, ...]
    references: tuple[str, ...]
    note: str = ""


_LEVINSON = "Levinson, A.A. (1980). Introduction to Exploration Geochemistry, 2nd ed. Applied Publishing, Wilmette."
_ROSE = "Rose, A.W., Hawkes, H.E. & Webb, J.S. (1979). Geochemistry in Mineral Exploration, 2nd ed. Academic Press."

DEPOSIT_MODELS: dict[str, DepositModel] = {
    m.key: m
    for m in (
        DepositModel(
            key="chromite_ophiolite",
            commodity="Cr",
            name="podiform (ophiolite-hosted) chromitite",
            pathfinders=("Cr", "Ni", "Co", "Mg", "Fe", "Pt", "Pd"),
            references=(
                "Ning et al. (2025). Mineral prospectivity mapping for multi-source geoscience data: a novel "
                "unsupervised deep learning method. Ore Geology Reviews 186, 106866 (Cr, Ni, Co, MgO, Fe2O3 "
                "of stream sediments over the Heishantou ophiolite).",
                "Gonzalez-Jimenez, J.M. et al. (2014). Chromitites in ophiolites: how, where, when, why? "
                "Part I. Lithos 189, 127-139 (PGE, Ni, Co of chromitite and host peridotite).",
                _ROSE,
            ),
            note="Mg and Fe match oxide bands such as MgO and Fe2O3.",
        ),
        DepositModel(
            key="orogenic",
            commodity="Au",
            name="orogenic gold",
            pathfinders=("Au", "As", "Sb", "W", "Bi", "Te", "Ag", "Mo"),
            references=(
                "Groves, D.I. et al. (1998). Orogenic gold deposits: a proposed classification in the context "
                "of continental growth and metallogeny. Ore Geology Reviews 13, 7-27.",
                "Eilu, P. & Groves, D.I. (2001). Primary alteration and geochemical dispersion haloes of "
                "Archaean orogenic gold deposits in the Yilgarn Craton: the pre-weathering scenario. "
                "Geochemistry: Exploration, Environment, Analysis 1, 183-200 (Au, As, Sb, W, Te, Bi, Mo, Ag).",
                "Goldfarb, R.J. et al. (2005). Distribution, character, and genesis of gold deposits in "
                "metamorphic terranes. Economic Geology 100th Anniversary Volume, 407-450.",
            ),
        ),
        DepositModel(
            key="porphyry",
            commodity="Cu",
            name="porphyry copper (proximal footprint)",
            pathfinders=("Cu", "Mo", "Au", "Ag", "W", "Bi", "Te"),
            references=(
                "Sillitoe, R.H. (2010). Porphyry copper systems. Economic Geology 105, 3-41.",
                "Halley, S., Dilles, J.H. & Tosdal, R.M. (2015). Footprints: hydrothermal alteration and "
                "geochemical dispersion around porphyry copper deposits. SEG Newsletter 100, 1-17 (Cu, Mo "
                "core; W, Sn, Bi, Te proximal; Pb, Zn, Mn, As, Sb, Tl distal).",
            ),
            note="The distal halo (Pb, Zn, Mn, As, Sb, Tl) is left out; list it in target.pathfinders for a "
            "search of the periphery.",
        ),
        DepositModel(
            key="lct_pegmatite",
            commodity="Li",
            name="lithium-caesium-tantalum (LCT) pegmatite",
            pathfinders=("Li", "Cs", "Ta", "Rb", "Be", "Sn", "Nb", "B", "F"),
            references=(
                "Cerny, P. & Ercit, T.S. (2005). The classification of granitic pegmatites revisited. "
                "Canadian Mineralogist 43, 2005-2026.",
                "Bradley, D.C., McCauley, A.D. & Stillings, L.M. (2017). Mineral-deposit model for "
                "lithium-cesium-tantalum pegmatites. USGS Scientific Investigations Report 2010-5070-O "
                "(Li, Cs, Ta, Rb, Be, Sn, Nb, B, F in pegmatites and their exomorphic haloes).",
            ),
        ),
        DepositModel(
            key="magmatic_ni_cu",
            commodity="Ni",
            name="magmatic Ni-Cu(-PGE) sulfide",
            pathfinders=("Ni", "Cu", "Co", "Pt", "Pd", "S"),
            references=(
                "Naldrett, A.J. (2004). Magmatic Sulfide Deposits: Geology, Geochemistry and Exploration. "
                "Springer, Berlin.",
                "Barnes, S.-J. & Lightfoot, P.C. (2005). Formation of magmatic nickel sulfide ore deposits and "
                "processes affecting their copper and platinum group element contents. Economic Geology "
                "100th Anniversary Volume, 179-213.",
                _LEVINSON,
            ),
        ),
    )
}

#: The deposit model taken when ``target.deposit_model`` is not given.
DEFAULT_MODEL: dict[str, str] = {m.commodity.lower(): m.key for m in DEPOSIT_MODELS.values()}

_ALIASES = {
    "ophiolite": "chromite_ophiolite",
    "chromite": "chromite_ophiolite",
    "podiform": "chromite_ophiolite",
    "orogenic_au": "orogenic",
    "orogenic_gold": "orogenic",
    "porphyry_cu": "porphyry",
    "lct": "lct_pegmatite",
    "pegmatite": "lct_pegmatite",
    "ni_cu": "magmatic_ni_cu",
    "magmatic": "magmatic_ni_cu",
}


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.strip().lower()).strip("_")


def deposit_model(name: str) -> DepositModel:
    """The table's entry for ``name`` (key or alias, any case; 'LCT pegmatite' = 'lct_pegmatite')."""
    k = _key(name)
    k = _ALIASES.get(k, k)
    if k not in DEPOSIT_MODELS:
        raise ConfigError(
            f"target.deposit_model {name!r} is not in the pathfinder table. Fix: use one of "
            f"{', '.join(DEPOSIT_MODELS)}, or list the elements in target.pathfinders"
        )
    return DEPOSIT_MODELS[k]


def pathfinder_elements(commodity: str, deposit_model_name: str | None = None, pathfinders=None) -> tuple[str, ...]:
    """Pathfinder elements of a target, the commodity first.

    ``pathfinders`` (the user's list) wins; else the table's list for ``deposit_model_name``, or for the
    commodity's default model (:data:`DEFAULT_MODEL`); a commodity outside the table gives itself only.
    """
    if pathfinders:
        return tuple(dict.fromkeys([commodity, *pathfinders]))
    if deposit_model_name:
        model = deposit_model(deposit_model_name)
        if model.commodity.lower() != commodity.lower():
            return tuple(dict.fromkeys([commodity, *model.pathfinders]))
        return model.pathfinders
    key = DEFAULT_MODEL.get(commodity.lower())
    return DEPOSIT_MODELS[key].pathfinders if key else (commodity,)


def element_matches(element: str, band: str) -> bool:
    """True when band name ``band`` holds element ``element`` (case-insensitive).

    The band name is split at ``_ - . space``; a part matches when it is the element ('Au_ppb',
    'Idw_Li', 'soil_Au_ppm') or an oxide of it ('MgO', 'Fe2O3', 'K2O' for Mg, Fe, K). 'Co' does not
    match 'CaO', nor 'B' 'ppb'.
    """
    el = re.escape(element.strip())
    pattern = re.compile(rf"{el}(\d*O\d*)?", re.IGNORECASE)
    parts = [p for p in re.split(r"[_\-.\s]+", band) if p]
    return any(pattern.fullmatch(p) for p in parts)


def pathfinder_bands(elements, bands) -> list[str]:
    """Bands of ``bands`` that hold one of ``elements``, in band order (each band once)."""
    bands = [str(b) for b in bands]
    return [b for b in bands if any(element_matches(e, b) for e in elements)]


def resolve_target(target, bands) -> list[str]:
    """The cube's band names for a config ``target:`` section (:class:`pipeline.config.TargetConfig`).

    Raises :class:`pipeline.errors.ConfigError` when no band holds the commodity or a pathfinder.
    """
    elements = pathfinder_elements(target.commodity, target.deposit_model, target.pathfinders)
    out = pathfinder_bands(elements, bands)
    if not out:
        raise ConfigError(
            f"target: none of the pathfinders {list(elements)} of commodity {target.commodity!r} matches a band "
            f"of the cube ({', '.join(map(str, bands))}). Fix: name the bands in target.pathfinders"
        )
    return out
