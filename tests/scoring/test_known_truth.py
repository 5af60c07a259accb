"""The method on known truth: signatures that pixel detectors cannot see (pipeline.data.signatures).

Cross-source targets are individually normal values whose pairing across sources breaks a nonlinear
relation; context targets are normal patches that break the spatial pattern. RX (a Mahalanobis distance
over the bands) and PCA see neither; the ViT, trained without labels and scored by hidden prediction, finds
both.
"""

from __future__ import annotations

import geopandas as gpd
import pytest

from pipeline.config import RunConfig
from pipeline.data.cube import open_cube, write_cube
from pipeline.data.signatures import known_truth_cube
from pipeline.evaluation.baselines import score_baseline
from pipeline.evaluation.evaluate import roc_auc_all
from pipeline.models.train import train
from pipeline.scoring.score import score_cube

ONE_TORCH_THREAD = True  # see conftest._one_torch_thread


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("known_truth")
    cube, targets = known_truth_cube(96, 0)
    path = write_cube(cube, tmp / "cube.zarr")
    cfg = RunConfig.from_dict(
        {
            "grid": {"crs": "EPSG:32650", "resolution": 100},
            "layers": [{"name": "a1", "path": "a1.tif"}],
            "model": {
                "window": 16,
                "patch": 4,
                "dim": 48,
                "depth": 2,
                "heads": 4,
                "decoder_dim": 48,
                "decoder_depth": 1,
            },
            "train": {"epochs": 15, "batch_size": 32, "lr": 2e-3, "train_stride": 4},
            "score": {"stride": 4},
        }
    )
    model = train(path, cfg, tmp / "run")
    ds = open_cube(path)
    maps = {
        mode: score_cube(ds, model, cfg.score.model_copy(update={"mode": mode})).compute()["prospectivity"]
        for mode in ("both", "cross", "spatial")
    }
    maps["rx"] = score_baseline("rx", ds, seed=0)
    maps["pca"] = score_baseline("pca", ds, seed=0)
    return maps, targets


def auc(score, targets, kind):
    t = targets[targets.type == kind]
    pts = gpd.GeoDataFrame(geometry=gpd.points_from_xy(t.x, t.y), crs="EPSG:32650")
    return roc_auc_all(score.rio.write_crs("EPSG:32650"), pts)


@pytest.mark.parametrize("kind", ["cross", "context"])
def test_pixel_detectors_do_not_see_the_signatures(scored, kind):
    maps, targets = scored
    assert len(targets[targets.type == kind]) >= 5
    for name in ("rx", "pca"):
        assert auc(maps[name], targets, kind) < 0.7, name


@pytest.mark.parametrize("kind", ["cross", "context"])
def test_the_vit_finds_both_signatures(scored, kind):
    maps, targets = scored
    assert auc(maps["both"], targets, kind) >= 0.9
