"""Multi-source fusion convolution + ViT masked autoencoder (Ning et al. 2025, DESIGN.md section 1).

Shapes: N windows, C bands, H = W = window pixels, p = patch, L = (window // p) ** 2 tokens, D = dim,
U hiding units (the source groups; the single bands when the cube has one source group).

Data flow of :meth:`FusionViTAE.forward`::

    x [N, C, H, W], valid [N, H, W], hide [N, U, L]
      --(zero the hidden units' pixels and invalid pixels; add the valid mask and one hidden-indicator
         channel per unit)--> per-group 3x3 conv stems (+ one stem over the indicators) --> 1x1 fusion conv
      --> patch embedding (kernel = stride = p) [N, L, D] + sin-cos positions --> encoder over all L tokens
      --> light decoder [N, L, Dd] --> linear head in fp32 [N, L, p*p*C] --> unpatchify [N, C, H, W]

Masking (cross-source and spatial): ``hide[n, u, l]`` hides unit ``u`` (a source group's bands) at token
``l``. Hiding every unit of a token is spatial (MAE-style) masking: the token is predicted from its context
only. Hiding one unit while the others stay visible asks the model to predict that source from the other
sources at the same place and from the context, so that "geochemistry that geology and geophysics do not
explain" becomes measurable. Hidden pixels are zeroed *before* the conv stems, so a hidden unit's values
never reach the model (the stems see only visible neighbours); the indicator channels tell the model which
zeros are hidden, and the valid channel which are nodata.

The forward has no host synchronisation and fixed shapes (every token goes through the encoder), so it
compiles with ``torch.compile`` without graph breaks; the head and the output are fp32 even under bf16
autocast.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FusionViTAE",
    "hiding_units",
    "sample_hide",
    "group_masked_mse",
    "complementary_masks",
    "random_token_mask",
    "masked_mse",
    "group_indices",
    "patchify",
    "unpatchify",
    "autocast_context",
]


def group_indices(sources: list[str]) -> dict[str, list[int]]:
    """Ordered mapping source group -> channel indices, in cube band order (first appearance order)."""
    groups: dict[str, list[int]] = {}
    for i, src in enumerate(sources):
        groups.setdefault(str(src), []).append(i)
    return groups


def autocast_context(device: torch.device | str):
    """bf16 autocast on CUDA, a no-op context on CPU (fp32), as in nanoGPT: one code path for both."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


# -- patches ---------------------------------------------------------------------------------------


def patchify(x: Tensor, patch: int) -> Tensor:
    """[N, C, H, W] -> [N, L, p*p*C] (token-major, row-major over the token grid)."""
    n, c, h, w = x.shape
    gh, gw = h // patch, w // patch
    x = x.reshape(n, c, gh, patch, gw, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, patch * patch * c)


def unpatchify(t: Tensor, patch: int, channels: int) -> Tensor:
    """[N, L, p*p*C] -> [N, C, H, W] with H = W = sqrt(L) * p."""
    n, length, _ = t.shape
    g = int(round(math.sqrt(length)))
    t = t.reshape(n, g, g, patch, patch, channels)
    return t.permute(0, 5, 1, 3, 2, 4).reshape(n, channels, g * patch, g * patch)


def token_mask_to_pixels(token_mask: Tensor, patch: int) -> Tensor:
    """[N, L] bool -> [N, H, W] bool (True where the pixel's token is hidden)."""
    n, length = token_mask.shape
    g = int(round(math.sqrt(length)))
    m = token_mask.reshape(n, g, 1, g, 1).expand(n, g, patch, g, patch)
    return m.reshape(n, g * patch, g * patch)


# -- masks -----------------------------------------------------------------------------------------


def random_token_mask(
    n: int, n_tokens: int, mask_ratio: float, *, generator: torch.Generator | None = None, device=None
) -> Tensor:
    """[N, L] bool, True = hidden; exactly round(L * mask_ratio) hidden tokens per row (at least one visible)."""
    n_mask = min(int(round(n_tokens * mask_ratio)), n_tokens - 1)
    noise = torch.rand(n, n_tokens, generator=generator)
    rank = noise.argsort(dim=1).argsort(dim=1)
    mask = rank < n_mask
    return mask.to(device) if device is not None else mask


def hiding_units(groups: dict[str, list[int]], sources_as_units: bool | None = None) -> list[list[int]]:
    """The channel sets hidden together by cross-source masking: one per source group, or one per band when
    the cube has a single source group (then each band is predicted from the others)."""
    if sources_as_units is None:
        sources_as_units = len(groups) > 1
    if sources_as_units:
        return [list(map(int, idx)) for idx in groups.values()]
    return [[int(i)] for idx in groups.values() for i in idx]


def sample_hide(
    n: int,
    n_units: int,
    n_tokens: int,
    mask_ratio: float,
    cross_ratio: float,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """[N, U, L] bool training mask, True = hidden.

    ``mask_ratio`` of the tokens (exactly, per window) hide every unit (spatial masking); each other
    (unit, token) is hidden with probability ``cross_ratio`` (cross-source masking). The two together make
    the model predict a source both from its context and from the other sources in place.
    """
    spatial = random_token_mask(n, n_tokens, mask_ratio, generator=generator) if mask_ratio > 0 else None
    hide = torch.rand(n, n_units, n_tokens, generator=generator) < cross_ratio
    if spatial is not None:
        hide = hide | spatial[:, None, :]
    return hide


def complementary_masks(n_tokens: int, mask_ratio: float, *, seed: int = 0) -> Tensor:
    """[K, L] bool masks that partition the tokens: every token is hidden in exactly one of them.

    K = max(2, round(1 / mask_ratio)) when mask_ratio > 0 (so each mask hides ~L/K tokens, close to the
    training ratio); K = 1 with an all-False mask when mask_ratio == 0. Token-to-mask assignment is a seeded
    random permutation, so hidden tokens are scattered and each one keeps visible neighbours.
    """
    if mask_ratio <= 0:
        return torch.zeros(1, n_tokens, dtype=torch.bool)
    k = max(2, int(round(1.0 / mask_ratio)))
    k = min(k, n_tokens)
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n_tokens, generator=g)
    masks = torch.zeros(k, n_tokens, dtype=torch.bool)
    masks[torch.arange(n_tokens) % k, perm] = True
    return masks


def masked_mse(
    recon: Tensor, target: Tensor, valid: Tensor, token_mask: Tensor | None = None, patch: int | None = None
) -> Tensor:
    """Mean squared error over valid pixels (and, with ``token_mask``, over hidden tokens only: MAE style).

    recon, target: [N, C, H, W]; valid: [N, H, W] bool; token_mask: [N, L] bool (needs ``patch``).
    Each window's error is averaged over its selected pixels and channels, then windows are averaged with
    equal weight. That makes the loss of a global batch equal the mean of the per-rank losses of its equal
    shards, so DDP gradient averaging matches single-process training exactly. A window with no selected
    pixel contributes 0. Returns a scalar (float32).
    """
    sel = valid.to(torch.bool)
    if token_mask is not None:
        if patch is None:
            raise ValueError("masked_mse needs `patch` with a token_mask to map tokens onto pixels")
        if token_mask.any():
            sel = sel & token_mask_to_pixels(token_mask.to(torch.bool), patch)
    w = sel.to(torch.float32).unsqueeze(1)  # [N, 1, H, W]
    err = (recon.float() - target.float()).pow(2) * w
    per_window = err.sum(dim=(1, 2, 3)) / (w.sum(dim=(1, 2, 3)) * recon.shape[1]).clamp_min(1.0)
    return per_window.mean()


def group_masked_mse(
    recon: Tensor, target: Tensor, valid: Tensor, hidden: Tensor | None, group_matrix: Tensor
) -> Tensor:
    """Squared error over valid (and, with ``hidden``, hidden) elements, each source group weighted equally.

    recon, target: [N, C, H, W]; valid: [N, H, W] bool; hidden: [N, C, H, W] bool or None (all valid pixels);
    group_matrix: [C, G] float one-hot (band -> group). Per window, each group's error is its mean over the
    selected elements of its bands; the window's loss is the mean over the groups that have any (so 39
    geochemistry bands do not outvote 3 geology bands), and windows are averaged with equal weight (the
    global batch's loss is the mean of equal shards', as DDP needs). No host synchronisation.
    """
    sel = valid.to(torch.bool)[:, None]
    if hidden is not None:
        sel = sel & hidden.to(torch.bool)
    w = sel.expand(recon.shape).to(torch.float32)
    err = (recon.float() - target.float()).pow(2) * w
    num = err.sum(dim=(2, 3)) @ group_matrix  # [N, G]
    den = w.sum(dim=(2, 3)) @ group_matrix
    present = (den > 0).to(torch.float32)
    per_group = num / den.clamp_min(1.0)
    per_window = (per_group * present).sum(dim=1) / present.sum(dim=1).clamp_min(1.0)
    return per_window.mean()


# -- building blocks -------------------------------------------------------------------------------


def sincos_pos_embed(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos positional embedding, [grid*grid, dim] (MAE's recipe; any dim)."""
    d4 = -(-dim // 4)  # frequencies per (axis, sin/cos)
    omega = 1.0 / (10000 ** (torch.arange(d4, dtype=torch.float64) / d4))
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        out = pos[:, None] * omega[None, :]
        parts += [out.sin(), out.cos()]
    return torch.cat(parts, dim=1)[:, :dim].float()


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x [N, S, D]; attn_mask [N, 1, 1, S] bool (True = attend) or None."""
        n, s, d = x.shape
        qkv = self.qkv(x).reshape(n, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        return self.proj(y.transpose(1, 2).reshape(n, s, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


def _stem(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.GELU(), nn.Conv2d(c_out, c_out, 3, padding=1), nn.GELU()
    )


class FusionStem(nn.Module):
    """Multi-source data fusion convolution layer.

    One small conv stem (two 3x3 convs) per source group over that group's channels -> ``stem_channels``,
    concatenated, then a 1x1 conv fusing the groups -> ``fusion_channels``. With ``fusion=False`` (ablation):
    one stem over all channels straight to ``fusion_channels``, no per-group stems, no 1x1 fusion.
    x [N, C, H, W] -> [N, fusion_channels, H, W].
    """

    def __init__(self, groups: dict[str, list[int]], stem_channels: int, fusion_channels: int, fusion: bool = True):
        super().__init__()
        self.fusion = fusion
        self.group_names = list(groups)
        n_channels = sum(len(v) for v in groups.values())
        if fusion:
            for i, idx in enumerate(groups.values()):
                self.register_buffer(f"idx_{i}", torch.as_tensor(idx, dtype=torch.long), persistent=False)
            self.stems = nn.ModuleList(_stem(len(idx), stem_channels) for idx in groups.values())
            self.fuse = nn.Sequential(nn.Conv2d(stem_channels * len(groups), fusion_channels, 1), nn.GELU())
        else:
            self.single = _stem(n_channels, fusion_channels)

    def forward(self, x: Tensor) -> Tensor:
        if not self.fusion:
            return self.single(x)
        feats = [stem(x.index_select(1, getattr(self, f"idx_{i}"))) for i, stem in enumerate(self.stems)]
        return self.fuse(torch.cat(feats, dim=1))


# -- the model -------------------------------------------------------------------------------------


class FusionViTAE(nn.Module):
    """Fusion-conv ViT (masked) autoencoder over [N, C, window, window] windows of normalised evidence.

    Args:
        groups: ordered source group -> channel indices; together they must cover 0..C-1 exactly once.
        window, patch: window side and token side in pixels (window % patch == 0).
        stem_channels, fusion_channels, fusion: see :class:`FusionStem`.
        dim, depth, heads: encoder width, blocks, attention heads.
        decoder_dim, decoder_depth: the light decoder (decoder heads: the first of heads, 4, 2, 1 dividing it).
        mask_ratio: fraction of tokens whose every unit is hidden when training draws its own mask
            (0 = no spatial masking).
        cross_ratio: probability that a (unit, token) is hidden when training draws its own mask
            (cross-source masking; 0 = none).
        units: the hiding units (channel index lists; default :func:`hiding_units`).
    """

    def __init__(
        self,
        groups: dict[str, list[int]],
        *,
        window: int = 32,
        patch: int = 4,
        stem_channels: int = 16,
        fusion_channels: int = 32,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        mask_ratio: float = 0.5,
        cross_ratio: float = 0.0,
        fusion: bool = True,
        units: list[list[int]] | None = None,
    ):
        super().__init__()
        flat = sorted(i for idx in groups.values() for i in idx)
        if not flat or flat != list(range(len(flat))):
            raise ValueError(f"groups {groups} must cover channel indices 0..C-1 exactly once")
        if window % patch:
            raise ValueError(f"window {window} is not a multiple of patch {patch}")
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.groups = {str(k): list(map(int, v)) for k, v in groups.items()}
        self.in_channels = len(flat)
        self.window, self.patch = int(window), int(patch)
        self.grid = window // patch
        self.n_tokens = self.grid**2
        self.mask_ratio = float(mask_ratio)
        self.cross_ratio = float(cross_ratio)
        self.units = [list(map(int, u)) for u in (units or hiding_units(self.groups))]
        if sorted(i for u in self.units for i in u) != flat:
            raise ValueError(f"hiding units {self.units} must cover channel indices 0..C-1 exactly once")
        self.n_units = len(self.units)
        unit_of = torch.zeros(self.in_channels, dtype=torch.long)
        for k, u in enumerate(self.units):
            unit_of[u] = k
        self.register_buffer("unit_of_channel", unit_of, persistent=False)
        group_matrix = torch.zeros(self.in_channels, len(self.groups))
        for k, idx in enumerate(self.groups.values()):
            group_matrix[idx, k] = 1.0
        self.register_buffer("group_matrix", group_matrix, persistent=False)

        # the valid mask and one hidden-indicator per unit enter as one more input group with its own stem
        n_aux = 1 + self.n_units
        stem_groups = {**self.groups, "__mask__": list(range(self.in_channels, self.in_channels + n_aux))}
        self.stem = FusionStem(stem_groups, stem_channels, fusion_channels, fusion)
        self.embed = nn.Conv2d(fusion_channels, dim, patch, stride=patch)
        self.register_buffer("pos", sincos_pos_embed(dim, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

        dec_heads = next(h for h in (heads, 4, 2, 1) if decoder_dim % h == 0)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.register_buffer("dec_pos", sincos_pos_embed(decoder_dim, self.grid)[None], persistent=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, dec_heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.head = nn.Linear(decoder_dim, patch * patch * self.in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def hidden_pixels(self, hide: Tensor) -> Tensor:
        """[N, U, L] unit-token mask -> [N, U, H, W] bool pixel mask."""
        n = hide.shape[0]
        return token_mask_to_pixels(hide.reshape(n * self.n_units, self.n_tokens), self.patch).reshape(
            n, self.n_units, self.window, self.window
        )

    def hidden_channels(self, hide: Tensor) -> Tensor:
        """[N, U, L] unit-token mask -> [N, C, H, W] bool: True where a band's pixel is hidden."""
        return self.hidden_pixels(hide).index_select(1, self.unit_of_channel)

    def forward(
        self, x: Tensor, token_mask: Tensor | None = None, *, valid: Tensor | None = None, hide: Tensor | None = None
    ) -> Tensor:
        """Reconstruct every band of each window.

        x: [N, C, H, W] normalised evidence, H == W == window. valid: [N, H, W] bool (default: all valid).
        hide: [N, U, L] bool, True = unit hidden at that token; token_mask: [N, L] bool, shorthand for hiding
        every unit of those tokens (spatial masking). With neither: a random mask (``mask_ratio``,
        ``cross_ratio``) in training mode (torch RNG), nothing hidden in eval mode. Returns [N, C, H, W] fp32.
        """
        n, c, h, w = x.shape
        if h != self.window or w != self.window or c != self.in_channels:
            raise ValueError(
                f"expected windows [N, {self.in_channels}, {self.window}, {self.window}], got {list(x.shape)}; "
                "cut windows of the model's size from a cube with the checkpoint's bands"
            )
        if token_mask is not None:
            if token_mask.shape != (n, self.n_tokens):
                raise ValueError(f"token_mask must be [N, L] = [{n}, {self.n_tokens}], got {list(token_mask.shape)}")
            hide = token_mask.to(device=x.device, dtype=torch.bool)[:, None, :].expand(n, self.n_units, -1)
        elif hide is None and self.training and (self.mask_ratio > 0 or self.cross_ratio > 0):
            hide = sample_hide(n, self.n_units, self.n_tokens, self.mask_ratio, self.cross_ratio).to(x.device)
        if hide is not None and hide.shape != (n, self.n_units, self.n_tokens):
            raise ValueError(f"hide must be [N, U, L] = [{n}, {self.n_units}, {self.n_tokens}], got {list(hide.shape)}")
        v = torch.ones(n, h, w, dtype=torch.bool, device=x.device) if valid is None else valid.to(torch.bool)
        keep = v[:, None].expand(n, c, h, w)
        if hide is None:
            indicators = torch.zeros(n, self.n_units, h, w, dtype=x.dtype, device=x.device)
        else:
            hp = self.hidden_pixels(hide.to(device=x.device, dtype=torch.bool))
            keep = keep & ~hp.index_select(1, self.unit_of_channel)
            indicators = hp.to(x.dtype)
        x_in = torch.cat([x * keep.to(x.dtype), v[:, None].to(x.dtype), indicators], dim=1)

        t = self.embed(self.stem(x_in)).flatten(2).transpose(1, 2) + self.pos  # [N, L, D]
        for blk in self.blocks:
            t = blk(t)
        full = self.decoder_embed(self.norm(t)) + self.dec_pos  # [N, L, Dd]
        for blk in self.decoder_blocks:
            full = blk(full)
        # the head in fp32 even under bf16 autocast: residuals are taken from this output
        with torch.autocast(device_type=x.device.type, enabled=False):
            pred = self.head(self.decoder_norm(full).float())  # [N, L, p*p*C]
        return unpatchify(pred, self.patch, self.in_channels)
