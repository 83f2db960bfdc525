"""Selection rules: which series to keep by their tags (criteria CSV) and their geometry."""
from __future__ import annotations

import csv
import fnmatch
import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
        min_thickness, max_thickness: SliceThickness range in mm (the median slice spacing is
            used when the tag is missing).
        min_slices: fewest usable slices.
        max_gap_mm: largest allowed gap between neighbouring slices; never below 1.5 x the median
            spacing so that a regular series is not dropped for its own spacing. Smaller gaps are
            interpolated (and counted as missing slices when about 2x, 3x, ... the median).
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
        """Largest allowed gap (mm) for a series with this median slice spacing."""
        return max(self.max_gap_mm, 1.5 * median_spacing)

    def check_geometry(self, geom: SeriesGeometry) -> str | None:
        """Reason to drop a series by thickness, slice count or gap size, or None."""
        thickness = geom.thickness
        if not self.min_thickness - 1e-3 <= thickness <= self.max_thickness + 1e-3:
            return f"slice thickness {thickness:.2f} mm outside [{self.min_thickness}, {self.max_thickness}]"
        if len(geom.slices) < self.min_slices:
            return f"{len(geom.slices)} slices < minimum {self.min_slices}"
        limit = self.gap_limit(geom.median_spacing)
        if geom.max_gap > limit + 1e-6:
            return f"gap of {geom.max_gap:.2f} mm between slices exceeds the limit {limit:.2f} mm"
        return None

