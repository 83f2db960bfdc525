"""Which slices of a series are images of its main stack (no reports, localizers, other orientations)."""
from __future__ import annotations

from collections import Counter

from data.dicom.headers import SliceHeader

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

