"""SimCLR views: pairs of augmented views of a region; the region depends on ``SIMCLR.MODE``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from data.io import AIR_HU, BadInputError
from data.transforms import crop_pad, crop_pad_offsets
from data.views.augment import AUG_FIELDS, CropAugment, augment_crop, draw_augment
from data.views.device import simclr_batch_transform
from data.views.geometry import random_head_voxel, resized_crop, sample_crop_box, sample_negative_center, world_to_voxel
from data.views.intensity import apply_histogram_curve, draw_histogram_curve
from data.windows import window_specs


@dataclass(frozen=True)
class SimCLRAugment(CropAugment):
    """Per-view augmentation of a SimCLR crop: :class:`CropAugment` plus a histogram shift.

    Order: flips, Gaussian blur, Gaussian noise, HU scale and shift, windowing, (gamma), then the
    histogram shift of the [0, 1] channels (:func:`histogram_shift`).

    Args:
        hist_p: probability of the histogram shift.
        hist_points: ``(low, high)`` number of control points (inclusive, >= 3); fewer points
            move each one further (stronger distortion).
        (the other fields as :class:`CropAugment`)
    """

    hist_p: float = 0.5
    hist_points: tuple[int, int] = (5, 5)


# CT-FM-like: left-right flips only (a head is left-right symmetric, and a flip of another axis of
# the axial plane would make the optional 90-degree rotation task ambiguous: rot180 = flip X + flip Y),
# histogram shift with 5 control points, blur, noise, and a mild HU scale/shift.
SIMCLR_AUGMENT = SimCLRAugment(flip_p=0.5, flip_axes=(0,), intensity_p=0.8, hu_scale=0.1, hu_shift=10.0,
                               gamma_p=0.0, blur_p=0.5, blur_sigma=(0.1, 1.0), noise_p=0.5,
                               noise_std=(2.0, 10.0), hist_p=0.5, hist_points=(5, 5))


class SimCLRViews:
    """SimCLR views of one scan: ``{"views": float32 [V, C, *SIMCLR.CROP_SIZE]}``.

    Views come in positive pairs: views ``2k`` and ``2k + 1`` are two augmented views of the same
    *region* (so the positive of view ``i`` is view ``i ^ 1``). Per ``SIMCLR.MODE``:

    * ``inter`` (V = 2): the region is the whole preprocessed head.
    * ``intra`` (V = 2 * SIMCLR.PATCHES_PER_SCAN): ``PATCHES_PER_SCAN`` regions of ``CROP_SIZE``
      voxels at uniform random positions (CT-FM: patches may overlap; they are padded with air
      where they reach past the array), pair k = region k.
    * ``negative_mined`` (V = 4): views 0, 1 of a ``CROP_SIZE`` region centred at the seed point
      (``meta["coord"]``, world mm, mapped to a voxel with ``inv(meta["affine"])``; a random head
      voxel (HU > DATA.HEAD_THRESHOLD) when the row has no coordinate); views 2, 3 of a region of
      the same size elsewhere in the scan whose box does not overlap the seed's
      (:func:`sample_negative_center`). A coordinate outside the array raises BadInputError.

    Each view is a random resized crop of its region (:func:`sample_crop_box` with
    ``SIMCLR.CROP_SCALE`` = volume fraction of the region and ``SIMCLR.CROP_ASPECT`` = largest
    per-axis side ratio), cut from the HU array (int16 memmap: only that box is read; air outside
    the array), flipped, resampled to ``CROP_SIZE`` (trilinear, the crop only), blurred, noised,
    intensity scaled and shifted, windowed (``DATA.WINDOWS``) and histogram shifted (``augment``).
    With ``CROP_SCALE [1, 1]`` and ``CROP_ASPECT 1`` a view is its whole region (the seed voxel at
    index ``CROP_SIZE // 2``). Only ``rng`` is drawn from. After ``data.datasets.collate``:
    ``[B, V, C, D, H, W]``.

    Device stage (``device_stage=True``, for GPU training; issue 11): the workers stop after the
    resize and return ``{"views": float16 HU [V, *CROP_SIZE], "views_aug": [V, 11], "views_hist":
    [V, 1 + P]}`` (the same draws in the same order); :func:`simclr_batch_transform` (which
    :class:`methods.simclr.SimCLR` applies first in its forward) blurs, noises, windows and
    histogram-shifts the whole batch on the GPU: the same views up to the float16 rounding of HU.

    The same callable serves training and validation (``train`` is accepted for the entry-script
    signature): the dataset's generator for epoch 0 makes validation views identical every pass.

    Args:
        cfg: the config (SIMCLR.MODE, SIMCLR.CROP_SIZE ([] = DATA.ROI), SIMCLR.CROP_SCALE,
            SIMCLR.CROP_ASPECT, SIMCLR.PATCHES_PER_SCAN, DATA.WINDOWS, DATA.HEAD_THRESHOLD).
        train: unused (see above).
        augment: per-view augmentation.
        device_stage: leave filtering and windowing to :func:`simclr_batch_transform` (attribute).
    """

    def __init__(self, cfg, train: bool = True, augment: SimCLRAugment = SIMCLR_AUGMENT,
                 device_stage: bool = False):
        self.device_stage = bool(device_stage)
        self.mode = str(cfg.SIMCLR.MODE)
        if self.mode not in ("inter", "intra", "negative_mined"):
            raise ValueError(f"SIMCLR.MODE = {self.mode!r}; expected 'inter', 'intra' or 'negative_mined'")
        self.crop = tuple(int(s) for s in (list(cfg.SIMCLR.CROP_SIZE) or list(cfg.DATA.ROI)))
        if len(self.crop) != 3 or min(self.crop) < 1:
            raise ValueError(f"SIMCLR.CROP_SIZE = {list(cfg.SIMCLR.CROP_SIZE)}; expected [] or 3 positive sizes")
        self.scale = tuple(float(s) for s in cfg.SIMCLR.CROP_SCALE)
        self.patches = int(cfg.SIMCLR.PATCHES_PER_SCAN)
        if self.patches < 1:
            raise ValueError(f"SIMCLR.PATCHES_PER_SCAN = {self.patches}; it must be >= 1")
        self.specs = window_specs(list(cfg.DATA.WINDOWS))
        self.head_threshold = float(cfg.DATA.HEAD_THRESHOLD)
        self.augment = augment
        self.max_aspect = float(cfg.SIMCLR.CROP_ASPECT)
        if self.max_aspect < 1:
            raise ValueError(f"SIMCLR.CROP_ASPECT = {self.max_aspect}; it must be >= 1 (1 = no stretching)")
        self.num_views = views_per_scan(self.mode, self.patches)

    def regions(self, hu: np.ndarray, meta: Optional[dict], rng: np.random.Generator
                ) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
        """``[(start [3] (may be negative), size)]`` of the regions, one per positive pair."""
        if self.mode == "inter":
            return [(np.zeros(3, dtype=np.int64), tuple(hu.shape))]
        half = np.asarray(self.crop) // 2
        if self.mode == "intra":
            return [(np.asarray(crop_pad_offsets(hu.shape, self.crop, rng)), self.crop) for _ in range(self.patches)]
        seed = self.seed_voxel(hu, meta, rng)
        neg = sample_negative_center(hu.shape, seed, self.crop, rng, accept=self._in_head(hu))
        return [(seed - half, self.crop), (neg - half, self.crop)]

    def _in_head(self, hu: np.ndarray) -> Callable[[np.ndarray], bool]:
        return lambda v: float(hu[tuple(v)]) > self.head_threshold

    def seed_voxel(self, hu: np.ndarray, meta: Optional[dict], rng: np.random.Generator) -> np.ndarray:
        """Voxel of ``meta["coord"]`` (world mm) through ``meta["affine"]``, else a random head voxel.

        Raises:
            BadInputError: the coordinate maps outside the array (wrong coordinate or frame).
        """
        coord = (meta or {}).get("coord")
        if coord is None:
            return random_head_voxel(hu, self.head_threshold, rng)
        if meta.get("affine") is None:
            raise ValueError(f"{meta.get('path', 'the scan')}: a seed coordinate needs meta['affine']")
        v = np.rint(world_to_voxel(meta["affine"], coord)).astype(np.int64)
        if (v < 0).any() or (v >= np.asarray(hu.shape)).any():
            raise BadInputError(str(meta.get("path", "?")),
                                f"seed point {[float(c) for c in coord]} mm (coordX/Y/Z) maps to voxel "
                                f"{v.tolist()}, outside the preprocessed array of shape {list(hu.shape)}")
        return v

    def view_hu(self, hu: np.ndarray, start: np.ndarray, size: Sequence[int], rng: np.random.Generator
                ) -> torch.Tensor:
        """Box, flips and trilinear resize of one view of the region: float32 HU ``CROP_SIZE``."""
        aug = self.augment
        sub_start, sub_size = sample_crop_box(size, self.crop, self.scale, rng, self.max_aspect)
        flips = [ax for ax in aug.flip_axes if rng.random() < aug.flip_p]
        box = crop_pad(hu, sub_size, np.asarray(start) + np.asarray(sub_start), AIR_HU)  # only the box is read
        return resized_crop(box, (0, 0, 0), box.shape, self.crop, flips)  # float32 HU [D, H, W]

    def draw_histogram(self, rng: np.random.Generator) -> np.ndarray:
        """float64 ``[1 + hist_points[1]]``: the number k of control points (0 = no shift), then the k
        moved points."""
        aug = self.augment
        row = np.zeros(1 + int(aug.hist_points[1]))
        if rng.random() < aug.hist_p:
            lo, hi = aug.hist_points
            k = int(rng.integers(lo, hi + 1))
            row[0] = k
            row[1:1 + k] = draw_histogram_curve(k, rng)
        return row

    def view(self, hu: np.ndarray, start: np.ndarray, size: Sequence[int], rng: np.random.Generator
             ) -> torch.Tensor:
        """One augmented view ``[C, *CROP_SIZE]`` of the region ``[start, start + size)``."""
        x = self.view_hu(hu, start, size, rng)
        out = augment_crop(x, self.specs, self.augment, rng)  # [C, D, H, W] in [0, 1]
        hist = self.draw_histogram(rng)
        return apply_histogram_curve(out, hist[1:1 + int(hist[0])]) if hist[0] > 0 else out

    def __call__(self, hu: np.ndarray, meta: Optional[dict], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        if hu.ndim != 3 or min(hu.shape) < 1:
            where = (meta or {}).get("path", "the scan")
            raise ValueError(f"{where}: SimCLR views need a non-empty 3D array; got shape {tuple(hu.shape)}")
        regions = [r for r in self.regions(hu, meta, rng) for _ in range(2)]
        if not self.device_stage:
            return {"views": torch.stack([self.view(hu, start, size, rng) for start, size in regions])}  # [V, C, *CROP]
        n = len(regions)
        crops = torch.empty((n,) + self.crop, dtype=torch.float16)  # [V, *CROP_SIZE] HU, resized, not filtered
        params = torch.empty((n, len(AUG_FIELDS)))
        hist = torch.empty((n, 1 + int(self.augment.hist_points[1])), dtype=torch.float64)
        for i, (start, size) in enumerate(regions):  # the draws of view(), in its order
            crops[i].copy_(self.view_hu(hu, start, size, rng))
            params[i] = draw_augment(self.augment, rng)
            hist[i] = torch.from_numpy(self.draw_histogram(rng))
        return {"views": crops, "views_aug": params, "views_hist": hist}

    def batch_transform(self, batch: dict) -> dict:
        """The device stage (a no-op unless the batch came from ``device_stage=True``)."""
        return simclr_batch_transform(batch, self.specs)

    def __repr__(self) -> str:
        return (f"SimCLRViews(mode={self.mode!r}, views={self.num_views}, crop={self.crop}, scale={self.scale}, "
                f"windows={self.specs}, device_stage={self.device_stage})")


def views_per_scan(mode: str, patches_per_scan: int = 1) -> int:
    """V of :class:`SimCLRViews`: 2 (inter), 2 * patches (intra), 4 (negative_mined)."""
    if mode == "inter":
        return 2
    if mode == "intra":
        return 2 * int(patches_per_scan)
    if mode == "negative_mined":
        return 4
    raise ValueError(f"SIMCLR.MODE = {mode!r}; expected 'inter', 'intra' or 'negative_mined'")
