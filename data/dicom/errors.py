"""The error every DICOM step raises for input that cannot become a volume."""
from __future__ import annotations

from data.io import BadInputError


class DicomError(BadInputError):
    """A DICOM file or series that cannot become a volume (a ``BadInputError``: ``.path``, ``.reason``).

    Args:
        path: the file, folder or series (pseudonymous id) concerned.
        reason: why, in words (reused as the drop reason in the series report).
    """
