"""Files of the phantom: int16 NIfTI in HU (slope 1, intercept -1024), gzip without a timestamp."""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Union

import nibabel as nib
import numpy as np


def save_nifti(path: Union[str, Path], hu: np.ndarray, affine: np.ndarray) -> None:
    """Write HU ``[X, Y, Z]`` as int16 NIfTI (slope 1, intercept -1024), gzip with no timestamp.

    Args:
        path: output ``.nii.gz`` (or ``.nii``) path.
        hu: HU array (rounded, clipped to [-1024, 3071]).
        affine: (4, 4) voxel -> world mm.
    """
    raw = (np.clip(np.round(hu), -1024, 3071) + 1024).astype(np.int16)
    img = nib.Nifti1Image(raw, affine)
    img.header.set_slope_inter(1.0, -1024.0)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header["descrip"] = b"synthetic head CT phantom (HU)"
    data = img.to_bytes()
    path = Path(path)
    path.write_bytes(gzip.compress(data, compresslevel=4, mtime=0) if path.suffix == ".gz" else data)


def save_mask(path: Path, mask: np.ndarray, affine: np.ndarray) -> None:
    """Write a bool mask or a uint8 label map ``[X, Y, Z]`` as uint8 NIfTI (gzip, no timestamp)."""
    img = nib.Nifti1Image(mask.astype(np.uint8), affine)
    img.header.set_xyzt_units("mm", "sec")
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=4, mtime=0))

