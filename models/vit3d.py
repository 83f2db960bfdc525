"""3D Vision Transformer for volumes: Conv3d patch embedding, CLS + register tokens, timm Blocks.

Token layout of :meth:`VisionTransformer3D.forward_features`: ``[CLS, reg_1..reg_R, patch_1..patch_N]``
(``num_prefix_tokens = 1 + R``). Patch tokens follow the raster order of the patch grid
``(gd, gh, gw)`` with the last axis fastest (``Conv3d(...).flatten(2)``).

Position embedding: patch tokens only, held as a grid ``[1, D, gd, gh, gw]`` built for ``img_size``
and resampled trilinearly for any other input grid (DINO local crops, another ROI). 'sincos' keeps
it fixed (a non-persistent buffer: recomputed, never loaded from checkpoints); 'learned' makes it a
parameter initialised with sin-cos (loaded and interpolated by ``models.zoo.load_pretrained``).
The CLS token has no position embedding: it is itself a learned vector, so a CLS position term
would add nothing (MAE's CLS position entry is all zeros). Register tokens have none either
(DINOv2 registers): they are position-free scratch memory.

Attention runs through timm's ``Attention`` (``F.scaled_dot_product_attention``);
:meth:`VisionTransformer3D.last_attention` computes the last block's attention probabilities
explicitly for that call only.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from models.names import POOLS, POS_EMBEDS, VIT_SIZES, VIT_VARIANTS
from models.pos_embed import grid_to_tokens, resize_pos_embed, sincos_3d


Size3 = Union[int, Sequence[int]]


def to_3tuple(v: Size3, name: str = "size") -> tuple[int, int, int]:
    """An int or a 3-sequence of positive ints -> ``(d, h, w)``; ValueError naming ``name`` otherwise."""
    t = (v, v, v) if isinstance(v, int) else tuple(int(x) for x in v)
    if len(t) != 3 or min(t) < 1:
        raise ValueError(f"{name} must be a positive int or 3 positive ints; got {v!r}")
    return t  # type: ignore[return-value]


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3D patches -> tokens with one strided Conv3d.

    Args:
        in_chans: input channels (one per HU window).
        embed_dim: token width.
        patch_size: int or ``(pd, ph, pw)``.
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: Size3 = 16) -> None:
        super().__init__()
        self.patch_size = to_3tuple(patch_size, "patch_size")
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, D, H, W] -> [B, embed_dim, gd, gh, gw]
        return self.proj(x)


class VisionTransformer3D(nn.Module):
    """ViT for ``[B, C, D, H, W]`` volumes.

    Args:
        img_size: input size the position-embedding table is built for; other sizes divisible by
            the patch size work too (interpolated embedding).
        patch_size: int or ``(pd, ph, pw)``.
        in_chans: input channels (``len(DATA.WINDOWS)``).
        width: token width D.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / D.
        qkv_bias: bias on the qkv projection.
        num_registers: DINOv2-style register tokens (no position embedding).
        pos_embed: 'sincos' (fixed) | 'learned' (sin-cos initialised parameter).
        pool: pooled output of :meth:`forward`: 'cls' | 'mean' (patch tokens) | 'cls+mean'
            (concatenation, so ``embed_dim = 2 * width``).
        drop_path_rate: stochastic depth rate of the last block (linear from 0 over depth).
        use_mask_token: create the learned mask token used by ``forward_features(mask=...)``
            (iBOT). Off by default so an unused parameter never stalls DDP.
        block_norm_eps: epsilon of the LayerNorms inside the blocks (1e-6 as timm's ViT; 1e-5, torch's
            default, reproduces MONAI-style ViTs such as HeadCT-Foundation's). The final norm keeps 1e-6.

    Attributes:
        embed_dim: width of :meth:`forward`'s output (``width``, or ``2 * width`` for cls+mean).
        token_dim: width of the tokens of :meth:`forward_features` (``width``).
    """

    def __init__(self, img_size: Size3 = 96, patch_size: Size3 = 16, in_chans: int = 3, width: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 num_registers: int = 0, pos_embed: str = "sincos", pool: str = "cls",
                 drop_path_rate: float = 0.0, use_mask_token: bool = False, block_norm_eps: float = 1e-6) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool = {pool!r}; expected one of {POOLS}")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed = {pos_embed!r}; expected one of {POS_EMBEDS}")
        if num_registers < 0:
            raise ValueError(f"num_registers = {num_registers}; it must be >= 0")
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.img_size = to_3tuple(img_size, "img_size")
        self.patch_size = to_3tuple(patch_size, "patch_size")
        self.in_chans = in_chans
        self.token_dim = width
        self.embed_dim = 2 * width if pool == "cls+mean" else width
        self.num_layers = depth
        self.num_heads = num_heads
        self.num_registers = num_registers
        self.num_prefix_tokens = 1 + num_registers
        self.pool = pool
        self.pos_embed_type = pos_embed

        self.patch_embed = PatchEmbed3D(in_chans, width, self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.reg_tokens = nn.Parameter(torch.zeros(1, num_registers, width)) if num_registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width)) if use_mask_token else None
        table = sincos_3d(width, self.grid_size(self.img_size))  # [1, D, gd, gh, gw]
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(table)
        else:
            self.register_buffer("pos_embed", table, persistent=False)

        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            Block(dim=width, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i],
                  norm_layer=partial(nn.LayerNorm, eps=block_norm_eps))
            for i in range(depth)])
        self.norm = norm_layer(width)
        self._init_weights()

    # ----------------------------------------------------------------------------------------- init
    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over the flattened patch (MAE)
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        if self.reg_tokens is not None:
            nn.init.normal_(self.reg_tokens, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------- helpers
    def grid_size(self, spatial_shape: Sequence[int]) -> tuple[int, int, int]:
        """Patch grid ``(gd, gh, gw)`` of an input of spatial size ``(D, H, W)``.

        Raises:
            ValueError: a size is not divisible by the patch size.
        """
        shape = tuple(int(s) for s in spatial_shape)
        if len(shape) != 3 or any(s % p for s, p in zip(shape, self.patch_size)):
            raise ValueError(f"input spatial size {shape} is not divisible by the patch size {self.patch_size}")
        return tuple(s // p for s, p in zip(shape, self.patch_size))  # type: ignore[return-value]

    def pos_embed_tokens(self, grid: Sequence[int]) -> torch.Tensor:
        """Patch position embedding for ``grid`` as ``[1, N, D]`` (interpolated when needed)."""
        return grid_to_tokens(resize_pos_embed(self.pos_embed, grid))

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay: tokens and the position embedding."""
        names = {"cls_token"}
        if self.reg_tokens is not None:
            names.add("reg_tokens")
        if self.mask_token is not None:
            names.add("mask_token")
        if isinstance(self.pos_embed, nn.Parameter):
            names.add("pos_embed")
        return names

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay.

        Args:
            name: parameter name relative to this module (``blocks.3.mlp.fc1.weight``).

        Returns:
            0 for embeddings and tokens, ``i + 1`` for block i, ``num_layers + 1`` for the final norm.
        """
        if name.startswith(("cls_token", "reg_tokens", "mask_token", "pos_embed", "patch_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers + 1

    # ------------------------------------------------------------------------------------- forward
    def prepare_tokens(self, x: torch.Tensor, keep_idx: Optional[torch.Tensor] = None,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embed patches, add position embedding, prepend CLS and registers (before the blocks).

        Args:
            x: ``[B, C, D, H, W]``.
            keep_idx: ``[B, L]`` long indices of the patch tokens to keep (MAE), applied after
                adding the position embedding.
            mask: ``[B, N]`` bool; True patch tokens are replaced by the mask token (iBOT) before
                the position embedding is added.

        Returns:
            ``[B, 1 + R + L, D]`` (``L = N`` without ``keep_idx``).
        """
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input [B, {self.in_chans}, D, H, W]; got {tuple(x.shape)}")
        b = x.shape[0]
        grid = self.grid_size(x.shape[2:])
        t = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, D]
        n, d = t.shape[1], t.shape[2]
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("forward_features(mask=...) needs a mask token; build the ViT with "
                                 "use_mask_token=True (build_backbone does when DINO.IBOT_WEIGHT > 0)")
            if mask.shape != (b, n):
                raise ValueError(f"mask must be [B, N] = [{b}, {n}]; got {tuple(mask.shape)}")
            t = torch.where(mask.unsqueeze(-1), self.mask_token.to(t.dtype), t)
        t = t + self.pos_embed_tokens(grid)
        if keep_idx is not None:
            if keep_idx.ndim != 2 or keep_idx.shape[0] != b:
                raise ValueError(f"keep_idx must be [B, L] with B = {b}; got {tuple(keep_idx.shape)}")
            t = torch.gather(t, 1, keep_idx.unsqueeze(-1).expand(-1, -1, d))  # [B, L, D]
        prefix = [self.cls_token.expand(b, -1, -1)]
        if self.reg_tokens is not None:
            prefix.append(self.reg_tokens.expand(b, -1, -1))
        return torch.cat([p.to(t.dtype) for p in prefix] + [t], dim=1)

    def forward_features(self, x: torch.Tensor, keep_idx: Optional[torch.Tensor] = None,
                         mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """All tokens after the final norm.

        Args:
            x: ``[B, C, D, H, W]``.
            keep_idx: see :meth:`prepare_tokens`.
            mask: see :meth:`prepare_tokens`.

        Returns:
            ``[B, 1 + R + N, D]`` (``N`` replaced by ``L`` with ``keep_idx``).
        """
        t = self.prepare_tokens(x, keep_idx=keep_idx, mask=mask)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` tokens of :meth:`forward_features` -> ``[B, embed_dim]`` by ``self.pool``."""
        cls = tokens[:, 0]
        if self.pool == "cls":
            return cls
        mean = tokens[:, self.num_prefix_tokens:].mean(dim=1)
        return mean if self.pool == "mean" else torch.cat([cls, mean], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, D, H, W]`` -> pooled features ``[B, embed_dim]``."""
        return self.pool_tokens(self.forward_features(x))

    @torch.no_grad()
    def last_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of the last block, computed explicitly for this call.

        Args:
            x: ``[B, C, D, H, W]``.

        Returns:
            ``[B, heads, T, T]`` with ``T = 1 + R + N``; row 0 is the CLS query.
        """
        t = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            t = blk(t)
        last = self.blocks[-1]
        attn = last.attn
        y = last.norm1(t)
        b, n, _ = y.shape
        qkv = attn.qkv(y).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, _ = qkv.unbind(0)  # [B, heads, T, head_dim]
        q, k = attn.q_norm(q), attn.k_norm(k)
        logits = (q * attn.scale) @ k.transpose(-2, -1)  # [B, heads, T, T]
        return logits.float().softmax(dim=-1)


def create_vit(name: str, **kwargs) -> VisionTransformer3D:
    """A named ViT size (``vit_tiny | vit_small | vit_base | vit_large``) or variant (``vit_base_headct``).

    Args:
        name: key of :data:`VIT_SIZES` (width/depth/heads) or of :data:`VIT_VARIANTS` (a size plus
            the arguments that make the variant).
        **kwargs: further :class:`VisionTransformer3D` arguments (img_size, patch_size, ...).
    """
    variant: dict = {}
    if name in VIT_VARIANTS:
        name, variant = VIT_VARIANTS[name]
    if name not in VIT_SIZES:
        raise ValueError(f"unknown ViT {name!r}; expected one of {list(VIT_SIZES) + list(VIT_VARIANTS)}")
    width, depth, heads = VIT_SIZES[name]
    return VisionTransformer3D(width=width, depth=depth, num_heads=heads, **variant, **kwargs)
