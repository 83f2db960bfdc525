"""Supervised classification on a backbone: fine-tuning, linear probing, few-shot.

The method (:class:`Classifier`) is what the trainer runs: a backbone plus a head
(:class:`models.heads.LinearClassifier` on pooled features or
:class:`models.heads.AttentiveClassifier` over all tokens / the CNN feature map), one sigmoid
output per label and a masked binary cross-entropy (a blank label excludes that sample for that
label only), with ``pos_weight = n_neg / n_pos`` per label when asked.

With a frozen backbone (linear probing) the freezing is enforced, not hoped for: every backbone
parameter has ``requires_grad=False`` (the optimizer and DDP never see them), the backbone stays in
eval mode (BatchNorm statistics and dropout frozen) even while the method trains, a step raises
when a backbone parameter requires or receives a gradient, and :meth:`Classifier.check_frozen`
compares a SHA-256 of the backbone's whole state dict (parameters and buffers) with the one taken
at construction.

The downstream job (``downstream/run.py``) trains it; its sampler is in :mod:`engine.samplers`, its
validation scorer in :mod:`evaluation.scoring`, the logistic probe on cached features in
:mod:`evaluation.probe`.
"""
from __future__ import annotations

import hashlib
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine import dist
from models.heads import AttentiveClassifier, LinearClassifier

# ---------------------------------------------------------------------------------------------
# loss and class balance
def masked_bce(logits: torch.Tensor, target: torch.Tensor, pos_weight: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
    """Binary cross-entropy over the labelled entries only.

    Args:
        logits: ``[B, L]``.
        target: ``[B, L]`` 1 / 0, NaN = blank (that entry does not count).
        pos_weight: ``[L]`` weight of the positive term per label (None = 1).

    Returns:
        Scalar: the mean over labelled entries (0, still attached to the graph, when there is none).
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(target.shape)} differ in shape")
    known = ~torch.isnan(target)  # [B, L]
    t = torch.where(known, target, torch.zeros_like(target)).to(logits.dtype)
    pw = pos_weight.to(device=logits.device, dtype=logits.dtype) if pos_weight is not None else None
    per = F.binary_cross_entropy_with_logits(logits, t, pos_weight=pw, reduction="none")  # [B, L]
    k = known.to(per.dtype)
    return (per * k).sum() / k.sum().clamp_min(1.0)


def label_counts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positives and negatives per label column of ``labels [N, L]`` (NaN = blank, not counted)."""
    y = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)
    return (y == 1).sum(axis=0), (y == 0).sum(axis=0)


def compute_pos_weight(labels: np.ndarray, label_names: Sequence[str]) -> torch.Tensor:
    """``n_neg / n_pos`` per label from the training labels.

    Args:
        labels: ``[N, L]`` training targets (NaN = blank).
        label_names: the L names (for the error message).

    Raises:
        ValueError: naming the label when it has no positive or no negative training sample.
    """
    pos, neg = label_counts(labels)
    for name, p, n in zip(label_names, pos, neg):
        if p == 0 or n == 0:
            raise ValueError(f"label {name!r} has {int(p)} positive and {int(n)} negative training samples; "
                             "a classifier needs both (check DOWNSTREAM.LABELS and DATA.TRAIN_CSV)")
    return torch.as_tensor(neg / pos, dtype=torch.float32)


def backbone_checksum(module: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of every tensor of ``module.state_dict()``."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FrozenBackboneError(RuntimeError):
    """A backbone that linear probing must keep frozen requires, received or changed a gradient."""


# ---------------------------------------------------------------------------------------------
# the method
class Classifier(nn.Module):
    """Backbone + classification head trained with a masked BCE; a method for the trainer.

    Args:
        backbone: a zoo backbone (``embed_dim``, ``token_dim``, ``forward``, ``forward_features``).
        label_names: the L labels (one sigmoid output each).
        head: 'linear' (:class:`LinearClassifier` on pooled features) or 'attentive'
            (:class:`AttentiveClassifier` over all tokens / the CNN feature map).
        freeze_backbone: linear probing: the backbone is frozen and kept in eval mode.
        pos_weight: ``[L]`` positive-class weights of the loss (None = unweighted).
        head_lr_scale: lr multiplier of the head when the backbone trains too.
    """

    def __init__(self, backbone: nn.Module, label_names: Sequence[str], head: str = "linear",
                 freeze_backbone: bool = False, pos_weight: Optional[torch.Tensor] = None,
                 head_lr_scale: float = 1.0) -> None:
        super().__init__()
        self.label_names = [str(n) for n in label_names]
        if not self.label_names:
            raise ValueError("a classifier needs at least one label")
        n = len(self.label_names)
        self.backbone = backbone
        self.head_type = head
        if head == "linear":
            self.head = LinearClassifier(backbone.embed_dim, n)
        elif head == "attentive":
            self.head = AttentiveClassifier(getattr(backbone, "token_dim", backbone.embed_dim), n)
        else:
            raise ValueError(f"DOWNSTREAM.HEAD = {head!r}; expected 'linear' or 'attentive'")
        self.frozen = bool(freeze_backbone)
        self.head_lr_scale = float(head_lr_scale)
        if pos_weight is not None:
            pos_weight = torch.as_tensor(pos_weight, dtype=torch.float32).reshape(n)
        # derived from the training labels at construction, so not part of the saved state
        self.register_buffer("pos_weight", pos_weight, persistent=False)
        self.frozen_checksum = ""
        if self.frozen:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            self.backbone.eval()
            self.frozen_checksum = backbone_checksum(self.backbone)

    # ------------------------------------------------------------------ modes and hooks
    def train(self, mode: bool = True) -> "Classifier":
        """Set the training mode; a frozen backbone stays in eval mode (BatchNorm stats, dropout)."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def lr_scales(self) -> dict[str, float]:
        """Head lr = backbone lr * DOWNSTREAM.HEAD_LR_SCALE when fine-tuning (only the head trains otherwise)."""
        return {} if self.frozen else {"head.": self.head_lr_scale}

    def _assert_no_backbone_grad(self, where: str) -> None:
        for name, p in self.backbone.named_parameters():
            if p.requires_grad:
                raise FrozenBackboneError(f"{where}: backbone parameter {name} requires grad although the "
                                          "backbone is frozen (linear probing)")
            if p.grad is not None:
                raise FrozenBackboneError(f"{where}: backbone parameter {name} received a gradient although "
                                          "the backbone is frozen (linear probing)")

    def on_step_start(self, it: int, epoch: int, total_iters: int) -> None:
        """Trainer hook: a frozen backbone must not require grad."""
        if self.frozen:
            self._assert_no_backbone_grad(f"iteration {it}")

    def on_after_backward(self, epoch: int) -> None:
        """Trainer hook: a frozen backbone must not have received a gradient."""
        if self.frozen:
            self._assert_no_backbone_grad(f"epoch {epoch} after backward")

    def check_frozen(self) -> None:
        """Raise :class:`FrozenBackboneError` unless a frozen backbone is bit-identical to its start."""
        if not self.frozen:
            return
        self._assert_no_backbone_grad("check")
        now = backbone_checksum(self.backbone)
        if now != self.frozen_checksum:
            raise FrozenBackboneError("the frozen backbone changed during linear probing (state-dict SHA-256 "
                                      f"{self.frozen_checksum[:12]} at the start, {now[:12]} now)")

    # ------------------------------------------------------------------ forward
    def _backbone_out(self, x: torch.Tensor) -> torch.Tensor:
        if self.head_type == "attentive":
            return self.backbone.forward_features(x)  # ViT [B, T, D] | CNN [B, C', d, h, w]
        return self.backbone(x)  # [B, embed_dim]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the head sees: pooled features ``[B, embed_dim]`` (linear head) or tokens / feature map."""
        if self.frozen:
            with torch.no_grad():
                return self._backbone_out(x)
        try:
            return self._backbone_out(x)
        except ValueError as e:
            if "Expected more than 1 value per channel" in str(e):
                raise ValueError(
                    f"{type(self.backbone).__name__} cannot train its BatchNorm on a batch of {x.shape[0]} "
                    f"input(s) of size {list(x.shape[2:])}: a feature map holds one value per channel. Raise "
                    "DATA.BATCH_SIZE above 1, use a larger DATA.ROI, or DOWNSTREAM.MODE linear (BatchNorm "
                    "statistics frozen)") from e
            raise

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, D, H, W]`` -> ``[B, L]`` logits."""
        return self.head(self.features(x))

    def forward(self, batch: dict) -> dict:
        """``batch["image"] [B, C, D, H, W]``, ``batch["label"] [B, L]`` (NaN = blank) -> ``{"loss", "labelled"}``."""
        if "label" not in batch:
            raise ValueError("the batch has no 'label': read the manifests with DOWNSTREAM.LABELS as label columns")
        logits = self.logits(batch["image"]).float()  # [B, L]
        target = batch["label"].float()
        loss = masked_bce(logits, target, self.pos_weight)
        return {"loss": loss, "labelled": (~torch.isnan(target)).float().mean().detach()}


def build_classifier(cfg: Any, backbone: nn.Module, train_labels: np.ndarray, frozen: bool) -> Classifier:
    """The :class:`Classifier` a config asks for.

    Args:
        cfg: config (DOWNSTREAM.LABELS, DOWNSTREAM.HEAD, DOWNSTREAM.IMBALANCE, DOWNSTREAM.HEAD_LR_SCALE).
        backbone: the (pretrained) backbone.
        train_labels: ``[N, L]`` training targets (pos_weight and the both-classes check).
        frozen: linear probing.
    """
    names = list(cfg.DOWNSTREAM.LABELS)
    pos_weight = compute_pos_weight(train_labels, names)  # also checks both classes are present
    return Classifier(backbone, names, head=cfg.DOWNSTREAM.HEAD, freeze_backbone=frozen,
                      pos_weight=pos_weight if cfg.DOWNSTREAM.IMBALANCE == "pos_weight" else None,
                      head_lr_scale=cfg.DOWNSTREAM.HEAD_LR_SCALE)


@torch.no_grad()
def average_buffers(method: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) of the trained parts over ranks.

    DDP does not sync buffers at each forward (``engine.trainer.wrap_ddp``), so each rank's running
    statistics follow its own
    batches; averaging them before every evaluation makes every rank's model (and the saved one)
    the same. A frozen backbone's buffers are identical already and are left untouched.
    """
    world = dist.get_world_size()
    if world == 1:
        return
    frozen_prefix = getattr(method, "backbone_prefix", "backbone.")  # methods.segment.Segmenter: 'net.encoder.'
    for name, buf in method.named_buffers():
        if not buf.is_floating_point() or name == "pos_weight" or (method.frozen and name.startswith(frozen_prefix)):
            continue
        dist.all_reduce_sum(buf)
        buf.div_(world)
