"""The segmentation view: an image crop and its label crop through the same spatial transforms.

Training: a ``DATA.ROI`` window, centred with probability ``DOWNSTREAM.SEG_FOREGROUND_PROB`` on a
random voxel of a foreground class drawn uniformly among the classes the scan holds (as MONAI's
``RandCropByLabelClassesd``: a lesion of a few voxels is seen as often as a large one), else placed
uniformly; the same left-right flip for both; a small HU shift of the image. Evaluation: the whole
preprocessed volume (sliding-window inference cuts the windows). Label values of
``DOWNSTREAM.SEG_CLASSES`` become classes ``1..K`` in that order, every other value background 0.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from data.transforms import crop_pad, crop_pad_offsets
from data.views.single import window_tensor
from data.windows import window_specs


def class_lut(values: Sequence[int], max_value: int) -> np.ndarray:
    """Lookup table ``raw label value -> class index`` (``values[k]`` -> ``k + 1``, others 0), ``[max_value + 1]``."""
    lut = np.zeros(max(int(max_value), max(values)) + 1, dtype=np.int64)
    for k, v in enumerate(values):
        lut[int(v)] = k + 1
    return lut


def map_classes(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Raw label map -> class indices ``0..K`` (int64), see :func:`class_lut`; negative values -> 0."""
    lab = np.asarray(labels)
    if lab.size == 0:
        return lab.astype(np.int64)
    lab = np.where(lab < 0, 0, lab)
    return class_lut(values, int(lab.max()))[lab]


class SegmentView:
    """``{"image": float32 [C, ...], "target": int64 [1, ...]}`` of a scan and its label map (``meta["mask"]``).

    Args:
        cfg: the config (DATA.ROI, DATA.WINDOWS, DOWNSTREAM.SEG_CLASSES, DOWNSTREAM.SEG_FOREGROUND_PROB).
        train: random foreground-centred crop, flip and HU shift (True), or the whole volume (False).
        flip_p: probability of the left-right (X) flip when training.
        hu_shift: training draws a HU offset uniformly in ``[-hu_shift, hu_shift]``.
    """

    def __init__(self, cfg, train: bool, flip_p: float = 0.5, hu_shift: float = 5.0):
        self.roi = tuple(int(r) for r in cfg.DATA.ROI)
        self.specs = window_specs(list(cfg.DATA.WINDOWS))
        self.values = [int(v) for v in cfg.DOWNSTREAM.SEG_CLASSES]
        self.fg_prob = float(cfg.DOWNSTREAM.SEG_FOREGROUND_PROB)
        self.train = bool(train)
        self.flip_p = float(flip_p)
        self.hu_shift = float(hu_shift)

    def crop_starts(self, labels: np.ndarray, rng: np.random.Generator) -> tuple[int, ...]:
        """Window start per axis: centred on a foreground voxel (class drawn among those present) or uniform."""
        if rng.random() < self.fg_prob:
            present = [v for v in self.values if v <= labels.max() and (labels == v).any()] if labels.size else []
            if present:
                v = present[int(rng.integers(len(present)))]
                flat = np.flatnonzero(np.asarray(labels) == v)
                centre = np.unravel_index(int(flat[int(rng.integers(flat.size))]), labels.shape)
                starts = []
                for c, n, r in zip(centre, labels.shape, self.roi):
                    s = int(c) - r // 2
                    s = min(max(s, min(0, n - r)), max(0, n - r))  # inside the array where the array allows
                    starts.append(s)
                return tuple(starts)
        return crop_pad_offsets(labels.shape, self.roi, rng)

    def __call__(self, hu: np.ndarray, meta: Optional[dict], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        labels = None if meta is None else meta.get("mask")
        if labels is None:
            raise ValueError("the segmentation view needs meta['mask'] (VolumeDataset(..., masks=True))")
        if not self.train:
            target = map_classes(labels, self.values)[None]  # [1, X, Y, Z]
            return {"image": window_tensor(np.asarray(hu, dtype=np.float32), self.specs),
                    "target": torch.from_numpy(np.ascontiguousarray(target)),
                    "affine": torch.as_tensor(np.asarray(meta["affine"], dtype=np.float64))}
        starts = self.crop_starts(labels, rng)
        x = crop_pad(hu, self.roi, starts)  # only the window is read from a memmap
        y = crop_pad(labels, self.roi, starts, pad_value=0)
        if rng.random() < self.flip_p:
            x, y = np.flip(x, axis=0), np.flip(y, axis=0)
        shift = float(rng.uniform(-self.hu_shift, self.hu_shift)) if self.hu_shift else 0.0
        target = map_classes(np.ascontiguousarray(y), self.values)[None]  # [1, *ROI]
        return {"image": window_tensor(np.ascontiguousarray(x), self.specs, shift),  # [C, *ROI]
                "target": torch.from_numpy(target)}

    def __repr__(self) -> str:
        return (f"SegmentView(roi={self.roi}, windows={self.specs}, classes={self.values}, "
                f"foreground_prob={self.fg_prob}, train={self.train})")
