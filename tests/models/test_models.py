"""The fusion-conv ViT autoencoder, its masks, its loss and its checkpoints."""

from __future__ import annotations

import pytest
import torch
from _cubes import BANDS, SOURCES, write_test_cube

from pipeline.config import ModelConfig
from pipeline.data.cube import open_cube
from pipeline.errors import CheckpointError
from pipeline.models import FusionViTAE, build_model, complementary_masks, group_indices, masked_mse
from pipeline.models.checkpoint import load_checkpoint, model_for_cube, save_checkpoint

SMALL = ModelConfig(
    window=16,
    patch=4,
    dim=32,
    depth=2,
    heads=2,
    decoder_dim=32,
    decoder_depth=1,
    stem_channels=8,
    fusion_channels=16,
    mask_ratio=0.5,
)


ONE_TORCH_THREAD = True  # see conftest._one_torch_thread


def small_model(**kw) -> FusionViTAE:
    torch.manual_seed(0)
    return build_model(SMALL.model_copy(update=kw), group_indices(SOURCES)).eval()


def test_group_indices_keep_band_order():
    assert group_indices(["g", "g", "p", "g", "q"]) == {"g": [0, 1, 3], "p": [2], "q": [4]}


@pytest.mark.parametrize("fusion", [True, False])
def test_output_shape_and_attributes(fusion):
    m = small_model(fusion=fusion)
    x = torch.randn(3, len(BANDS), 16, 16)
    y = m(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert (m.window, m.patch, m.n_tokens, m.in_channels, m.mask_ratio) == (16, 4, 16, 8, 0.5)
    # per-group stems exist only with fusion
    assert hasattr(m.stem, "stems") is fusion


def test_channels_are_a_parameter():
    m = build_model(SMALL, {"a": [0, 2], "b": [1]})
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 3, 16, 16)


def test_wrong_window_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\[N, 8, 16, 16\]"):
        small_model()(torch.randn(1, len(BANDS), 32, 32))


def test_masked_token_is_predicted_from_context_only():
    """Changing a hidden token's pixels does not change the output at all (no leak through the conv stem);
    changing a visible token's pixels does."""
    m = small_model()
    x = torch.randn(2, len(BANDS), 16, 16)
    mask = complementary_masks(m.n_tokens, 0.5, seed=1)[[0, 0]]
    hidden = int(mask[0].nonzero()[0])
    visible = int((~mask[0]).nonzero()[0])

    def poke(tok):
        x2 = x.clone()
        r, c = divmod(tok, 4)
        x2[:, :, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] += 5.0
        return x2

    with torch.no_grad():
        base = m(x, mask)
        assert torch.equal(m(poke(hidden), mask), base)
        assert not torch.allclose(m(poke(visible), mask), base)
        # and masking changes the reconstruction of the hidden tokens
        assert not torch.allclose(m(x), base)


def test_training_mode_draws_a_random_mask_eval_does_not():
    m = small_model()
    x = torch.randn(2, len(BANDS), 16, 16)
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
        m.train()
        torch.manual_seed(1)
        a = m(x)
        torch.manual_seed(2)
        b = m(x)
    assert not torch.allclose(a, b)


def test_rows_with_different_visible_counts_match_one_by_one():
    m = small_model()
    x = torch.randn(3, len(BANDS), 16, 16)
    masks = complementary_masks(16, 0.3, seed=0)  # K=3: 6, 5, 5 hidden tokens
    assert sorted(masks.sum(1).tolist()) == [5, 5, 6]
    with torch.no_grad():
        batch = m(x, masks)
        single = torch.cat([m(x[i : i + 1], masks[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ratio,k", [(0.5, 2), (0.25, 4), (0.3, 3), (0.75, 2), (0.0, 1)])
def test_complementary_masks_partition_the_tokens(ratio, k):
    masks = complementary_masks(64, ratio, seed=3)
    assert masks.shape == (k, 64) and masks.dtype == torch.bool
    if ratio == 0:
        assert not masks.any()
    else:
        assert torch.equal(masks.sum(0), torch.ones(64, dtype=torch.long))  # each token hidden exactly once
        assert torch.equal(complementary_masks(64, ratio, seed=3), masks)


def test_masked_mse_ignores_invalid_pixels_and_visible_tokens():
    target = torch.zeros(2, 3, 8, 8)
    recon = torch.zeros(2, 3, 8, 8)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    recon[:, :, :4, :4] = 100.0  # huge error, but only on invalid pixels
    valid[:, :4, :4] = False
    assert masked_mse(recon, target, valid).item() == 0.0
    recon[:, :, 4:, 4:] = 2.0  # error 4 on a quarter of each window
    assert masked_mse(recon, target, valid).item() == pytest.approx(4.0 * 16 / 48)
    tm = torch.tensor([[False, False, False, True]] * 2)  # only the bottom-right token counts
    assert masked_mse(recon, target, valid, tm, patch=4).item() == pytest.approx(4.0)
    tm = torch.tensor([[False, True, False, False]] * 2)
    assert masked_mse(recon, target, valid, tm, patch=4).item() == 0.0


def test_masked_mse_is_the_mean_of_equal_shards():
    """Per-window weighting: the global-batch loss equals the mean of the two half-batch losses (DDP)."""
    g = torch.Generator().manual_seed(0)
    r, t = torch.randn(4, 2, 8, 8, generator=g), torch.randn(4, 2, 8, 8, generator=g)
    v = torch.rand(4, 8, 8, generator=g) > 0.3
    whole = masked_mse(r, t, v)
    halves = (masked_mse(r[:2], t[:2], v[:2]) + masked_mse(r[2:], t[2:], v[2:])) / 2
    torch.testing.assert_close(whole, halves)


# -- checkpoints -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cube(tmp_path_factory):
    return open_cube(write_test_cube(tmp_path_factory.mktemp("cube") / "cube.zarr"))


def _save(path, model, cube, **kw):
    return save_checkpoint(
        path,
        model,
        model_cfg=SMALL,
        bands=BANDS,
        sources=SOURCES,
        center=cube["center"].values,
        scale=cube["scale"].values,
        groups=group_indices(SOURCES),
        config={"name": "t"},
        **kw,
    )


def test_checkpoint_round_trip_weights_only(tmp_path, cube):
    m = small_model()
    opt = torch.optim.AdamW(m.parameters())
    m.train()
    masked_mse(m(torch.randn(2, 8, 16, 16)), torch.zeros(2, 8, 16, 16), torch.ones(2, 16, 16, dtype=bool)).backward()
    opt.step()
    p = _save(tmp_path / "m.pt", m, cube, optimizer=opt, step=7, epoch=1)
    assert not list(tmp_path.glob("*.tmp-*"))
    blob = torch.load(p, weights_only=True)  # plain containers only
    assert blob["bands"] == BANDS
    m2, meta = load_checkpoint(p, expect_bands=BANDS)
    assert not m2.training
    assert set(meta) >= {
        "model",
        "bands",
        "sources",
        "center",
        "scale",
        "groups",
        "config",
        "step",
        "epoch",
        "optimizer",
    }
    assert (meta["step"], meta["epoch"], meta["model"]["dim"]) == (7, 1, 32)
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    opt2 = torch.optim.AdamW(m2.parameters())
    opt2.load_state_dict(meta["optimizer"])
    model_for_cube(meta, cube)  # matches: no error


def test_corrupt_checkpoint_is_a_checkpoint_error(tmp_path, cube):
    p = _save(tmp_path / "m.pt", small_model(), cube)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="lacks"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_band_mismatch_names_the_bands(tmp_path, cube):
    p = _save(tmp_path / "m.pt", small_model(), cube)
    other = [*BANDS[:-1], "Au"]
    with pytest.raises(
        CheckpointError, match=r"missing from the cube: \['fault_dist'\].*not known to the model: \['Au'\].*Fix"
    ):
        load_checkpoint(p, expect_bands=other)
    _, meta = load_checkpoint(p)
    shifted = cube.assign_coords(center=cube["center"] + 1.0)
    with pytest.raises(CheckpointError, match="normalisation 'center'.*Cr"):
        model_for_cube(meta, shifted)
    renamed = cube.assign_coords(band=other)
    with pytest.raises(CheckpointError, match="Au"):
        model_for_cube(meta, renamed)
