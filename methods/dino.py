"""DINO self-distillation (Caron et al. 2021) for head-CT volumes, with optional DINOv2 extras.

Student = backbone + :class:`models.heads.DINOHead`; teacher = a deep copy of both, updated only
as an exponential moving average (EMA) of the student after each optimizer step. The student sees
every crop of :class:`data.views.DINOViews` (global crops at ``DATA.ROI``, local crops at
``DINO.LOCAL_CROP_SIZE``: a ViT interpolates its position embedding for the smaller grid, a CNN
takes any size), the teacher only the global ones. The loss is the cross-entropy between the
centred, sharpened teacher distribution of each global crop and the student distribution of
every other crop.

What the reference head-CT DINO got wrong and this file gets right:

* teacher momentum, teacher temperature and weight decay follow the GLOBAL iteration (the
  engine passes it to :meth:`DINO.on_step_start`); nothing restarts per epoch;
* the centre is a registered buffer, updated with the batch mean all-reduced over ranks, and
  only in training (``self.training``): validation leaves it alone;
* the teacher is never trained nor synchronised by DDP: its parameters have
  ``requires_grad=False``, and DDP reduces only parameters that require a gradient
  (public behaviour; no private ignore list); DDP's one broadcast at start-up
  (:func:`engine.trainer.wrap_ddp`) copies rank 0's teacher and centres, which every rank already
  holds (the engine seeds the model init identically), and the EMA follows the DDP-averaged
  student, so the teacher stays identical on every rank;
* the checkpoint (``state_dict``) holds student, teacher and centre, so resume is exact;
  ``backbone.pth`` is the TEACHER backbone (:meth:`DINO.exported_backbone`);
* weight decay spares norms, biases, tokens and position embeddings (engine parameter groups).

Monitoring scalars of every step: ``teacher_entropy`` (mean entropy of the teacher distribution:
collapse shows as a fall to 0 or a stay at ``log(OUT_DIM)``), ``kl`` (teacher || student),
``teacher_temp``, ``momentum``. :class:`KNNMonitor` adds a k-NN AUROC of frozen teacher features
on a labelled validation set.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.views import dino_batch_transform
from data.windows import window_specs
from engine import dist
from engine.schedules import cosine, linear_warmup
from models.heads import DINOHead
from models.vit3d import VisionTransformer3D

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- losses
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


def random_patch_mask(batch_size: int, num_patches: int, ratio_range: Sequence[float],
                      device: torch.device) -> torch.Tensor:
    """iBOT masks: per sample a ratio ~ U(ratio_range) of the patches (at least one), at random.

    Draws from the torch RNG of ``device`` (seeded per rank by the engine; restored on resume).

    Returns:
        ``[B, N]`` bool, True = masked.
    """
    lo, hi = float(ratio_range[0]), float(ratio_range[1])
    ratios = lo + (hi - lo) * torch.rand(batch_size, device=device)  # [B]
    n_mask = (ratios * num_patches).round().clamp(1, num_patches).long()  # [B]
    rank = torch.argsort(torch.rand(batch_size, num_patches, device=device), dim=1).argsort(dim=1)  # [B, N]
    return rank < n_mask[:, None]


# --------------------------------------------------------------------------------------- method
class DINO(nn.Module):
    """DINO objective; ``DINO(cfg, backbone)``.

    Batch: ``{"global": [B, G, C, *ROI], "local": [B, L, C, *local]}`` (from
    :class:`data.views.DINOViews`; its device-stage form is windowed in :meth:`forward`).
    Returns ``{"loss", "dino_loss", "teacher_entropy", "kl",
    "teacher_temp", "momentum"}`` plus ``"ibot_loss"`` / ``"koleo"`` when enabled.

    State (``state_dict``): ``backbone.*``, ``head.*`` (student), ``teacher.backbone.*``,
    ``teacher.head.*``, ``center``, ``center_ready`` (and ``ibot_head.*``, ``teacher.ibot_head.*``,
    ``patch_center`` with iBOT). Schedules are functions of the global iteration, which the
    engine checkpoints; nothing else is needed to resume.

    Args:
        cfg: config (``DINO.*``, ``TRAIN.EPOCHS``).
        backbone: any zoo backbone (``self.backbone``, the student's); iBOT needs a ViT built with
            a mask token (``build_backbone`` does that when ``DINO.IBOT_WEIGHT > 0``).
    """

    def __init__(self, cfg: Any, backbone: nn.Module) -> None:
        super().__init__()
        d = cfg.DINO
        self.backbone = backbone
        self.head = DINOHead(backbone.embed_dim, int(d.OUT_DIM), int(d.HEAD_HIDDEN_DIM), int(d.HEAD_BOTTLENECK_DIM),
                             norm_last_layer=bool(d.NORM_LAST_LAYER), use_bn=bool(d.HEAD_BN))
        self.ibot_weight = float(d.IBOT_WEIGHT)
        self.koleo_weight = float(d.KOLEO_WEIGHT)
        self.ibot_mask_ratio = tuple(float(r) for r in d.IBOT_MASK_RATIO)
        if self.ibot_weight > 0:
            if not isinstance(backbone, VisionTransformer3D) or backbone.mask_token is None:
                raise ValueError(f"DINO.IBOT_WEIGHT = {self.ibot_weight} needs a ViT backbone with a mask token "
                                 f"(MODEL.NAME vit_*, built by models.zoo.build_backbone); got "
                                 f"{type(backbone).__name__}")
            self.ibot_head = DINOHead(backbone.token_dim, int(d.OUT_DIM), int(d.HEAD_HIDDEN_DIM),
                                      int(d.HEAD_BOTTLENECK_DIM), norm_last_layer=bool(d.NORM_LAST_LAYER),
                                      use_bn=bool(d.HEAD_BN))
        self._check_local_size(cfg)

        teacher = {"backbone": copy.deepcopy(backbone), "head": copy.deepcopy(self.head)}
        if self.ibot_weight > 0:
            teacher["ibot_head"] = copy.deepcopy(self.ibot_head)
        self.teacher = nn.ModuleDict(teacher)
        for p in self.teacher.parameters():
            p.requires_grad = False
        k = int(d.OUT_DIM)
        self.register_buffer("center", torch.zeros(1, k))
        if self.ibot_weight > 0:
            self.register_buffer("patch_center", torch.zeros(1, 1, k))
        # False until the first training step, whose teacher mean then becomes the centre outright
        # (DINO starts from 0: its first teacher targets all share the same peak, a push towards
        # collapse that the EMA takes ~1/(1 - CENTER_MOMENTUM) steps to undo)
        self.register_buffer("center_ready", torch.zeros((), dtype=torch.bool))
        # DDP (engine.trainer.wrap_ddp) reduces only parameters that require a gradient, so the
        # teacher is never averaged; it and the centres are copied from rank 0 once, when DDP is
        # built, and never broadcast at a forward

        self.window_specs = window_specs(list(cfg.DATA.WINDOWS))  # device-stage batches are windowed here
        self.student_temp = float(d.STUDENT_TEMP)
        self.center_momentum = float(d.CENTER_MOMENTUM)
        self.momentum_start, self.momentum_end = float(d.MOMENTUM_TEACHER), float(d.MOMENTUM_TEACHER_END)
        self.warmup_teacher_temp, self.final_teacher_temp = float(d.WARMUP_TEACHER_TEMP), float(d.TEACHER_TEMP)
        self.warmup_teacher_temp_epochs = int(d.WARMUP_TEACHER_TEMP_EPOCHS)
        self.freeze_last_layer_epochs = int(d.FREEZE_LAST_LAYER_EPOCHS)
        self.epochs = int(cfg.TRAIN.EPOCHS)
        # schedule values, set from the global iteration by on_step_start (iteration 0 until then)
        self.total_iters = 0
        self.momentum = self.momentum_start
        self.teacher_temp = self.warmup_teacher_temp

    def _check_local_size(self, cfg: Any) -> None:
        local = list(cfg.DINO.LOCAL_CROP_SIZE) or [max(1, int(r) // 2) for r in cfg.DATA.ROI]
        if isinstance(self.backbone, VisionTransformer3D) and int(cfg.DINO.LOCAL_CROPS_NUMBER) > 0:
            try:
                self.backbone.grid_size(local)
            except ValueError:
                raise ValueError(f"DINO.LOCAL_CROP_SIZE = {local} (default: half of DATA.ROI) is not divisible by "
                                 f"MODEL.PATCH_SIZE = {list(self.backbone.patch_size)}; set DINO.LOCAL_CROP_SIZE") \
                    from None

    # ------------------------------------------------------------------------------- schedules
    def teacher_temp_at(self, it: int, iters_per_epoch: int) -> float:
        """Teacher temperature at global iteration ``it``: linear warm-up over
        ``WARMUP_TEACHER_TEMP_EPOCHS * iters_per_epoch`` iterations, then constant."""
        return linear_warmup(it, self.warmup_teacher_temp, self.final_teacher_temp,
                             self.warmup_teacher_temp_epochs * iters_per_epoch)

    def momentum_at(self, it: int, total_iters: int) -> float:
        """Teacher EMA momentum at global iteration ``it``: cosine from MOMENTUM_TEACHER to _END."""
        return cosine(it, self.momentum_start, self.momentum_end, total_iters)

    def on_step_start(self, it: int, epoch: int, total_iters: int) -> None:
        """Set the schedules from the global iteration (engine hook, before the forward)."""
        self.total_iters = int(total_iters)
        iters_per_epoch = max(1, total_iters // max(1, self.epochs))
        self.teacher_temp = self.teacher_temp_at(it, iters_per_epoch)
        self.momentum = self.momentum_at(it, total_iters)

    def on_after_backward(self, epoch: int) -> None:
        """Drop the last head layer's gradients during the first FREEZE_LAST_LAYER_EPOCHS epochs."""
        if epoch >= self.freeze_last_layer_epochs:
            return
        heads = [self.head] + ([self.ibot_head] if self.ibot_weight > 0 else [])
        for h in heads:
            for p in h.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def on_step_end(self, it: int) -> None:
        """EMA of the student into the teacher with the momentum of this iteration (after the step)."""
        m = self.momentum
        pairs = [(self.backbone, self.teacher["backbone"]), (self.head, self.teacher["head"])]
        if self.ibot_weight > 0:
            pairs.append((self.ibot_head, self.teacher["ibot_head"]))
        student, teacher = [], []
        for s_mod, t_mod in pairs:
            for ps, pt in zip(s_mod.parameters(), t_mod.parameters()):
                student.append(ps.detach())
                teacher.append(pt)
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, student, alpha=1.0 - m)

    def exported_backbone(self) -> nn.Module:
        """What ``backbone.pth`` holds: the TEACHER backbone (the EMA weights DINO evaluates)."""
        return self.teacher["backbone"]

    # ------------------------------------------------------------------------------- forward
    @torch.no_grad()
    def _update_center(self, buffer: torch.Tensor, outputs: torch.Tensor) -> None:
        """EMA of the buffer towards the mean of ``outputs [n, ..., K]`` over ALL ranks' samples
        (the mean itself at the first training step)."""
        k = outputs.shape[-1]
        flat = outputs.detach().float().reshape(-1, k)
        stats = torch.cat([flat.sum(0), flat.new_tensor([flat.shape[0]])])  # [K + 1]: sum, count
        dist.all_reduce_sum(stats)
        mean = (stats[:k] / stats[k]).reshape(buffer.shape)
        m = self.center_momentum if bool(self.center_ready) else 0.0
        buffer.mul_(m).add_(mean, alpha=1.0 - m)

    def _student_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None
                          ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Pooled features ``[n, E]`` and (ViT with a mask) patch tokens ``[n, N, D]``."""
        if mask is None:
            return self.backbone(x), None
        tokens = self.backbone.forward_features(x, mask=mask)  # [n, 1+R+N, D]
        return self.backbone.pool_tokens(tokens), tokens[:, self.backbone.num_prefix_tokens:]

    def forward(self, batch: dict) -> dict:
        """``{"global": [B, G, C, ...], "local": [B, L, C, ...]}`` -> loss and monitors.

        A device-stage batch of :class:`data.views.DINOViews` (HU crops + ``"*_aug"`` parameters)
        is windowed here first, on the batch's device.
        """
        batch = dino_batch_transform(batch, self.window_specs)
        glob = batch["global"]
        if glob.ndim != 6:
            raise ValueError(f"DINO expects batch['global'] of shape [B, G, C, D, H, W]; got {tuple(glob.shape)}")
        b, g = glob.shape[:2]
        loc = batch.get("local")
        n_local = 0 if loc is None else loc.shape[1]
        if g + n_local < 2:
            raise ValueError(f"DINO needs at least two crops; got {g} global and {n_local} local")
        xg = glob.transpose(0, 1).reshape(g * b, *glob.shape[2:])  # [G*B, C, ...], crop-major
        use_ibot = self.ibot_weight > 0

        with torch.no_grad():
            if use_ibot:
                t_tokens = self.teacher["backbone"].forward_features(xg)  # [G*B, T, D]
                t_feat = self.teacher["backbone"].pool_tokens(t_tokens)
                t_patch = self.teacher["ibot_head"](t_tokens[:, self.backbone.num_prefix_tokens:])  # [G*B, N, K]
            else:
                t_feat = self.teacher["backbone"](xg)  # [G*B, E]
            t_logits = self.teacher["head"](t_feat).float()  # [G*B, K]

        mask = None
        if use_ibot:
            n_patches = math.prod(self.backbone.grid_size(xg.shape[2:]))
            mask = random_patch_mask(g * b, n_patches, self.ibot_mask_ratio, xg.device)  # [G*B, N]
        s_feat, s_patch_tokens = self._student_features(xg, mask)
        s_logits = [self.head(s_feat)]  # [G*B, K]
        if n_local:
            xl = loc.transpose(0, 1).reshape(n_local * b, *loc.shape[2:])  # [L*B, C, ...]
            s_logits.append(self.head(self.backbone(xl)))  # [L*B, K]
        k = t_logits.shape[-1]
        student = torch.cat(s_logits).float().reshape(g + n_local, b, k)  # [S, B, K]
        teacher = t_logits.reshape(g, b, k)
        loss, monitors = dino_loss(student, teacher, self.center, self.student_temp, self.teacher_temp)
        out = {"dino_loss": loss.detach()}
        total = loss
        if use_ibot:
            s_patch = self.ibot_head(s_patch_tokens)  # [G*B, N, K]
            ibot = ibot_patch_loss(s_patch, t_patch, mask, self.patch_center, self.student_temp, self.teacher_temp)
            total = total + self.ibot_weight * ibot
            out["ibot_loss"] = ibot.detach()
        if self.koleo_weight > 0:
            koleo = torch.stack([koleo_loss(f) for f in s_feat.reshape(g, b, -1)]).mean()
            total = total + self.koleo_weight * koleo
            out["koleo"] = koleo.detach()
        if self.training:  # validation never moves the centres
            self._update_center(self.center, t_logits)
            if use_ibot:
                self._update_center(self.patch_center, t_patch)
            self.center_ready.fill_(True)
        out.update(monitors)
        out.update({"loss": total, "teacher_temp": self.teacher_temp, "momentum": self.momentum})
        return out


# --------------------------------------------------------------------------------------- k-NN
def knn_scores(features: np.ndarray, labels: np.ndarray, k: int, temperature: float = 0.07) -> np.ndarray:
    """Leave-one-out weighted k-NN score of the positive class, by cosine similarity.

    Each sample's score is ``sum_j w_j y_j / sum_j w_j`` over its k most similar OTHER samples,
    ``w_j = exp(sim_j / temperature)`` (DINO's weighted k-NN).

    Args:
        features: ``[N, D]``.
        labels: ``[N]`` 0/1.
        k: neighbours (clipped to N - 1).
        temperature: similarity temperature.

    Returns:
        ``[N]`` scores in [0, 1].
    """
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"k-NN needs at least 2 samples; got {n}")
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    x = F.normalize(x, dim=1)
    sim = x @ x.t()  # [N, N]
    sim.fill_diagonal_(-float("inf"))  # leave one out
    kk = max(1, min(int(k), n - 1))
    top, idx = sim.topk(kk, dim=1)  # [N, k]
    w = torch.softmax(top / temperature, dim=1)  # exp(sim / T), normalised
    y = torch.from_numpy(np.asarray(labels, dtype=np.float32))[idx]  # [N, k]
    return (w * y).sum(1).numpy()


class KNNMonitor:
    """``evaluator(method, epoch)`` for the trainer: k-NN AUROC of frozen TEACHER features.

    Every ``DINO.KNN_EVERY`` epochs (and at the last epoch) the teacher backbone, in eval mode,
    embeds the centred :class:`data.views.SingleView` of every scan of ``DATA.VAL_CSV``; the
    features are gathered from all ranks (``engine.dist.all_gather_object``) and scored by
    leave-one-out weighted k-NN (``DINO.KNN_K``, cosine) against the ``DINO.KNN_LABEL`` column
    (blank labels skipped). Logged: ``knn_auroc`` (also returned as ``score``, so the trainer keeps
    ``checkpoint_best.pth``), ``knn_n``, and ``rank_center_maxdiff`` / ``rank_teacher_maxdiff``
    (largest difference of the centre / a teacher checksum between ranks: 0 when the ranks agree).

    Args:
        cfg: the config (DATA.VAL_CSV, DINO.KNN_*, DATA.* for the view and loader).
    """

    def __init__(self, cfg: Any) -> None:
        from data.datasets import build_dataset
        from data.views import SingleView
        if not cfg.DATA.VAL_CSV:
            raise ValueError(f"DINO.KNN_EVERY = {cfg.DINO.KNN_EVERY} needs a labelled DATA.VAL_CSV (column "
                             f"DINO.KNN_LABEL = {cfg.DINO.KNN_LABEL!r}); set DATA.VAL_CSV or DINO.KNN_EVERY 0")
        self.cfg = cfg
        self.every = int(cfg.DINO.KNN_EVERY)
        self.k = int(cfg.DINO.KNN_K)
        self.label = str(cfg.DINO.KNN_LABEL)
        # reads the CSV now: a missing label column fails at start-up, not epochs later
        self.dataset = build_dataset(cfg, cfg.DATA.VAL_CSV, SingleView(cfg, train=False), label_columns=[self.label])
        self._loader = None

    def due(self, epoch: int) -> bool:
        """k-NN runs after epoch ``epoch`` (0-based) when this is True."""
        return self.every > 0 and ((epoch + 1) % self.every == 0 or epoch + 1 == int(self.cfg.TRAIN.EPOCHS))

    @torch.no_grad()
    def features(self, method: DINO) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Teacher features, labels and row indices of this rank's share of the validation set."""
        from data.datasets import collate
        if self._loader is None:  # built lazily: the process group exists by now
            self._loader = dist.make_loader(self.dataset, self.cfg, train=False, collate_fn=collate)
        teacher = method.teacher["backbone"]
        device = next(teacher.parameters()).device
        was_training = teacher.training
        teacher.eval()
        feats, labels, index = [], [], []
        try:
            for batch in self._loader:
                feats.append(teacher(batch["image"].to(device)).float().cpu().numpy())  # [b, E]
                labels.append(batch["label"][:, 0].numpy())
                index.append(np.asarray(batch["index"]))
        finally:
            teacher.train(was_training)
        if not feats:
            e = getattr(teacher, "embed_dim", 0)
            return np.zeros((0, e), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
        return np.concatenate(feats), np.concatenate(labels), np.concatenate(index)

    def __call__(self, method: DINO, epoch: int) -> dict:
        out = self.rank_agreement(method)
        if not self.due(epoch):
            return out
        parts = dist.all_gather_object(self.features(method))
        feats = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        keep = ~np.isnan(labels)
        feats, labels = feats[keep], labels[keep]
        out["knn_n"] = int(len(labels))
        if len(labels) < 2 or len(np.unique(labels)) < 2:
            log.warning("k-NN monitor: %d labelled scans in %s with classes %s for %r; AUROC needs both "
                        "classes", len(labels), self.cfg.DATA.VAL_CSV, np.unique(labels).tolist(), self.label)
            return out
        from sklearn.metrics import roc_auc_score
        auroc = float(roc_auc_score(labels, knn_scores(feats, labels, self.k)))
        out.update({"knn_auroc": auroc, "score": auroc})
        return out

    @staticmethod
    @torch.no_grad()
    def rank_agreement(method: DINO) -> dict:
        """Largest difference between ranks of the centre and of a teacher checksum (0 = agree)."""
        center = method.center.detach().float().cpu().numpy().ravel()
        checksum = float(sum(p.detach().double().sum().item() for p in method.teacher.parameters()))
        gathered = dist.all_gather_object((center, checksum))
        c0, s0 = gathered[0]
        return {"rank_center_maxdiff": max(float(np.abs(c - c0).max()) for c, _ in gathered),
                "rank_teacher_maxdiff": max(abs(s - s0) for _, s in gathered)}
