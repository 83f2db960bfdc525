"""Intensity transforms of a crop, array logic only: Gaussian blur, Gaussian noise from a fixed
bank, histogram shift. Tensors in, tensors out, on any device; the random draws are the caller's.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch


def gaussian_blur3(x: torch.Tensor, sigma) -> torch.Tensor:
    """Gaussian blur of the last three axes by repeated separable 3-tap ``[a, 1 - 2a, a]`` passes.

    ``n = ceil(sigma^2 / 0.5)`` passes with ``a = sigma^2 / (2 n)`` (<= 0.25) give the variance
    ``sigma^2`` exactly (a binomial approximation of the Gaussian, close for these small sigmas);
    borders are replicated. Several times faster on one core than ``scipy.ndimage.gaussian_filter``.

    Args:
        x: float32 ``[..., D, H, W]``.
        sigma: standard deviation in voxels, a number or a tensor ``[...]`` (one per volume of the
            leading axes; 0 = that volume is left as it is).

    Returns:
        a new blurred tensor (``x`` itself when nothing is blurred).
    """
    lead = x.shape[:-3]
    sig = torch.as_tensor(sigma, dtype=torch.float32).to(x.device).expand(lead)
    var = sig.double().cpu() ** 2
    passes = torch.ceil(var / 0.5).long()  # 0 where sigma == 0
    if not bool((passes > 0).any()):
        return x
    if var.numel() == 1 or bool((var == var.flatten()[0]).all()):  # one sigma for all: straight through
        v, n = float(var.flatten()[0]), int(passes.flatten()[0])
        return _blur_passes(x, v / (2 * n), n)
    out = x.clone()
    for n in passes.unique().tolist():
        if n == 0:
            continue
        sel = (passes == n).to(x.device)
        a = (var.to(x.device)[sel] / (2 * n)).float()  # [k]
        out[sel] = _blur_passes(x[sel], a.view(-1, 1, 1, 1), n)
    return out


def _blur_passes(x: torch.Tensor, a, n: int) -> torch.Tensor:
    """``n`` passes of ``[a, 1 - 2a, a]`` over each of the last three axes (edges replicated)."""
    for _ in range(n):
        for d in (-3, -2, -1):
            size = x.shape[d]
            if size < 2:
                continue
            z = x * (1.0 - 2.0 * a)
            if isinstance(a, torch.Tensor):
                z.narrow(d, 1, size - 1).addcmul_(x.narrow(d, 0, size - 1), a)
                z.narrow(d, 0, size - 1).addcmul_(x.narrow(d, 1, size - 1), a)
                z.narrow(d, 0, 1).addcmul_(x.narrow(d, 0, 1), a)  # replicated borders
                z.narrow(d, size - 1, 1).addcmul_(x.narrow(d, size - 1, 1), a)
            else:
                z.narrow(d, 1, size - 1).add_(x.narrow(d, 0, size - 1), alpha=a)
                z.narrow(d, 0, size - 1).add_(x.narrow(d, 1, size - 1), alpha=a)
                z.narrow(d, 0, 1).add_(x.narrow(d, 0, 1), alpha=a)
                z.narrow(d, size - 1, 1).add_(x.narrow(d, size - 1, 1), alpha=a)
            x = z
    return x


NOISE_BANK_MARGIN = 16  # a noise field is a random window of a fixed bank this much larger per axis
NOISE_BANK_SEED = 20240607  # a constant of the code: the bank is the same in every process and run
_NOISE_BANKS: dict[tuple, torch.Tensor] = {}


def noise_window(shape: Sequence[int], offsets: Sequence[int], flips: Sequence[bool],
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """Unit Gaussian noise ``shape``: the window at ``offsets`` (each in ``[0, NOISE_BANK_MARGIN]``) of
    a fixed per-shape bank, flipped along the axes where ``flips`` is true.

    Drawing fresh normals costs more than the rest of a crop's augmentation; a window of a bank
    generated once per process (and device) from a constant seed gives ``17^3 * 8`` distinct fields,
    chosen by 6 draws of the sample's generator (see :func:`draw_augment`). Do not modify the result.
    """
    shape = tuple(int(s) for s in shape)
    key = (shape, str(torch.device(device)))
    bank = _NOISE_BANKS.get(key)
    if bank is None:
        cpu = _NOISE_BANKS.get((shape, "cpu"))
        if cpu is None:
            g = np.random.default_rng(NOISE_BANK_SEED)
            cpu = torch.from_numpy(g.standard_normal(tuple(s + NOISE_BANK_MARGIN for s in shape), dtype=np.float32))
            _NOISE_BANKS[(shape, "cpu")] = cpu
        bank = _NOISE_BANKS[key] = cpu.to(device)
    field = bank[tuple(slice(int(o), int(o) + n) for o, n in zip(offsets, shape))]
    dims = [d for d in range(3) if flips[d]]
    return field.flip(dims) if dims else field


def noise_field(shape: Sequence[int], rng: np.random.Generator) -> torch.Tensor:
    """Unit Gaussian noise ``shape`` at a random window and flips of the bank (:func:`noise_window`)."""
    offsets = rng.integers(0, NOISE_BANK_MARGIN + 1, size=3)
    return noise_window(shape, offsets, [rng.random() < 0.5 for _ in range(3)])


def histogram_shift(x: torch.Tensor, num_points: int, rng: np.random.Generator) -> torch.Tensor:
    """Monotone non-linear remap of [0, 1] intensities (the logic of MONAI ``RandHistogramShift``).

    ``num_points`` control points evenly spaced over [0, 1]; each inner point moves to a uniform
    draw between its left neighbour (already moved) and its right neighbour (not yet moved), so the
    curve stays non-decreasing and maps 0 -> 0 and 1 -> 1; voxels follow the piecewise-linear
    curve. The range is the fixed [0, 1] of the windowed channels (not the crop's min/max), so the
    remap does not depend on what the crop happens to contain. One curve for all channels.

    Args:
        x: float32 ``[C, D, H, W]`` in [0, 1].
        num_points: control points (>= 3).
        rng: the sample's generator (``num_points - 2`` draws).

    Returns:
        float32 tensor of the shape of ``x``, in [0, 1].
    """
    return apply_histogram_curve(x, draw_histogram_curve(num_points, rng))


def draw_histogram_curve(num_points: int, rng: np.random.Generator) -> np.ndarray:
    """The moved control points ``[num_points]`` of :func:`histogram_shift` (``num_points - 2`` draws)."""
    if num_points < 3:
        raise ValueError(f"histogram shift needs >= 3 control points; got {num_points}")
    moved = np.linspace(0.0, 1.0, num_points)
    for i in range(1, num_points - 1):
        moved[i] = rng.uniform(moved[i - 1], moved[i + 1])
    return moved


def apply_histogram_curve(x: torch.Tensor, moved, use_numpy: Optional[bool] = None) -> torch.Tensor:
    """Map [0, 1] values through the piecewise-linear curve from evenly spaced inputs to ``moved``.

    Args:
        x: float tensor in [0, 1] (any shape, any device).
        moved: ``[k]`` outputs of the ``k`` control points at ``linspace(0, 1, k)`` (k >= 2).
        use_numpy: compute with ``numpy.interp`` (default: on the CPU) or with torch ops (default
            elsewhere: the batch stays on its GPU).

    Returns:
        float32 tensor of the shape of ``x``: ``numpy.interp(x, linspace(0, 1, k), moved)``.
    """
    moved = np.asarray(moved.cpu() if isinstance(moved, torch.Tensor) else moved, dtype=np.float64)
    if use_numpy if use_numpy is not None else x.device.type == "cpu":
        ref = np.linspace(0.0, 1.0, len(moved))
        return torch.from_numpy(np.interp(x.numpy(), ref, moved).astype(np.float32))
    m = torch.as_tensor(moved, dtype=torch.float32).to(x.device)
    k = m.numel()
    pos = x.float().clamp(0.0, 1.0) * (k - 1)
    seg = pos.floor().clamp_(max=k - 2)
    t = pos - seg  # position inside the segment, [0, 1]
    seg = seg.long()
    lo = m[seg]
    return lo.add_(t.mul_(m[seg + 1] - lo))
