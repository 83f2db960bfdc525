"""Alice views: the same anatomy in two heads, matched through a head-CT template.

A sample is scan A plus a partner scan B drawn by the dataset (another row of the manifest). A
point p is drawn inside A's head; when both scans carry a template registration
(``meta["template"]``, the scan -> template world transform stored at preprocessing, see
docs/data.md#registration-to-a-head-ct-template), p goes through A's transform into the template
and back through B's into B, and the crop around p in A (the query view) and the crop of the SAME
physical size around p' in B (the anchor view) show the same anatomy in two people. When that is
not possible (no partner, a scan without a usable registration, p' outside B's head, or with
probability ``1 - ALICE.CROSS_SCAN_PROB``) the anchor is a second crop of A around p moved by up to
``ALICE.SAME_SCAN_JITTER_MM``: the crop views of plain DINO. ``"cross"`` says which one a sample got.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from data.cache import IDENTITY_TEMPLATE
from data.io import BadInputError
from data.registration import map_voxel
from data.views.augment import CropAugment, augment_crop
from data.views.dino import DINO_GLOBAL_AUGMENTS
from data.views.geometry import random_head_voxel
from data.windows import window_specs

AIR_HU = -1024.0  # what a crop reaching past the cached array (cropped to the head with a margin) is padded with
MATCH_TRIES = 8  # points of A tried before falling back to same-scan views


def centered_crop(hu: np.ndarray, center: Sequence[float], sizes: Sequence[int], out_size: Sequence[int],
                  flip_axes: Sequence[int] = (), pad_value: float = AIR_HU) -> torch.Tensor:
    """A box of ``sizes`` voxels centred on the continuous voxel ``center`` (to the nearest voxel: the box centre,
    ``start + (size - 1) / 2``, lies within half a voxel of it), resampled to ``out_size``.

    Only the part of the box inside the array is read; the rest is ``pad_value`` (air: the cached
    array is cropped to the head with a margin, so outside it there is no anatomy). Trilinear
    resize (``align_corners=False``) when ``sizes != out_size``.

    Args:
        hu: HU ``[X, Y, Z]`` (int16 memmap or float32).
        center: continuous voxel index ``[3]`` of the box centre.
        sizes: box side per axis, voxels.
        out_size: output ``[D, H, W]``.
        flip_axes: axes flipped after the cut.
        pad_value: HU outside the array.

    Returns:
        float32 HU tensor ``out_size``.
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"crop sizes {sizes}: expected 3 positive sizes")
    starts = [int(np.floor(c - (s - 1) / 2.0 + 0.5)) for c, s in zip(center, sizes)]  # box centre within 1/2 voxel
    box = np.full(sizes, pad_value, dtype=np.float32)  # [sx, sy, sz]
    src, dst = [], []
    for st, s, n in zip(starts, sizes, hu.shape):
        lo, hi = max(st, 0), min(st + s, n)
        if hi <= lo:  # the box misses the array on this axis: all padding
            return _resize(torch.from_numpy(box), flip_axes, out_size)
        src.append(slice(lo, hi))
        dst.append(slice(lo - st, hi - st))
    box[tuple(dst)] = hu[tuple(src)]
    return _resize(torch.from_numpy(box), flip_axes, out_size)


def _resize(x: torch.Tensor, flip_axes: Sequence[int], out_size: Sequence[int]) -> torch.Tensor:
    if flip_axes:
        x = torch.flip(x, dims=list(flip_axes))
    out_size = tuple(int(s) for s in out_size)
    if tuple(x.shape) == out_size:
        return x.contiguous()
    return torch.nn.functional.interpolate(x[None, None], size=out_size, mode="trilinear",
                                           align_corners=False)[0, 0]  # [D, H, W]


def _inside_head(hu: np.ndarray, voxel: np.ndarray, threshold: float) -> bool:
    v = np.rint(voxel).astype(np.int64)
    if (v < 0).any() or (v >= np.asarray(hu.shape)).any():
        return False
    return float(hu[tuple(v)]) > threshold


class AliceViews:
    """``{"query": [C, *DATA.ROI], "anchor": [C, *DATA.ROI], "cross": float32 []}`` of a scan and its partner.

    Called by :class:`data.datasets.VolumeDataset` as ``view(hu, meta, rng, partner=(hu_b, meta_b))`` when
    ``needs_partner`` (``ALICE.CROSS_SCAN_PROB > 0``); ``partner`` is None when the manifest has a single row
    or the partner is unreadable (skipped) or smaller than the crop. A config that can never match (no
    ``DATA.TEMPLATE``, or a template file without ``DATA.CACHE_DIR``) is refused at construction. Both crops have the
    same physical size: ``round(DATA.ROI * s)`` voxels of the cache grid (``DATA.SPACING``, the same for
    every scan) with ``s ~ U(ALICE.CROP_SCALE)``, resampled to ``DATA.ROI``. Each view gets its own
    flips and intensity augmentation (those of DINO's two global views). Every draw comes from ``rng``.

    Args:
        cfg: the config (DATA.ROI, DATA.WINDOWS, DATA.SPACING, DATA.HEAD_THRESHOLD, ALICE.*).
        augments: augmentation of the query and the anchor view.
    """

    def __init__(self, cfg, augments: Sequence[CropAugment] = DINO_GLOBAL_AUGMENTS):
        self.specs = window_specs(list(cfg.DATA.WINDOWS))
        self.roi = tuple(int(r) for r in cfg.DATA.ROI)
        self.spacing = np.asarray([float(s) for s in cfg.DATA.SPACING])
        self.threshold = float(cfg.DATA.HEAD_THRESHOLD)
        a = cfg.ALICE
        self.cross_prob = float(a.CROSS_SCAN_PROB)
        self.scale = (float(a.CROP_SCALE[0]), float(a.CROP_SCALE[1]))
        self.jitter_mm = float(a.SAME_SCAN_JITTER_MM)
        self.needs_partner = self.cross_prob > 0  # the dataset loads a partner scan only then
        template, cache = str(cfg.DATA.TEMPLATE), str(cfg.DATA.CACHE_DIR)
        if self.needs_partner and (not template or (template != IDENTITY_TEMPLATE and not cache)):
            from config import ConfigError
            raise ConfigError(
                f"ALICE.CROSS_SCAN_PROB = {self.cross_prob} asks for views of the same anatomy in two scans, but "
                f"DATA.TEMPLATE = {template!r} and DATA.CACHE_DIR = {cache!r}: the matches come from the template "
                "registrations of a cache made by tools/preprocess.py with DATA.TEMPLATE set (or DATA.TEMPLATE "
                "identity for scans already in one frame); without them every sample would silently get same-scan "
                "views. Set both, or ALICE.CROSS_SCAN_PROB 0 for same-scan views on purpose")
        if len(augments) != 2:
            raise ValueError(f"AliceViews needs 2 augmentations (query, anchor); got {len(augments)}")
        self.augments = tuple(augments)

    def _too_small(self, hu: np.ndarray) -> bool:
        return any(int(round(r * self.scale[0])) > n for r, n in zip(self.roi, hu.shape))

    def _check_size(self, hu: np.ndarray, meta: dict) -> None:
        """A scan smaller than the crop on some axis even at its smallest scale is refused (BadInputError: under
        ``DATA.ON_ERROR skip`` it is listed in skipped.csv and the next row takes its place)."""
        smallest = [int(round(r * self.scale[0])) for r in self.roi]
        if self._too_small(hu):
            raise BadInputError(meta.get("path", "a scan"),
                f"its cached array is {list(hu.shape)} voxels of DATA.SPACING "
                f"{self.spacing.tolist()} mm, smaller than the smallest Alice crop, DATA.ROI {list(self.roi)} x "
                f"ALICE.CROP_SCALE[0] {self.scale[0]} = {smallest} voxels; lower DATA.ROI or ALICE.CROP_SCALE, or "
                "use a finer DATA.SPACING")

    def _point(self, hu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A random voxel inside the head (HU above DATA.HEAD_THRESHOLD; the array centre after 32 misses), ``[3]``."""
        return random_head_voxel(hu, self.threshold, rng).astype(np.float64)

    def _match(self, hu: np.ndarray, meta: dict, partner, rng: np.random.Generator
               ) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(p in A, p' in B, hu_b)`` through the template, or None when no match is possible."""
        if partner is None or rng.random() >= self.cross_prob:
            return None
        hu_b, meta_b = partner
        t_a, t_b = meta.get("template"), meta_b.get("template")
        if t_a is None or t_b is None:
            return None
        for _ in range(MATCH_TRIES):
            p = self._point(hu, rng)
            q = map_voxel(p, meta["affine"], t_a, meta_b["affine"], t_b)
            if _inside_head(hu_b, q, self.threshold):
                return p, q, hu_b
        return None

    def __call__(self, hu: np.ndarray, meta: dict, rng: np.random.Generator,
                 partner: Optional[tuple[np.ndarray, dict]] = None) -> dict[str, torch.Tensor]:
        if hu.ndim != 3 or min(hu.shape) < 1:
            raise ValueError(f"{meta.get('path', 'the scan')}: Alice views need a non-empty 3D array; "
                             f"got shape {tuple(hu.shape)}")
        self._check_size(hu, meta)
        if partner is not None and self._too_small(partner[0]):
            partner = None  # the partner is refused when it is the scan of its own sample
        match = self._match(hu, meta, partner, rng)
        if match is not None:
            p, q, hu_b = match
        else:
            p = self._point(hu, rng)
            q = p + rng.uniform(-self.jitter_mm, self.jitter_mm, size=3) / self.spacing
            hu_b = hu
        s = rng.uniform(*self.scale)
        sizes = [max(1, int(round(r * s))) for r in self.roi]  # the same box (and mm) in both scans
        out = {}
        for name, src, c, aug in (("query", hu, p, self.augments[0]), ("anchor", hu_b, q, self.augments[1])):
            flips = [ax for ax in aug.flip_axes if rng.random() < aug.flip_p]
            crop = centered_crop(src, c, sizes, self.roi, flips)  # float32 HU [*ROI]
            out[name] = augment_crop(crop, self.specs, aug, rng)  # [C, *ROI]
        out["cross"] = torch.tensor(float(match is not None))
        return out

    def __repr__(self) -> str:
        return (f"AliceViews(roi={self.roi}, windows={self.specs}, cross_scan_prob={self.cross_prob}, "
                f"crop_scale={self.scale}, same_scan_jitter_mm={self.jitter_mm})")
