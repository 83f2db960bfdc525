"""Read a CT volume as Hounsfield units with its geometry, and refuse inputs that are not head CTs.

Two formats are read:

* NIfTI (``.nii`` / ``.nii.gz``) through nibabel, with the header's slope/intercept applied (HU), the
  affine (voxel -> world mm) and spacing kept, and a singleton 4th axis squeezed. Every check of
  :func:`check_hu` runs on it.
* The preprocessing cache (``.npy`` written by :mod:`data.cache`, int16 HU) read by memory map, with
  its geometry from the JSON sidecar beside it. The checks ran when the entry was written, so none
  runs again here: a crop of a memory-mapped array costs well under a millisecond.

Bad input raises :class:`BadInputError` naming the file and the reason; nothing is replaced by zeros
or noise. Under ``DATA.ON_ERROR skip`` callers list such files in ``skipped.csv``
(:func:`write_skipped`).
"""
from __future__ import annotations

import csv
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

import numpy as np

PathLike = Union[str, os.PathLike]

AIR_HU = -1024.0  # value of padding and of everything outside the scanned field (air)
CT_AIR_BELOW = -500.0  # a head CT holds air below this HU...
CT_TISSUE_ABOVE = 0.0  # ...and tissue above this HU; otherwise it is not CT in HU
NIFTI_SUFFIXES = (".nii", ".nii.gz")
CACHE_SUFFIX = ".npy"


class BadInputError(ValueError):
    """An input that cannot be used: ``str(e) == f"{e.path}: {e.reason}"``.

    Args:
        path: the offending file (source path, not a temporary copy).
        reason: what is wrong, in words a user can act on.
    """

    def __init__(self, path: PathLike, reason: str):
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # picklable across worker processes (the default would pass only the message)
        return (type(self), (self.path, self.reason))


class TooManyBadInputs(RuntimeError):
    """More bad inputs than ``DATA.MAX_BAD_FRACTION`` allows; the message summarises them."""


@dataclass
class Volume:
    """A CT volume in Hounsfield units.

    Attributes:
        array: HU ``[X, Y, Z]``: float32, or an int16 memory map when read from the cache.
        affine: ``(4, 4)`` float64, voxel index -> world mm (RAS+ world, nibabel convention).
        spacing: voxel size in mm along the three array axes (norms of the affine's columns).
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size per array axis: the length of each of the first three affine columns (mm)."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def is_nifti(path: PathLike) -> bool:
    """True when the file name ends in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_volume(path: PathLike, check: bool = True) -> Volume:
    """Read a NIfTI file (HU, checked) or a preprocessing-cache array (memory-mapped int16).

    Args:
        path: ``.nii`` / ``.nii.gz`` file, or a cache ``.npy`` with its ``.json`` sidecar.
        check: run :func:`check_hu` on NIfTI data (missing/unreadable files are always errors).

    Returns:
        The volume; ``array`` is float32 ``[X, Y, Z]`` for NIfTI, an int16 memmap for the cache.

    Raises:
        BadInputError: missing, empty, truncated or non-NIfTI file, several volumes, non-finite,
            constant or non-CT values; the message names the file and the reason.
    """
    path = str(path)
    if str(path).endswith(CACHE_SUFFIX):
        return read_cached(path)
    return read_nifti(path, check=check)


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise BadInputError(path, "file does not exist")
    if os.path.isdir(path):
        raise BadInputError(path, "is a directory, not a NIfTI file (DICOM series: convert them with "
                                  "tools/prepare_dicom.py first)")
    if os.path.getsize(path) == 0:
        raise BadInputError(path, "file is empty (0 bytes)")


def read_nifti(path: PathLike, check: bool = True) -> Volume:
    """Read a NIfTI volume as float32 HU ``[X, Y, Z]`` (see :func:`read_volume`).

    Args:
        path: the NIfTI file.
        check: run :func:`check_hu` on the values.
    """
    import nibabel as nib

    path = str(path)
    _check_file(path)
    try:
        img = nib.load(path)
    except FileNotFoundError:
        raise BadInputError(path, "file does not exist") from None
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError) as e:
        raise BadInputError(path, f"not a readable NIfTI file ({e})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise BadInputError(path, f"not a NIfTI file (nibabel read it as {type(img).__name__})")
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3:
        raise BadInputError(path, f"{len(shape)}D image of shape {shape}; a CT volume has 3 axes")
    if any(s > 1 for s in shape[3:]):
        raise BadInputError(path, f"{len(shape)}D image of shape {shape} holds {int(np.prod(shape[3:]))} "
                                  "volumes; give one 3D volume per file")
    if min(shape[:3]) == 0:
        raise BadInputError(path, f"image of shape {shape} has an empty axis")
    dtype = img.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise BadInputError(path, f"unsupported voxel type {dtype} (expected integer or float HU)")
    try:
        # dataobj applies scl_slope / scl_inter: HU = stored * slope + inter
        array = img.get_fdata(dtype=np.float32, caching="unchanged")
    except (EOFError, OSError, zlib.error, ValueError) as e:
        raise BadInputError(path, f"truncated or corrupt image data ({e})") from None
    array = array.reshape(shape[:3])  # squeeze a singleton 4th (5th...) axis
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise BadInputError(path, f"affine is not invertible:\n{affine}")
    if check:
        # integer voxels with finite scaling cannot be NaN / inf: skip that pass over the volume
        slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
        check_hu(array, path, finite_known=dtype.kind in "biu" and np.isfinite([slope, inter]).all())
    return Volume(array=array, affine=affine, spacing=spacing_from_affine(affine))


def check_hu(array: np.ndarray, path: PathLike, finite_known: bool = False) -> None:
    """Raise BadInputError unless ``array`` looks like a CT in HU.

    Refused: NaN or inf voxels; a constant volume; no air below -500 HU (unscaled or non-CT data,
    e.g. a missing rescale intercept); no tissue above 0 HU.

    Args:
        array: the voxel values, any shape.
        path: named in the error.
        finite_known: the values cannot be NaN / inf (integer storage): skip that check.
    """
    if not finite_known:
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(array.size - np.count_nonzero(finite))
            raise BadInputError(path, f"{bad} of {array.size} voxels are NaN or inf")
    lo, hi = float(array.min()), float(array.max())
    if lo == hi:
        raise BadInputError(path, f"constant volume (every voxel = {lo:g})")
    if lo >= CT_AIR_BELOW:
        raise BadInputError(path, f"values are not CT in HU: no air below {CT_AIR_BELOW:g} HU (range "
                                  f"{lo:g} .. {hi:g}; missing rescale intercept, or not a CT?)")
    if hi <= CT_TISSUE_ABOVE:
        raise BadInputError(path, f"values are not CT in HU: no tissue above {CT_TISSUE_ABOVE:g} HU "
                                  f"(range {lo:g} .. {hi:g})")


def sidecar_path(npy_path: PathLike) -> str:
    """The JSON sidecar of a cache array: same name, ``.json`` instead of ``.npy``."""
    p = str(npy_path)
    return p[: -len(CACHE_SUFFIX)] + ".json" if p.endswith(CACHE_SUFFIX) else p + ".json"


def read_sidecar(npy_path: PathLike) -> dict:
    """The JSON sidecar of a cache array (source, spacing, shape, affine, parameters)."""
    side = sidecar_path(npy_path)
    try:
        with open(side) as f:
            return json.load(f)
    except FileNotFoundError:
        raise BadInputError(npy_path, f"cache array has no sidecar {side}") from None
    except (OSError, ValueError) as e:
        raise BadInputError(npy_path, f"unreadable cache sidecar {side} ({e})") from None


def read_cached(npy_path: PathLike) -> Volume:
    """Memory-map a cache array (int16 HU ``[X, Y, Z]``) and read its geometry from the sidecar.

    Args:
        npy_path: the ``.npy`` file written by :func:`data.cache.write_entry`.
    """
    npy_path = str(npy_path)
    meta = read_sidecar(npy_path)
    try:
        array = np.load(npy_path, mmap_mode="r")
    except FileNotFoundError:
        raise BadInputError(npy_path, "cache array does not exist") from None
    except (OSError, ValueError) as e:
        raise BadInputError(npy_path, f"unreadable cache array ({e})") from None
    if list(array.shape) != list(meta.get("shape", array.shape)) or array.ndim != 3:
        raise BadInputError(npy_path, f"cache array of shape {array.shape} does not match its sidecar "
                                      f"shape {meta.get('shape')}")
    affine = np.asarray(meta["affine"], dtype=np.float64)
    return Volume(array=array, affine=affine, spacing=tuple(float(s) for s in meta["spacing"]))


# ---------------------------------------------------------------------------------------------
# skipped.csv: (path, reason) rows of inputs left out under DATA.ON_ERROR skip

SKIPPED_FIELDS = ("path", "reason")


def read_skipped(path_csv: PathLike) -> dict[str, str]:
    """``{path: reason}`` from a ``skipped.csv``; empty when the file does not exist."""
    if not os.path.exists(path_csv):
        return {}
    with open(path_csv, newline="") as f:
        return {row["path"]: row["reason"] for row in csv.DictReader(f)}


def write_skipped(path_csv: PathLike, rows: Iterable[tuple[str, str]], replace: bool = False) -> int:
    """Merge ``(path, reason)`` rows into ``skipped.csv``, one row per path, written atomically.

    Args:
        path_csv: the CSV to create or update (its folder is created).
        rows: ``(path, reason)`` pairs; a path already listed keeps its first reason.
        replace: drop the rows already in the file first (a fresh list).

    Returns:
        The number of rows in the file afterwards. No file is written when there are none.
    """
    merged = {} if replace else read_skipped(path_csv)
    for path, reason in rows:
        merged.setdefault(str(path), str(reason))
    path_csv = Path(path_csv)
    if not merged:
        if replace and path_csv.exists():
            path_csv.unlink()
        return 0
    path_csv.parent.mkdir(parents=True, exist_ok=True)
    tmp = path_csv.with_name(f".{path_csv.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SKIPPED_FIELDS)
        w.writerows(merged.items())
    os.replace(tmp, path_csv)
    return len(merged)
