"""MAE pieces for volumes: patchify/unpatchify and the lightweight decoder.

The encoder is the zoo's :class:`models.vit3d.VisionTransformer3D` run on visible tokens only
(``forward_features(x, keep_idx=...)``); the objective lives in ``methods/mae.py``.

Patch vectors are laid out ``(pd, ph, pw, C)`` (channels fastest), tokens in the ViT's raster
order of the patch grid (last axis fastest).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from models.pos_embed import grid_to_tokens, sincos_3d


def patchify(imgs: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """Cut volumes into flattened patches.

    Args:
        imgs: ``[B, C, D, H, W]`` with D, H, W divisible by the patch size.
        patch_size: ``(pd, ph, pw)``.

    Returns:
        ``[B, N, pd*ph*pw*C]`` with ``N = (D/pd)(H/ph)(W/pw)``.
    """
    b, c, d, h, w = imgs.shape
    pd, ph, pw = patch_size
    if d % pd or h % ph or w % pw:
        raise ValueError(f"volume {tuple(imgs.shape[2:])} is not divisible by the patch size {tuple(patch_size)}")
    gd, gh, gw = d // pd, h // ph, w // pw
    x = imgs.reshape(b, c, gd, pd, gh, ph, gw, pw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, gd, gh, gw, pd, ph, pw, C]
    return x.reshape(b, gd * gh * gw, pd * ph * pw * c)


def unpatchify(x: torch.Tensor, patch_size: Sequence[int], grid: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`.

    Args:
        x: ``[B, N, pd*ph*pw*C]``.
        patch_size: ``(pd, ph, pw)``.
        grid: ``(gd, gh, gw)`` with ``gd*gh*gw = N``.
        channels: C.

    Returns:
        ``[B, C, gd*pd, gh*ph, gw*pw]``.
    """
    pd, ph, pw = patch_size
    gd, gh, gw = grid
    b, n, k = x.shape
    if n != gd * gh * gw or k != pd * ph * pw * channels:
        raise ValueError(f"patches {tuple(x.shape)} do not fit grid {tuple(grid)}, patch {tuple(patch_size)} "
                         f"and {channels} channels")
    x = x.reshape(b, gd, gh, gw, pd, ph, pw, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, gd, pd, gh, ph, gw, pw]
    return x.reshape(b, channels, gd * pd, gh * ph, gw * pw)


class MAEDecoder(nn.Module):
    """MAE decoder: embed visible tokens, fill the masked positions with a mask token, add a fixed
    3D sin-cos position embedding, run timm Blocks, predict every patch's voxels.

    Prefix tokens (CLS, registers) pass through the decoder blocks without position embedding and
    are dropped from the prediction.

    Args:
        encoder_dim: token width of the encoder.
        decoder_dim: ``MAE.DECODER_DIM``.
        depth: ``MAE.DECODER_DEPTH``.
        num_heads: ``MAE.DECODER_NUM_HEADS``.
        patch_size: ``(pd, ph, pw)``.
        in_chans: C (channels predicted per voxel).
        grid: patch grid of the training ROI (other grids get their own sin-cos table on the fly).
        mlp_ratio: MLP width / decoder_dim.
    """

    def __init__(self, encoder_dim: int, decoder_dim: int, depth: int, num_heads: int,
                 patch_size: Sequence[int], in_chans: int, grid: Sequence[int], mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if decoder_dim % num_heads:
            raise ValueError(f"MAE.DECODER_DIM {decoder_dim} is not divisible by MAE.DECODER_NUM_HEADS {num_heads}")
        self.decoder_dim = decoder_dim
        self.grid = tuple(int(g) for g in grid)
        self.decoder_embed = nn.Linear(encoder_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("pos_embed", grid_to_tokens(sincos_3d(decoder_dim, self.grid)), persistent=False)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList([Block(decoder_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                                     for _ in range(depth)])
        self.norm = norm_layer(decoder_dim)
        self.pred = nn.Linear(decoder_dim, int(patch_size[0] * patch_size[1] * patch_size[2] * in_chans))
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _pos(self, grid: Sequence[int]) -> torch.Tensor:
        if tuple(grid) == self.grid:
            return self.pos_embed  # [1, N, Dd]
        return grid_to_tokens(sincos_3d(self.decoder_dim, grid)).to(self.pos_embed.device)

    def forward(self, latent: torch.Tensor, keep_idx: torch.Tensor, grid: Sequence[int],
                num_prefix_tokens: int) -> torch.Tensor:
        """Predict all patches.

        Args:
            latent: encoder output ``[B, P + L, E]`` (P prefix tokens, L visible patch tokens).
            keep_idx: ``[B, L]`` patch indices of the visible tokens (as given to the encoder).
            grid: patch grid ``(gd, gh, gw)``; ``N = gd*gh*gw``.
            num_prefix_tokens: P.

        Returns:
            ``[B, N, pd*ph*pw*C]``.
        """
        x = self.decoder_embed(latent)  # [B, P+L, Dd]
        b, _, dd = x.shape
        n = int(grid[0] * grid[1] * grid[2])
        prefix, visible = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
        full = self.mask_token.to(x.dtype).expand(b, n, dd)
        full = full.scatter(1, keep_idx.unsqueeze(-1).expand(-1, -1, dd), visible)  # [B, N, Dd]
        full = (full + self._pos(grid)).to(x.dtype)
        x = torch.cat([prefix, full], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return self.pred(x[:, num_prefix_tokens:])  # [B, N, p^3*C]
