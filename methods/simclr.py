"""SimCLR (Chen et al. 2020) for head-CT volumes in three modes, with optional SwinUNETR-style
auxiliary tasks.

Input: ``batch["views"] [B, V, C, D, H, W]`` from :class:`data.views.SimCLRViews`, where views
``2k`` and ``2k + 1`` of a sample are two augmented views of one region. Rows are flattened to
``b * V + v``; every view goes through ``backbone.forward`` (``[N, embed_dim]``) and the projection
head (:class:`models.heads.ProjectionMLP`, ``SIMCLR.PROJ_HIDDEN_DIM -> SIMCLR.PROJ_DIM``); the
NT-Xent loss (:mod:`methods.losses.nt_xent`, temperature ``SIMCLR.TEMPERATURE``) scores each anchor's
positive against every other embedding of the global batch (all ranks, with gradients):

* ``inter`` (V = 2): anchors = both views of every scan; negatives = the views of the other scans.
* ``intra`` (V = 2 * PATCHES_PER_SCAN): anchors = both views of every patch; negatives = the other
  patches of the same scan and every patch of the other scans.
* ``negative_mined`` (V = 4, FMCIB-style): anchors = the two views of the seed-point crop (views 0
  and 1, each the other's positive); negatives = everything else in the global batch: the two
  views of the same scan's distant crop (views 2, 3: the mined negatives) and all views of the
  other scans. Views 2, 3 are candidates only, never anchors.

Auxiliary tasks (SwinUNETR pretraining), off unless their weight is > 0; then ONE forward pass
serves every loss, on views that are first rotated, then masked (as SwinUNETR):

* rotation (``SIMCLR.ROTATION_WEIGHT``): each view is rotated by ``k * 90`` degrees in the axial
  plane (array axes X, Y = input dims D, H; needs ``D == H``), ``k`` uniform in 0..3; a linear head
  on the pooled features predicts ``k`` (cross entropy).
* inpainting (``SIMCLR.INPAINT_WEIGHT``): a fraction ``SIMCLR.INPAINT_MASK_RATIO`` of the blocks of
  each view (ViT: its patches; CNNs: blocks of 1/8 of the crop per axis) is set to 0; a small
  decoder reconstructs the view from ``backbone.forward_features`` (ViT: linear patch decoder
  from the patch tokens; CNN/Swin: transposed-convolution upsampling of the feature map); L1 on the
  dropped voxels only.

``loss = nt_xent + ROTATION_WEIGHT * rotation + INPAINT_WEIGHT * inpaint``. Random rotations and
masks come from the torch RNG of the input's device (seeded per rank by the trainer). Only
``backbone.forward`` / ``forward_features`` are used, so every zoo backbone works; ``backbone.pth``
holds the backbone alone.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.views import simclr_batch_transform, views_per_scan
from data.windows import window_specs
from methods.losses.nt_xent import nt_xent_logits, pair_positives
from models.heads import ProjectionMLP
from models.mae import unpatchify
from models.vit3d import VisionTransformer3D

NUM_ROTATIONS = 4  # k * 90 degrees, k = 0..3
CNN_MASK_BLOCKS = 8  # inpainting blocks per axis of a CNN input (block = crop // 8)


def pool_features(backbone: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """What ``backbone.forward`` returns, from ``forward_features``'s output (one pass for both).

    ViT: ``backbone.pool_tokens(tokens)``; CNN / Swin feature map ``[B, C', d, h, w]``: spatial mean.
    """
    if isinstance(backbone, VisionTransformer3D):
        return backbone.pool_tokens(feats)
    if feats.ndim == 5:
        return feats.mean(dim=(2, 3, 4))
    raise ValueError(f"cannot pool features of shape {tuple(feats.shape)} from {type(backbone).__name__}")


def rotate_axial(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate each volume of ``x [N, C, D, H, W]`` by ``k[n] * 90`` degrees in the (D, H) plane.

    Args:
        x: volumes with ``D == H``.
        k: long ``[N]`` in 0..3.
    """
    if x.shape[2] != x.shape[3]:
        raise ValueError(f"an axial rotation needs D == H; got {tuple(x.shape[2:])}")
    out = torch.empty_like(x)
    for r in range(NUM_ROTATIONS):
        idx = torch.nonzero(k == r).squeeze(1)
        if idx.numel():
            out[idx] = torch.rot90(x[idx], r, dims=(2, 3))
    return out


def block_mask(n: int, size: Sequence[int], block: Sequence[int], ratio: float, device: torch.device
               ) -> torch.Tensor:
    """Random block masks: per volume, ``max(1, round(ratio * G))`` of its ``G`` blocks are dropped.

    Args:
        n: volumes.
        size: ``(D, H, W)``.
        block: block size per axis (the last block of an axis may be cut by the volume's edge).
        ratio: fraction of blocks dropped.
        device: where the noise is drawn (that device's torch RNG).

    Returns:
        float ``[n, 1, D, H, W]``: 1 = dropped, 0 = kept.
    """
    grid = [math.ceil(s / b) for s, b in zip(size, block)]
    g = math.prod(grid)
    drop = min(g, max(1, int(round(ratio * g))))
    idx = torch.argsort(torch.rand(n, g, device=device), dim=1)[:, :drop]  # [n, drop]
    m = torch.zeros(n, g, device=device).scatter_(1, idx, 1.0).view(n, 1, *grid)
    for axis, b in enumerate(block):
        m = m.repeat_interleave(int(b), dim=2 + axis)
    return m[:, :, :size[0], :size[1], :size[2]].contiguous()


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean ``|pred - target|`` over the masked voxels (every channel), float32.

    Args:
        pred, target: ``[N, C, D, H, W]``.
        mask: ``[N, 1, D, H, W]``, 1 = scored.
    """
    err = (pred.float() - target.float()).abs() * mask
    return err.sum() / (mask.sum() * pred.shape[1]).clamp_min(1.0)


class PatchDecoder(nn.Module):
    """ViT inpainting head: patch tokens -> voxels of their patch (one Linear), SwinUNETR-style.

    Args:
        token_dim: width of the tokens.
        patch_size: ``(pd, ph, pw)``.
        channels: C of the input.
        num_prefix_tokens: CLS + registers at the front of the token sequence (dropped).
    """

    def __init__(self, token_dim: int, patch_size: Sequence[int], channels: int, num_prefix_tokens: int) -> None:
        super().__init__()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.channels = int(channels)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.norm = nn.LayerNorm(token_dim, eps=1e-6)
        self.proj = nn.Linear(token_dim, math.prod(self.patch_size) * self.channels)

    def forward(self, tokens: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """``tokens [N, P+L, D]`` -> volume ``[N, C, *size]``."""
        grid = [s // p for s, p in zip(size, self.patch_size)]
        x = self.proj(self.norm(tokens[:, self.num_prefix_tokens:]))  # [N, L, pd*ph*pw*C]
        return unpatchify(x, self.patch_size, grid, self.channels)


class UpsampleDecoder(nn.Module):
    """CNN / Swin inpainting head: ``log2(factor)`` x (ConvTranspose3d x2 -> InstanceNorm -> LeakyReLU),
    halving the channels each time (at least 16), then a 1x1x1 convolution to the C input channels
    and, if the factor is no power of two, a trilinear resize to the input size.

    Args:
        in_channels: channels of the feature map (``backbone.token_dim``).
        factor: input size / feature-map size (smallest over the axes).
        channels: C of the input.
    """

    def __init__(self, in_channels: int, factor: int, channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = int(in_channels)
        for _ in range(max(0, int(round(math.log2(max(1, factor)))))):
            out = max(16, ch // 2)
            layers += [nn.ConvTranspose3d(ch, out, kernel_size=2, stride=2), nn.InstanceNorm3d(out, affine=True),
                       nn.LeakyReLU(0.01, inplace=True)]
            ch = out
        self.up = nn.Sequential(*layers)
        self.out = nn.Conv3d(ch, int(channels), kernel_size=1)

    def forward(self, fmap: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """``fmap [N, C', d, h, w]`` -> volume ``[N, C, *size]``."""
        x = self.out(self.up(fmap))
        if tuple(x.shape[2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)
        return x


class SimCLR(nn.Module):
    """SimCLR objective around any zoo backbone (see the module docstring).

    Args:
        cfg: config (``SIMCLR.*``, ``DATA.ROI`` when ``SIMCLR.CROP_SIZE`` is [], ``DATA.WINDOWS``).
        backbone: a zoo backbone (``self.backbone``; ``forward -> [B, embed_dim]``).
    """

    def __init__(self, cfg: Any, backbone: nn.Module) -> None:
        super().__init__()
        s = cfg.SIMCLR
        self.backbone = backbone
        self.mode = str(s.MODE)
        self.num_views = views_per_scan(self.mode, int(s.PATCHES_PER_SCAN))
        self.anchor_views = 2 if self.mode == "negative_mined" else self.num_views
        self.temperature = float(s.TEMPERATURE)
        self.crop = tuple(int(c) for c in (list(s.CROP_SIZE) or list(cfg.DATA.ROI)))
        self.channels = len(cfg.DATA.WINDOWS)
        self.window_specs = window_specs(list(cfg.DATA.WINDOWS))  # device-stage batches are finished here
        if isinstance(backbone, VisionTransformer3D) and any(c % p for c, p in zip(self.crop, backbone.patch_size)):
            raise ValueError(f"SIMCLR.CROP_SIZE (or DATA.ROI when it is []) = {list(self.crop)} is not divisible by "
                             f"MODEL.PATCH_SIZE = {list(backbone.patch_size)}")
        self.projector = ProjectionMLP(backbone.embed_dim, int(s.PROJ_HIDDEN_DIM), int(s.PROJ_DIM))

        self.rotation_weight = float(s.ROTATION_WEIGHT)
        self.rotation_head: Optional[nn.Linear] = None
        if self.rotation_weight > 0:
            if self.crop[0] != self.crop[1]:
                raise ValueError(f"SIMCLR.ROTATION_WEIGHT > 0 rotates views in the axial (D, H) plane and needs "
                                 f"D == H; SIMCLR.CROP_SIZE (or DATA.ROI) = {list(self.crop)}")
            self.rotation_head = nn.Linear(backbone.embed_dim, NUM_ROTATIONS)

        self.inpaint_weight = float(s.INPAINT_WEIGHT)
        self.mask_ratio = float(s.INPAINT_MASK_RATIO)
        self.inpaint_decoder: Optional[nn.Module] = None
        if self.inpaint_weight > 0:
            if isinstance(backbone, VisionTransformer3D):
                self.mask_block = tuple(backbone.patch_size)
                self.inpaint_decoder = PatchDecoder(backbone.token_dim, backbone.patch_size, self.channels,
                                                    backbone.num_prefix_tokens)
            else:
                self.mask_block = tuple(max(1, c // CNN_MASK_BLOCKS) for c in self.crop)
                self.inpaint_decoder = UpsampleDecoder(backbone.token_dim, self._downsampling(), self.channels)

    @torch.no_grad()
    def _downsampling(self) -> int:
        """Input size / feature-map size of a CNN backbone (one dry run on a zero crop, eval mode)."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            fmap = self.backbone.forward_features(torch.zeros(1, self.channels, *self.crop))
        finally:
            self.backbone.train(was_training)
        return min(c // max(1, f) for c, f in zip(self.crop, fmap.shape[2:]))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``x [N, C, D, H, W]`` -> pooled ``[N, embed_dim]`` and, when inpainting, the features."""
        if self.inpaint_decoder is None:
            return self.backbone(x), None
        feats = self.backbone.forward_features(x)
        return pool_features(self.backbone, feats), feats

    def forward(self, batch: dict) -> dict:
        """``batch["views"] [B, V, C, D, H, W]`` -> ``{"loss", "contrastive", "top1", ...}``.

        ``top1``: fraction of anchors whose positive scores highest among all candidates.
        Under DDP in training the negatives come from every rank; in evaluation (``self.training``
        False) each rank scores its own batch only (ranks may hold different batch counts then).
        A device-stage batch of :class:`data.views.SimCLRViews` (HU views + ``"views_aug"``,
        ``"views_hist"``) is augmented and windowed here first, on the batch's device.
        """
        batch = simclr_batch_transform(batch, self.window_specs)
        views = batch["views"]
        if views.ndim != 6 or views.shape[1] != self.num_views or tuple(views.shape[3:]) != self.crop:
            raise ValueError(f"SimCLR ({self.mode}) expects batch['views'] of shape [B, {self.num_views}, C, "
                             f"{', '.join(map(str, self.crop))}]; got {tuple(views.shape)}")
        b = views.shape[0]
        x = views.flatten(0, 1)  # [N, C, D, H, W], row = b * V + v
        out: dict[str, Any] = {}
        rot = None
        if self.rotation_head is not None:
            rot = torch.randint(0, NUM_ROTATIONS, (x.shape[0],), device=x.device)  # [N]
            x = rotate_axial(x, rot)
        target, mask = x, None
        if self.inpaint_decoder is not None:
            mask = block_mask(x.shape[0], self.crop, self.mask_block, self.mask_ratio, x.device).to(x.dtype)
            x = x * (1.0 - mask)  # dropped blocks = 0
        pooled, feats = self.encode(x)  # [N, E]
        z = self.projector(pooled)  # [N, PROJ_DIM]
        positive = pair_positives(b, self.num_views, self.anchor_views, device=z.device)  # [N]
        logits, tgt = nt_xent_logits(z, positive, self.temperature, gather=self.training)
        contrastive = F.cross_entropy(logits, tgt)
        loss = contrastive
        out["contrastive"] = contrastive.detach()
        out["top1"] = (logits.detach().argmax(dim=1) == tgt).float().mean()
        if rot is not None:
            rot_logits = self.rotation_head(pooled).float()  # [N, 4]
            rot_loss = F.cross_entropy(rot_logits, rot)
            loss = loss + self.rotation_weight * rot_loss
            out["rot_loss"] = rot_loss.detach()
            out["rot_acc"] = (rot_logits.detach().argmax(dim=1) == rot).float().mean()
        if mask is not None:
            rec = self.inpaint_decoder(feats, self.crop)  # [N, C, D, H, W]
            inpaint = masked_l1(rec, target, mask)
            loss = loss + self.inpaint_weight * inpaint
            out["inpaint_loss"] = inpaint.detach()
        out["loss"] = loss
        return out
