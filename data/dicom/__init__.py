"""DICOM series -> Hounsfield volume on an orthogonal, uniform grid.

Steps for one folder tree (``tools/prepare_dicom.py`` runs them in parallel, one series per task),
by module:

    headers    read_header(path)              header only (stop_before_pixels) -> SliceHeader | None
               group_series(headers)          {SeriesInstanceUID: [SliceHeader, ...]}
    selection  select_slices(slices)          drop non-image objects, localizers, off-geometry slices
    criteria   Criteria.check_header(slice)   modality + allowed (StudyDescription, KVP, kernel, ...)
    geometry   analyse_geometry(slices)       sort along the normal; gaps, coverage, missing slices, tilt
    criteria   Criteria.check_geometry(geom)  thickness range, minimum slice count, largest uncovered gap
    pixels     load_hu(geom)                  pixels of the kept slices only -> HU float32 [K, rows, cols]
    resample   resample_to_grid(stack, geom)  orthogonal uniform grid -> (HU [X, Y, Z], voxel -> RAS affine)
    ids        pseudonym(salt, kind, uid)     keyed hashes for the ids written to outputs

``read_dicom_series(folder)`` runs them all for a folder holding one series, without selection rules.
Geometry conventions (LPS world, row/column directions, tilt) are described in ``geometry.py``.
"""
from __future__ import annotations

import os

import numpy as np

from data.dicom.criteria import CRITERIA_COLUMNS, DEFAULT_CRITERIA, Criteria, load_criteria
from data.dicom.errors import DicomError
from data.dicom.geometry import SeriesGeometry, analyse_geometry
from data.dicom.headers import SliceHeader, group_series, iter_files, read_header
from data.dicom.ids import pseudonym
from data.dicom.pixels import load_hu
from data.dicom.resample import lps_to_ras, resample_to_grid
from data.dicom.selection import describe_drops, select_slices
from data.io import AIR_HU

__all__ = [
    "AIR_HU",
    "CRITERIA_COLUMNS",
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
