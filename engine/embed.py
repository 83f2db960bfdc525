"""Backbone features and model outputs over an eval loader, gathered from every rank.

:func:`embed_batch` is the one definition of a scan's embedding (pooled features, optionally patch
tokens); :func:`embed` runs it over an eval loader and :func:`predict_gathered` gathers any
``fn(images) -> [B, K]`` (e.g. a classifier's logits) by row. The collapse monitor, the k-NN
monitor, the downstream job's feature cache and validation, and ``tools/extract_features.py`` (which
streams :func:`embed_batch` into resumable part files) all go through here.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from engine import dist
from engine.amp import autocast


def embed_batch(backbone: nn.Module, images: torch.Tensor, tokens: bool = False
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], tuple[int, ...]]:
    """Pooled features (and optionally patch tokens) of one batch.

    ViTs (``pool_tokens`` + ``num_prefix_tokens``): one ``forward_features`` pass; pooled =
    ``pool_tokens`` (``MODEL.POOL``, what ``forward`` returns), tokens = the patch tokens without
    CLS and registers. Other backbones: pooled = ``backbone(x)``; with ``tokens``, one
    ``forward_features`` pass whose map ``[B, C', d, h, w]`` is flattened to tokens and averaged for
    the pooled output (what the zoo's CNN and Swin encoders return from ``forward``).

    Args:
        backbone: a zoo backbone in eval mode.
        images: ``[B, C, D, H, W]``.
        tokens: also return the tokens.

    Returns:
        ``(pooled [B, embed_dim], tokens [B, n_tokens, token_dim] or None, grid of the tokens)``.
    """
    if hasattr(backbone, "pool_tokens") and hasattr(backbone, "num_prefix_tokens"):
        t = backbone.forward_features(images)  # [B, 1 + R + N, D]
        grid = tuple(backbone.grid_size(images.shape[2:])) if hasattr(backbone, "grid_size") else ()
        return backbone.pool_tokens(t), (t[:, backbone.num_prefix_tokens:] if tokens else None), grid
    if not tokens:
        return backbone(images), None, ()
    fmap = backbone.forward_features(images)  # [B, C', d, h, w]
    return fmap.mean(dim=(2, 3, 4)), fmap.flatten(2).transpose(1, 2), tuple(fmap.shape[2:])


@torch.no_grad()
def predict_gathered(fn: Callable[[torch.Tensor], torch.Tensor], loader, n_total: int, device: torch.device,
                     amp: str = "none", allow_missing: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Run ``fn(images) -> [B, K]`` over an eval loader on every rank and gather the rows by index.

    Args:
        fn: e.g. ``method.logits`` (called under no_grad and autocast).
        loader: an eval loader (``make_loader(train=False)``: each sample on exactly one rank).
        n_total: rows of the dataset.
        device: where the model is.
        amp: TRAIN.AMP.
        allow_missing: under DATA.ON_ERROR skip, skipped rows have no prediction (else an error).

    Returns:
        ``(index [M], values [M, K] float32)`` sorted by index, each index once, on every rank.
    """
    idx_parts, val_parts = [], []
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        with autocast(device.type, amp):
            out = fn(images)
        idx_parts.append(np.asarray(batch["index"], dtype=np.int64).reshape(-1))
        val_parts.append(out.float().cpu().numpy().reshape(images.shape[0], -1))
    local = (np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64),
             np.concatenate(val_parts) if val_parts else None)
    gathered = dist.all_gather_object(local)
    index = np.concatenate([g[0] for g in gathered])
    values = np.concatenate([g[1] for g in gathered if g[1] is not None])
    uniq, first = np.unique(index, return_index=True)  # a skipped row's replacement appears twice
    if len(uniq) != len(index) and not allow_missing:
        raise RuntimeError(f"evaluation saw {len(index) - len(uniq)} rows more than once; the eval loader "
                           "must shard without padding (engine.dist.make_loader(train=False))")
    if len(uniq) != n_total and not allow_missing:
        raise RuntimeError(f"evaluation covered {len(uniq)} of {n_total} rows")
    return uniq, values[first]


@torch.no_grad()
def embed(backbone: nn.Module, loader, n_total: int, amp: str = "none",
          allow_missing: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pooled embeddings (:func:`embed_batch`) of every row of an eval loader, gathered on every rank.

    The backbone is put in eval mode for the pass and given back in the mode it had.

    Args:
        backbone: a zoo backbone (its parameters' device is used).
        loader: an eval loader (``make_loader(train=False)``).
        n_total: rows of the dataset.
        amp: TRAIN.AMP.
        allow_missing: DATA.ON_ERROR == 'skip'.

    Returns:
        ``(index [M], features [M, embed_dim] float32)`` sorted by index, on every rank.
    """
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    try:
        return predict_gathered(lambda x: embed_batch(backbone, x)[0], loader, n_total, device, amp, allow_missing)
    finally:
        backbone.train(was_training)
