"""HU windows -> input channels in [0, 1].

A window ``(center, width)`` maps HU linearly onto [0, 1] over ``[center - width/2, center + width/2]``
and clips outside: ``clip((hu - center + width / 2) / width, 0, 1)``. Each window is one channel.
Presets: brain 40/80, subdural 80/200, stroke 40/40, bone 600/2800, soft_tissue 40/400; any other
window is written ``"center,width"``.

:func:`apply_windows` takes numpy (data loading) or torch (batched, on any device, e.g. on the GPU
after the DataLoader); :class:`ApplyWindows` / :class:`ApplyWindowsd` wrap it as MONAI transforms.
"""
from __future__ import annotations

from typing import Hashable, Mapping, Sequence, Union

import numpy as np
import torch
from monai.transforms import MapTransform, Transform

from config import parse_window

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (80.0, 200.0),
    "stroke": (40.0, 40.0),
    "bone": (600.0, 2800.0),
    "soft_tissue": (40.0, 400.0),
}

WindowLike = Union[str, Sequence[float]]
ArrayLike = Union[np.ndarray, torch.Tensor]


def window_specs(names: Sequence[WindowLike]) -> list[tuple[float, float]]:
    """Preset names, ``"center,width"`` strings or ``(center, width)`` pairs -> ``[(center, width)]``.

    Args:
        names: e.g. ``cfg.DATA.WINDOWS`` (``["brain", "subdural", "bone"]`` or ``["40,80"]``).

    Raises:
        ValueError: naming the entry that is neither a preset nor a valid center/width.
    """
    if isinstance(names, str):
        names = [names]
    if len(names) == 0:
        raise ValueError("no windows given; name at least one (one input channel each)")
    specs = []
    for n in names:
        if isinstance(n, str):
            spec = WINDOW_PRESETS[n] if n in WINDOW_PRESETS else parse_window(n)
        else:
            if len(n) != 2:
                raise ValueError(f"window {n!r} is not a (center, width) pair")
            spec = (float(n[0]), float(n[1]))
            if not spec[1] > 0:
                raise ValueError(f"window {n!r} has width {spec[1]}; it must be > 0")
        specs.append((float(spec[0]), float(spec[1])))
    return specs


def apply_windows(hu: ArrayLike, specs: Sequence[tuple[float, float]]) -> ArrayLike:
    """HU -> one channel in [0, 1] per window.

    Args:
        hu: numpy ``[*spatial]`` (any dtype, e.g. an int16 memmap crop), or torch ``[B, 1, D, H, W]``,
            ``[1, D, H, W]`` or ``[D, H, W]`` on any device.
        specs: ``[(center, width)]`` from :func:`window_specs`.

    Returns:
        numpy float32 ``[C, *spatial]``; torch ``[B, C, D, H, W]`` / ``[C, D, H, W]`` (float32, or the
        input's floating dtype), on the input's device.
    """
    specs = [(float(c), float(w)) for c, w in specs]
    if not specs:
        raise ValueError("no windows given")
    if isinstance(hu, torch.Tensor):
        return _apply_torch(hu, specs)
    hu = np.asarray(hu)
    out = np.empty((len(specs),) + hu.shape, dtype=np.float32)  # [C, *spatial]
    for c, (center, width) in enumerate(specs):
        ch = out[c]
        np.subtract(hu, center - width / 2.0, out=ch, casting="unsafe")
        ch *= np.float32(1.0 / width)
        np.clip(ch, 0.0, 1.0, out=ch)
    return out


def _apply_torch(hu: torch.Tensor, specs: list[tuple[float, float]]) -> torch.Tensor:
    if hu.ndim == 5:
        if hu.shape[1] != 1:
            raise ValueError(f"expected HU of shape [B, 1, D, H, W]; got {tuple(hu.shape)}")
        view = (1, -1, 1, 1, 1)
    elif hu.ndim == 4:
        if hu.shape[0] != 1:
            raise ValueError(f"expected HU of shape [1, D, H, W]; got {tuple(hu.shape)}")
        view = (-1, 1, 1, 1)
    elif hu.ndim == 3:
        hu = hu.unsqueeze(0)  # [1, D, H, W]
        view = (-1, 1, 1, 1)
    else:
        raise ValueError(f"expected HU of shape [B, 1, D, H, W], [1, D, H, W] or [D, H, W]; "
                         f"got {tuple(hu.shape)}")
    dtype = hu.dtype if hu.is_floating_point() else torch.float32
    lo = torch.tensor([c - w / 2.0 for c, w in specs], dtype=dtype, device=hu.device).view(view)
    inv = torch.tensor([1.0 / w for _, w in specs], dtype=dtype, device=hu.device).view(view)
    return ((hu.to(dtype) - lo) * inv).clamp_(0.0, 1.0)  # broadcast over the channel axis


class ApplyWindows(Transform):
    """Array transform: HU -> stacked window channels in [0, 1] (see :func:`apply_windows`).

    Args:
        windows: preset names, ``"center,width"`` strings or ``(center, width)`` pairs.
    """

    backend = ["numpy", "torch"]

    def __init__(self, windows: Sequence[WindowLike]):
        self.specs = window_specs(windows)

    def __call__(self, img: ArrayLike) -> ArrayLike:
        """numpy ``[*spatial]`` -> ``[C, *spatial]``; torch ``[B, 1, D, H, W]`` -> ``[B, C, D, H, W]``."""
        return apply_windows(img, self.specs)


class ApplyWindowsd(MapTransform):
    """Dictionary wrapper of :class:`ApplyWindows`.

    Args:
        keys: keys of the HU arrays to window (replaced by the channels).
        windows: as :class:`ApplyWindows`.
        allow_missing_keys: do not raise when a key is absent.
    """

    backend = ApplyWindows.backend

    def __init__(self, keys, windows: Sequence[WindowLike], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.windower = ApplyWindows(windows)

    def __call__(self, data: Mapping[Hashable, ArrayLike]) -> dict[Hashable, ArrayLike]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.windower(d[key])
        return d
