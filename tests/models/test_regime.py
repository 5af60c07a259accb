"""The training regime and the scoring protocol's pieces, on known truth: held-out blocks, augmentation,
cross-source masks, the equal-group loss, the residual calibration, and a compile-friendly forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.data.cube import from_arrays
from pipeline.models import build_model, group_indices, group_masked_mse, hiding_units, sample_hide
from pipeline.models.regime import augment, holdout_mask, split_cube
from pipeline.models.residuals import fit_calibration, predict_hidden, score_partitions

ONE_TORCH_THREAD = True  # see conftest._one_torch_thread
SOURCES = ["geochemistry", "geochemistry", "geochemistry", "geophysics", "geology"]
GROUPS = group_indices(SOURCES)
TINY = dict(
    window=16, patch=4, dim=32, depth=1, heads=2, decoder_dim=32, decoder_depth=1, stem_channels=4, fusion_channels=8
)


def tiny(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(**TINY, **kw), GROUPS).eval()


def test_holdout_blocks_are_seeded_whole_blocks_of_the_asked_share():
    m = holdout_mask((100, 130), block=10, fraction=0.2, seed=3)
    blocks = m[:100, :130].reshape(10, 10, 13, 10).transpose(0, 2, 1, 3).reshape(10, 13, 100)
    assert np.all(blocks.all(axis=2) | ~blocks.any(axis=2))  # each block entirely in or out
    assert blocks.all(axis=2).sum() == round(0.2 * 130)
    assert np.array_equal(m, holdout_mask((100, 130), 10, 0.2, 3))
    assert not np.array_equal(m, holdout_mask((100, 130), 10, 0.2, 4))
    assert not holdout_mask((100, 130), 10, 0.0, 3).any()


def test_split_cube_partitions_the_valid_area():
    rng = np.random.default_rng(0)
    valid = rng.random((64, 64)) > 0.1
    ds = from_arrays(
        rng.standard_normal((2, 64, 64)).astype("float32"),
        bands=["a", "b"],
        sources=["g", "g"],
        x=np.arange(64) + 0.5,
        y=-np.arange(64) - 0.5,
        crs="EPSG:32650",
        valid=valid,
        chunk=32,
    )
    train, val = split_cube(ds, block=8, fraction=0.25, seed=1)
    t, v = train["valid"].values.astype(bool), val["valid"].values.astype(bool)
    assert not (t & v).any() and np.array_equal(t | v, valid)
    assert 0.15 < v.sum() / valid.sum() < 0.35
    np.testing.assert_array_equal(train["evidence"].values, ds["evidence"].values)


def test_augment_moves_pixels_without_changing_them_and_punches_holes():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    v = torch.ones(2, 8, 8, dtype=torch.bool)
    seen_moved = False
    for _ in range(8):
        xa, va = augment(x, v, g, flips=True, nodata_fraction=0.0)
        assert torch.equal(
            xa.sort(dim=-1).values.sort(dim=-2).values.sum(), x.sort(dim=-1).values.sort(dim=-2).values.sum()
        )
        assert torch.equal(torch.sort(xa.flatten()).values, torch.sort(x.flatten()).values)
        assert va.all()
        seen_moved |= not torch.equal(xa, x)
    assert seen_moved
    xs = torch.zeros(400, 1, 16, 16)
    vs = torch.ones(400, 16, 16, dtype=torch.bool)
    _, va = augment(xs, vs, torch.Generator().manual_seed(1), flips=False, nodata_fraction=0.25)
    holed = (~va).flatten(1).any(1).float().mean().item()
    assert 0.18 < holed < 0.32
    sizes = (~va).flatten(1).sum(1)
    assert sizes[sizes > 0].min() >= 16 and sizes.max() <= 64


def test_hiding_units_are_sources_or_bands_of_a_single_source():
    assert hiding_units(GROUPS) == [[0, 1, 2], [3], [4]]
    assert hiding_units({"geology": [0, 1, 2]}) == [[0], [1], [2]]


def test_sample_hide_spatial_share_is_exact_and_cross_share_is_its_rate():
    g = torch.Generator().manual_seed(0)
    h = sample_hide(500, 3, 16, 0.5, 0.0, generator=g)
    assert torch.equal(h[:, 0], h[:, 1]) and (h[:, 0].sum(1) == 8).all()
    h = sample_hide(2000, 3, 16, 0.0, 0.25, generator=g)
    assert abs(h.float().mean().item() - 0.25) < 0.01
    assert not torch.equal(h[:, 0], h[:, 1])


def test_group_loss_weighs_source_groups_equally():
    recon = torch.zeros(1, 5, 4, 4)
    target = torch.zeros(1, 5, 4, 4)
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    gm = torch.zeros(5, 3)
    for k, idx in enumerate(GROUPS.values()):
        gm[idx, k] = 1.0
    target[:, 4] = 3.0  # an error of 9 in the one geology band only
    assert group_masked_mse(recon, target, valid, None, gm).item() == pytest.approx(9.0 / 3)
    target[:, 4] = 0.0
    target[:, 0] = 3.0  # the same error in one of three geochemistry bands
    assert group_masked_mse(recon, target, valid, None, gm).item() == pytest.approx(9.0 / 3 / 3)
    hidden = torch.zeros(1, 5, 4, 4, dtype=torch.bool)
    hidden[:, 1] = True  # only a band without error is hidden: the loss sees no error
    assert group_masked_mse(recon, target, valid, hidden, gm).item() == 0.0


def test_hidden_source_never_reaches_its_own_prediction():
    """predict_hidden in cross mode: a band's prediction does not change when that source's own values change
    anywhere in the window... at the token where it is hidden; it does change with the other sources."""
    m = tiny(mask_ratio=0.0, cross_ratio=0.5)
    x = torch.randn(2, 5, 16, 16)
    v = torch.ones(2, 16, 16, dtype=torch.bool)
    parts = score_partitions(m.n_tokens, 16, seed=0)  # one token per partition: the poked token is alone
    base = predict_hidden(m, x, v, parts)
    x2 = x.clone()
    x2[:, 0:3, 4:8, 4:8] += 5.0  # geochemistry of token (1, 1)
    np.testing.assert_allclose(predict_hidden(m, x2, v, parts)[:, 0:3, 4:8, 4:8], base[:, 0:3, 4:8, 4:8], atol=1e-5)
    x3 = x.clone()
    x3[:, 3, 4:8, 4:8] += 5.0  # geophysics at the same token
    assert not torch.allclose(predict_hidden(m, x3, v, parts)[:, 0:3, 4:8, 4:8], base[:, 0:3, 4:8, 4:8], atol=1e-4)


def test_calibration_recovers_scales_and_normalises_distances():
    rng = np.random.default_rng(0)
    n = 20_000
    z = rng.standard_normal((n, 5))
    z[:, 1] = 0.8 * z[:, 0] + 0.6 * z[:, 1]  # correlated geochemistry residuals
    scale = np.array([0.5, 2.0, 1.0, 4.0, 0.1])
    r = z * scale + np.array([0.3, 0, 0, -1, 0])
    cal = fit_calibration(r, GROUPS)
    np.testing.assert_allclose(cal.scale / scale, 1.0, rtol=0.05)
    zs = cal.standardise(r.T)
    d = cal.group_distances(zs)
    for g in GROUPS:
        assert np.median(d[g]) == pytest.approx(1.0, rel=0.02)
    # a residual that breaks the correlation is far in Mahalanobis terms, though each value is ordinary
    odd = np.array([1.5, -1.5, 0.0, 0.0, 0.0])  # 1.5 sd each way: ordinary values, a broken pairing
    d_odd = cal.group_distances(cal.standardise((cal.center + cal.scale * odd)[:, None]))["geochemistry"][0]
    d_same = cal.group_distances(cal.standardise((cal.center + cal.scale * odd * [1, -1, 1, 1, 1])[:, None]))
    assert d_odd > 5.0 > d_same["geochemistry"][0]


def test_forward_compiles_without_graph_breaks():
    m = tiny(mask_ratio=0.5, cross_ratio=0.25)
    x = torch.randn(4, 5, 16, 16)
    v = torch.rand(4, 16, 16) > 0.1
    h = sample_hide(4, m.n_units, m.n_tokens, 0.5, 0.25, generator=torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(m)(x, valid=v, hide=h)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
