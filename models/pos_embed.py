"""3D sine-cosine position embeddings and their interpolation to other token grids.

A position embedding here is held as a grid ``[1, D, gd, gh, gw]`` (channels first, one vector per
patch position), so its grid is never ambiguous and :func:`resize_pos_embed` is a single
``F.interpolate``. :func:`grid_to_tokens` flattens it to ``[1, gd*gh*gw, D]`` in the raster order
of ``Conv3d(...).flatten(2)`` (last axis fastest), the order of the ViT patch tokens.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def _axis_dims(embed_dim: int) -> list[int]:
    """Split ``embed_dim`` over the 3 axes in even parts (sin + cos halves), as equal as possible.

    768 -> [256, 256, 256]; 1024 -> [342, 342, 340].
    """
    if embed_dim % 2 or embed_dim < 6:
        raise ValueError(f"3D sin-cos position embedding needs an even embed_dim >= 6; got {embed_dim}")
    base = (embed_dim // 6) * 2
    dims = [base] * 3
    for i in range((embed_dim - 3 * base) // 2):
        dims[i] += 2
    return dims


def sincos_1d(dim: int, positions: torch.Tensor, temperature: float = 10000.0) -> torch.Tensor:
    """1D sin-cos embedding of positions.

    Args:
        dim: even output width; the first half holds sines, the second cosines.
        positions: float tensor ``[M]`` of (possibly fractional) positions.
        temperature: the longest wavelength is ``2 * pi * temperature``.

    Returns:
        ``[M, dim]`` float32.
    """
    if dim % 2:
        raise ValueError(f"sincos_1d needs an even dim; got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / temperature ** omega  # [dim/2]
    out = positions.double()[:, None] * omega[None, :]  # [M, dim/2]
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_3d(embed_dim: int, grid: Sequence[int]) -> torch.Tensor:
    """3D sin-cos position embedding on an integer grid.

    Each axis gets its own even slice of the channels (see :func:`_axis_dims`), encoding the
    patch index 0..g-1 along that axis.

    Args:
        embed_dim: channels (even, >= 6).
        grid: ``(gd, gh, gw)`` patches per axis.

    Returns:
        ``[1, embed_dim, gd, gh, gw]`` float32.
    """
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must hold 3 positive sizes; got {grid}")
    dims = _axis_dims(embed_dim)
    mesh = torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid], indexing="ij")
    parts = [sincos_1d(d, m.reshape(-1)) for d, m in zip(dims, mesh)]  # 3 x [N, d_axis]
    emb = torch.cat(parts, dim=1)  # [N, D], N in raster order (last axis fastest)
    return emb.t().reshape(1, embed_dim, *grid).contiguous()


def grid_to_tokens(pos_grid: torch.Tensor) -> torch.Tensor:
    """``[1, D, gd, gh, gw]`` -> ``[1, gd*gh*gw, D]`` in patch-token raster order."""
    return pos_grid.flatten(2).transpose(1, 2)


def resize_pos_embed(pos_grid: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Resample a position-embedding grid to another token grid by trilinear interpolation.

    The same grid returns the input tensor itself (exact identity, gradients flow unchanged).
    ``align_corners=False`` maps both grids onto the same physical extent, as DINO does for
    local crops.

    Args:
        pos_grid: ``[1, D, gd, gh, gw]``.
        grid: target ``(gd', gh', gw')``.

    Returns:
        ``[1, D, gd', gh', gw']`` in the dtype of ``pos_grid``.
    """
    grid = tuple(int(g) for g in grid)
    if pos_grid.ndim != 5:
        raise ValueError(f"pos_grid must be [1, D, gd, gh, gw]; got shape {tuple(pos_grid.shape)}")
    if tuple(pos_grid.shape[2:]) == grid:
        return pos_grid
    out = F.interpolate(pos_grid.float(), size=grid, mode="trilinear", align_corners=False)
    return out.to(pos_grid.dtype)


def tokens_to_grid(pos_tokens: torch.Tensor, grid: Sequence[int] | None = None,
                   num_prefix_tokens: Sequence[int] = (0, 1)) -> torch.Tensor:
    """Turn a token-list position embedding (other codebases' ``[1, T, D]``) into a grid.

    Used when loading foreign checkpoints. Leading prefix tokens (e.g. a CLS entry) are dropped.

    Args:
        pos_tokens: ``[1, T, D]`` or ``[T, D]``.
        grid: the source grid when known; else the first of ``num_prefix_tokens`` that leaves a
            perfect cube of patch tokens decides it.
        num_prefix_tokens: prefix counts to try.

    Returns:
        ``[1, D, gd, gh, gw]``.
    """
    if pos_tokens.ndim == 2:
        pos_tokens = pos_tokens[None]
    if pos_tokens.ndim != 3:
        raise ValueError(f"position embedding of shape {tuple(pos_tokens.shape)} is neither [1, T, D] nor [T, D]")
    t = pos_tokens.shape[1]
    for p in num_prefix_tokens:
        n = t - p
        if grid is not None:
            if math.prod(grid) == n:
                break
            continue
        side = round(n ** (1 / 3)) if n > 0 else 0
        if side > 0 and side ** 3 == n:
            grid = (side, side, side)
            break
    else:
        raise ValueError(f"cannot infer a 3D grid from a position embedding of {t} tokens "
                         f"(tried {list(num_prefix_tokens)} prefix tokens)")
    patch = pos_tokens[:, p:]  # [1, N, D]
    return patch.transpose(1, 2).reshape(1, patch.shape[2], *grid).contiguous()
