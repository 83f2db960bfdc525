"""The single view of MAE and the downstream tasks: one ROI-sized crop of the head, windowed.

Also the two small helpers any view may reuse: :func:`window_tensor` (HU -> window channels) and
:func:`random_flip`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from data.transforms import fit_to_roi
from data.windows import apply_windows, window_specs


def window_tensor(hu: np.ndarray, specs: Sequence[tuple[float, float]], hu_shift: float = 0.0) -> torch.Tensor:
    """HU crop ``[X, Y, Z]`` -> float32 tensor ``[C, X, Y, Z]`` in [0, 1] (one channel per window).

    Args:
        hu: HU array (any dtype, may be a flipped view).
        specs: ``[(center, width)]``.
        hu_shift: HU added to every voxel (applied by moving the windows: free).
    """
    if hu_shift:
        specs = [(c - hu_shift, w) for c, w in specs]
    return torch.from_numpy(apply_windows(hu, specs))


def random_flip(hu: np.ndarray, rng: np.random.Generator, axes: Sequence[int] = (0,), p: float = 0.5
                ) -> np.ndarray:
    """Flip each of ``axes`` with probability ``p`` (a view, no copy). Axis 0 = X = left-right."""
    for ax in axes:
        if rng.random() < p:
            hu = np.flip(hu, axis=ax)
    return hu


class SingleView:
    """One ROI-sized crop of the head, windowed: ``{"image": float32 [C, *DATA.ROI]}``.

    Training: random crop/pad offset (or random padding placement with ``DATA.FIT resize``), a
    left-right flip with probability 0.5 and a small random HU shift. Evaluation: centred and
    deterministic.

    Args:
        cfg: the config (DATA.ROI, DATA.WINDOWS, DATA.FIT).
        train: random augmentation (True) or centred and deterministic (False).
        flip_p: probability of the left-right (X) flip when training.
        hu_shift: training draws a HU offset uniformly in ``[-hu_shift, hu_shift]`` (0 = none).
    """

    def __init__(self, cfg, train: bool, flip_p: float = 0.5, hu_shift: float = 5.0):
        self.roi = tuple(int(r) for r in cfg.DATA.ROI)
        self.specs = window_specs(list(cfg.DATA.WINDOWS))
        self.fit = str(cfg.DATA.FIT)
        self.train = bool(train)
        self.flip_p = float(flip_p)
        self.hu_shift = float(hu_shift)

    def __call__(self, hu: np.ndarray, meta: Optional[dict], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        if not self.train:
            x = fit_to_roi(hu, self.roi, self.fit, rng=None)  # centred, deterministic
            return {"image": window_tensor(x, self.specs)}
        x = fit_to_roi(hu, self.roi, self.fit, rng=rng)  # only the crop is read from a memmap
        x = random_flip(x, rng, axes=(0,), p=self.flip_p)
        shift = float(rng.uniform(-self.hu_shift, self.hu_shift)) if self.hu_shift else 0.0
        return {"image": window_tensor(x, self.specs, shift)}  # [C, *ROI]

    def __repr__(self) -> str:
        return (f"SingleView(roi={self.roi}, windows={self.specs}, fit={self.fit!r}, train={self.train}, "
                f"flip_p={self.flip_p}, hu_shift={self.hu_shift})")
