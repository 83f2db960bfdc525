"""DINO self-distillation (Caron et al. 2021) for head-CT volumes, with optional DINOv2 extras.

Student = backbone + :class:`models.heads.DINOHead`; teacher = a deep copy of both, updated only
as an exponential moving average (EMA) of the student after each optimizer step. The student sees
every crop of :class:`data.views.DINOViews` (global crops at ``DATA.ROI``, local crops at
``DINO.LOCAL_CROP_SIZE``: a ViT interpolates its position embedding for the smaller grid, a CNN
takes any size), the teacher only the global ones. The loss is the cross-entropy between the
centred, sharpened teacher distribution of each global crop and the student distribution of
every other crop.

Schedules (teacher momentum, teacher temperature; the engine's weight decay) follow the global
iteration (:meth:`DINO.on_step_start`). The centre is a buffer, updated with the batch mean
all-reduced over ranks, in training only (``self.training``). The teacher has
``requires_grad=False``: DDP neither trains nor averages it, and it stays identical on every rank
(docs/design-notes.md, "DINO's teacher under DDP"). The checkpoint holds student, teacher and
centre, so resume is exact; ``backbone.pth`` is the TEACHER backbone (:meth:`DINO.exported_backbone`).
Losses: :mod:`methods.losses.dino`.

Monitoring scalars of every step: ``teacher_entropy`` (mean entropy of the teacher distribution:
collapse shows as a fall to 0 or a stay at ``log(OUT_DIM)``), ``kl`` (teacher || student),
``teacher_temp``, ``momentum``. :class:`evaluation.knn.KNNMonitor` adds a k-NN AUROC of frozen
teacher features on a labelled validation set.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from data.views import dino_batch_transform
from data.windows import window_specs
from engine import dist
from engine.schedules import cosine, linear_warmup
from methods.losses.dino import dino_loss, ibot_patch_loss, koleo_loss
from models.heads import DINOHead
from models.vit3d import VisionTransformer3D



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


# ------------------------------------------------------------------------------ shared machinery
class SelfDistillation(nn.Module):
    """What DINO-style objectives share: an EMA teacher, centres, schedules, last-layer freeze.

    A subclass builds its student modules as attributes, then calls :meth:`_make_teacher` with the
    names of those that get an EMA copy (``self.teacher[name]`` mirrors ``getattr(self, name)``),
    :meth:`_register_centers` and :meth:`_init_schedules`. The engine hooks below then work on every
    pair: :meth:`on_step_end` moves each teacher copy towards its student, :meth:`on_after_backward`
    drops the last-layer gradients of every student :class:`models.heads.DINOHead` with a teacher copy.
    """

    def _make_teacher(self, names: Sequence[str]) -> None:
        """``self.teacher``: deep copies of the named student modules, ``requires_grad=False``
        (DDP neither trains nor averages them; they change only by :meth:`on_step_end`)."""
        self.teacher = nn.ModuleDict({n: copy.deepcopy(getattr(self, n)) for n in names})
        for p in self.teacher.parameters():
            p.requires_grad = False

    def _register_centers(self, out_dim: int, patch: bool) -> None:
        """Buffers ``center [1, K]``, ``patch_center [1, 1, K]`` (when ``patch``) and ``center_ready``."""
        self.register_buffer("center", torch.zeros(1, out_dim))
        if patch:
            self.register_buffer("patch_center", torch.zeros(1, 1, out_dim))
        # False until the first training step, whose teacher mean then becomes the centre outright
        # (DINO starts from 0: its first teacher targets all share the same peak, a push towards
        # collapse that the EMA takes ~1/(1 - CENTER_MOMENTUM) steps to undo)
        self.register_buffer("center_ready", torch.zeros((), dtype=torch.bool))

    def _init_schedules(self, cfg: Any) -> None:
        """Temperatures, momenta and freeze length from ``DINO.*`` and ``TRAIN.EPOCHS``."""
        d = cfg.DINO
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
        """Drop the last layer's gradients of every student DINO head during the first
        FREEZE_LAST_LAYER_EPOCHS epochs."""
        if epoch >= self.freeze_last_layer_epochs:
            return
        for name in self.teacher:
            head = getattr(self, name)
            if isinstance(head, DINOHead):
                for p in head.last_layer.parameters():
                    p.grad = None

    @torch.no_grad()
    def on_step_end(self, it: int) -> None:
        """EMA of each student module into its teacher copy with the momentum of this iteration (after the step)."""
        m = self.momentum
        student, teacher = [], []
        for name, t_mod in self.teacher.items():
            s_mod = getattr(self, name)
            for ps, pt in zip(s_mod.parameters(), t_mod.parameters()):
                student.append(ps.detach())
                teacher.append(pt)
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, student, alpha=1.0 - m)

    def exported_backbone(self) -> nn.Module:
        """What ``backbone.pth`` holds: the TEACHER backbone (the EMA weights DINO evaluates)."""
        return self.teacher["backbone"]

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

    def _update_centers(self, teacher_logits: torch.Tensor, teacher_patch: Optional[torch.Tensor] = None) -> None:
        """In training only (validation never moves them): ``center`` towards ``teacher_logits [n, K]`` and, when
        given, ``patch_center`` towards ``teacher_patch [n, N, K]``; the first step sets them outright."""
        if not self.training:
            return
        self._update_center(self.center, teacher_logits)
        if teacher_patch is not None:
            self._update_center(self.patch_center, teacher_patch)
        self.center_ready.fill_(True)


# --------------------------------------------------------------------------------------- method
class DINO(SelfDistillation):
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

        self._make_teacher(["backbone", "head"] + (["ibot_head"] if self.ibot_weight > 0 else []))
        self._register_centers(int(d.OUT_DIM), patch=self.ibot_weight > 0)
        self.window_specs = window_specs(list(cfg.DATA.WINDOWS))  # device-stage batches are windowed here
        self._init_schedules(cfg)

    def _check_local_size(self, cfg: Any) -> None:
        local = list(cfg.DINO.LOCAL_CROP_SIZE) or [max(1, int(r) // 2) for r in cfg.DATA.ROI]
        if isinstance(self.backbone, VisionTransformer3D) and int(cfg.DINO.LOCAL_CROPS_NUMBER) > 0:
            try:
                self.backbone.grid_size(local)
            except ValueError:
                raise ValueError(f"DINO.LOCAL_CROP_SIZE = {local} (default: half of DATA.ROI) is not divisible by "
                                 f"MODEL.PATCH_SIZE = {list(self.backbone.patch_size)}; set DINO.LOCAL_CROP_SIZE") \
                    from None

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
        self._update_centers(t_logits, t_patch if use_ibot else None)
        out.update(monitors)
        out.update({"loss": total, "teacher_temp": self.teacher_temp, "momentum": self.momentum})
        return out
