"""Optimizer and parameter groups: no weight decay on norms, biases, position embeddings and tokens;
layer-wise lr decay for ViT fine-tuning; per-prefix lr multipliers (e.g. a classifier head); the
optimizer step on accumulated gradients (unscale, clip, step), shared by the trainer and the
training-step benchmark."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


def _no_decay_names(model: nn.Module) -> set[str]:
    """Full names of parameters that submodules list in ``no_weight_decay()``."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


def _layer_scale(model: nn.Module, name: str, layer_decay: float) -> float:
    """lr multiplier layer_decay ** (num_layers + 1 - layer_id) for parameters of a layered backbone."""
    if layer_decay >= 1.0:
        return 1.0
    for prefix, module in model.named_modules():
        if prefix and hasattr(module, "layer_id") and hasattr(module, "num_layers") \
                and name.startswith(prefix + "."):
            depth = module.num_layers + 1
            return layer_decay ** (depth - module.layer_id(name[len(prefix) + 1:]))
    return 1.0


def param_groups(model: nn.Module, layer_decay: float = 1.0,
                 lr_scales: Optional[dict[str, float]] = None) -> list[dict]:
    """Split trainable parameters into groups carrying ``lr_scale`` and ``wd_scale`` (0 or 1).

    Args:
        model: the method (its frozen parameters are left out).
        layer_decay: layer-wise lr decay for backbones exposing ``layer_id``/``num_layers``
            (1 = off).
        lr_scales: parameter-name prefix -> lr multiplier (first match wins).
    """
    no_decay = _no_decay_names(model)
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd_scale = 0.0 if (p.ndim <= 1 or name.endswith(".bias") or name in no_decay) else 1.0
        lr_scale = _layer_scale(model, name, layer_decay)
        for prefix, scale in (lr_scales or {}).items():
            if name.startswith(prefix):
                lr_scale *= scale
                break
        g = groups.setdefault((lr_scale, wd_scale),
                              {"params": [], "names": [], "lr_scale": lr_scale, "wd_scale": wd_scale})
        g["params"].append(p)
        g["names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return list(groups.values())


def build_optimizer(cfg, groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW (default) or SGD over ``groups``; lr and weight decay are set every step by the trainer."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if cfg.TRAIN.OPTIMIZER == "adamw":
        return torch.optim.AdamW(clean, lr=cfg.TRAIN.BASE_LR, betas=tuple(cfg.TRAIN.BETAS))
    return torch.optim.SGD(clean, lr=cfg.TRAIN.BASE_LR, momentum=0.9)


def scaled_lr(cfg, world_size: int) -> float:
    """BASE_LR * global batch / 256 (global batch = per-process batch * ranks * accumulation)."""
    return cfg.TRAIN.BASE_LR * cfg.DATA.BATCH_SIZE * world_size * cfg.TRAIN.ACCUM_STEPS / 256


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, clip_grad: float,
                   before_clip: Optional[Callable[[], None]] = None) -> Optional[torch.Tensor]:
    """One step on the gradients accumulated by ``scaler.scale(loss).backward()``.

    Unscales the gradients, calls ``before_clip()`` (a method's ``on_after_backward`` hook, which
    sees true gradients), clips their global norm to ``clip_grad`` (0 = no clipping), steps through
    the scaler (skipped when an fp16 gradient is not finite), updates the scale and sets the
    gradients to None.

    Args:
        optimizer: the optimizer; every parameter of its groups is clipped together.
        scaler: ``torch.amp.GradScaler`` (disabled unless TRAIN.AMP is fp16: then a no-op wrapper).
        clip_grad: TRAIN.CLIP_GRAD.
        before_clip: called after unscaling, before clipping.

    Returns:
        The global gradient norm before clipping (a 0-d tensor, left on the device so no step waits
        for it), or None when ``clip_grad`` is 0.
    """
    scaler.unscale_(optimizer)
    if before_clip is not None:
        before_clip()
    grad_norm = None
    if clip_grad > 0:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
