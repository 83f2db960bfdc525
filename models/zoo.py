"""The model registry: ``build_backbone(cfg)`` by ``MODEL.NAME`` and ``load_pretrained(model, path)``.

Every backbone has ``embed_dim`` (width of ``forward``'s output), ``token_dim`` (width of the
tokens / channels of the feature map of ``forward_features``), ``forward(x [B, C, D, H, W]) ->
[B, embed_dim]``, ``forward_features(x)`` (ViT: tokens ``[B, 1+R+N, D]``; CNN/Swin: feature map
``[B, C', d, h, w]``) and ``no_weight_decay() -> set[str]``. ViTs are
:class:`models.vit3d.VisionTransformer3D` (test with ``isinstance``; note that the Swin encoder
also has a ``patch_size`` attribute).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any, Mapping

import torch
import torch.nn as nn

from models.names import BACKBONES, VIT_NAMES
from models.pos_embed import resize_pos_embed, tokens_to_grid
from models.vit3d import VisionTransformer3D, create_vit

logger = logging.getLogger(__name__)

# checkpoint entries that may hold the weights, in order of preference (EMA teacher before student)
WRAPPER_KEYS = ("backbone", "teacher", "model", "state_dict", "student")
# key segments added by DDP (module.) and torch.compile (_orig_mod.), removed wherever they occur
WRAPPER_SEGMENTS = ("module", "_orig_mod")
# key prefixes tried, best first when several match equally many tensors; any other prefix that
# matches more tensors (e.g. 'trunk.') wins too
KNOWN_PREFIXES = ("", "teacher.backbone.", "teacher_backbone.", "teacher.", "backbone.", "encoder.",
                  "model.backbone.", "model.", "swinViT.", "student.backbone.", "student_backbone.", "student.")


class PretrainedLoadError(RuntimeError):
    """A pretrained checkpoint could not be used; the message names the file and what went wrong."""


# MODEL.FEATURE_SIZE 0 = these widths (SwinUNETR, CT-FM's SegResEncoder, torchvision-style ResNets)
STANDARD_WIDTH = {"swin": 48, "segresnet": 32, "resnet18": 64, "resnet50": 64}


def build_backbone(cfg: Any) -> nn.Module:
    """Build the backbone named by ``cfg.MODEL.NAME`` (random init; see :func:`load_pretrained`).

    in_chans = ``len(DATA.WINDOWS)``. ViTs: ``img_size = DATA.ROI``, ``MODEL.PATCH_SIZE``,
    ``MODEL.NUM_REGISTERS``, ``MODEL.POS_EMBED``, ``MODEL.POOL``, ``MODEL.DROP_PATH``, and a mask
    token when ``DINO.IBOT_WEIGHT > 0``. MONAI encoders: width ``MODEL.FEATURE_SIZE`` or, when 0,
    :data:`STANDARD_WIDTH` (swin embed dim, segresnet init filters, resnet first-stage channels);
    segresnet normalisation ``MODEL.NORM``, input orientation ``MODEL.INPUT_ORIENTATION``;
    ``MODEL.POOL`` does not apply (mean pool).

    Args:
        cfg: the config tree.
    """
    name = cfg.MODEL.NAME
    in_chans = len(cfg.DATA.WINDOWS)
    width = int(cfg.MODEL.FEATURE_SIZE) or STANDARD_WIDTH.get(name, 0)
    if name in VIT_NAMES:
        return create_vit(name, img_size=list(cfg.DATA.ROI), patch_size=list(cfg.MODEL.PATCH_SIZE),
                          in_chans=in_chans, num_registers=int(cfg.MODEL.NUM_REGISTERS),
                          pos_embed=cfg.MODEL.POS_EMBED, pool=cfg.MODEL.POOL,
                          drop_path_rate=float(cfg.MODEL.DROP_PATH),
                          use_mask_token=float(cfg.DINO.IBOT_WEIGHT) > 0)
    if name not in BACKBONES:
        raise ValueError(f"MODEL.NAME = {name!r}; expected one of {list(BACKBONES)}")
    from models import monai_backbones as mb  # MONAI imports take seconds: only when needed

    if name == "swin":
        model = mb.SwinEncoder(in_chans, feature_size=width, drop_path_rate=float(cfg.MODEL.DROP_PATH))
    elif name == "segresnet":
        model = mb.SegResEncoderBackbone(in_chans, init_filters=width, norm=cfg.MODEL.NORM)
    else:
        model = mb.ResNet3D(int(name[len("resnet"):]), in_chans, width=width)
    model.set_input_orientation(cfg.MODEL.INPUT_ORIENTATION)
    return model


# ------------------------------------------------------------------------------ load_pretrained
def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, path: str) -> tuple[dict[str, torch.Tensor], str]:
    """Descend through wrapper entries ('model', 'teacher', ...) to a state dict."""
    where: list[str] = []
    while not _is_state_dict(obj):
        if not isinstance(obj, Mapping):
            raise PretrainedLoadError(f"{path}: holds a {type(obj).__name__} at "
                                      f"{'.'.join(where) or 'the top level'}, not a state dict")
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                where.append(key)
                obj = obj[key]
                break
        else:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if not tensors:
                raise PretrainedLoadError(
                    f"{path}: no state dict found at {'.'.join(where) or 'the top level'}; keys are "
                    f"{sorted(map(str, obj))[:10]}, none of {list(WRAPPER_KEYS)} holds weights")
            obj = tensors
    return dict(obj), ".".join(where)


def _strip_wrappers(key: str) -> str:
    return ".".join(p for p in key.split(".") if p not in WRAPPER_SEGMENTS)


def _pos_embed_to(src: torch.Tensor, dst: torch.Tensor, model: nn.Module) -> torch.Tensor | None:
    """Resample a checkpoint position embedding to the model's grid ``dst [1, D, gd, gh, gw]``."""
    if dst.ndim != 5 or src.shape[-1 if src.ndim in (2, 3) else 1] != dst.shape[1]:
        return None
    if src.ndim in (2, 3):  # other codebases: [1, T, D] with optional prefix (CLS, registers) entries
        prefixes = sorted({0, 1, int(getattr(model, "num_prefix_tokens", 1))})
        try:
            src = tokens_to_grid(src, num_prefix_tokens=prefixes)
        except ValueError:
            return None
    if src.ndim != 5:
        return None
    return resize_pos_embed(src.float(), dst.shape[2:]).to(dst.dtype)


def _choose_prefix(src: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> str:
    """The key prefix of ``src`` under which the most tensors fit ``target`` (shape-compatible)."""
    counts: Counter[str] = Counter()
    for key, value in src.items():
        parts = key.split(".")
        for i in range(len(parts)):
            suffix = ".".join(parts[i:])
            if suffix in target and (suffix == "pos_embed" or tuple(value.shape) == tuple(target[suffix].shape)):
                counts[".".join(parts[:i]) + ("." if i else "")] += 1
    if not counts:
        return ""

    def rank(p: str) -> tuple[int, int]:
        return counts[p], -(KNOWN_PREFIXES.index(p) if p in KNOWN_PREFIXES else len(KNOWN_PREFIXES))

    return max(counts, key=rank)


def load_pretrained(model: nn.Module, path: str, min_fraction: float = 0.9) -> dict:
    """Load backbone weights from a checkpoint, tolerant of wrappers and prefixes, strict on coverage.

    Reads with ``torch.load(weights_only=True)``; accepts a raw state dict or a dict holding one
    under 'backbone' / 'teacher' / 'model' / 'state_dict' / 'student' (nested too, e.g. a training
    checkpoint's ``model`` = a method's state dict). Removes ``module.`` and ``_orig_mod.`` segments,
    then strips the key prefix (``backbone.``, ``encoder.``, ``teacher.backbone.``, ...) under which
    the most tensors fit the model, preferring an EMA teacher over a student on ties. A learned ViT
    position embedding of another grid (or another codebase's ``[1, T, D]`` list) is interpolated
    to the model's grid; a fixed sin-cos one is recomputed by the model and the checkpoint's is
    ignored. Other shape mismatches are not loaded and are reported.

    Args:
        model: the backbone (unwrapped, not DDP).
        path: checkpoint file.
        min_fraction: fail when fewer than this fraction of the model's state-dict tensors load
            (``MODEL.MIN_LOADED_FRACTION``).

    Returns:
        Report dict: ``path``, ``source`` (wrapper entry used), ``prefix``, ``loaded``, ``total``,
        ``fraction``, ``missing`` (model keys not loaded), ``unexpected`` (checkpoint keys under the
        prefix the model lacks), ``mismatched`` (``"key: checkpoint shape vs model shape"``),
        ``ignored`` (with reason), ``other_keys`` (count of checkpoint keys outside the prefix),
        ``pos_embed_resized`` (``[source grid, model grid]`` or None).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        PretrainedLoadError: unreadable file, no state dict inside, or too few tensors loaded.
    """
    if not 0 <= min_fraction <= 1:
        raise ValueError(f"min_fraction = {min_fraction}; it must lie in [0, 1]")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained checkpoint {path!r} does not exist (MODEL.PRETRAINED)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-tensor objects refused by weights_only
        raise PretrainedLoadError(f"{path}: cannot be read by torch.load(weights_only=True): {e}") from e
    src, source = _unwrap(obj, path)
    src = {_strip_wrappers(k): v for k, v in src.items()}
    target = model.state_dict()
    prefix = _choose_prefix(src, target)

    matched: dict[str, torch.Tensor] = {}
    unexpected, mismatched, ignored = [], [], []
    other_keys = 0
    pos_resized = None
    for key, value in src.items():
        if not key.startswith(prefix):
            other_keys += 1
            continue
        name = key[len(prefix):]
        if name not in target:
            if name == "pos_embed" and isinstance(model, VisionTransformer3D):
                ignored.append("pos_embed: the model's fixed sin-cos table is used")
            else:
                unexpected.append(name)
            continue
        dst = target[name]
        if tuple(value.shape) != tuple(dst.shape):
            resized = _pos_embed_to(value, dst, model) if name == "pos_embed" else None
            if resized is None:
                mismatched.append(f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(dst.shape)}")
                continue
            pos_resized = [list(value.shape[2:]) if value.ndim == 5 else f"{value.shape[-2]} tokens",
                           list(dst.shape[2:])]
            value = resized
        matched[name] = value

    missing = [k for k in target if k not in matched]
    total = len(target)
    fraction = len(matched) / max(total, 1)
    report = {"path": path, "source": source, "prefix": prefix, "loaded": len(matched), "total": total,
              "fraction": fraction, "missing": missing, "unexpected": unexpected, "mismatched": mismatched,
              "ignored": ignored, "other_keys": other_keys, "pos_embed_resized": pos_resized}
    if fraction < min_fraction:
        raise PretrainedLoadError(
            f"{path}: only {len(matched)}/{total} backbone tensors ({fraction:.0%}) loaded, fewer than "
            f"MODEL.MIN_LOADED_FRACTION = {min_fraction}; entry {source or '<top level>'!r}, prefix "
            f"{prefix!r}; missing e.g. {missing[:5]}; mismatched e.g. {mismatched[:3]}; unexpected e.g. "
            f"{unexpected[:5]}. Is MODEL.NAME / MODEL.PATCH_SIZE / DATA.WINDOWS the one it was trained with?")
    model.load_state_dict(matched, strict=False)

    logger.info("loaded %d/%d backbone tensors from %s (entry %r, prefix %r)%s", len(matched), total, path,
                source or "<top level>", prefix,
                f"; position embedding resized {pos_resized[0]} -> {pos_resized[1]}" if pos_resized else "")
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)):
        if items:
            logger.warning("%d %s keys, e.g. %s", len(items), label, items[:10])
    return report
