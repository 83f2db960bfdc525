"""What a ViT looks at: CLS-to-patch attention maps, patch-feature colours, overlays on slices.

* :func:`cls_attention` / :func:`attention_maps`: the last block's attention of the CLS query to
  every patch token, per head (``model.last_attention(x) -> [B, heads, T, T]``; register tokens and
  the CLS token itself are left out), on the patch grid or upsampled (trilinear) to the input size.
* :func:`token_pca_rgb`: the first three principal components of patch features as RGB colours.
* :func:`overlay_slices` / :func:`overlay_attention`: maps drawn over windowed slices
  (matplotlib ``Figure``).

Display orientation (:func:`slice_2d`): arrays are RAS ``[X, Y, Z]``; a slice is shown with
``origin="lower"`` so that anterior (axial), superior (coronal, sagittal) is up and the patient's
left is on the viewer's left (neurological convention) in axial and coronal slices.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = Union[np.ndarray, torch.Tensor]
PLANES = {0: "sagittal", 1: "coronal", 2: "axial"}


def _np(a: ArrayLike) -> np.ndarray:
    return a.detach().float().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


@torch.no_grad()
def cls_attention(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CLS-to-patch attention of the last block on the patch grid.

    Args:
        model: a 3D ViT (``last_attention``, ``num_prefix_tokens``, ``grid_size``), in eval mode.
        x: input ``[B, C, D, H, W]`` (windowed, on the model's device).

    Returns:
        ``[B, heads, gd, gh, gw]`` float32: attention probabilities of the CLS query to each patch
        token (rows of the softmax over all T tokens, so a map sums to 1 minus the attention the
        CLS token pays to itself and to the registers).
    """
    if not all(hasattr(model, a) for a in ("last_attention", "num_prefix_tokens", "grid_size")):
        raise ValueError(f"{type(model).__name__} has no last_attention(); attention maps need a ViT backbone "
                         "(MODEL.NAME vit_*)")
    if x.ndim != 5:
        raise ValueError(f"expected input [B, C, D, H, W]; got {tuple(x.shape)}")
    grid = tuple(model.grid_size(x.shape[2:]))
    attn = model.last_attention(x)  # [B, heads, T, T]
    b, h, t, _ = attn.shape
    npt = int(model.num_prefix_tokens)
    if t != npt + int(np.prod(grid)):
        raise ValueError(f"attention has {t} tokens; expected {npt} prefix + {int(np.prod(grid))} patch tokens")
    return attn[:, :, 0, npt:].float().reshape(b, h, *grid)  # [B, heads, gd, gh, gw]


def upsample(maps: ArrayLike, size: Sequence[int], mode: str = "trilinear") -> torch.Tensor:
    """Resample maps ``[..., gd, gh, gw]`` to ``[..., *size]`` (``align_corners=False``).

    Args:
        maps: grid maps with any leading dimensions.
        size: output spatial size (3 ints).
        mode: 'trilinear' or 'nearest'.
    """
    t = maps if isinstance(maps, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(maps))
    lead = t.shape[:-3]
    flat = t.float().reshape(1, -1, *t.shape[-3:])  # [1, M, gd, gh, gw]
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    out = F.interpolate(flat, size=tuple(int(s) for s in size), mode=mode, **kwargs)
    return out.reshape(*lead, *out.shape[-3:])


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each map (last three dims) to [0, 1]; a constant map becomes 0."""
    flat = maps.reshape(*maps.shape[:-3], -1)
    lo = flat.min(dim=-1, keepdim=True).values
    hi = flat.max(dim=-1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(maps.shape)


@torch.no_grad()
def attention_maps(model: torch.nn.Module, x: torch.Tensor, upsampled: bool = True, normalize: bool = False
                   ) -> torch.Tensor:
    """CLS-to-patch attention per head, upsampled to the input's spatial size.

    Args:
        model: a 3D ViT in eval mode.
        x: ``[B, C, D, H, W]``.
        upsampled: trilinear to ``(D, H, W)`` (False: the patch grid).
        normalize: min-max scale each head's map to [0, 1].

    Returns:
        ``[B, heads, D, H, W]`` (or ``[B, heads, gd, gh, gw]``), float32 on the input's device.
    """
    maps = cls_attention(model, x)
    if upsampled:
        maps = upsample(maps, x.shape[2:])
    return normalize_maps(maps) if normalize else maps


def token_pca_rgb(tokens: ArrayLike, grid: Optional[Sequence[int]] = None, robust: float = 1.0) -> np.ndarray:
    """Colour each patch by the first three principal components of the patch features.

    Args:
        tokens: ``[N, D]`` patch tokens (or ``[..., N, D]``: all leading maps share one PCA basis,
            so colours are comparable between scans).
        grid: ``(gd, gh, gw)`` with ``gd * gh * gw = N``: return maps on that grid.
        robust: percentile clipped at each end before scaling each component to [0, 1].

    Returns:
        float32 ``[..., N, 3]`` (or ``[..., gd, gh, gw, 3]``) in [0, 1].
    """
    t = _np(tokens).astype(np.float64)
    if t.ndim < 2:
        raise ValueError(f"tokens must be [N, D] (or [..., N, D]); got shape {t.shape}")
    lead, (n, d) = t.shape[:-2], t.shape[-2:]
    flat = t.reshape(-1, d)
    flat = flat - flat.mean(axis=0)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    comps = vt[:3]
    proj = flat @ comps.T  # [M, <=3]
    if proj.shape[1] < 3:
        proj = np.concatenate([proj, np.zeros((len(proj), 3 - proj.shape[1]))], axis=1)
    lo = np.percentile(proj, robust, axis=0)
    hi = np.percentile(proj, 100 - robust, axis=0)
    rgb = np.clip((proj - lo) / np.maximum(hi - lo, 1e-12), 0, 1).astype(np.float32)
    rgb = rgb.reshape(*lead, n, 3)
    if grid is not None:
        grid = tuple(int(g) for g in grid)
        if int(np.prod(grid)) != n:
            raise ValueError(f"grid {grid} holds {int(np.prod(grid))} patches, tokens have {n}")
        rgb = rgb.reshape(*lead, *grid, 3)
    return rgb


def slice_2d(volume: ArrayLike, axis: int, index: int) -> np.ndarray:
    """One slice of ``[X, Y, Z]`` (or ``[X, Y, Z, 3]``) oriented for ``imshow(..., origin="lower")``.

    Args:
        volume: RAS array.
        axis: 0 sagittal, 1 coronal, 2 axial.
        index: slice index along ``axis``.
    """
    v = _np(volume)
    if axis not in PLANES:
        raise ValueError(f"axis = {axis}; expected 0 (sagittal), 1 (coronal) or 2 (axial)")
    s = np.take(v, int(index), axis=axis)  # [A, B] or [A, B, 3]
    return np.swapaxes(s, 0, 1)  # rows = second remaining axis (shown upwards), columns = first


def default_slices(n: int, count: int = 5) -> list[int]:
    """``count`` evenly spread slice indices of an axis of length ``n`` (ends excluded)."""
    return [int(round(v)) for v in np.linspace(0, n - 1, count + 2)[1:-1]]


def overlay_slices(image: ArrayLike, overlays: Sequence[ArrayLike] | ArrayLike, axis: int = 2,
                   slices: Optional[Sequence[int]] = None, alpha: float = 0.5, cmap: str = "inferno",
                   row_titles: Optional[Sequence[str]] = None, hide_below: Optional[float] = None,
                   vmin: float = 0.0, vmax: float = 1.0, size: float = 2.0, title: str = ""):
    """Overlays drawn over grey slices: one row per overlay, one column per slice.

    Args:
        image: grey volume ``[X, Y, Z]`` (a windowed channel in [0, 1], or HU with ``vmin/vmax``).
        overlays: ``[M, X, Y, Z]`` scalar maps (drawn with ``cmap`` over [0, 1] of each map's own
            range) or ``[M, X, Y, Z, 3]`` RGB in [0, 1]; a single ``[X, Y, Z]`` map is one row.
        axis: 0 sagittal, 1 coronal, 2 axial.
        slices: indices along ``axis`` (default: 5 spread over the volume).
        alpha: overlay opacity.
        cmap: colormap of scalar overlays.
        row_titles: one per overlay.
        hide_below: scalar overlay values <= this are transparent (e.g. 0 for masks).
        vmin: grey level of black.
        vmax: grey level of white.
        size: inches per panel.
        title: figure title.

    Returns:
        A matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    img = _np(image)
    if img.ndim != 3:
        raise ValueError(f"image must be [X, Y, Z]; got shape {img.shape}")
    if isinstance(overlays, (list, tuple)):
        ovs = [_np(o) for o in overlays]
    else:
        arr = _np(overlays)
        single = arr.ndim == 3 or (arr.ndim == 4 and arr.shape[:3] == img.shape and arr.shape[-1] == 3)
        ovs = [arr] if single else list(arr)
    for o in ovs:
        if o.shape[:3] != img.shape or o.ndim not in (3, 4):
            raise ValueError(f"overlay of shape {o.shape} does not match the image {img.shape} "
                             "(expected [X, Y, Z] or [X, Y, Z, 3])")
    slices = list(slices) if slices is not None else default_slices(img.shape[axis])
    rows, cols = len(ovs), len(slices)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for r, o in enumerate(ovs):
        if o.ndim == 3:
            lo, hi = float(np.nanmin(o)), float(np.nanmax(o))
            o = (o - lo) / max(hi - lo, 1e-12)
            thr = None if hide_below is None else (hide_below - lo) / max(hi - lo, 1e-12)
        for c, s in enumerate(slices):
            ax = axes[r, c]
            ax.imshow(slice_2d(img, axis, s), cmap="gray", vmin=vmin, vmax=vmax, origin="lower")
            ov = slice_2d(o, axis, s)
            if o.ndim == 3:
                if thr is not None:
                    ov = np.ma.masked_where(ov <= thr, ov)
                ax.imshow(ov, cmap=cmap, vmin=0, vmax=1, alpha=alpha, origin="lower", interpolation="nearest")
            else:
                ax.imshow(np.clip(ov, 0, 1), alpha=alpha, origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{PLANES[axis]} {s}", fontsize=8)
        if row_titles is not None:
            axes[r, 0].set_ylabel(str(row_titles[r]), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def overlay_attention(image: ArrayLike, maps: ArrayLike, axis: int = 2, slices: Optional[Sequence[int]] = None,
                      alpha: float = 0.5, cmap: str = "inferno", mean_row: bool = True, title: str = ""):
    """Per-head attention maps over slices of a windowed volume.

    Args:
        image: ``[C, X, Y, Z]`` windowed input (channel 0 is shown) or ``[X, Y, Z]``.
        maps: ``[heads, X, Y, Z]`` upsampled attention (from :func:`attention_maps`, one sample).
        axis: 0 sagittal, 1 coronal, 2 axial.
        slices: indices along ``axis`` (default: 5 spread over the volume).
        alpha: overlay opacity.
        cmap: colormap.
        mean_row: add a row with the mean over heads.
        title: figure title.

    Returns:
        A matplotlib ``Figure`` (rows: heads, then the mean; each map scaled to its own range).
    """
    img = _np(image)
    img = img[0] if img.ndim == 4 else img
    m = _np(maps)
    if m.ndim == 3:
        m = m[None]
    if m.ndim != 4:
        raise ValueError(f"maps must be [heads, X, Y, Z]; got shape {m.shape}")
    rows = list(m) + ([m.mean(axis=0)] if mean_row and len(m) > 1 else [])
    titles = [f"head {i}" for i in range(len(m))] + (["mean"] if len(rows) > len(m) else [])
    return overlay_slices(img, rows, axis=axis, slices=slices, alpha=alpha, cmap=cmap, row_titles=titles,
                          title=title)
