"""Models: the fusion-conv ViT autoencoder (baselines' deep models live in ``baselines.py``)."""

from __future__ import annotations

from pipeline.models.vit import (
    FusionViTAE,
    autocast_context,
    complementary_masks,
    group_indices,
    group_masked_mse,
    hiding_units,
    masked_mse,
    patchify,
    random_token_mask,
    sample_hide,
    unpatchify,
)

__all__ = [
    "FusionViTAE",
    "build_model",
    "complementary_masks",
    "group_indices",
    "group_masked_mse",
    "hiding_units",
    "sample_hide",
    "masked_mse",
    "random_token_mask",
    "autocast_context",
    "patchify",
    "unpatchify",
]


def build_model(cfg, groups: dict[str, list[int]]) -> FusionViTAE:
    """Build the model from a :class:`pipeline.config.ModelConfig` and the cube's source groups."""
    return FusionViTAE(
        groups,
        window=cfg.window,
        patch=cfg.patch,
        stem_channels=cfg.stem_channels,
        fusion_channels=cfg.fusion_channels,
        dim=cfg.dim,
        depth=cfg.depth,
        heads=cfg.heads,
        decoder_dim=cfg.decoder_dim,
        decoder_depth=cfg.decoder_depth,
        mask_ratio=cfg.mask_ratio,
        cross_ratio=cfg.cross_ratio,
        fusion=cfg.fusion,
    )
