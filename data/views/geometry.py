"""Crop geometry shared by the multi-view generators: random boxes, resized crops, seed points.

:func:`sample_crop_box` + :func:`resized_crop` are the random-resized crop of DINO's and SimCLR's
views; :func:`world_to_voxel`, :func:`random_head_voxel` and :func:`sample_negative_center` place
SimCLR's seed-point and negative regions. Every random draw comes from the sample's generator.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

DINO_MAX_ASPECT = 4.0 / 3.0  # per-axis crop-box aspect jitter: side ratios log-uniform in [3/4, 4/3]
SIMCLR_MAX_TRIES = 32  # random draws when looking for a head voxel / a distant negative centre


def sample_crop_box(shape: Sequence[int], out_size: Sequence[int], scale: Sequence[float],
                    rng: np.random.Generator, max_aspect: float = DINO_MAX_ASPECT
                    ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A random box inside an array, for a random-resized crop.

    The box holds a fraction ``s ~ U(scale)`` of the array's voxels (the head's extent: the
    preprocessed array is already cropped to the head). Its shape follows ``out_size`` (a cube for
    a cubic crop) with each side multiplied by a log-uniform ratio in ``[1/max_aspect, max_aspect]``
    (ratios renormalised to a product of 1, so the volume is kept), then clipped to the array: a
    side longer than the array is cut to it (the box then holds less than ``s``). The position is
    uniform among the positions that keep the box inside the array; nothing is ever padded.

    Args:
        shape: array shape ``[X, Y, Z]``.
        out_size: size the crop will be resampled to ``[D, H, W]`` (sets the box's aspect).
        scale: ``[low, high]`` range of the volume fraction, ``0 < low <= high <= 1``.
        rng: the sample's generator (draws: 1 fraction, 3 ratios, 3 starts).
        max_aspect: largest per-axis side ratio (>= 1).

    Returns:
        ``(starts, sizes)``, each 3 ints, with ``0 <= start`` and ``start + size <= shape``.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"expected a non-empty 3D array shape; got {tuple(shape)}")
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop scale {list(scale)} must be [low, high] with 0 < low <= high <= 1")
    if max_aspect < 1:
        raise ValueError(f"max_aspect = {max_aspect}; it must be >= 1")
    dims = np.asarray(shape, dtype=np.float64)
    out = np.asarray(out_size, dtype=np.float64)
    frac = rng.uniform(scale[0], scale[1])
    log_r = rng.uniform(-np.log(max_aspect), np.log(max_aspect), size=3)
    log_r -= log_r.mean()  # product of the ratios = 1: the volume stays frac * prod(shape)
    side = np.cbrt(frac * dims.prod() / out.prod()) * out * np.exp(log_r)
    sizes = np.clip(np.round(side), 1, dims).astype(int)
    starts = [int(rng.integers(0, n - s + 1)) for n, s in zip(shape, sizes)]
    return tuple(starts), tuple(int(s) for s in sizes)  # type: ignore[return-value]


def resized_crop(hu: np.ndarray, starts: Sequence[int], sizes: Sequence[int], out_size: Sequence[int],
                 flip_axes: Sequence[int] = ()) -> torch.Tensor:
    """Cut a box from ``hu`` and resample it (trilinear) to ``out_size``; float32 HU.

    Only the box is read (a memmap is never loaded whole) and cast to float32; interpolation runs
    on that box alone (``torch.nn.functional.interpolate``, ``align_corners=False``; skipped when
    the box already has the output size).

    Args:
        hu: HU ``[X, Y, Z]`` (int16 memmap or float32).
        starts: box start per axis (inside the array).
        sizes: box size per axis.
        out_size: output ``[D, H, W]``.
        flip_axes: array axes to flip (applied to the box view before the copy: free).

    Returns:
        float32 tensor ``out_size`` (contiguous, new memory).
    """
    box = hu[tuple(slice(s, s + n) for s, n in zip(starts, sizes))]
    for ax in flip_axes:
        box = np.flip(box, axis=ax)
    x = torch.from_numpy(np.array(box, dtype=np.float32, order="C"))  # always a copy: never the caller's array
    out_size = tuple(int(s) for s in out_size)
    if tuple(x.shape) == out_size:
        return x
    return torch.nn.functional.interpolate(x[None, None], size=out_size, mode="trilinear",
                                           align_corners=False)[0, 0]  # [D, H, W]


def world_to_voxel(affine: np.ndarray, point: Sequence[float]) -> np.ndarray:
    """World point (mm) -> continuous voxel coordinate: ``inv(affine) @ [x, y, z, 1]``.

    Args:
        affine: ``(4, 4)`` voxel -> world of the (preprocessed) array.
        point: ``[x, y, z]`` mm.

    Returns:
        float64 ``[3]`` voxel indices (array axis order).
    """
    h = np.append(np.asarray(point, dtype=np.float64), 1.0)
    return (np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ h)[:3]


def random_head_voxel(hu: np.ndarray, threshold: float, rng: np.random.Generator,
                      tries: int = SIMCLR_MAX_TRIES) -> np.ndarray:
    """A uniform random voxel with HU above ``threshold`` (inside the head).

    Rejection sampling that reads one voxel per draw (a memmap is never read whole); the
    preprocessed array is cropped to the head, so about half the draws hit. After ``tries``
    misses the array centre is returned.

    Args:
        hu: HU ``[X, Y, Z]``.
        threshold: ``DATA.HEAD_THRESHOLD``.
        rng: the sample's generator.
        tries: number of draws.

    Returns:
        int64 ``[3]`` voxel index.
    """
    shape = np.asarray(hu.shape)
    for _ in range(tries):
        v = rng.integers(0, shape)
        if float(hu[tuple(v)]) > threshold:
            return v.astype(np.int64)
    return (shape // 2).astype(np.int64)


def sample_negative_center(shape: Sequence[int], seed: Sequence[int], crop: Sequence[int],
                           rng: np.random.Generator, accept: Optional[Callable[[np.ndarray], bool]] = None,
                           tries: int = SIMCLR_MAX_TRIES) -> np.ndarray:
    """The centre of a crop elsewhere in the scan: its box does not overlap the seed's box.

    Two boxes of size ``crop`` centred at ``c`` and ``s`` are disjoint when ``|c_i - s_i| >= crop_i``
    on some axis ``i``. Candidates are drawn uniformly from that set (a slab per axis and side,
    chosen with probability proportional to its volume, then a uniform voxel inside it) until
    ``accept`` (e.g. "inside the head") holds, for at most ``tries`` draws (then the last draw).
    When the array is too small for any disjoint box (shorter than about two crops on every axis),
    the centre goes to the far end of the axis with the most room: as far away as the scan allows.

    Args:
        shape: array shape ``[X, Y, Z]``.
        seed: seed voxel ``[3]``.
        crop: crop size ``[D, H, W]`` in voxels.
        rng: the sample's generator.
        accept: optional predicate on a candidate voxel.
        tries: number of draws.

    Returns:
        int64 ``[3]`` voxel index inside the array.
    """
    shape, seed, crop = (np.asarray(a, dtype=np.int64) for a in (shape, seed, crop))
    slabs = []  # (axis, low, high) inclusive ranges of the centre along that axis
    for i in range(3):
        if seed[i] - crop[i] >= 0:
            slabs.append((i, 0, int(seed[i] - crop[i])))
        if seed[i] + crop[i] <= shape[i] - 1:
            slabs.append((i, int(seed[i] + crop[i]), int(shape[i] - 1)))
    if not slabs:  # no disjoint box fits: the farthest end of the roomiest axis
        room = np.maximum(seed, shape - 1 - seed) / crop
        i = int(np.argmax(room))
        end = 0 if seed[i] > shape[i] - 1 - seed[i] else int(shape[i] - 1)
        slabs.append((i, end, end))
    sizes = np.array([(hi - lo + 1) * np.prod(shape) / shape[i] for i, lo, hi in slabs], dtype=np.float64)
    c = seed.copy()
    for _ in range(tries):
        i, lo, hi = slabs[int(rng.choice(len(slabs), p=sizes / sizes.sum()))]
        c = rng.integers(0, shape)
        c[i] = rng.integers(lo, hi + 1)
        if accept is None or accept(c):
            break
    return c.astype(np.int64)
