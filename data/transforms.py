"""Spatial transforms of HU volumes: orient to RAS, resample, crop to the head, fit to the ROI.

Every function that changes the voxel grid returns a :class:`data.io.Volume` whose affine maps the new
voxels to the same world millimetres as before (the geometry is exact, only values are interpolated).
Padding is air (-1024 HU), added before windowing.

:func:`preprocess_volume` is what ``tools/preprocess.py`` stores in the cache (and what the dataset
applies on the fly without a cache); :func:`fit_to_roi` runs per sample in the views.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from data.io import AIR_HU, Volume, spacing_from_affine

# Head cropping (part of the cache key through data.cache.preprocess_params).
HEAD_MARGIN_MM = 4.0  # margin kept around the head's bounding box
HEAD_OPENING_MM = 3.0  # binary-opening radius: cuts thin links (head holder, straps, bed contacts)
MASK_SPACING_MM = 2.0  # large volumes are searched for the head on a grid about this coarse
SPACING_TOL = 1e-3  # relative spacing difference below which no resampling is done


def orient_ras(vol: Volume) -> Volume:
    """Flip / permute the array axes so that they run closest to R, A, S (no interpolation).

    Args:
        vol: any orientation (e.g. LPS from DICOM).

    Returns:
        The same voxels, re-ordered; the new affine maps each voxel to its old world position.
    """
    import nibabel.orientations as nio

    ornt = nio.io_orientation(vol.affine)  # [3, 2]: (target axis, flip) of each array axis
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return vol
    array = nio.apply_orientation(np.asarray(vol.array), ornt)
    affine = vol.affine @ nio.inv_ornt_aff(ornt, vol.array.shape)
    return Volume(array=np.ascontiguousarray(array), affine=affine, spacing=spacing_from_affine(affine))


def resample(vol: Volume, spacing: Sequence[float]) -> Volume:
    """Resample linearly to ``spacing`` mm per array axis, keeping the axis directions.

    The new grid shares the old grid's first corner: new voxel ``i`` lies at old voxel coordinate
    ``(i + 0.5) * s' / s - 0.5``, and there are ``round(n * s / s')`` of them per axis (the field of
    view to within half a new voxel); the affine says exactly that. Trilinear interpolation (torch
    on CPU; a crop view is read in place, without a copy), edges replicated.

    Args:
        vol: volume with float HU.
        spacing: target voxel size (mm) per array axis.
    """
    import torch

    old = np.asarray(vol.spacing, dtype=np.float64)
    new = np.asarray(spacing, dtype=np.float64)
    if new.shape != (3,) or not (new > 0).all():
        raise ValueError(f"spacing = {list(spacing)}; expected 3 positive numbers (mm)")
    if np.all(np.abs(old - new) <= SPACING_TOL * new):
        return vol
    zoom = new / old  # old voxels per new voxel
    size = [max(1, int(round(n / z))) for n, z in zip(vol.array.shape, zoom)]
    x = torch.from_numpy(np.asarray(vol.array, dtype=np.float32))[None, None]  # [1, 1, X, Y, Z]
    # the aten op behind F.interpolate, given both the size and the exact scales:
    # src = (dst + 0.5) * zoom - 0.5 (align_corners=False), clamped to the array
    array = torch.ops.aten.upsample_trilinear3d(x, size, False, *(float(1.0 / z) for z in zoom))
    array = array[0, 0].numpy()  # [X', Y', Z']
    step = np.eye(4)
    step[:3, :3] = np.diag(zoom)
    step[:3, 3] = 0.5 * zoom - 0.5
    affine = vol.affine @ step
    return Volume(array=array, affine=affine, spacing=spacing_from_affine(affine))


def head_bbox(hu: np.ndarray, spacing: Sequence[float], threshold: float,
              margin_mm: float = HEAD_MARGIN_MM, opening_mm: float = HEAD_OPENING_MM
              ) -> tuple[slice, slice, slice]:
    """Bounding box of the head: the largest connected body component above ``threshold`` HU.

    Threshold, binary opening (radius ``opening_mm``) to cut thin links to the bed or head holder,
    largest 6-connected component, bounding box plus ``margin_mm``. When the opening removes
    everything (a tiny object) the unopened mask is used. Volumes over 2M voxels are searched on a
    strided grid of about ``MASK_SPACING_MM`` (the box is widened by the stride, never narrowed).

    Args:
        hu: HU ``[X, Y, Z]``.
        spacing: voxel size in mm (sets the opening radius and margin in voxels per axis).
        threshold: HU above which a voxel is body (``DATA.HEAD_THRESHOLD``).
        margin_mm: margin around the component's box.
        opening_mm: opening radius; 0 = none.

    Raises:
        ValueError: when no voxel exceeds ``threshold``.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    hu = np.asarray(hu)
    # search on a grid of about MASK_SPACING_MM when the volume is large (8x fewer voxels at 1 mm)
    stride = np.maximum(1, np.floor(MASK_SPACING_MM / spacing)).astype(int) if hu.size > 2_000_000 \
        else np.ones(3, dtype=int)
    mask = hu[tuple(slice(None, None, s) for s in stride)] > threshold
    if not mask.any():
        mask = hu > threshold
        stride = np.ones(3, dtype=int)
    if not mask.any():
        raise ValueError(f"no voxel above the head threshold {threshold:g} HU")
    radius = np.floor(opening_mm / (spacing * stride)).astype(int)
    if radius.max() > 0:
        # per-axis radius: an ellipsoid of `opening_mm` in world units (anisotropic voxels)
        grid = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
        struct = sum((g / max(r, 1)) ** 2 for g, r in zip(grid, radius)) <= 1.0
        opened = ndimage.binary_opening(mask, structure=struct)
        if opened.any():
            mask = opened
    labels, n = ndimage.label(mask)  # 6-connectivity
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(sizes.argmax())
    margin = np.ceil(margin_mm / spacing).astype(int)
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        f = int(stride[axis])  # strided voxel i covers full voxels [i*f - f + 1, i*f + f - 1]
        lo = max(0, int(idx[0]) * f - (f - 1) - int(margin[axis]))
        hi = min(hu.shape[axis], int(idx[-1]) * f + f + int(margin[axis]))
        box.append(slice(lo, hi))
    return tuple(box)


def crop(vol: Volume, box: Sequence[slice], copy: bool = True) -> Volume:
    """Crop to ``box`` (three slices with step 1), shifting the affine's origin to the first voxel.

    Args:
        vol: the volume.
        box: one slice per axis.
        copy: return a contiguous copy (False: a view of ``vol.array``).
    """
    starts = np.array([s.start or 0 for s in box], dtype=np.float64)
    shift = np.eye(4)
    shift[:3, 3] = starts
    array = vol.array[tuple(box)]
    return Volume(array=np.ascontiguousarray(array) if copy else array, affine=vol.affine @ shift,
                  spacing=vol.spacing)


def preprocess_volume(vol: Volume, spacing: Sequence[float], head_threshold: float,
                      margin_mm: float = HEAD_MARGIN_MM, opening_mm: float = HEAD_OPENING_MM) -> Volume:
    """Orient to RAS, crop to the head, resample (linear) to ``spacing``.

    The head is found on the source grid (margins and opening in mm), so only the crop is resampled.

    Args:
        vol: HU volume as read by :func:`data.io.read_volume`.
        spacing: target voxel size, ``DATA.SPACING``.
        head_threshold: ``DATA.HEAD_THRESHOLD`` (HU).
        margin_mm: margin kept around the head.
        opening_mm: opening radius separating the head from bed / holder.

    Returns:
        float32 HU ``[X, Y, Z]`` with its affine (voxel -> the same world mm as the input).
    """
    vol = Volume(np.asarray(vol.array, dtype=np.float32), np.asarray(vol.affine, np.float64), vol.spacing)
    vol = orient_ras(vol)
    box = head_bbox(vol.array, vol.spacing, head_threshold, margin_mm, opening_mm)
    out = resample(crop(vol, box, copy=False), spacing)  # reads the crop in place
    if not out.array.flags.c_contiguous:  # no resampling was needed: copy the crop alone
        out = Volume(np.ascontiguousarray(out.array), out.affine, out.spacing)
    return out


# ---------------------------------------------------------------------------------------------
# Fitting a preprocessed head to the model input size (per sample, in the views)


def crop_pad_offsets(shape: Sequence[int], roi: Sequence[int],
                     rng: Optional[np.random.Generator] = None) -> tuple[int, ...]:
    """Start of the ROI window in the array, per axis; negative = that much padding before.

    Per axis the start lies in ``[min(0, n - r), max(0, n - r)]``: random (uniform) with ``rng``,
    centred (``(n - r) // 2``) without.

    Args:
        shape: array shape ``[X, Y, Z]``.
        roi: window size ``[D, H, W]``.
        rng: draws the offsets; None = centred, deterministic.
    """
    if len(shape) != len(roi):
        raise ValueError(f"shape {tuple(shape)} and ROI {tuple(roi)} differ in length")
    starts = []
    for n, r in zip(shape, roi):
        lo, hi = min(0, n - r), max(0, n - r)
        starts.append(int(rng.integers(lo, hi + 1)) if rng is not None else (n - r) // 2)
    return tuple(starts)


def crop_pad(hu: np.ndarray, roi: Sequence[int], starts: Sequence[int], pad_value: float = AIR_HU
             ) -> np.ndarray:
    """``out[i] = hu[starts + i]`` inside the array, ``pad_value`` outside; shape ``roi``.

    Only the window is read (a memory map is not loaded whole); the result is a new array of the
    input's dtype.

    Args:
        hu: HU ``[X, Y, Z]`` (numpy or memmap).
        roi: output shape.
        starts: from :func:`crop_pad_offsets`.
        pad_value: fill outside the array (air).
    """
    src, dst, inside = [], [], True
    for n, r, s in zip(hu.shape, roi, starts):
        a, b = max(s, 0), min(s + r, n)
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
        inside &= a == s and b == s + r
    if inside:
        return np.array(hu[tuple(src)])  # copies the window only
    out = np.full(tuple(roi), pad_value, dtype=hu.dtype)
    out[tuple(dst)] = hu[tuple(src)]
    return out


def resize_to_fit(hu: np.ndarray, roi: Sequence[int], rng: Optional[np.random.Generator] = None,
                  pad_value: float = AIR_HU) -> np.ndarray:
    """Aspect-preserving (trilinear) resize so the whole array fits ``roi``, then pad with air.

    The scale is ``min(roi / shape)`` over the axes (up- or down-sampling), so the longest axis
    relative to the ROI fills it; the rest is padded, centred or at random (``rng``).

    Args:
        hu: HU ``[X, Y, Z]``.
        roi: output shape.
        rng: random placement of the padding; None = centred.
        pad_value: fill (air).

    Returns:
        float32 ``roi``.
    """
    import torch
    import torch.nn.functional as F

    shape = np.asarray(hu.shape, dtype=np.float64)
    scale = float(np.min(np.asarray(roi, dtype=np.float64) / shape))
    size = [max(1, min(int(r), int(round(n * scale)))) for n, r in zip(hu.shape, roi)]
    x = torch.from_numpy(np.asarray(hu, dtype=np.float32))[None, None]  # [1, 1, X, Y, Z]
    x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()
    return crop_pad(x, roi, crop_pad_offsets(x.shape, roi, rng), pad_value)


def fit_to_roi(hu: np.ndarray, roi: Sequence[int], mode: str = "crop_pad",
               rng: Optional[np.random.Generator] = None, pad_value: float = AIR_HU) -> np.ndarray:
    """Bring a preprocessed head to the model input size ``roi`` (``DATA.FIT``).

    Args:
        hu: HU ``[X, Y, Z]`` (int16 memmap or float32).
        roi: ``DATA.ROI``.
        mode: ``'crop_pad'`` (keeps the mm scale; random window with ``rng``, centred without) or
            ``'resize'`` (aspect-preserving resize + pad: the whole head is visible).
        rng: randomness (training); None = centred and deterministic.
        pad_value: air.

    Returns:
        ``roi``-shaped array (input dtype for crop_pad, float32 for resize).
    """
    roi = tuple(int(r) for r in roi)
    if mode == "crop_pad":
        return crop_pad(hu, roi, crop_pad_offsets(hu.shape, roi, rng), pad_value)
    if mode == "resize":
        return resize_to_fit(hu, roi, rng, pad_value)
    raise ValueError(f"fit mode {mode!r}; expected 'crop_pad' or 'resize'")
