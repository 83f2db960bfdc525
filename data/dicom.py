"""DICOM series -> Hounsfield volume on an orthogonal, uniform grid.

Steps for one folder tree (``tools/prepare_dicom.py`` runs them in parallel, one series per task):

    read_header(path)                header only (stop_before_pixels) -> SliceHeader | None
    group_series(headers)            {SeriesInstanceUID: [SliceHeader, ...]}
    select_slices(slices)            drop non-image objects, localizers, slices off the majority geometry
    Criteria.check_header(slice)     modality + allowed (StudyDescription, KVP, ConvolutionKernel, ...)
    analyse_geometry(slices)         sort along the slice normal; gaps, missing slices, gantry tilt
    Criteria.check_geometry(...)     slice thickness range, minimum slice count, largest gap
    load_hu(geometry)                pixels of the kept slices only -> HU float32 [K, rows, cols]
    resample_to_grid(stack, geom)    orthogonal uniform grid -> (HU [X, Y, Z], voxel -> RAS mm affine)

Geometry conventions. DICOM world coordinates are LPS mm. ``ImageOrientationPatient`` holds the
row direction ``r`` (the direction in which the column index increases) and the column direction
``c`` (the direction in which the row index increases); ``PixelSpacing`` is (spacing between rows,
i.e. along ``c``; spacing between columns, i.e. along ``r``). The slice normal is ``n = r x c``.
A slice's ``ImagePositionPatient`` is the centre of its first pixel. With gantry tilt, the image
planes are tilted with respect to the table, so successive positions step along the table
direction ``d`` instead of ``n``: the stack of slices is sheared and has to be resampled onto an
orthogonal grid. Affines returned here map voxel indices to RAS mm (LPS with x and y negated),
the NIfTI convention.
"""
from __future__ import annotations

import csv
import fnmatch
import hashlib
import hmac
import math
import os
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from scipy.ndimage import map_coordinates

from data.io import AIR_HU, BadInputError

__all__ = [
    "AIR_HU",
    "DEFAULT_CRITERIA",
    "Criteria",
    "DicomError",
    "SeriesGeometry",
    "SliceHeader",
    "analyse_geometry",
    "describe_drops",
    "group_series",
    "iter_files",
    "load_criteria",
    "load_hu",
    "lps_to_ras",
    "pseudonym",
    "read_dicom_series",
    "read_header",
    "resample_to_grid",
    "select_slices",
]

# AIR_HU (-1024, from data.io): fill value outside the scanned volume, and the lower clip of HU.

# Objects that carry no image (structured reports, presentation states, key objects, documents).
NON_IMAGE_MODALITIES = frozenset({"SR", "PR", "KO", "DOC", "REG", "PLAN", "FID", "AU", "ECG"})
NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports (incl. dose SR, key object selection)
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF / CDA
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration, fiducials
)
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # screenshots, dose sheets
LOCALIZER_TYPES = ("LOCALIZER", "SCOUT")

# Criteria CSV column -> SliceHeader attribute. KVP is matched numerically when the pattern is a
# number or a range "lo-hi".
CRITERIA_COLUMNS = {
    "StudyDescription": "study_description",
    "SeriesDescription": "series_description",
    "BodyPartExamined": "body_part",
    "KVP": "kvp",
    "ConvolutionKernel": "kernel",
}
DEFAULT_CRITERIA = Path(__file__).resolve().with_name("criteria_default.csv")

# Bytes of the pixel data tags (7FE0,0010 / 0008 / 0009) in little- and big-endian encodings.
_PIXEL_TAG_BYTES = frozenset(
    {b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00",
     b"\x7f\xe0\x00\x10", b"\x7f\xe0\x00\x08", b"\x7f\xe0\x00\x09"}
)


class DicomError(BadInputError):
    """A DICOM file or series that cannot become a volume (a ``BadInputError``: ``.path``, ``.reason``).

    Args:
        path: the file, folder or series (pseudonymous id) concerned.
        reason: why, in words (reused as the drop reason in the series report).
    """


# --------------------------------------------------------------------------- headers


@dataclass(slots=True)
class SliceHeader:
    """What the pipeline needs from one DICOM file, read without its pixels.

    ``patient_key`` (PatientID) and the UIDs are kept only to group series and compute
    pseudonyms; they are never written to an output.
    """

    path: str
    series_uid: str
    study_uid: str = ""
    patient_key: str = ""
    sop_uid: str = ""
    sop_class: str = ""
    modality: str = ""
    image_type: str = ""  # ImageType values joined by "\", upper case
    has_pixels: bool = True
    frames: int = 1
    orientation: tuple[float, ...] | None = None  # 6 direction cosines: row dir, column dir
    position: tuple[float, float, float] | None = None  # LPS mm, centre of the first pixel
    pixel_spacing: tuple[float, float] | None = None  # (between rows, between columns) mm
    rows: int = 0
    cols: int = 0
    photometric: str = ""
    samples: int = 1
    study_description: str = ""
    series_description: str = ""
    body_part: str = ""
    kvp: str = ""
    kernel: str = ""
    thickness: float | None = None
    slope: float = 1.0
    intercept: float = 0.0
    padding: float | None = None  # PixelPaddingValue (raw pixel value outside the scan field)
    instance: int | None = None


def _text(ds: pydicom.Dataset, name: str) -> str:
    value = ds.get(name, "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def _floats(ds: pydicom.Dataset, name: str, n: int) -> tuple[float, ...] | None:
    value = ds.get(name)
    if value is None or value == "":
        return None
    try:
        values = tuple(float(v) for v in (value if n > 1 else [value]))
    except (TypeError, ValueError):
        return None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        return None
    return values


def _number(ds: pydicom.Dataset, name: str, default: float | None) -> float | None:
    values = _floats(ds, name, 1)
    return default if values is None else values[0]


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)


def _looks_like_headerless_dicom(f) -> bool:
    """True when a file without the 'DICM' preamble starts like a DICOM data set (group 0002/0008)."""
    start = f.read(4)
    f.seek(0)
    return len(start) == 4 and start[:2] in (b"\x02\x00", b"\x08\x00")


def read_header(path: str | os.PathLike) -> SliceHeader | None:
    """Read one file's header (``stop_before_pixels``) and note whether pixel data follows.

    Args:
        path: any file; files that are not DICOM, or DICOM objects without a SeriesInstanceUID
            (DICOMDIR), give None.
    Returns:
        The SliceHeader, or None when the file is not a DICOM object of a series.
    """
    path = str(path)
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except InvalidDicomError:
                f.seek(0)
                if not _looks_like_headerless_dicom(f):
                    return None
                ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            # stop_before_pixels leaves the file positioned on the pixel data tag, if any.
            ts = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
            has_pixels = f.read(4) in _PIXEL_TAG_BYTES or ts == pydicom.uid.DeflatedExplicitVRLittleEndian
            series_uid = _text(ds, "SeriesInstanceUID")
            if not series_uid:
                return None
            sop_class = _text(ds, "SOPClassUID") or str(
                getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "")
            )
            spacing = _floats(ds, "PixelSpacing", 2)
            return SliceHeader(
                path=path,
                series_uid=series_uid,
                study_uid=_text(ds, "StudyInstanceUID"),
                patient_key=_text(ds, "PatientID"),
                sop_uid=_text(ds, "SOPInstanceUID"),
                sop_class=sop_class,
                modality=_text(ds, "Modality").upper(),
                image_type=_text(ds, "ImageType").upper(),
                has_pixels=has_pixels,
                frames=int(_number(ds, "NumberOfFrames", 1) or 1),
                orientation=_floats(ds, "ImageOrientationPatient", 6),
                position=_floats(ds, "ImagePositionPatient", 3),
                pixel_spacing=spacing,
                rows=int(ds.get("Rows", 0) or 0),
                cols=int(ds.get("Columns", 0) or 0),
                photometric=_text(ds, "PhotometricInterpretation").upper(),
                samples=int(ds.get("SamplesPerPixel", 1) or 1),
                study_description=_text(ds, "StudyDescription"),
                series_description=_text(ds, "SeriesDescription"),
                body_part=_text(ds, "BodyPartExamined"),
                kvp=_text(ds, "KVP"),
                kernel=_text(ds, "ConvolutionKernel"),
                thickness=_number(ds, "SliceThickness", None),
                slope=_number(ds, "RescaleSlope", 1.0) or 1.0,
                intercept=_number(ds, "RescaleIntercept", 0.0) or 0.0,
                padding=_number(ds, "PixelPaddingValue", None),
                instance=_int_or_none(_number(ds, "InstanceNumber", None)),
            )
    except Exception:  # unreadable or truncated file: not part of any series  # noqa: BLE001
        return None


def iter_files(root: str | os.PathLike, exclude: Iterable[str | os.PathLike] = ()) -> Iterator[str]:
    """Every regular file under ``root`` (any folder layout), in sorted order.

    Args:
        root: folder to walk (symbolic links to folders are not followed).
        exclude: folders to skip (e.g. an output folder inside the input).
    """
    skip = {os.path.realpath(p) for p in exclude}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(folder, d)) not in skip)
        for name in sorted(files):
            yield os.path.join(folder, name)


def group_series(headers: Iterable[SliceHeader | None]) -> dict[str, list[SliceHeader]]:
    """Group headers by SeriesInstanceUID (None entries are ignored)."""
    series: dict[str, list[SliceHeader]] = {}
    for h in headers:
        if h is not None:
            series.setdefault(h.series_uid, []).append(h)
    return series


# --------------------------------------------------------------------------- slice selection


def _slice_problem(h: SliceHeader) -> str | None:
    if (
        not h.has_pixels
        or h.modality in NON_IMAGE_MODALITIES
        or h.sop_class.startswith(NON_IMAGE_SOP_PREFIXES)
    ):
        return "non-image"
    if any(t in h.image_type for t in LOCALIZER_TYPES):
        return "localizer"
    if h.sop_class.startswith(SECONDARY_CAPTURE_PREFIX):
        return "secondary-capture"
    if h.frames > 1:
        return "multi-frame"
    if h.samples != 1 or h.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return "not-grayscale"
    if h.orientation is None or h.position is None or h.pixel_spacing is None or h.rows < 1 or h.cols < 1:
        return "no-geometry"
    if min(h.pixel_spacing) <= 0:
        return "no-geometry"
    return None


def _geometry_key(h: SliceHeader) -> tuple:
    return (
        tuple(round(v, 3) for v in h.orientation),  # type: ignore[union-attr]
        h.rows,
        h.cols,
        tuple(round(v, 4) for v in h.pixel_spacing),  # type: ignore[union-attr]
    )


def select_slices(slices: list[SliceHeader]) -> tuple[list[SliceHeader], Counter]:
    """Keep the image slices of a series that share its majority geometry.

    Drops (counted by reason): duplicate files (same SOPInstanceUID), non-image objects (no pixel
    data, SR, presentation states, ...), localizers (ImageType LOCALIZER/SCOUT), secondary
    captures, multi-frame and colour images, slices without geometry tags, and slices whose
    orientation, matrix size or pixel spacing differs from the series majority
    ("off-orientation": e.g. a localizer stored in the axial series).

    Args:
        slices: the headers of one series.
    Returns:
        (kept headers in input order, Counter of dropped slices by reason).
    """
    dropped: Counter = Counter()
    seen: set[str] = set()
    candidates = []
    for h in slices:
        if h.sop_uid and h.sop_uid in seen:
            dropped["duplicate"] += 1
            continue
        if h.sop_uid:
            seen.add(h.sop_uid)
        problem = _slice_problem(h)
        if problem:
            dropped[problem] += 1
        else:
            candidates.append(h)
    if not candidates:
        return [], dropped
    counts = Counter(_geometry_key(h) for h in candidates)
    majority = counts.most_common(1)[0][0]
    kept = [h for h in candidates if _geometry_key(h) == majority]
    if len(kept) < len(candidates):
        dropped["off-orientation"] += len(candidates) - len(kept)
    return kept, dropped


def describe_drops(dropped: Counter) -> str:
    """'reason:count;...' in a stable order ('' when nothing was dropped)."""
    return ";".join(f"{k}:{v}" for k, v in sorted(dropped.items()))


# --------------------------------------------------------------------------- criteria


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

    def check_geometry(self, geom: "SeriesGeometry") -> str | None:
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


# --------------------------------------------------------------------------- geometry


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
        raise DicomError(
            series, f"{dup or len(slices) - 1} slice(s) share a position with another (several acquisitions in one series?)"
        )
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


# --------------------------------------------------------------------------- pixels and resampling


def _ensure_transfer_syntax(ds: pydicom.Dataset) -> None:
    """Give a data set read without file meta information (old headerless files) the transfer
    syntax it was read with, which pixel decoding needs."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (ds.is_implicit_VR, ds.is_little_endian))
    if meta is None:
        ds.file_meta = meta = pydicom.dataset.FileMetaDataset()
    meta.TransferSyntaxUID = (
        pydicom.uid.ImplicitVRLittleEndian if implicit
        else pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian
    )


def load_hu(geom: SeriesGeometry, series: str = "series") -> np.ndarray:
    """Read the pixels of the sorted slices and convert them to HU.

    HU = pixel * RescaleSlope + RescaleIntercept per slice; PixelPaddingValue pixels and values
    below -1024 (outside the scan field) become -1024.

    Args:
        geom: from ``analyse_geometry``.
        series: name used in error messages.
    Returns:
        float32 HU ``[K, rows, cols]`` in the order of ``geom.slices``.
    Raises:
        DicomError: unreadable or undecodable pixel data (e.g. a compressed transfer syntax
            without its decoder installed), or a matrix that disagrees with Rows/Columns.
    """
    first = geom.slices[0]
    stack = np.empty((len(geom.slices), first.rows, first.cols), dtype=np.float32)
    for k, h in enumerate(geom.slices):
        ds = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(h.path, force=True)  # read_header accepted it (maybe without preamble)
                _ensure_transfer_syntax(ds)
                px = ds.pixel_array
        except Exception as e:  # noqa: BLE001 - pydicom raises many types
            msg = str(e).replace(h.path, "<file>")  # no input paths (may hold names) in reasons
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
            raise DicomError(series, f"cannot read pixel data of slice {k} (transfer syntax {ts}): "
                                     f"{type(e).__name__}: {msg}") from e
        if px.shape != (first.rows, first.cols):
            raise DicomError(series, f"slice {k} has pixel matrix {px.shape}, expected {(first.rows, first.cols)}")
        hu = px.astype(np.float32) * np.float32(h.slope) + np.float32(h.intercept)
        if h.padding is not None:
            hu[px == h.padding] = AIR_HU
        stack[k] = hu
    np.maximum(stack, AIR_HU, out=stack)
    return stack


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """Voxel -> LPS affine to voxel -> RAS affine (negate world x and y)."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _snap(x: np.ndarray, n: int, tol: float = 1e-3) -> np.ndarray:
    """Move coordinates within ``tol`` voxel outside [0, n-1] onto the edge (rounding noise)."""
    x[(x < 0) & (x > -tol)] = 0.0
    x[(x > n - 1) & (x < n - 1 + tol)] = n - 1
    return x


def _uniform_axis(extent: float, step: float) -> tuple[int, float]:
    """Number of samples and spacing that cover ``extent`` exactly with a spacing close to ``step``."""
    count = max(1, int(round(extent / step))) + 1
    return count, extent / (count - 1)


def _bilinear_rows(stack: np.ndarray, kf: np.ndarray, ii: np.ndarray, valid: np.ndarray, fill: float) -> np.ndarray:
    """Whole image rows interpolated bilinearly in (slice, row): stack [K, rows, cols],
    kf / ii / valid [...] -> [..., cols] (``fill`` where not valid)."""
    k0 = np.clip(np.floor(kf).astype(np.intp), 0, stack.shape[0] - 2)
    i0 = np.clip(np.floor(ii).astype(np.intp), 0, stack.shape[1] - 2)
    wk = np.clip(kf - k0, 0.0, 1.0).astype(np.float32)[..., None]
    wi = np.clip(ii - i0, 0.0, 1.0).astype(np.float32)[..., None]
    top = stack[k0, i0] * (1 - wi) + stack[k0, i0 + 1] * wi
    bottom = stack[k0 + 1, i0] * (1 - wi) + stack[k0 + 1, i0 + 1] * wi
    vals = top * (1 - wk) + bottom * wk
    vals[~valid] = fill
    return vals


def resample_to_grid(
    stack: np.ndarray, geom: SeriesGeometry, fill: float = AIR_HU, chunk_voxels: int = 1 << 22
) -> tuple[np.ndarray, np.ndarray]:
    """Put the slices on an orthogonal, uniformly spaced grid.

    - Slices not shifted in-plane: the grid axes are (row_dir, col_dir, normal) with the pixel
      spacing in-plane; evenly spaced slices are used as they are, uneven ones are linearly
      interpolated along the normal onto a uniform spacing close to the median that spans
      the first to the last slice exactly.
    - Gantry tilt (slices shifted in-plane): the grid axes are e3 = table direction,
      e1 = row direction made orthogonal to e3, e2 = e3 x e1 (for the usual tilt about the
      left-right axis these are the world axes). The grid covers every voxel centre of the
      series (empty corners get ``fill``) and is sampled with trilinear interpolation
      (``scipy.ndimage.map_coordinates``) between neighbouring slices, each slice shifted by its
      own in-plane offset.

    Args:
        stack: float32 HU ``[K, rows, cols]`` in ``geom.slices`` order.
        geom: from ``analyse_geometry``.
        fill: value outside the scanned volume.
        chunk_voxels: output voxels computed at once (bounds memory for large series).
    Returns:
        (hu float32 ``[X, Y, Z]`` with X along e1 / row_dir (a Fortran-ordered view; it may share
        memory with ``stack``), affine (4, 4) voxel -> RAS mm).
    """
    k_count, rows, cols = stack.shape
    if k_count != len(geom.slices):
        raise ValueError(f"stack has {k_count} slices, geometry {len(geom.slices)}")
    r, c, n = geom.row_dir, geom.col_dir, geom.normal
    s = geom.offsets[:, 2]
    extent = float(s[-1] - s[0])
    lps = np.eye(4)

    # Results are built as [Z, Y, X] C-contiguous and returned as the [X, Y, Z] view (Fortran
    # order, which is also NIfTI's on-disk order: no copy when written).
    if not geom.sheared:
        if not geom.uneven:
            out = stack  # [K, rows, cols]
            step = extent / (k_count - 1)
        else:
            m_count, step = _uniform_axis(extent, geom.median_spacing)
            kf = np.interp(s[0] + step * np.arange(m_count), s, np.arange(k_count))
            k0 = np.minimum(np.floor(kf).astype(int), k_count - 2)
            w = (kf - k0).astype(np.float32)
            out = np.empty((m_count, rows, cols), dtype=np.float32)
            for m in range(m_count):  # linear blend of the two neighbouring slices
                np.multiply(stack[k0[m]], 1 - w[m], out=out[m])
                out[m] += w[m] * stack[k0[m] + 1]
        lps[:3, 0] = r * geom.col_spacing
        lps[:3, 1] = c * geom.row_spacing
        lps[:3, 2] = n * step
        lps[:3, 3] = geom.origin
        return out.transpose(2, 1, 0), lps_to_ras(lps)

    # Gantry tilt: orthogonal frame aligned with the table.
    e3 = geom.table_dir
    e1 = r - (r @ e3) * e3
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(e3, e1)
    frame = np.stack([e1, e2, e3])  # [3 axes, 3 world]
    rel = geom.offsets @ np.stack([r, c, n])  # [K, 3] slice origins relative to slice 0 (world)
    corners = np.array([[0, 0], [0, cols - 1], [rows - 1, 0], [rows - 1, cols - 1]], dtype=np.float64)
    corner_vecs = corners[:, :1] * geom.row_spacing * c + corners[:, 1:] * geom.col_spacing * r  # [4, 3]
    pts = (rel[:, None, :] + corner_vecs[None]).reshape(-1, 3) @ frame.T  # [4K, 3] in (e1, e2, e3)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    ext = hi - lo
    steps_d = np.diff(rel @ e3)
    sizes, spacing, start = [], [], []
    for axis, sp in enumerate((geom.col_spacing, geom.row_spacing)):
        count = int(math.ceil(ext[axis] / sp - 1e-3)) + 1
        sizes.append(count)
        spacing.append(sp)
        start.append(lo[axis] - ((count - 1) * sp - ext[axis]) / 2)
    count3, sp3 = _uniform_axis(float(ext[2]), float(np.median(steps_d)))
    sizes.append(count3)
    spacing.append(sp3)
    start.append(lo[2])
    start_rel = np.asarray(start) @ frame  # world offset of voxel (0,0,0) from slice 0's origin

    # Coordinates of voxel (p, q, m) along (r, c, n): base + p*A[0] + q*A[1] + m*A[2].
    axes = np.asarray(spacing)[:, None] * frame  # [3, 3] world step per voxel index
    proj = np.stack([r, c, n], axis=1)  # [3 world, 3] -> (u, v, w)
    base = start_rel @ proj  # (3,)
    step_uvw = axes @ proj  # [3 index axes, 3]
    a_off, b_off = geom.offsets[:, 0], geom.offsets[:, 1]
    nx, ny, nz = sizes
    out = np.empty((nz, ny, nx), dtype=np.float32)
    p = np.arange(nx, dtype=np.float64)[None, None, :]
    q = np.arange(ny, dtype=np.float64)[None, :, None]
    k_index = np.arange(k_count, dtype=np.float64)
    block = max(1, chunk_voxels // (nx * ny))
    # The usual tilt (about the row direction): output x = column index, and (depth, row) depend
    # on (q, m) only; drift below 1% of a pixel over the whole grid counts as none.
    drift_u = (abs(step_uvw[0, 0] - geom.col_spacing) * nx + abs(step_uvw[1, 0]) * ny + abs(step_uvw[2, 0]) * nz
               + float(np.max(np.abs(base[0] - a_off))))
    row_aligned = (
        nx == cols and rows >= 2 and drift_u < 0.01 * geom.col_spacing
        and abs(step_uvw[0, 1]) * nx < 0.01 * geom.row_spacing
        and abs(step_uvw[0, 2]) * nx < 0.01 * float(np.min(np.diff(s)))
    )
    for m0 in range(0, nz, block):
        m = np.arange(m0, min(nz, m0 + block), dtype=np.float64)[:, None, None]
        if row_aligned:
            w = (base[2] + q * step_uvw[1, 2] + m * step_uvw[2, 2])[..., 0]  # [mb, ny]
            v = (base[1] + q * step_uvw[1, 1] + m * step_uvw[2, 1])[..., 0]
            kf = np.interp(w, s, k_index)
            ii = _snap((v - np.interp(w, s, b_off)) / geom.row_spacing, rows)
            valid = (w >= s[0] - 1e-4) & (w <= s[-1] + 1e-4) & (ii >= 0) & (ii <= rows - 1)
            vals = _bilinear_rows(stack, kf, ii, valid, fill)  # [mb, ny, cols]
        else:
            # General case, computed as [m, q, p] (p fastest) so neighbouring points read
            # neighbouring pixels of a slice (cache-friendly).
            coords = np.empty((3, m.shape[0], ny, nx), dtype=np.float64)  # (k, i, j) per output voxel
            w = base[2] + p * step_uvw[0, 2] + q * step_uvw[1, 2] + m * step_uvw[2, 2]
            kf = np.interp(w, s, k_index)  # fractional slice index
            kf[(w < s[0] - 1e-4) | (w > s[-1] + 1e-4)] = -10.0  # outside the first/last plane
            coords[0] = kf
            u = base[0] + p * step_uvw[0, 0] + q * step_uvw[1, 0] + m * step_uvw[2, 0]
            coords[2] = _snap((u - np.interp(w, s, a_off)) / geom.col_spacing, cols)
            v = base[1] + p * step_uvw[0, 1] + q * step_uvw[1, 1] + m * step_uvw[2, 1]
            coords[1] = _snap((v - np.interp(w, s, b_off)) / geom.row_spacing, rows)
            vals = map_coordinates(stack, coords, order=1, mode="constant", cval=fill, output=np.float32)
        out[m0:m0 + m.shape[0]] = vals  # [mb, ny, nx]
    lps[:3, :3] = axes.T
    lps[:3, 3] = geom.origin + start_rel
    return out.transpose(2, 1, 0), lps_to_ras(lps)


# --------------------------------------------------------------------------- ids and convenience


def pseudonym(salt: str, kind: str, value: str, length: int = 16) -> str:
    """Keyed hash (HMAC-SHA256) of an identifier: stable for one salt, not reversible without it.

    Args:
        salt: secret key (keep it to get the same ids on reruns).
        kind: namespace ('patient', 'study', 'series') so equal strings of different kinds differ.
        value: the identifier (UID, PatientID).
        length: hex characters kept.
    """
    if not salt:
        raise ValueError("pseudonym needs a non-empty salt")
    return hmac.new(salt.encode(), f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:length]


def read_dicom_series(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read the one image series in a folder tree into HU on an orthogonal grid (no selection rules).

    Args:
        folder: folder holding the files of one series (other objects such as localizers,
            structured reports or unrelated files are ignored).
    Returns:
        (hu float32 ``[X, Y, Z]``, affine (4, 4) voxel -> RAS mm).
    Raises:
        DicomError: no image series, several image series, or a series that cannot be built.
    """
    series = group_series(read_header(p) for p in iter_files(folder))
    usable = {uid: select_slices(s)[0] for uid, s in series.items()}
    usable = {uid: s for uid, s in usable.items() if s}
    if len(usable) != 1:
        raise DicomError(folder, f"expected one image series, found {len(usable)}")
    geom = analyse_geometry(next(iter(usable.values())), str(folder))
    return resample_to_grid(load_hu(geom, str(folder)), geom)
