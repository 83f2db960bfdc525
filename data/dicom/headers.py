"""Headers without pixels: one ``SliceHeader`` per DICOM file, files under a folder, series by UID."""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator

import pydicom
from pydicom.errors import InvalidDicomError

# Bytes of the pixel data tags (7FE0,0010 / 0008 / 0009) in little- and big-endian encodings.
_PIXEL_TAG_BYTES = frozenset(
    {b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00",
     b"\x7f\xe0\x00\x10", b"\x7f\xe0\x00\x08", b"\x7f\xe0\x00\x09"}
)




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

