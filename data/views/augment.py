"""Per-crop augmentation of the multi-crop views: its parameters, their draw, and their application.

A crop's augmentation is drawn once into a vector (:func:`draw_augment`, columns
:data:`AUG_FIELDS`) and applied by :func:`filter_batch` (blur, noise: HU) and :func:`window_batch`
(intensity, windows, gamma), to one crop in a worker (:func:`augment_crop`) or to a whole batch on
the device (``data.views.device``): the same numbers either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from data.views.intensity import NOISE_BANK_MARGIN, gaussian_blur3, noise_window


@dataclass(frozen=True)
class CropAugment:
    """Per-view augmentation of a DINO crop (probabilities and ranges).

    Applied in this order to the resampled HU crop: flips, Gaussian blur (sigma in output voxels,
    :func:`gaussian_blur3`), Gaussian noise (std in HU, :func:`noise_window`), intensity scale and
    shift (``hu * a + b``, applied exactly and for
    free by moving the windows), windowing, gamma (``x ** g`` on the [0, 1] channels).

    Args:
        flip_p: probability of a flip of each axis in ``flip_axes``.
        flip_axes: array axes that may flip (0 = X = left-right: a head is nearly symmetric).
        intensity_p: probability of the HU scale/shift.
        hu_scale: ``a ~ U(1 - hu_scale, 1 + hu_scale)``.
        hu_shift: ``b ~ U(-hu_shift, hu_shift)`` HU.
        gamma_p: probability of the gamma.
        gamma_range: ``g`` log-uniform in this range.
        blur_p: probability of the blur.
        blur_sigma: sigma ~ U(range), output voxels.
        noise_p: probability of the noise.
        noise_std: std ~ U(range), HU.
    """

    flip_p: float = 0.5
    flip_axes: tuple[int, ...] = (0,)
    intensity_p: float = 0.8
    hu_scale: float = 0.1
    hu_shift: float = 10.0
    gamma_p: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    noise_p: float = 0.0
    noise_std: tuple[float, float] = (2.0, 10.0)


# per-crop augmentation parameters, the order of the columns of draw_augment's vector
AUG_FIELDS = ("blur_sigma", "noise_std", "noise_off_x", "noise_off_y", "noise_off_z", "noise_flip_x",
              "noise_flip_y", "noise_flip_z", "hu_scale", "hu_shift", "gamma")


def draw_augment(aug: CropAugment, rng: np.random.Generator) -> torch.Tensor:
    """Draw one crop's augmentation (after its flips): ``[len(AUG_FIELDS)]`` float32.

    Draw order: blur (coin, sigma), noise (coin, std, 3 window offsets, 3 flips), intensity (coin,
    scale, shift), gamma (coin, value). Not drawn = identity (sigma 0, std 0, scale 1, shift 0,
    gamma 1).
    """
    v = [0.0, 0.0, 0, 0, 0, 0, 0, 0, 1.0, 0.0, 1.0]
    if rng.random() < aug.blur_p:
        v[0] = float(rng.uniform(*aug.blur_sigma))
    if rng.random() < aug.noise_p:
        v[1] = float(rng.uniform(*aug.noise_std))
        v[2:5] = [int(o) for o in rng.integers(0, NOISE_BANK_MARGIN + 1, size=3)]
        v[5:8] = [float(rng.random() < 0.5) for _ in range(3)]
    if rng.random() < aug.intensity_p:
        v[8] = float(rng.uniform(1.0 - aug.hu_scale, 1.0 + aug.hu_scale))
        v[9] = float(rng.uniform(-aug.hu_shift, aug.hu_shift))
    if rng.random() < aug.gamma_p:
        lo, hi = aug.gamma_range
        v[10] = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    return torch.tensor(v, dtype=torch.float32)


def filter_batch(hu: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """HU stage of the augmentation for crops ``[N, D, H, W]`` (float32) with ``params [N, 11]``:
    Gaussian blur (:func:`gaussian_blur3`), then noise (``std *`` :func:`noise_window`). Any device."""
    sigma = params[:, 0]
    if bool((sigma > 0).any()):
        hu = gaussian_blur3(hu, sigma)
    noisy = (params[:, 1] > 0).nonzero().flatten().tolist()
    if noisy:
        hu = hu.clone()  # noise is added in place: never into the caller's tensor
        p = params.cpu()
        for i in noisy:
            field = noise_window(hu.shape[1:], p[i, 2:5].long().tolist(), (p[i, 5:8] > 0).tolist(), hu.device)
            hu[i] = hu[i].add(field, alpha=float(p[i, 1]))
    return hu


def window_batch(hu: torch.Tensor, params: torch.Tensor, specs: Sequence[tuple[float, float]],
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Intensity, windowing and gamma: ``clip((a * hu + b - lo_c) / w_c, 0, 1) ** gamma`` per channel.

    Args:
        hu: ``[N, D, H, W]`` HU (any float dtype).
        params: ``[N, 11]`` (:data:`AUG_FIELDS`; uses scale ``a``, shift ``b``, gamma).
        specs: windows ``[(center, width)]``; ``lo_c = center_c - w_c / 2``.
        out: optional float32 ``[N, C, D, H, W]`` written in place.

    Returns:
        float32 ``[N, C, D, H, W]`` in [0, 1].
    """
    n = hu.shape[0]
    dev = hu.device
    lo = torch.tensor([c - w / 2.0 for c, w in specs], dtype=torch.float32, device=dev).view(1, -1, 1, 1, 1)
    inv = torch.tensor([1.0 / w for _, w in specs], dtype=torch.float32, device=dev).view(1, -1, 1, 1, 1)
    p = params.to(device=dev, dtype=torch.float32).view(n, -1, 1, 1, 1)
    scale = p[:, 8:9] * inv  # [N, C, 1, 1, 1]
    offset = (p[:, 9:10] - lo) * inv
    if out is None:
        out = torch.empty((n, len(specs)) + tuple(hu.shape[1:]), dtype=torch.float32, device=dev)
    torch.addcmul(offset, hu.float().unsqueeze(1), scale, out=out).clamp_(0.0, 1.0)
    gamma = p[:, 10:11]  # [N, 1, 1, 1, 1]
    if bool((gamma != 1).any()):
        if n == 1:
            out.log2_().mul_(float(gamma)).exp2_()  # out ** gamma (0 -> 0), faster than pow_ on the CPU
        else:
            out.log2_().mul_(gamma).exp2_()
    return out


def augment_crop(x: torch.Tensor, specs: Sequence[tuple[float, float]], aug: CropAugment,
                 rng: np.random.Generator, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Blur, noise, intensity, windowing and gamma of one resampled HU crop (flips come earlier).

    Args:
        x: float32 HU crop ``[D, H, W]``.
        specs: windows ``[(center, width)]``.
        aug: probabilities and ranges.
        rng: the sample's generator (the only source of randomness; see :func:`draw_augment`).
        out: optional float32 ``[C, D, H, W]`` tensor written in place (saves a stacking copy).

    Returns:
        float32 ``[C, D, H, W]`` in [0, 1] (``out`` when given).
    """
    params = draw_augment(aug, rng)[None]  # [1, 11]
    x = filter_batch(x[None], params)  # [1, D, H, W]
    return window_batch(x, params, specs, None if out is None else out[None])[0]
