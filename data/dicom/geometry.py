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


# Slices whose SliceThickness differs by more than this (mm) count as of different thickness.
THICKNESS_TOL_MM = 0.01


@dataclass
class SeriesGeometry:
    """Sorted slices of one series and the geometry derived from their headers (LPS mm).

    ``offsets[k]`` = position of slice k minus that of slice 0, expressed along
    (row_dir, col_dir, normal); without tilt the first two columns are ~0. Distances between
    slices and thicknesses are measured along the normal (SliceThickness is perpendicular to the
    image plane, also with gantry tilt).
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
    uneven: bool  # spacing between planes not constant (jitter, missing slices, mixed thickness)
    tilt_deg: float  # angle between table_dir and normal
    inplane_shift: float  # largest in-plane offset of a slice origin from slice 0 (mm)
    thickness: float  # thinnest SliceThickness, or the median spacing when no slice has the tag
    max_thickness: float = 0.0  # thickest SliceThickness (= thickness when uniform or missing)
    thicknesses: np.ndarray | None = None  # [K] SliceThickness per sorted slice, NaN where missing
    # [K-1] distance between neighbouring slabs not covered by either: gap - (t_k + t_k+1) / 2
    # (negative when they overlap); None when some slice has no SliceThickness.
    uncovered: np.ndarray | None = None
    finest_spacing: float = 0.0  # regular spacing of the thinnest slices (median_spacing when uniform)

    def __post_init__(self) -> None:
        self.max_thickness = max(self.max_thickness, self.thickness)
        self.finest_spacing = self.finest_spacing or self.median_spacing

    @property
    def sheared(self) -> bool:
        """True when slices are shifted in-plane (gantry tilt): needs a 3D resampling."""
        return self.inplane_shift > 0.05 * min(self.row_spacing, self.col_spacing)

    @property
    def mixed_thickness(self) -> bool:
        """True when the SliceThickness changes within the series (e.g. thin slices, then thick ones)."""
        return self.max_thickness - self.thickness > THICKNESS_TOL_MM

    @property
    def max_uncovered(self) -> float | None:
        """Largest uncovered distance between neighbouring slices (mm), None without SliceThickness."""
        return None if self.uncovered is None else float(self.uncovered.max())

    @property
    def slice_step(self) -> float:
        """Spacing along the normal that a uniform grid of this series uses by default: the finest
        regular spacing when thickness changes (no detail of the thin part is lost), else the median."""
        return self.finest_spacing if self.mixed_thickness else self.median_spacing


def _thickness_classes(thick: np.ndarray) -> np.ndarray:
    """[K] class label per slice: slices of equal SliceThickness (within the tolerance) share one;
    every slice without the tag shares class -1."""
    labels = np.full(len(thick), -1, dtype=np.int64)
    known = np.isfinite(thick)
    if known.any():
        labels[known] = np.round(thick[known] / THICKNESS_TOL_MM).astype(np.int64)
    return labels


def _reference_spacing(gaps: np.ndarray, thick: np.ndarray, median: float) -> tuple[np.ndarray, float]:
    """The regular spacing expected between each pair of neighbours, and the finest one.

    Each run of slices of one thickness has its own regular spacing: the median gap between two
    neighbours of that thickness. A pair's expected gap is the mean of its two slices' spacings
    (thin-to-thick boundary: (4 + 7) / 2 for contiguous 4 mm and 7 mm slices). A thickness with no
    neighbouring pair of its own uses the thickness itself. Without SliceThickness: the median.

    Returns:
        (expected gap per pair [K-1], finest regular spacing).
    """
    labels = _thickness_classes(thick)
    same = labels[:-1] == labels[1:]
    spacing_of: dict[int, float] = {}
    for label in np.unique(labels):
        inside = same & (labels[:-1] == label)
        if inside.any():
            spacing_of[int(label)] = float(np.median(gaps[inside]))
        else:
            first = int(np.argmax(labels == label))
            spacing_of[int(label)] = float(thick[first]) if label >= 0 else median
    per_slice = np.array([spacing_of[int(v)] for v in labels])
    return (per_slice[:-1] + per_slice[1:]) / 2, min(spacing_of.values())


def analyse_geometry(slices: list[SliceHeader], series: str = "series") -> SeriesGeometry:
    """Sort slices along the normal and measure gaps, coverage, missing slices and gantry tilt.

    A gap counts as ``round(gap / expected) - 1`` missing slices when it is over 1.5 times the
    regular spacing expected there (see ``_reference_spacing``: the spacing of slices of that
    thickness), so the steps between contiguous thick slices of a series that starts thin are
    not mistaken for holes.

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
    thick = np.array([h.thickness if h.thickness is not None and h.thickness > 0 else np.nan for h in slices])
    expected, finest = _reference_spacing(gaps, thick, median)
    ratio = gaps / expected
    missing = int(sum(int(round(x)) - 1 for x in ratio if x > 1.5))
    uneven = bool(np.any(np.abs(gaps - median) > max(0.01 * median, 1e-3)))
    known = np.isfinite(thick)
    uncovered = gaps - (thick[:-1] + thick[1:]) / 2 if known.all() else None

    # Table direction: principal axis of the positions, pointing along +normal.
    _, _, vt = np.linalg.svd(rel - rel.mean(axis=0), full_matrices=False)
    d = vt[0] / np.linalg.norm(vt[0])
    if d @ n < 0:
        d = -d
    tilt = math.degrees(math.acos(min(1.0, abs(float(d @ n)))))
    inplane = float(np.max(np.hypot(offsets[:, 0], offsets[:, 1])))

    sp = slices[0].pixel_spacing
    thinnest = float(np.min(thick[known])) if known.any() else median
    thickest = float(np.max(thick[known])) if known.any() else median
    return SeriesGeometry(
        slices=slices, row_dir=r, col_dir=c, normal=n, table_dir=d,
        row_spacing=float(sp[0]), col_spacing=float(sp[1]),  # type: ignore[index]
        origin=pos[0], offsets=offsets, gaps=gaps, median_spacing=median,
        max_gap=float(gaps.max()), missing_slices=missing, uneven=uneven,
        tilt_deg=tilt, inplane_shift=inplane, thickness=thinnest, max_thickness=thickest,
        thicknesses=thick, uncovered=uncovered, finest_spacing=finest,
    )
