"""The device stage: finish a collated batch of HU crops where it lies (the GPU).

With ``device_stage=True`` the DINO and SimCLR views stop in the workers after the resize (or,
for DINO's ``device_resize``, before it) and ship HU crops with their augmentation draws; these
batch wrappers cut/resize (:func:`crops_from_heads`), filter and window them
(``data.views.augment``) and histogram-shift them, batched, into exactly what the workers would
have produced. The methods call them first in their ``forward``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from data.views.augment import filter_batch, window_batch
from data.views.intensity import apply_histogram_curve


def crops_from_heads(heads: Sequence[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
    """Cut, flip and resize (trilinear) the crops of a device-resize batch where the heads lie.

    The same operations as :func:`resized_crop`, so the same numbers on the CPU.

    Args:
        heads: ``B`` HU tensors ``[X_b, Y_b, Z_b]`` (any dtype, any device).
        boxes: ``[B, N, 12]`` integers: start (3), size (3), flips (3, 0/1), output size (3).

    Returns:
        float32 ``[B, N, D, H, W]`` HU on the heads' device.
    """
    b, n = boxes.shape[:2]
    rows = boxes.cpu().tolist()
    size = tuple(rows[0][0][9:12]) if b * n else (1, 1, 1)
    out = torch.empty((b, n) + size, dtype=torch.float32, device=heads[0].device if b else "cpu")
    for i in range(b):
        for j in range(n):
            s, z, f = rows[i][j][0:3], rows[i][j][3:6], rows[i][j][6:9]
            x = heads[i][s[0]:s[0] + z[0], s[1]:s[1] + z[1], s[2]:s[2] + z[2]]
            dims = [d for d in range(3) if f[d]]
            x = (x.flip(dims) if dims else x).float()
            if tuple(x.shape) != size:
                x = torch.nn.functional.interpolate(x[None, None], size=size, mode="trilinear",
                                                    align_corners=False)[0, 0]
            out[i, j] = x
    return out


def dino_batch_transform(batch: dict, specs: Sequence[tuple[float, float]]) -> dict:
    """Window a device-stage DINO batch in place of its HU crops (see :class:`DINOViews`).

    ``batch["global"] [B, G, D, H, W]`` HU + ``batch["global_aug"] [B, G, 11]`` (:data:`AUG_FIELDS`)
    -> ``batch["global"] [B, G, C, D, H, W]`` float32 (likewise ``"local"``): blur, noise,
    intensity, windowing and gamma, batched; a batch without ``"_aug"`` entries (windowed by the
    workers) is returned unchanged. A device-resize batch (``"hu"`` heads and ``"*_box"`` rows
    instead of crops) is cut and resized first (:func:`crops_from_heads`).

    Args:
        batch: a collated batch (on the device where the windowing should run).
        specs: windows ``[(center, width)]`` (``DATA.WINDOWS``).
    """
    if not any(k.endswith("_aug") for k in batch):
        return batch
    out = dict(batch)
    if "hu" in out:  # device resize: cut and resize the crops first
        heads = out.pop("hu")
        for name in ("global", "local"):
            if name + "_box" in out:
                out[name] = crops_from_heads(heads, out.pop(name + "_box"))  # [B, N, D, H, W] float32
    for name in ("global", "local"):
        if name + "_aug" in out:
            hu, params = out[name], out.pop(name + "_aug")  # [B, N, D, H, W], [B, N, 11]
            b, n = hu.shape[:2]
            if b * n == 0:
                out[name] = torch.zeros((b, n, len(specs)) + tuple(hu.shape[2:]), device=hu.device)
                continue
            flat, p = hu.reshape(b * n, *hu.shape[2:]).float(), params.reshape(b * n, -1)
            out[name] = window_batch(filter_batch(flat, p), p, specs).reshape(b, n, len(specs), *hu.shape[2:])
    return out


def simclr_batch_transform(batch: dict, specs: Sequence[tuple[float, float]]) -> dict:
    """Finish a device-stage SimCLR batch (see :class:`SimCLRViews`) where it lies (the GPU).

    ``batch["views"] [B, V, D, H, W]`` HU + ``"views_aug" [B, V, 11]`` (:data:`AUG_FIELDS`) +
    ``"views_hist" [B, V, 1 + P]`` -> ``batch["views"] [B, V, C, D, H, W]`` float32: blur, noise,
    intensity, windowing (:func:`filter_batch`, :func:`window_batch`) and histogram shift, as the
    workers do without a device stage. A batch without ``"views_aug"`` is returned unchanged.

    Args:
        batch: a collated batch (on the device where the work should run).
        specs: windows ``[(center, width)]`` (``DATA.WINDOWS``).
    """
    if "views_aug" not in batch:
        return batch
    out = dict(batch)
    hu, params, hist = out["views"], out.pop("views_aug"), out.pop("views_hist")
    b, v = hu.shape[:2]
    spatial = tuple(hu.shape[2:])
    p = params.reshape(b * v, -1)
    x = window_batch(filter_batch(hu.reshape((b * v,) + spatial).float(), p), p, specs)  # [N, C, *S]
    h = hist.reshape(b * v, -1).cpu()
    for i in torch.nonzero(h[:, 0] > 0).flatten().tolist():
        x[i] = apply_histogram_curve(x[i], h[i, 1:1 + int(h[i, 0])])
    out["views"] = x.reshape((b, v, len(specs)) + spatial)
    return out
