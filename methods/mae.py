"""Masked autoencoder (He et al. 2022) for head-CT volumes.

Per sample, a random ``MAE.MASK_RATIO`` of the patches is hidden (argsort of uniform noise drawn
from the torch RNG on the input's device, which the engine seeds per rank). The ViT encoder sees
the visible ``round((1 - r) N)`` patch tokens only; the decoder (``models/mae.py``) predicts every
patch's voxels; the loss is the MSE on the masked patches, against per-patch normalised targets
when ``MAE.NORM_PIX_LOSS``.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn

from models.mae import MAEDecoder, patchify, unpatchify
from models.vit3d import VisionTransformer3D


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Visible patches ``round((1 - mask_ratio) * N)``; ValueError unless 0 < visible < N."""
    keep = int(round((1.0 - mask_ratio) * num_patches))
    if not 0 < keep < num_patches:
        raise ValueError(f"MAE.MASK_RATIO = {mask_ratio} leaves {keep} of {num_patches} patches visible; "
                         "at least one patch must be visible and at least one masked")
    return keep


def random_masking(batch_size: int, num_patches: int, mask_ratio: float, device: torch.device,
                   generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample random masking.

    Args:
        batch_size: B.
        num_patches: N.
        mask_ratio: fraction of patches hidden.
        device: where the noise is drawn (the torch RNG of that device unless ``generator``).
        generator: optional RNG (visualisation uses a fixed one so it never moves the training RNG).

    Returns:
        ``keep_idx [B, L]`` long (visible patch indices, random order) and ``mask [B, N]`` bool
        (True = hidden), with ``L = round((1 - mask_ratio) N)``.
    """
    keep = num_visible(num_patches, mask_ratio)
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)  # [B, N]
    keep_idx = torch.argsort(noise, dim=1)[:, :keep]  # [B, L]
    mask = torch.ones(batch_size, num_patches, dtype=torch.bool, device=device)
    mask.scatter_(1, keep_idx, False)
    return keep_idx, mask


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch standardisation ``(t - mean) / sqrt(var + eps)`` over the last dim of ``[B, N, K]``."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps).sqrt()


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """MSE over the masked patches only (float32).

    Args:
        pred: ``[B, N, K]`` predicted patches.
        target: ``[B, N, K]`` patchified input.
        mask: ``[B, N]`` bool, True = hidden (scored).
        norm_pix: standardise each target patch first.
    """
    target = target.float()
    if norm_pix:
        target = normalize_patches(target)
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # [B, N]
    m = mask.float()
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


class MAE(nn.Module):
    """MAE objective around a ViT encoder.

    Args:
        cfg: config (``MAE.*``, ``DATA.ROI`` for the decoder's position table).
        backbone: a :class:`models.vit3d.VisionTransformer3D` (``self.backbone``).
    """

    def __init__(self, cfg: Any, backbone: nn.Module) -> None:
        super().__init__()
        if not isinstance(backbone, VisionTransformer3D):
            raise ValueError(f"MAE needs a ViT backbone (MODEL.NAME vit_*); got {type(backbone).__name__}")
        self.backbone = backbone
        self.mask_ratio = float(cfg.MAE.MASK_RATIO)
        self.norm_pix_loss = bool(cfg.MAE.NORM_PIX_LOSS)
        self.vis_every = int(cfg.MAE.VIS_EVERY)  # the trainer calls visualize() every this many epochs
        grid = backbone.grid_size(cfg.DATA.ROI)
        num_visible(math.prod(grid), self.mask_ratio)  # fail at build time, naming MAE.MASK_RATIO
        self.decoder = MAEDecoder(backbone.token_dim, int(cfg.MAE.DECODER_DIM), int(cfg.MAE.DECODER_DEPTH),
                                  int(cfg.MAE.DECODER_NUM_HEADS), backbone.patch_size, backbone.in_chans, grid)

    def predict(self, imgs: torch.Tensor, generator: Optional[torch.Generator] = None
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """Mask, encode the visible tokens, decode all patches.

        Args:
            imgs: ``[B, C, D, H, W]``.
            generator: optional RNG for the mask.

        Returns:
            ``pred [B, N, K]``, ``mask [B, N]`` (True = hidden) and the patch grid.
        """
        if imgs.ndim != 5:
            raise ValueError(f"MAE expects batch['image'] of shape [B, C, D, H, W]; got {tuple(imgs.shape)}")
        grid = self.backbone.grid_size(imgs.shape[2:])
        keep_idx, mask = random_masking(imgs.shape[0], math.prod(grid), self.mask_ratio, imgs.device, generator)
        latent = self.backbone.forward_features(imgs, keep_idx=keep_idx)  # [B, P+L, E]
        pred = self.decoder(latent, keep_idx, grid, self.backbone.num_prefix_tokens)  # [B, N, K]
        return pred, mask, grid

    def forward(self, batch: dict) -> dict:
        """``batch["image"] [B, C, D, H, W]`` -> ``{"loss", "mask_ratio"}``."""
        imgs = batch["image"]
        pred, mask, _ = self.predict(imgs)
        loss = mae_loss(pred, patchify(imgs, self.backbone.patch_size), mask, self.norm_pix_loss)
        n = mask.shape[1]
        return {"loss": loss, "mask_ratio": (n - num_visible(n, self.mask_ratio)) / n}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
        """Mid-axial slices of the first volume: input, masked input, reconstruction.

        The mask comes from a fixed ``seed`` (own generator: the training RNG does not move), the
        model runs in eval mode, and the reconstruction shows predicted hidden patches (un-normalised
        with the input patch statistics under ``MAE.NORM_PIX_LOSS``) beside the visible ones.

        Args:
            images: ``[B, C, D, H, W]``; only the first volume and channel are shown.
            seed: mask seed.

        Returns:
            ``{"input", "masked", "reconstruction"}`` each ``[1, H, D]`` float in [0, 1]: the slice at
            the middle of the last array axis (axial for RAS ``[X, Y, Z]``), anterior up.
        """
        was_training = self.training
        self.eval()
        try:
            x = images[:1].to(device=self.backbone.cls_token.device, dtype=torch.float32)
            gen = torch.Generator(device=x.device).manual_seed(seed)
            pred, mask, grid = self.predict(x, generator=gen)
            pred = pred.float()
            target = patchify(x, self.backbone.patch_size)  # [1, N, K]
            if self.norm_pix_loss:
                mean = target.mean(dim=-1, keepdim=True)
                std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
                pred = pred * std + mean
            hidden = mask.unsqueeze(-1)  # [1, N, 1]
            volumes = {
                "input": x,
                "masked": unpatchify(target.masked_fill(hidden, 0.0), self.backbone.patch_size, grid, x.shape[1]),
                "reconstruction": unpatchify(torch.where(hidden, pred, target), self.backbone.patch_size, grid,
                                             x.shape[1]),
            }
        finally:
            self.train(was_training)
        out = {}
        for key, vol in volumes.items():
            sl = vol[0, 0, :, :, vol.shape[-1] // 2]  # [D, H] = [X, Y]
            out[key] = sl.t().flip(0).clamp(0, 1).unsqueeze(0).cpu()  # [1, Y, X], anterior (+Y) up
        return out

    def visualize(self, batch: dict) -> dict[str, torch.Tensor]:
        """TensorBoard image: input | masked | reconstruction side by side, ``[1, H, 3D + 4]`` in [0, 1]."""
        imgs = self.reconstruct(batch["image"])
        gap = torch.ones_like(imgs["input"][..., :2])
        panel = torch.cat([imgs["input"], gap, imgs["masked"], gap, imgs["reconstruction"]], dim=-1)
        return {"mae/reconstruction": panel}
