"""DINO's losses (Caron et al. 2021; Oquab et al. 2023): the CLS-token self-distillation
cross-entropy, iBOT's masked-patch loss and the KoLeo regulariser. Each works on plain tensors."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dino_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
              student_temp: float, teacher_temp: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DINO cross-entropy over all (teacher global crop, other student crop) pairs.

    ``p_t = softmax((t - center) / teacher_temp)``, ``log p_s = log_softmax(s / student_temp)``;
    the loss averages ``-sum_k p_t log p_s`` over the batch and over the pairs ``(i, v)`` with
    ``v != i`` (a global crop is never compared with itself).

    Args:
        student_logits: ``[S, B, K]``: student crops, the G global ones first (same order as the
            teacher's), then the local ones.
        teacher_logits: ``[G, B, K]`` (no gradient needed).
        center: ``[1, K]`` or ``[K]``.
        student_temp: student temperature.
        teacher_temp: teacher temperature.

    Returns:
        ``loss`` (0-d float32) and detached monitors ``{"teacher_entropy", "kl"}`` (mean entropy of
        ``p_t``; mean KL(p_t || p_s) over the same pairs).
    """
    if student_logits.ndim != 3 or teacher_logits.ndim != 3:
        raise ValueError(f"expected student [S, B, K] and teacher [G, B, K] logits; got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    s_n, b, k = student_logits.shape
    g = teacher_logits.shape[0]
    if teacher_logits.shape[1:] != (b, k) or s_n < 2 or g > s_n:
        raise ValueError(f"student logits {tuple(student_logits.shape)} do not match teacher logits "
                         f"{tuple(teacher_logits.shape)} (need S >= 2, S >= G, same B and K)")
    # float32 throughout: under autocast the einsum (a batched matrix product) would run in bf16
    # and round the loss to 1/16 near log(65536) = 11, and the kl monitor with it
    with torch.autocast(student_logits.device.type, enabled=False):
        t = F.softmax((teacher_logits.float() - center.float().reshape(1, 1, k)) / teacher_temp, dim=-1)  # [G,B,K]
        log_s = F.log_softmax(student_logits.float() / student_temp, dim=-1)  # [S, B, K]
        ce = -torch.einsum("gbk,sbk->gs", t, log_s) / b  # [G, S] mean over the batch
    pairs = torch.ones(g, s_n, dtype=torch.bool, device=ce.device)
    pairs[torch.arange(g), torch.arange(g)] = False  # skip (global i, same global i)
    loss = ce[pairs].mean()
    with torch.no_grad():
        ent = -(t * torch.log(t.clamp_min(1e-30))).sum(-1)  # [G, B]
        kl = loss.detach() - (ent.mean(1, keepdim=True).expand(g, s_n)[pairs]).mean()  # CE = H(t) + KL
    return loss, {"teacher_entropy": ent.mean(), "kl": kl}


def ibot_patch_loss(student_patch_logits: torch.Tensor, teacher_patch_logits: torch.Tensor,
                    mask: torch.Tensor, center: torch.Tensor, student_temp: float, teacher_temp: float
                    ) -> torch.Tensor:
    """iBOT masked-token loss: teacher (unmasked view) vs student (masked view) on masked patches.

    Per image, the cross-entropy is averaged over its masked patches; then over images.

    Args:
        student_patch_logits: ``[B, N, K]`` of the masked student crops.
        teacher_patch_logits: ``[B, N, K]`` of the same crops, unmasked, seen by the teacher.
        mask: ``[B, N]`` bool, True = masked in the student's input.
        center: ``[1, 1, K]`` patch-token centre.
        student_temp: student temperature.
        teacher_temp: teacher temperature.
    """
    t = F.softmax((teacher_patch_logits.float() - center.float()) / teacher_temp, dim=-1)
    log_s = F.log_softmax(student_patch_logits.float() / student_temp, dim=-1)
    ce = -(t * log_s).sum(-1)  # [B, N]
    m = mask.float()
    per_image = (ce * m).sum(1) / m.sum(1).clamp_min(1.0)  # [B]
    return per_image.mean()


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser (DINOv2): ``-mean log(distance to the nearest neighbour)`` of L2-normalised rows.

    Args:
        features: ``[B, D]`` (B >= 2; returns 0 for B < 2).
    """
    if features.shape[0] < 2:
        return features.sum() * 0.0
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        sim = x @ x.t()  # [B, B]
        sim.fill_diagonal_(-2.0)
        nn_idx = sim.argmax(dim=1)  # [B]
    d = F.pairwise_distance(x, x[nn_idx], eps=eps)  # [B]
    return -torch.log(d + eps).mean()
