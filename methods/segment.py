"""Supervised segmentation with a pretrained encoder inside a decoder: fine-tuning or a frozen encoder.

:class:`Segmenter` is what the trainer runs: a :mod:`models.segmenters` network, MONAI's ``DiceCELoss``
(soft Dice over the foreground classes plus cross-entropy over all, the Dice pooled over the batch so that
a crop without a lesion does not make the loss jump) wrapped in ``DeepSupervisionLoss`` when the decoder
returns deep outputs (SegResNetDS). With a frozen encoder (``DOWNSTREAM.MODE linear``) the freezing is
enforced as for classification (:mod:`methods.classify`): no encoder parameter requires or receives a
gradient, the encoder stays in eval mode, and a SHA-256 of its state dict is checked after training.
"""
from __future__ import annotations

import torch
from torch import nn

from methods.classify import FrozenBackboneError, backbone_checksum


def build_loss(deep: bool) -> nn.Module:
    """``DiceCELoss`` (softmax, one-hot targets, background left out of the Dice, batch Dice); deep supervision
    (``DeepSupervisionLoss``, weights halving per level, targets resized by nearest neighbour) when ``deep``."""
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    loss = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    return DeepSupervisionLoss(loss, weight_mode="exp") if deep else loss


class Segmenter(nn.Module):
    """A segmentation network trained with Dice + cross-entropy; a method for the trainer.

    Args:
        net: a :mod:`models.segmenters` network (``net.encoder`` the zoo backbone).
        num_classes: output channels (classes + background).
        freeze_encoder: keep the encoder frozen (weights, BatchNorm statistics) and train the decoder.
        decoder_lr_scale: lr multiplier of the decoder when the encoder trains too
            (``DOWNSTREAM.HEAD_LR_SCALE``: the decoder starts from scratch).
    """

    backbone_prefix = "net.encoder."

    def __init__(self, net: nn.Module, num_classes: int, freeze_encoder: bool = False,
                 decoder_lr_scale: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.num_classes = int(num_classes)
        self.frozen = bool(freeze_encoder)
        self.decoder_lr_scale = float(decoder_lr_scale)
        self.loss_fn = build_loss(deep=getattr(net, "dsdepth", 1) > 1)
        self.frozen_checksum = ""
        if self.frozen:
            for p in self.net.encoder.parameters():
                p.requires_grad_(False)
            self.net.encoder.eval()
            self.frozen_checksum = backbone_checksum(self.net.encoder)

    @property
    def backbone(self) -> nn.Module:
        """The encoder (what ``backbone.pth`` holds; ``engine.monitor.exported_backbone``)."""
        return self.net.encoder

    def train(self, mode: bool = True) -> "Segmenter":
        """Set the training mode; a frozen encoder stays in eval mode."""
        super().train(mode)
        if self.frozen:
            self.net.encoder.eval()
        return self

    def lr_scales(self) -> dict[str, float]:
        """Decoder lr = encoder lr * DOWNSTREAM.HEAD_LR_SCALE when fine-tuning."""
        if self.frozen:
            return {}
        return {f"net.{name}.": self.decoder_lr_scale for name, _ in self.net.named_children() if name != "encoder"}

    def _assert_no_encoder_grad(self, where: str) -> None:
        for name, p in self.net.encoder.named_parameters():
            if p.requires_grad or p.grad is not None:
                raise FrozenBackboneError(f"{where}: encoder parameter {name} "
                                          f"{'requires' if p.requires_grad else 'received'} a gradient although the "
                                          "encoder is frozen (DOWNSTREAM.MODE linear)")

    def on_step_start(self, it: int, epoch: int, total_iters: int) -> None:
        """Trainer hook: a frozen encoder must not require grad."""
        if self.frozen:
            self._assert_no_encoder_grad(f"iteration {it}")

    def on_after_backward(self, epoch: int) -> None:
        """Trainer hook: a frozen encoder must not have received a gradient."""
        if self.frozen:
            self._assert_no_encoder_grad(f"epoch {epoch} after backward")

    def check_frozen(self) -> None:
        """Raise :class:`FrozenBackboneError` unless a frozen encoder is bit-identical to its start."""
        if not self.frozen:
            return
        self._assert_no_encoder_grad("check")
        now = backbone_checksum(self.net.encoder)
        if now != self.frozen_checksum:
            raise FrozenBackboneError(f"the frozen encoder changed during training (state-dict SHA-256 "
                                      f"{self.frozen_checksum[:12]} at the start, {now[:12]} now)")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, D, H, W]`` -> ``[B, K + 1, D, H, W]`` (the full-resolution output only)."""
        out = self.net(x)
        return out[0] if isinstance(out, (list, tuple)) else out

    def forward(self, batch: dict) -> dict:
        """``batch["image"] [B, C, *ROI]``, ``batch["target"] [B, 1, *ROI]`` (class indices) -> ``{"loss", "fg"}``."""
        if "target" not in batch:
            raise ValueError("the batch has no 'target': segmentation reads the manifests' mask_path "
                             "(data.views.segment.SegmentView)")
        try:
            out = self.net(batch["image"])
        except ValueError as e:
            if "Expected more than 1 value per channel" in str(e):
                raise ValueError(f"{type(self.net.encoder).__name__} cannot train its BatchNorm on a batch of "
                                 f"{batch['image'].shape[0]} crop(s) of {list(batch['image'].shape[2:])}: its deepest "
                                 "feature map holds one value per channel. Raise DATA.BATCH_SIZE above 1, use a larger "
                                 "DATA.ROI, or DOWNSTREAM.MODE linear (BatchNorm statistics frozen)") from e
            raise
        target = batch["target"].float()  # DeepSupervisionLoss resizes it (nearest), which needs floats
        if isinstance(out, (list, tuple)):
            loss = self.loss_fn([o.float() for o in out], target)
        else:
            loss = self.loss_fn(out.float(), target)
        return {"loss": loss, "fg": (target > 0).float().mean().detach()}


def build_segmentation_method(cfg, encoder: nn.Module, frozen: bool) -> Segmenter:
    """The :class:`Segmenter` a config asks for (DOWNSTREAM.SEG_CLASSES, SEG_DECODER_WIDTH, HEAD_LR_SCALE)."""
    from models.segmenters import build_segmenter

    k = len(cfg.DOWNSTREAM.SEG_CLASSES) + 1
    net = build_segmenter(encoder, k, int(cfg.DOWNSTREAM.SEG_DECODER_WIDTH))
    return Segmenter(net, k, freeze_encoder=frozen, decoder_lr_scale=cfg.DOWNSTREAM.HEAD_LR_SCALE)

