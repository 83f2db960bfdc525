"""Alice (Jiang et al., ICCV 2023): self-distillation between views of the same anatomy in two heads,
aligned by cross-attention (CASA), with masked-patch reconstruction.

Batch (from the Alice view, already windowed, both crops the same size)::

    {"query":  [B, C, *ROI]   a crop of scan A around a point p,
     "anchor": [B, C, *ROI]   the same anatomy in scan B (matched through DATA.TEMPLATE), or, where no
                              match exists, another crop of scan A around p,
     "cross":  [B] float32    1 = the anchor comes from another scan, 0 = from the same one}

The student (backbone + heads + CASA + decoder) sees both crops block-masked
(:func:`block_patch_mask`, ``ALICE.MASK_RATIO`` of the patches replaced by the ViT's mask token);
the teacher (EMA copies of backbone, head, CASA and patch head; :class:`methods.dino.SelfDistillation`)
sees them unmasked. The loss is

``dino + ALICE.PATCH_WEIGHT * patch + ALICE.RECON_WEIGHT * recon (+ DINO.KOLEO_WEIGHT * koleo)``:

1. ``dino``: DINO's cross-entropy (:func:`methods.losses.dino.dino_loss`) between the pooled features of
   the student's query and the teacher's anchor, and of the student's anchor and the teacher's query
   (centre ``center``, teacher temperature and momentum schedules from ``DINO.*``).
2. ``patch``: CASA (:class:`models.alice.CrossAttentionBlock`) lets each view's patch tokens attend to the OTHER
   view's patch tokens (query -> anchor and anchor -> query). At every masked position of a view, the
   student's CASA output (masked tokens attending to the other view's masked tokens) through
   ``patch_head`` is matched by iBOT's cross-entropy (:func:`methods.losses.dino.ibot_patch_loss`,
   centre ``patch_center``) to the teacher's CASA output at the same position (the teacher's EMA
   CASA and patch head on the unmasked tokens of both views). The target thus carries what the
   teacher reads of the same anatomy in the other scan, and the student must recover it from
   partial views of both.
3. ``recon``: a light decoder (:class:`models.alice.ReconstructionDecoder`, ``ALICE.DECODER_DIM`` wide,
   ``ALICE.DECODER_DEPTH`` blocks, then a linear layer to patch voxels) on the student's patch tokens;
   MSE on the masked patches to per-patch standardised voxels of the input crop (as MAE's norm-pix loss).
4. ``koleo``: DINOv2's KoLeo on the student's pooled features of each view, when ``DINO.KOLEO_WEIGHT > 0``.

Differences from the paper: the anatomical match comes from registration of each scan to a template
(the view's business) instead of the SAM landmark network, and a failed match falls back to a
same-scan pair (``cross`` = 0, logged as ``cross_fraction``); no multi-crop (two global-size views);
one fixed masking ratio for every student crop; the reconstruction head is this codebase's light
decoder. The two extra terms default to weight 1 (``ALICE.PATCH_WEIGHT``, ``ALICE.RECON_WEIGHT``):
equal weighting of the three terms, the simplest choice, not tuned on head CT; a weight of 0
removes the term's modules (CASA + patch head, or the decoder) so DDP never meets unused parameters.

Backbones with tokens: a ViT (:class:`models.vit3d.VisionTransformer3D`; masking replaces patch tokens by
the mask token; CASA and the decoder work per patch token, pooled = its ``MODEL.POOL``) or Swin
(:class:`models.monai_backbones.SwinEncoder`; a token is one 32^3 block of the last stage, masking replaces the
patch embeddings of a masked block by a mask token before the stages, as SimMIM masks a Swin; pooled = the mean
token, as its ``forward``; the decoder predicts a masked block at 1/4 of its resolution, 8^3 voxels, as a
32^3 x C output per token would make the "light" decoder's last layer the largest part of the model). CNNs
have no tokens and are refused at construction.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.dino import SelfDistillation
from methods.losses.dino import dino_loss, ibot_patch_loss, koleo_loss
from methods.mae import mae_loss
from models.alice import CrossAttentionBlock, ReconstructionDecoder
from models.heads import DINOHead
from models.mae import patchify
from models.vit3d import VisionTransformer3D

# BEiT/iBOT block masking: a block covers at least this many patches, its sides' ratios lie in
# [BLOCK_ASPECT, 1 / BLOCK_ASPECT] (BEiT's min_num_patches = 4 and min_aspect = 0.3)
MIN_BLOCK_PATCHES = 4
BLOCK_ASPECT = 0.3
# candidate blocks drawn per sample; in the rare case that all of them together cover too few
# patches, random patches fill the rest
NUM_BLOCKS = 32


def num_masked(num_patches: int, ratio: float) -> int:
    """Masked patches ``round(ratio * N)``; ValueError unless at least one is masked and one visible."""
    n = int(round(ratio * num_patches))
    if not 0 < n < num_patches:
        raise ValueError(f"ALICE.MASK_RATIO = {ratio} masks {n} of {num_patches} patches; at least one patch "
                         "must be masked and at least one visible")
    return n


def block_patch_mask(batch_size: int, grid: Sequence[int], ratio: float, device: torch.device) -> torch.Tensor:
    """BEiT/iBOT block masking in 3D: per sample, cuboids of patches until ``round(ratio * N)`` are masked.

    Per sample, :data:`NUM_BLOCKS` cuboids are drawn (volume uniform in ``[4, target]`` patches, log-uniform
    side ratios, uniform position) and taken in order while their union stays within the target; the
    first cuboid that would overshoot contributes its new patches in raster order (a contiguous slab)
    up to the target. Every sample gets exactly ``round(ratio * N)`` masked patches. All draws come
    from the torch RNG of ``device`` (seeded per rank by the engine, restored on resume) in a fixed
    number of calls, without host synchronisation.

    Args:
        batch_size: B.
        grid: patch grid ``(gd, gh, gw)``; ``N = gd * gh * gw`` in the ViT's raster order.
        ratio: fraction of the patches masked.
        device: where the mask is drawn.

    Returns:
        ``[B, N]`` bool, True = masked.
    """
    g = torch.tensor([int(s) for s in grid], device=device)  # [3]
    n = math.prod(int(s) for s in grid)
    target = num_masked(n, ratio)
    k = NUM_BLOCKS
    lo, hi = float(MIN_BLOCK_PATCHES), float(max(target, MIN_BLOCK_PATCHES))
    volume = lo + (hi - lo) * torch.rand(batch_size, k, device=device)  # [B, K]
    log_aspect = (2 * torch.rand(batch_size, k, 3, device=device) - 1) * math.log(1 / BLOCK_ASPECT)  # [B, K, 3]
    log_aspect = log_aspect - log_aspect.mean(-1, keepdim=True)  # the three factors multiply to 1
    sides = (volume.log()[..., None] / 3 + log_aspect).exp().round().clamp_min(1)  # [B, K, 3]
    sides = torch.minimum(sides, g.float()).long()
    start = (torch.rand(batch_size, k, 3, device=device) * (g - sides + 1)).long()  # [B, K, 3]
    axes = [torch.arange(int(s), device=device) for s in grid]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(1, 1, n, 3)  # [1, 1, N, 3]
    inside = ((coords >= start[:, :, None]) & (coords < (start + sides)[:, :, None])).all(-1)  # [B, K, N]

    cover = inside.cumsum(1, dtype=torch.int32) > 0  # [B, K, N]: union of the first k + 1 blocks
    n_full = (cover.sum(-1) <= target).sum(1)  # [B]: leading blocks taken whole (union is monotone)
    rows = torch.arange(batch_size, device=device)
    cover = torch.cat([torch.zeros_like(cover[:, :1]), cover], 1)  # [B, K + 1, N]
    mask = cover[rows, n_full]  # [B, N]
    fresh = inside[rows, n_full.clamp(max=k - 1)] & ~mask & (n_full < k)[:, None]  # next block's new patches
    deficit = target - mask.sum(-1)  # [B]
    mask = mask | (fresh & (fresh.cumsum(-1) <= deficit[:, None]))
    deficit = target - mask.sum(-1)  # > 0 only where all K blocks cover fewer than the target
    noise = torch.rand(batch_size, n, device=device) + mask.float()  # masked patches sort last
    rank = noise.argsort(1).argsort(1)
    return mask | (rank < deficit[:, None])


SWIN_RECON_STRIDE = 4  # Swin: a masked 32^3 block is reconstructed at 8^3 (average-pooled by 4 per axis)


def _is_swin(backbone: nn.Module) -> bool:
    from models.monai_backbones import SwinEncoder  # MONAI imports take seconds: only when asked

    return isinstance(backbone, SwinEncoder)


def check_backbone(cfg: Any, backbone: nn.Module) -> None:
    """ValueError naming ``MODEL.NAME`` unless ``backbone`` has tokens Alice can mask: a ViT, or Swin in RAS."""
    if isinstance(backbone, VisionTransformer3D):
        return
    if _is_swin(backbone):
        if backbone.input_orientation != "RAS":
            raise ValueError(f"Alice with MODEL.NAME swin needs MODEL.INPUT_ORIENTATION RAS (its masks follow the "
                             f"data's token grid); got {backbone.input_orientation!r}")
        return
    raise ValueError(
        f"Alice needs a backbone with tokens (MODEL.NAME vit_* or swin); got MODEL.NAME = {cfg.MODEL.NAME!r} "
        f"({type(backbone).__name__}). Its student replaces masked tokens by a mask token and its cross-attention "
        "(CASA) and decoder work on one token per patch or block: the CNNs (segresnet, resnet18, resnet50) have "
        "no tokens")


def encode(backbone: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor] = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features ``[n, E]`` and patch tokens ``[n, N, D]`` of a ViT or Swin (``mask [n, N]``: True = hidden)."""
    if isinstance(backbone, VisionTransformer3D):
        tokens = backbone.forward_features(x) if mask is None else backbone.forward_features(x, mask=mask)
        return backbone.pool_tokens(tokens), tokens[:, backbone.num_prefix_tokens:]  # [n, E], [n, N, D]
    patches = backbone.forward_tokens(x, mask)  # [n, N, D]
    return patches.mean(dim=1), patches


class Alice(SelfDistillation):
    """Alice objective; ``Alice(cfg, backbone)``. See the module docstring for what it computes.

    Batch: ``{"query": [B, C, *ROI], "anchor": [B, C, *ROI], "cross": [B]}``. Returns ``{"loss",
    "dino_loss", "teacher_entropy", "kl", "teacher_temp", "momentum"}`` plus ``"patch_loss"`` /
    ``"recon_loss"`` when their weights are > 0, ``"koleo"`` when ``DINO.KOLEO_WEIGHT > 0`` and
    ``"cross_fraction"`` (mean of ``batch["cross"]``) when the batch has it.

    State (``state_dict``): ``backbone.*`` (with ``backbone.mask_token``), ``head.*``, ``casa.*``,
    ``patch_head.*``, ``decoder.*`` (student), ``teacher.backbone.*``, ``teacher.head.*``,
    ``teacher.casa.*``, ``teacher.patch_head.*``, ``center``, ``patch_center``, ``center_ready``
    (CASA, patch head, their teacher copies and ``patch_center`` only with ``ALICE.PATCH_WEIGHT > 0``;
    the decoder only with ``ALICE.RECON_WEIGHT > 0``). Schedules follow the global iteration, which
    the engine checkpoints. ``backbone.pth`` is the teacher backbone; its ``mask_token`` entry is
    reported as unexpected, and skipped, by :func:`models.zoo.load_pretrained` into a backbone built without one.

    Args:
        cfg: config (``ALICE.*``, ``DINO.*`` for heads, temperatures, momentum, centre, freeze and
            KoLeo, ``TRAIN.EPOCHS``, ``DATA.ROI``, ``MODEL.NAME`` for messages).
        backbone: a :class:`models.vit3d.VisionTransformer3D` or :class:`models.monai_backbones.SwinEncoder`;
            a mask token is added when it has none (zeros, as the ViT creates it), so the student can mask
            without ``DINO.IBOT_WEIGHT``.
    """

    def __init__(self, cfg: Any, backbone: nn.Module) -> None:
        super().__init__()
        check_backbone(cfg, backbone)
        d, a = cfg.DINO, cfg.ALICE
        swin = not isinstance(backbone, VisionTransformer3D)  # check_backbone let only a ViT or Swin through
        if backbone.mask_token is None:  # zeros, as the ViT creates its own; Swin's masks its patch embeddings
            ref = next(backbone.parameters())
            shape = (1, backbone.feature_size, 1, 1, 1) if swin else (1, 1, backbone.token_dim)
            backbone.mask_token = nn.Parameter(torch.zeros(shape, device=ref.device, dtype=ref.dtype))
        self.backbone = backbone
        # Swin: tokens of 32^3 blocks, reconstructed at 8^3; ViT: its patches, reconstructed whole
        self.patch_size = (32, 32, 32) if swin else tuple(backbone.patch_size)
        self.recon_stride = SWIN_RECON_STRIDE if swin else 1
        casa_heads = backbone.token_dim // 64 if swin else backbone.num_heads
        self.mask_ratio = float(a.MASK_RATIO)
        self.patch_weight = float(a.PATCH_WEIGHT)
        self.recon_weight = float(a.RECON_WEIGHT)
        self.koleo_weight = float(d.KOLEO_WEIGHT)
        try:
            grid = backbone.grid_size(cfg.DATA.ROI)
        except ValueError as e:
            raise ValueError(f"DATA.ROI = {list(cfg.DATA.ROI)}: {e}") from None
        num_masked(math.prod(grid), self.mask_ratio)  # fail at build time, naming ALICE.MASK_RATIO

        def dino_head(in_dim: int) -> DINOHead:
            return DINOHead(in_dim, int(d.OUT_DIM), int(d.HEAD_HIDDEN_DIM), int(d.HEAD_BOTTLENECK_DIM),
                            norm_last_layer=bool(d.NORM_LAST_LAYER), use_bn=bool(d.HEAD_BN))

        self.head = dino_head(backbone.embed_dim)
        with_teacher = ["backbone", "head"]
        if self.patch_weight > 0:
            self.casa = CrossAttentionBlock(backbone.token_dim, casa_heads)
            self.patch_head = dino_head(backbone.token_dim)
            with_teacher += ["casa", "patch_head"]
        if self.recon_weight > 0:
            self.decoder = ReconstructionDecoder(backbone.token_dim, int(a.DECODER_DIM), int(a.DECODER_DEPTH),
                                                 [p // self.recon_stride for p in self.patch_size],
                                                 backbone.in_chans, grid)
        self._make_teacher(with_teacher)
        self._register_centers(int(d.OUT_DIM), patch=self.patch_weight > 0)
        self._init_schedules(cfg)

    @staticmethod
    def _aligned(casa: nn.Module, patches: torch.Tensor) -> torch.Tensor:
        """CASA across the two views: ``patches [2B, N, D]`` (queries, then anchors) -> ``[2B, N, D]``,
        each query crop's tokens attending to its anchor's and each anchor's to its query's."""
        q, a = patches.chunk(2)  # [B, N, D] each
        return casa(patches, torch.cat([a, q]))

    def forward(self, batch: dict) -> dict:
        """``{"query": [B, C, *ROI], "anchor": [B, C, *ROI], "cross": [B]}`` -> loss and monitors."""
        xq, xa = batch["query"], batch["anchor"]
        if xq.ndim != 5 or xq.shape != xa.shape:
            raise ValueError(f"Alice expects batch['query'] and batch['anchor'] of one shape [B, C, D, H, W]; got "
                             f"{tuple(xq.shape)} and {tuple(xa.shape)}")
        b = xq.shape[0]
        x = torch.cat([xq, xa])  # [2B, C, D, H, W]: query crops, then anchor crops
        grid = self.backbone.grid_size(x.shape[2:])
        use_patch = self.patch_weight > 0

        with torch.no_grad():
            t_feat, t_patches = encode(self.teacher["backbone"], x)  # [2B, E], [2B, N, D]
            t_logits = self.teacher["head"](t_feat).float()  # [2B, K]
            if use_patch:
                t_aligned = self._aligned(self.teacher["casa"], t_patches)  # [2B, N, D]
                t_patch = self.teacher["patch_head"](t_aligned).float()  # [2B, N, K]

        mask = block_patch_mask(2 * b, grid, self.mask_ratio, x.device)  # [2B, N]
        s_feat, s_patches = encode(self.backbone, x, mask)  # [2B, E], [2B, N, D]
        k = t_logits.shape[-1]
        student = self.head(s_feat).float().reshape(2, b, k)  # [2, B, K]: query, anchor
        # dino_loss skips the (i, i) pairs: student query vs teacher anchor, student anchor vs teacher query
        loss, monitors = dino_loss(student, t_logits.reshape(2, b, k), self.center, self.student_temp,
                                   self.teacher_temp)
        out = {"dino_loss": loss.detach()}
        total = loss
        if use_patch:
            s_patch = self.patch_head(self._aligned(self.casa, s_patches))  # [2B, N, K]
            patch = ibot_patch_loss(s_patch, t_patch, mask, self.patch_center, self.student_temp, self.teacher_temp)
            total = total + self.patch_weight * patch
            out["patch_loss"] = patch.detach()
        if self.recon_weight > 0:
            pred = self.decoder(s_patches, grid)  # [2B, N, (pd*ph*pw / stride^3) * C]
            target = x if self.recon_stride == 1 else F.avg_pool3d(x, self.recon_stride)
            recon = mae_loss(pred, patchify(target, [p // self.recon_stride for p in self.patch_size]), mask,
                             norm_pix=True)
            total = total + self.recon_weight * recon
            out["recon_loss"] = recon.detach()
        if self.koleo_weight > 0:
            koleo = torch.stack([koleo_loss(f) for f in s_feat.reshape(2, b, -1)]).mean()
            total = total + self.koleo_weight * koleo
            out["koleo"] = koleo.detach()
        self._update_centers(t_logits, t_patch if use_patch else None)
        out.update(monitors)
        out.update({"loss": total, "teacher_temp": self.teacher_temp, "momentum": self.momentum})
        if "cross" in batch:
            out["cross_fraction"] = batch["cross"].detach().float().mean()
        return out
