"""Segmentation label maps: read, check against their image, carry through preprocessing, map back.

A manifest's ``mask_path`` is an integer label map on the image's grid or on any other grid with a
world affine. :func:`align_mask` puts it on the image's grid by nearest neighbour after checking
that both cover the same world box with the same axis orientation (to within half a voxel);
anything else is refused, never guessed into place. :func:`preprocess_pair` then applies the
image's preprocessing (orient to RAS, crop to the head, resample) to both: the image with linear
interpolation, the labels with nearest neighbour onto exactly the same grid. :func:`labels_to_grid`
maps a label map from one grid to another (a prediction on the preprocessed grid back onto the
source image's grid; voxels outside the preprocessed crop are background).

Errors are :class:`data.io.BadInputError` naming the mask file, the manifest row and the values.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
from scipy import ndimage

from data.io import BadInputError, PathLike, Volume, spacing_from_affine
from data.transforms import crop, head_bbox, orient_ras, resample

AFFINE_TOL_MM = 1e-3  # affines this close (mm) are the same grid: no resampling


def read_mask(path: PathLike, where: str = "") -> Volume:
    """Read a NIfTI label map as int32 ``[X, Y, Z]`` with its affine.

    Args:
        path: the mask file.
        where: the manifest row it comes from (named in errors), e.g. ``"row 3 (id s03) of train.csv"``.

    Raises:
        BadInputError: missing or unreadable file, not 3D, non-integer values (the message lists some).
    """
    import nibabel as nib

    path = str(path)
    at = f" ({where})" if where else ""
    if not path:
        raise BadInputError(where or "<manifest>", "the row has no mask_path; DOWNSTREAM.TASK segment needs one")
    try:
        img = nib.load(path)
    except FileNotFoundError:
        raise BadInputError(path, f"mask file does not exist{at}") from None
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError) as e:
        raise BadInputError(path, f"not a readable NIfTI mask{at} ({e})") from None
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3 or any(s > 1 for s in shape[3:]):
        raise BadInputError(path, f"mask of shape {shape}{at}; expected one 3D label map")
    try:
        data = np.asarray(img.dataobj).reshape(shape[:3])  # scaled by slope/intercept when the header has them
    except (EOFError, OSError, zlib.error, ValueError) as e:
        raise BadInputError(path, f"truncated or corrupt mask data{at} ({e})") from None
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data) | (data != np.round(data))
        if bad.any():
            vals = np.unique(data[bad])
            raise BadInputError(path, f"mask holds {int(bad.sum())} non-integer voxels{at}, values e.g. "
                                      f"{[float(v) for v in vals[:5]]}; a label map holds integer class values")
    elif data.dtype.kind not in "biu":
        raise BadInputError(path, f"mask voxel type {data.dtype}{at}; expected integers")
    return Volume(array=data.astype(np.int32), affine=np.asarray(img.affine, np.float64),
                  spacing=spacing_from_affine(img.affine))


def world_box(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World (mm) lower and upper bounds of the voxel edges of a grid: ``([3], [3])``."""
    corners = np.array([[i, j, k] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5)
                        for k in (-0.5, shape[2] - 0.5)])  # [8, 3] voxel coordinates
    world = corners @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def labels_to_grid(labels: np.ndarray, src_affine: np.ndarray, dst_shape: Sequence[int], dst_affine: np.ndarray,
                   outside: str = "zero") -> np.ndarray:
    """Nearest-neighbour label map of another grid: every destination voxel takes the label of the source
    voxel nearest to its centre in world coordinates.

    Args:
        labels: integer ``[X, Y, Z]`` on the source grid.
        src_affine: ``(4, 4)`` voxel -> world of the source grid.
        dst_shape: destination shape.
        dst_affine: ``(4, 4)`` voxel -> world of the destination grid.
        outside: destination voxels whose centre falls outside the source grid get 0 ('zero') or the
            nearest edge voxel's label ('nearest').

    Returns:
        ``dst_shape`` array of the labels' dtype.
    """
    if outside not in ("zero", "nearest"):
        raise ValueError(f"outside = {outside!r}; expected 'zero' or 'nearest'")
    dst_shape = tuple(int(s) for s in dst_shape)
    m = np.linalg.inv(np.asarray(src_affine, np.float64)) @ np.asarray(dst_affine, np.float64)  # dst voxel -> src voxel
    if tuple(labels.shape) == dst_shape and np.allclose(m, np.eye(4), atol=1e-6):
        return np.array(labels, copy=True)
    return ndimage.affine_transform(np.asarray(labels), m[:3, :3], offset=m[:3, 3], output_shape=dst_shape,
                                    order=0, mode="grid-constant" if outside == "zero" else "nearest", cval=0)


def align_mask(mask: Volume, image: Volume, mask_path: PathLike, where: str = "") -> np.ndarray:
    """The mask's labels on the image's grid (nearest neighbour), after checking the two grids agree.

    Same shape and affine (to :data:`AFFINE_TOL_MM`): returned as is. Otherwise the axis
    orientations (nibabel axis codes) must be equal and the world boxes covered by the voxels must
    agree to within half the larger voxel; then the labels are resampled by nearest neighbour.

    Args:
        mask: from :func:`read_mask`.
        image: the image as read (source grid).
        mask_path: named in errors.
        where: the manifest row (named in errors).

    Raises:
        BadInputError: naming the mask, the row, both orientations or both world boxes.
    """
    import nibabel as nib

    at = f" ({where})" if where else ""
    same_shape = tuple(mask.array.shape) == tuple(image.array.shape)
    if same_shape and np.abs(mask.affine - image.affine).max() <= AFFINE_TOL_MM:
        return mask.array
    mo, io = "".join(nib.aff2axcodes(mask.affine)), "".join(nib.aff2axcodes(image.affine))
    if mo != io:
        raise BadInputError(mask_path, f"mask orientation {mo} differs from its image's {io}{at}; write the mask "
                                       "on the image's grid (nothing is reoriented silently)")
    mlo, mhi = world_box(mask.array.shape, mask.affine)
    ilo, ihi = world_box(image.array.shape, image.affine)
    tol = 0.5 * max(max(mask.spacing), max(image.spacing))
    off = np.maximum(np.abs(mlo - ilo), np.abs(mhi - ihi))
    if (off > tol).any():
        fmt = lambda a: "[" + ", ".join(f"{v:.1f}" for v in a) + "]"  # noqa: E731
        raise BadInputError(mask_path, f"mask covers world box {fmt(mlo)}..{fmt(mhi)} mm, its image "
                                       f"{fmt(ilo)}..{fmt(ihi)} mm{at}: {off.max():.2f} mm apart, more than half a "
                                       f"voxel ({tol:.2f} mm); shape {tuple(mask.array.shape)} vs "
                                       f"{tuple(image.array.shape)}")
    return labels_to_grid(mask.array, mask.affine, image.array.shape, image.affine, outside="nearest")


def preprocess_pair(vol: Volume, labels: np.ndarray, spacing: Sequence[float], head_threshold: float,
                    **head_kw) -> tuple[Volume, np.ndarray]:
    """:func:`data.transforms.preprocess_volume` of an image and its label map on the same grid.

    Orient both to RAS, crop both to the head box found on the image, resample the image linearly
    and the labels by nearest neighbour onto exactly the image's new grid.

    Args:
        vol: the image (source grid).
        labels: integer ``[X, Y, Z]`` on ``vol``'s grid (:func:`align_mask`).
        spacing: ``DATA.SPACING``.
        head_threshold: ``DATA.HEAD_THRESHOLD``.
        head_kw: ``margin_mm`` / ``opening_mm`` of :func:`data.transforms.head_bbox`.

    Returns:
        ``(image Volume float32, labels [X', Y', Z'] of the labels' dtype)`` on the same grid.
    """
    if tuple(labels.shape) != tuple(vol.array.shape):
        raise ValueError(f"labels {tuple(labels.shape)} and image {tuple(vol.array.shape)} differ in shape")
    src_affine = np.asarray(vol.affine, np.float64)
    img = orient_ras(Volume(np.asarray(vol.array, dtype=np.float32), src_affine, vol.spacing))
    lab = orient_ras(Volume(np.asarray(labels), src_affine, vol.spacing))  # the same flips and permutation
    box = head_bbox(img.array, img.spacing, head_threshold, **head_kw)
    img_c, lab_c = crop(img, box, copy=False), crop(lab, box, copy=False)
    out = resample(img_c, spacing)
    if not out.array.flags.c_contiguous:  # no resampling was needed
        out = Volume(np.ascontiguousarray(out.array), out.affine, out.spacing)
    return out, labels_to_grid(np.ascontiguousarray(lab_c.array), lab_c.affine, out.array.shape, out.affine,
                               outside="nearest")
