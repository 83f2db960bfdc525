"""The scanner: head pose, head holder, point-spread blur and noise of one series.

A pose (tilt + position) maps the head frame into the scanner's RAS world; the head holder is a
curved shell below the head (the patient lies supine, gravity is -y) separated from it by air;
a point-spread blur (~0.6 mm) and spatially correlated noise, stronger in the head's centre, come
last (:func:`acquire`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import ndimage

from data.phantom.anatomy import AIR, BED
from data.phantom.geometry import _rotation


@dataclass
class Pose:
    """Head frame -> world: ``p = rotation @ q + center``; angles (pitch, roll, yaw) in degrees."""

    angles: np.ndarray
    center: np.ndarray

    @property
    def rotation(self) -> np.ndarray:
        return _rotation(*self.angles)


@dataclass
class Scan:
    """Series-level acquisition: head pose, noise level, head holder."""

    pose: Pose
    noise_sigma: float  # HU, std of the noise in the brain
    bed: dict[str, float]  # gap, thickness, hu, arc (deg), shift (mm)


def sample_pose(rng: np.random.Generator, base: Optional[Pose] = None) -> Pose:
    """Head tilt and position; with ``base``, a small re-positioning of it (second series)."""
    if base is None:
        angles = np.array([rng.uniform(-12, 12), rng.uniform(-5, 5), rng.uniform(-6, 6)])
        center = np.array([rng.uniform(-8, 8), rng.uniform(0, 10), rng.uniform(-6, 8)])
    else:
        angles = base.angles + rng.uniform(-3, 3, 3)
        center = base.center + rng.uniform(-4, 4, 3)
    return Pose(angles, center)


def sample_scan(rng: np.random.Generator, base: Optional[Scan] = None) -> Scan:
    """Pose, noise level and head holder of one series (``base``: re-scan of the same patient)."""
    pose = sample_pose(rng, None if base is None else base.pose)
    if base is None:
        sigma = rng.uniform(5.0, 10.0)
        bed = dict(gap=rng.uniform(6, 15), thickness=rng.uniform(3, 8), hu=rng.uniform(-150, 150),
                   arc=rng.uniform(50, 75), shift=rng.uniform(-5, 5))
    else:
        sigma = float(np.clip(base.noise_sigma + rng.uniform(-1, 1), 5.0, 10.0))
        bed = dict(base.bed, gap=base.bed["gap"] + rng.uniform(-2, 2))
    return Scan(pose, float(sigma), bed)


def add_holder(tissue: np.ndarray, hu: np.ndarray, axis: np.ndarray, scan: Scan,
                sp: float) -> None:
    """Paint a curved head holder (cylindrical shell, axis along z) below the head, in place."""
    bed = scan.bed
    xc = float(scan.pose.center[0])
    yc = float(scan.pose.center[1] + bed["shift"])
    body_xy = (tissue != AIR).any(axis=2)  # [X, Y]
    r = np.sqrt((axis[:, None] - xc) ** 2 + (axis[None, :] - yc) ** 2)
    below = axis[None, :] < yc
    r_max = float(r[body_xy & below].max()) if (body_xy & below).any() else 80.0
    r_in = r_max + max(bed["gap"], 2.5 * sp)
    thick = max(bed["thickness"], 1.2 * sp)
    cos_arc = math.cos(math.radians(bed["arc"]))
    shell = (r >= r_in) & (r < r_in + thick) & (yc - axis[None, :] >= r * cos_arc)
    shell3 = np.broadcast_to(shell[:, :, None], tissue.shape) & (tissue == AIR)
    tissue[shell3] = BED
    hu[shell3] = bed["hu"]


def acquire(hu: np.ndarray, axis: np.ndarray, scan: Scan, sp: float,
            rng: np.random.Generator) -> np.ndarray:
    """Scanner blur and noise of a noiseless HU volume: integer-valued float32 HU in [-1024, 3071].

    Args:
        hu: float32 ``[X, Y, Z]`` HU (the noise is added in place when the blur is skipped).
        axis: world mm of the voxel centres along each axis ``[size]``.
        scan: the series (noise level, head position).
        sp: voxel spacing (mm).
        rng: random generator of the noise.
    """
    psf = 0.6 / sp  # point-spread blur (~0.6 mm), in voxels
    if psf >= 0.25:
        hu = ndimage.gaussian_filter(hu, psf, mode="nearest")
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, float(np.clip(1.0 / sp, 0.45, 1.2)), mode="wrap")
    noise /= noise.std() + 1e-8
    c = scan.pose.center.astype(np.float32)
    r2 = ((axis - c[0])[:, None, None] ** 2 + (axis - c[1])[None, :, None] ** 2
          + (axis - c[2])[None, None, :] ** 2)
    hu += noise * (scan.noise_sigma * (0.8 + 0.35 * np.exp(-r2 / (2 * 55.0 ** 2))))
    return np.clip(np.round(hu), -1024, 3071).astype(np.float32)
