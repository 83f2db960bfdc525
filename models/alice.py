"""The model blocks of Alice (:mod:`methods.alice`): CASA, its cross-attention block, and the light decoder that
reconstructs masked patches from the student's tokens."""
from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block

from models.pos_embed import grid_to_tokens, sincos_3d


class CrossAttentionBlock(nn.Module):
    """CASA: a pre-norm transformer block whose queries attend to ANOTHER token set.

    ``x = q + Proj(Attn(LN(q), LN(kv)))``; ``x = x + MLP(LN(x))`` with
    ``F.scaled_dot_product_attention``.

    Args:
        dim: token width D (both inputs).
        num_heads: attention heads (``dim`` divisible by it).
        mlp_ratio: MLP hidden width / D.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CASA width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim, eps=1e-6)
        self.norm_kv = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``query [B, Nq, D]`` attends to ``context [B, Nk, D]`` -> ``[B, Nq, D]``."""
        b, nq, d = query.shape
        nk, hd = context.shape[1], d // self.num_heads
        q = self.q(self.norm_q(query)).reshape(b, nq, self.num_heads, hd).transpose(1, 2)  # [B, h, Nq, hd]
        k, v = self.kv(self.norm_kv(context)).reshape(b, nk, 2, self.num_heads, hd).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, Nq, hd]
        x = query + self.proj(out.transpose(1, 2).reshape(b, nq, d))
        return x + self.mlp(self.norm_mlp(x))


class ReconstructionDecoder(nn.Module):
    """Light decoder from encoder patch tokens to patch voxels: Linear -> + fixed 3D sin-cos position
    -> ``depth`` timm Blocks (heads of width 32, one head when the width is not a multiple of 32)
    -> LayerNorm -> Linear.

    Args:
        token_dim: encoder token width.
        decoder_dim: ``ALICE.DECODER_DIM`` (even, >= 6, for the sin-cos table).
        depth: ``ALICE.DECODER_DEPTH`` (0 = linear decoder).
        patch_size: ``(pd, ph, pw)``.
        in_chans: C (channels predicted per voxel).
        grid: patch grid of ``DATA.ROI`` (other grids get their table on the fly).
    """

    def __init__(self, token_dim: int, decoder_dim: int, depth: int, patch_size: Sequence[int], in_chans: int,
                 grid: Sequence[int]) -> None:
        super().__init__()
        self.decoder_dim = decoder_dim
        self.grid = tuple(int(s) for s in grid)
        num_heads = decoder_dim // 32 if decoder_dim % 32 == 0 else 1
        self.embed = nn.Linear(token_dim, decoder_dim)
        self.register_buffer("pos_embed", grid_to_tokens(sincos_3d(decoder_dim, self.grid)), persistent=False)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList([Block(decoder_dim, num_heads, 4.0, qkv_bias=True, norm_layer=norm_layer)
                                     for _ in range(depth)])
        self.norm = norm_layer(decoder_dim)
        self.pred = nn.Linear(decoder_dim, math.prod(int(p) for p in patch_size) * in_chans)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Patch tokens ``[B, N, token_dim]`` on ``grid`` -> voxels ``[B, N, pd*ph*pw*C]``."""
        pos = self.pos_embed if tuple(grid) == self.grid else \
            grid_to_tokens(sincos_3d(self.decoder_dim, grid)).to(tokens.device)
        x = self.embed(tokens) + pos.to(tokens.dtype)  # [B, N, Dd]
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))
