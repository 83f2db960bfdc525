"""Selection rules: which series to keep by their tags (criteria CSV) and their geometry."""
from __future__ import annotations

import csv
import fnmatch
import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data.dicom.geometry import SeriesGeometry
from data.dicom.headers import SliceHeader

# Criteria CSV column -> SliceHeader attribute. KVP is matched numerically when the pattern is a
# number or a range "lo-hi".
CRITERIA_COLUMNS = {
    "StudyDescription": "study_description",
    "SeriesDescription": "series_description",
    "BodyPartExamined": "body_part",
    "KVP": "kvp",
    "ConvolutionKernel": "kernel",
}
DEFAULT_CRITERIA = Path(__file__).resolve().parents[1] / "criteria_default.csv"


def _numeric_range(pattern: str) -> tuple[float, float] | None:
    """(lo, hi) for '120' or '80-140', None for a text pattern."""
    lo, sep, hi = pattern.partition("-")
    try:
        return (float(lo), float(hi)) if sep else (float(lo), float(lo))
    except ValueError:
        return None


def _match(pattern: str, value: str, numeric: bool) -> bool:
    """Case-insensitive shell pattern ('*HEAD*'); alternatives with '|'; numbers and 'lo-hi' ranges for KVP."""
    for alt in pattern.split("|"):
        p = alt.strip()
        if p in ("", "*"):
            return True
        bounds = _numeric_range(p) if numeric else None
        if bounds is not None:
            try:
                v = float(value)
            except ValueError:
                continue
            if bounds[0] - 1e-6 <= v <= bounds[1] + 1e-6:
                return True
        elif fnmatch.fnmatchcase(value.strip().upper(), p.upper()):
            return True
    return False


def load_criteria(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read a criteria CSV: one allowed combination per row.

    Columns (any subset, header required): StudyDescription, SeriesDescription, BodyPartExamined,
    KVP, ConvolutionKernel. Cells are case-insensitive shell patterns (``*HEAD*``, ``H3?s``),
    several alternatives separated by ``|``; KVP also takes a number or a range ``lo-hi``; an empty
    cell or ``*`` matches anything (also a missing tag). A series is allowed when all cells of
    at least one row match. Lines starting with ``#`` are comments.

    Args:
        path: the CSV file.
    Returns:
        List of {column: pattern} rows.
    Raises:
        ValueError: unknown column, no header, or no rows.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    reader = csv.DictReader(lines)
    columns = [c.strip() for c in (reader.fieldnames or [])]
    unknown = [c for c in columns if c not in CRITERIA_COLUMNS]
    if not columns or unknown:
        raise ValueError(
            f"{path}: unknown criteria column(s) {unknown or '(no header)'}; "
            f"allowed: {', '.join(CRITERIA_COLUMNS)}"
        )
    rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    if not rows:
        raise ValueError(f"{path}: no criteria rows (pass --criteria '' to accept every series)")
    return rows


@dataclass
class Criteria:
    """Which series to keep.

    Args:
        patterns: allowed combinations (see ``load_criteria``); empty = every description/kVp/kernel.
        modalities: allowed Modality values.
        min_thickness, max_thickness: SliceThickness range in mm, checked on the thinnest slices
            (a series that starts thin and goes on thick is judged by its best resolution; its
            thick part must still leave no uncovered gap above ``max_gap_mm``). The median slice
            spacing stands in when no slice has the tag.
        min_slices: fewest usable slices.
        max_gap_mm: largest allowed uncovered distance between neighbouring slices, i.e.
            ``spacing - (thickness_k + thickness_k+1) / 2`` along the normal (0 for contiguous
            slices of any thickness, negative for overlapping ones). When a slice has no
            SliceThickness, the spacing itself is limited instead, never below 1.5 x the median
            spacing so that a regular series is not dropped for its own spacing. Smaller gaps are
            interpolated (and counted as missing slices when about 2x, 3x, ... the regular spacing).
    """

    patterns: list[dict[str, str]] = field(default_factory=list)
    modalities: tuple[str, ...] = ("CT",)
    min_thickness: float = 0.5
    max_thickness: float = 5.0
    min_slices: int = 20
    max_gap_mm: float = 5.0

    def __post_init__(self) -> None:
        self.modalities = tuple(m.upper() for m in self.modalities)
        if self.min_thickness < 0 or self.max_thickness < self.min_thickness:
            raise ValueError(f"slice thickness range [{self.min_thickness}, {self.max_thickness}] is empty")
        if self.min_slices < 2:
            raise ValueError(f"min_slices must be >= 2, got {self.min_slices}")
        if self.max_gap_mm <= 0:
            raise ValueError(f"max_gap_mm must be > 0, got {self.max_gap_mm}")
        for row in self.patterns:
            unknown = set(row) - set(CRITERIA_COLUMNS)
            if unknown:
                raise ValueError(f"unknown criteria column(s) {sorted(unknown)}")

    def fingerprint(self) -> str:
        """Short hash of every setting (a changed setting makes reruns redo the series)."""
        text = repr(sorted(asdict(self).items()))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def check_header(self, h: SliceHeader) -> str | None:
        """Reason to drop the series of representative slice ``h`` by its tags, or None."""
        if self.modalities and h.modality not in self.modalities:
            return f"modality {h.modality or '(none)'} not in {'/'.join(self.modalities)}"
        if self.patterns and not any(
            all(_match(p, getattr(h, CRITERIA_COLUMNS[col]), col == "KVP") for col, p in row.items())
            for row in self.patterns
        ):
            return (
                f"not in criteria: StudyDescription={h.study_description!r} KVP={h.kvp!r} "
                f"ConvolutionKernel={h.kernel!r}"
            )
        return None

    def gap_limit(self, median_spacing: float) -> float:
        """Largest allowed spacing (mm) between slices without SliceThickness, for this median spacing."""
        return max(self.max_gap_mm, 1.5 * median_spacing)

    def check_geometry(self, geom: SeriesGeometry) -> str | None:
        """Reason to drop a series by thickness, slice count or uncovered gap, or None."""
        thickness = geom.thickness
        if not self.min_thickness - 1e-3 <= thickness <= self.max_thickness + 1e-3:
            thickest = f" (thinnest; thickest {geom.max_thickness:.2f} mm)" if geom.mixed_thickness else ""
            return (f"slice thickness {thickness:.2f} mm{thickest} outside "
                    f"[{self.min_thickness}, {self.max_thickness}]")
        if len(geom.slices) < self.min_slices:
            return f"{len(geom.slices)} slices < minimum {self.min_slices}"
        if geom.uncovered is not None:
            k = int(np.argmax(geom.uncovered))
            if geom.uncovered[k] > self.max_gap_mm + 1e-6:
                t0, t1 = geom.thicknesses[k], geom.thicknesses[k + 1]  # type: ignore[index]
                thick = f"{t0:.2f} mm" if abs(t0 - t1) <= 1e-6 else f"{t0:.2f} and {t1:.2f} mm"
                numbers = [geom.slices[i].instance for i in (k, k + 1)]
                which = f"InstanceNumber {numbers[0]} and {numbers[1]}" if None not in numbers else "slices"
                return (f"gap of {geom.gaps[k]:.2f} mm between {which} ({thick} thick, sorted positions {k} and "
                        f"{k + 1}) leaves {geom.uncovered[k]:.2f} mm uncovered, above the limit "
                        f"{self.max_gap_mm:.2f} mm")
            return None
        limit = self.gap_limit(geom.median_spacing)
        if geom.max_gap > limit + 1e-6:
            return (f"gap of {geom.max_gap:.2f} mm between slices exceeds the limit {limit:.2f} mm "
                    f"(no SliceThickness: spacing limited, not coverage)")
        return None
