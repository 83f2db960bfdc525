"""Pixels of the sorted slices -> Hounsfield units."""
from __future__ import annotations

import warnings

import numpy as np
import pydicom

from data.dicom.errors import DicomError
from data.dicom.geometry import SeriesGeometry
from data.io import AIR_HU


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

