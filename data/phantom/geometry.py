"""Geometry of the phantom: the field of view, the head frame's texture grids and small vector math.

The head frame: u = right, v = anterior, w = superior (mm), origin at the centre of the cranial
ellipsoid; a pose (``scanner.Pose``) maps it into the scanner's RAS world.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

FOV_MM = 240.0  # edge of the cubic field of view; spacing = FOV_MM / size


@dataclass(frozen=True)
class _Grid:
    """Regular grid holding a random texture in the head frame (mm)."""

    origin: tuple[float, float, float]
    cell: float
    shape: tuple[int, int, int]

    def index(self, q: np.ndarray) -> np.ndarray:
        """Head-frame points ``[N, 3]`` (mm) -> fractional grid indices ``[3, N]``."""
        return ((q - np.asarray(self.origin, np.float32)) / np.float32(self.cell)).T


LOW_GRID = _Grid((-128.0, -128.0, -128.0), 8.0, (33, 33, 33))  # slow variations (thickness, bias)
MID_GRID = _Grid((-120.0, -120.0, -120.0), 5.0, (49, 49, 49))  # lumps, fat marbling, heterogeneity
SULCI_GRID = _Grid((-98.0, -115.0, -84.0), 3.5, (57, 67, 55))  # sulcal sheets over the brain box


def spacing_for_size(size: int) -> float:
    """Isotropic voxel spacing (mm) of a phantom of ``size^3`` voxels (240 mm field of view)."""
    return FOV_MM / int(size)


def phantom_affine(size: int) -> np.ndarray:
    """RAS voxel->world affine (4, 4) of a ``size^3`` phantom, the volume centred on the origin."""
    sp = spacing_for_size(size)
    aff = np.diag([sp, sp, sp, 1.0])
    aff[:3, 3] = -0.5 * (size - 1) * sp
    return aff


def _sig(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _random_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise, zero mean and unit std (float32)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    f -= f.mean()
    f /= f.std() + 1e-8
    return f


def _sample(tex: np.ndarray, grid: _Grid, q: np.ndarray) -> np.ndarray:
    """Trilinear lookup of a texture at head-frame points ``q [N, 3]`` -> ``[N]``."""
    if q.shape[0] == 0:
        return np.zeros(0, np.float32)
    return ndimage.map_coordinates(tex, grid.index(q), order=1, mode="nearest")


def _k(q: np.ndarray, center, semi) -> np.ndarray:
    """Normalised ellipsoid radius |(q - center) / semi| (< 1 inside) for points ``[N, 3]``."""
    d0 = (q[:, 0] - center[0]) / semi[0]
    d1 = (q[:, 1] - center[1]) / semi[1]
    d2 = (q[:, 2] - center[2]) / semi[2]
    return np.sqrt(d0 * d0 + d1 * d1 + d2 * d2)


def _dot3(q: np.ndarray, vec) -> np.ndarray:
    """Row-wise dot product of points ``[N, 3]`` with a 3-vector (no BLAS: cheap and thread-free)."""
    return (q[:, 0] * float(vec[0]) + q[:, 1] * float(vec[1]) + q[:, 2] * float(vec[2]))


def _rotation(pitch: float, roll: float, yaw: float) -> np.ndarray:
    """Rotation (3, 3) from angles in degrees about x (pitch), y (roll), z (yaw): Rz @ Ry @ Rx."""
    a, b, c = np.deg2rad([pitch, roll, yaw])
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def _fibonacci_sphere(n: int = 162) -> np.ndarray:
    """``n`` near-uniform unit vectors ``[n, 3]``."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5 ** 0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], 1)


