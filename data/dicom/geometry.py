"""Slice order and stack geometry from headers: normal, spacing, gaps, missing slices, gantry tilt.

Geometry conventions. DICOM world coordinates are LPS mm. ``ImageOrientationPatient`` holds the
row direction ``r`` (the direction in which the column index increases) and the column direction
``c`` (the direction in which the row index increases); ``PixelSpacing`` is (spacing between rows,
i.e. along ``c``; spacing between columns, i.e. along ``r``). The slice normal is ``n = r x c``.
A slice's ``ImagePositionPatient`` is the centre of its first pixel. With gantry tilt, the image
planes are tilted with respect to the table, so successive positions step along the table
direction ``d`` instead of ``n``: the stack of slices is sheared and has to be resampled onto an
orthogonal grid. Affines returned by this package map voxel indices to RAS mm (LPS with x and y
negated), the NIfTI convention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from data.dicom.errors import DicomError
from data.dicom.headers import SliceHeader


@dataclass
class SeriesGeometry:
    """Sorted slices of one series and the geometry derived from their headers (LPS mm).

    ``offsets[k]`` = position of slice k minus that of slice 0, expressed along
    (row_dir, col_dir, normal); without tilt the first two columns are ~0.
    """

    slices: list[SliceHeader]  # sorted along the normal, ascending
    row_dir: np.ndarray  # (3,) direction of increasing column index
    col_dir: np.ndarray  # (3,) direction of increasing row index
    normal: np.ndarray  # (3,) row_dir x col_dir
    table_dir: np.ndarray  # (3,) direction the slice positions step along (normal when untilted)
    row_spacing: float  # mm between rows (along col_dir)
    col_spacing: float  # mm between columns (along row_dir)
    origin: np.ndarray  # (3,) ImagePositionPatient of slice 0
    offsets: np.ndarray  # [K, 3]
    gaps: np.ndarray  # [K-1] mm between neighbouring planes along the normal
    median_spacing: float
    max_gap: float
    missing_slices: int
    uneven: bool
    tilt_deg: float  # angle between table_dir and normal
    inplane_shift: float  # largest in-plane offset of a slice origin from slice 0 (mm)
    thickness: float  # SliceThickness, or the median spacing when the tag is missing

    @property
    def sheared(self) -> bool:
        """True when slices are shifted in-plane (gantry tilt): needs a 3D resampling."""
        return self.inplane_shift > 0.05 * min(self.row_spacing, self.col_spacing)


def analyse_geometry(slices: list[SliceHeader], series: str = "series") -> SeriesGeometry:
    """Sort slices along the normal and measure gaps, missing slices and gantry tilt.

    Args:
        slices: headers sharing one orientation, matrix and pixel spacing (``select_slices``).
        series: name used in error messages.
    Returns:
        SeriesGeometry.
    Raises:
        DicomError: fewer than 2 slices, degenerate orientation, or slices sharing a position.
    """
    if len(slices) < 2:
        raise DicomError(series, f"cannot build a volume from {len(slices)} slice(s)")
    iop = np.asarray(slices[0].orientation, dtype=np.float64)
    r, c = iop[:3], iop[3:]
    if np.linalg.norm(r) < 1e-6 or np.linalg.norm(c) < 1e-6:
        raise DicomError(series, "ImageOrientationPatient has a zero direction")
    r, c = r / np.linalg.norm(r), c / np.linalg.norm(c)
    if abs(float(r @ c)) > 1e-3:
        raise DicomError(series, f"row and column directions are not orthogonal (cos = {float(r @ c):.4f})")
    n = np.cross(r, c)
    n /= np.linalg.norm(n)

    pos = np.asarray([h.position for h in slices], dtype=np.float64)  # [K, 3] LPS
    order = np.argsort(pos @ n, kind="stable")
    slices = [slices[i] for i in order]
    pos = pos[order]
    rel = pos - pos[0]
    offsets = np.stack([rel @ r, rel @ c, rel @ n], axis=1)  # [K, 3]
    gaps = np.diff(offsets[:, 2])
    positive = gaps[gaps > 1e-3]
    median = float(np.median(positive)) if positive.size else 0.0
    dup = int(np.sum(gaps <= max(1e-3, 0.01 * median)))
    if dup or median <= 0:
        raise DicomError(series, f"{dup or len(slices) - 1} slice(s) share a position with another "
                                 f"(several acquisitions in one series?)")
    ratio = gaps / median
    missing = int(sum(int(round(x)) - 1 for x in ratio if x > 1.5))
    uneven = bool(np.any(np.abs(gaps - median) > max(0.01 * median, 1e-3)))

    # Table direction: principal axis of the positions, pointing along +normal.
    _, _, vt = np.linalg.svd(rel - rel.mean(axis=0), full_matrices=False)
    d = vt[0] / np.linalg.norm(vt[0])
    if d @ n < 0:
        d = -d
    tilt = math.degrees(math.acos(min(1.0, abs(float(d @ n)))))
    inplane = float(np.max(np.hypot(offsets[:, 0], offsets[:, 1])))

    sp = slices[0].pixel_spacing
    thickness = slices[0].thickness if slices[0].thickness and slices[0].thickness > 0 else median
    return SeriesGeometry(
        slices=slices, row_dir=r, col_dir=c, normal=n, table_dir=d,
        row_spacing=float(sp[0]), col_spacing=float(sp[1]),  # type: ignore[index]
        origin=pos[0], offsets=offsets, gaps=gaps, median_spacing=median,
        max_gap=float(gaps.max()), missing_slices=missing, uneven=uneven,
        tilt_deg=tilt, inplane_shift=inplane, thickness=float(thickness),
    )

