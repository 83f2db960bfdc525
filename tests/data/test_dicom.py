"""Tests of data/dicom.py on synthetic DICOM series written with pydicom in tmp_path.

``write_series`` / ``write_non_image`` are reused by tests/tools/test_prepare_dicom.py.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from data.dicom import (
    DEFAULT_CRITERIA,
    Criteria,
    DicomError,
    SliceHeader,
    analyse_geometry,
    group_series,
    iter_files,
    load_criteria,
    load_hu,
    pseudonym,
    read_dicom_series,
    read_header,
    resample_to_grid,
    select_slices,
)
from data.io import BadInputError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
GRAYSCALE_PS = "1.2.840.10008.5.1.4.1.1.11.1"
PHI = {"PatientName": "Doe^Jane", "PatientID": "MRN12345", "PatientBirthDate": "19700101"}
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def tilted_orientation(deg: float) -> tuple[float, ...]:
    """Rows along +x, columns tilted about x: (0, cos t, -sin t) (a gantry tilt of ``deg``)."""
    t = math.radians(deg)
    return (1.0, 0.0, 0.0, 0.0, math.cos(t), -math.sin(t))


def _save(ds: FileDataset, path: Path) -> None:
    try:  # pydicom >= 3
        ds.save_as(path, enforce_file_format=True)
    except TypeError:  # pydicom 2.x
        ds.save_as(path, write_like_original=False)


def _dataset(path: Path, sop_class: str, study_uid: str, series_uid: str, explicit: bool) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    if int(pydicom.__version__.split(".")[0]) < 3:
        ds.is_little_endian, ds.is_implicit_VR = True, not explicit
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    for key, value in PHI.items():
        setattr(ds, key, value)
    return ds


def write_series(
    folder: Path,
    hu: np.ndarray,
    positions: np.ndarray,
    orientation: tuple[float, ...] = AXIAL,
    spacing: tuple[float, float] = (1.0, 1.0),
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    study_description: str = "CT HEAD WO CONTRAST",
    series_description: str = "Head 1.0 H30s",
    kvp: str = "120",
    kernel: str = "H30s",
    thickness: float | Sequence[float] | np.ndarray | None = 1.0,
    modality: str = "CT",
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    slope: float = 1.0,
    intercept: float = -1024.0,
    explicit: bool = False,
    shuffle: bool = True,
    tags: dict | None = None,
) -> str:
    """Write one CT series: slice k holds ``hu[k]`` ([rows, cols]) at ``positions[k]`` (LPS mm).

    Pixels are stored as int16 ``round((hu - intercept) / slope)``; files are written in a shuffled
    order with shuffled names so that sorting must use the geometry. ``thickness``: SliceThickness
    of every slice, or one per slice (``thickness[k]`` for ``hu[k]``); ``tags``: further attributes
    of every file (e.g. ``{"GantryDetectorTilt": 18.5}``). Returns the SeriesInstanceUID.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    order = np.random.default_rng(0).permutation(len(hu)) if shuffle else np.arange(len(hu))
    for n, k in enumerate(order):
        path = folder / f"IM{n:04d}"
        ds = _dataset(path, CT_IMAGE_STORAGE, study_uid, series_uid, explicit)
        ds.Modality = modality
        ds.ImageType = list(image_type)
        ds.StudyDescription = study_description
        ds.SeriesDescription = series_description
        ds.KVP = kvp
        ds.ConvolutionKernel = kernel
        t = thickness[k] if isinstance(thickness, (Sequence, np.ndarray)) else thickness
        if t is not None:
            ds.SliceThickness = round(float(t), 6)
        for key, value in (tags or {}).items():
            setattr(ds, key, value)
        ds.InstanceNumber = n + 1
        ds.ImageOrientationPatient = [round(v, 8) for v in orientation]
        ds.ImagePositionPatient = [round(float(v), 6) for v in positions[k]]
        ds.PixelSpacing = list(spacing)
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.rint((hu[k] - intercept) / slope).astype(np.int16).tobytes()
        _save(ds, path)
    return series_uid


def write_non_image(folder: Path, kind: str, study_uid: str | None = None, series_uid: str | None = None) -> str:
    """Write a structured report ('SR') or a presentation state ('PR'): no pixel data."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    path = folder / f"{kind}{generate_uid()[-6:]}.dcm"
    ds = _dataset(path, BASIC_TEXT_SR if kind == "SR" else GRAYSCALE_PS, study_uid or generate_uid(), series_uid,
                  explicit=True)
    ds.Modality = kind
    ds.StudyDescription = "CT HEAD WO CONTRAST"
    _save(ds, path)
    return series_uid


def linear_hu(points_lps: np.ndarray) -> np.ndarray:
    """Analytic HU as a linear function of LPS world mm ([..., 3] -> [...])."""
    return 200.0 + 4.0 * points_lps[..., 0] + 12.0 * points_lps[..., 1] + 8.0 * points_lps[..., 2]


def sample_slices(positions: np.ndarray, orientation, spacing, rows: int, cols: int, fn=linear_hu) -> np.ndarray:
    """HU [K, rows, cols] of ``fn`` at every pixel centre of the slices."""
    r, c = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    offsets = i[..., None] * spacing[0] * c + j[..., None] * spacing[1] * r  # [rows, cols, 3]
    return np.stack([fn(p + offsets) for p in positions])


def voxel_world_lps(affine_ras: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """LPS world mm of every voxel centre ([*shape, 3])."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(float)
    ras = idx @ affine_ras[:3, :3].T + affine_ras[:3, 3]
    return ras * np.array([-1.0, -1.0, 1.0])


def uneven_z(n: int, step: float, seed: int = 0) -> np.ndarray:
    """n slice positions along z with steps of step * [0.75, 1.25]."""
    rng = np.random.default_rng(seed)
    return np.concatenate([[0.0], np.cumsum(step * rng.uniform(0.75, 1.25, n - 1))])


# --------------------------------------------------------------------------- headers and selection


def test_read_header_fields_and_non_dicom(tmp_path: Path) -> None:
    z = np.arange(3) * 2.0
    pos = np.stack([np.full(3, -20.0), np.full(3, -10.0), z], axis=1)
    uid = write_series(tmp_path / "s", sample_slices(pos, AXIAL, (1.0, 1.0), 8, 8), pos, kvp="120", explicit=True,
                       shuffle=False)
    (tmp_path / "s" / "README.txt").write_text("not dicom")
    (tmp_path / "s" / "noise.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    headers = [read_header(p) for p in iter_files(tmp_path)]
    assert sum(h is None for h in headers) == 2
    h = next(h for h in headers if h is not None)
    assert h.series_uid == uid and h.modality == "CT" and h.has_pixels and h.kvp == "120"
    assert h.orientation == AXIAL and h.pixel_spacing == (1.0, 1.0) and (h.rows, h.cols) == (8, 8)
    assert h.intercept == -1024.0 and h.thickness == 1.0 and "AXIAL" in h.image_type
    write_non_image(tmp_path / "sr", "SR")
    sr = read_header(next(iter_files(tmp_path / "sr")))
    assert sr is not None and not sr.has_pixels and sr.modality == "SR"


def test_select_slices_drops_localizers_non_images_and_off_orientation(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    z = np.arange(6) * 2.0
    pos = np.stack([np.zeros(6), np.zeros(6), z], axis=1)
    write_series(tmp_path / "ax", sample_slices(pos, AXIAL, (1.0, 1.0), 8, 8), pos, study_uid=study, series_uid=series)
    sag = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    loc_pos = np.array([[0.0, -50.0, 80.0]])
    write_series(tmp_path / "loc", sample_slices(loc_pos, sag, (1.0, 1.0), 8, 8), loc_pos, sag, study_uid=study,
                 series_uid=series, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    write_series(tmp_path / "obl", sample_slices(loc_pos, sag, (1.0, 1.0), 8, 8), loc_pos, sag, study_uid=study,
                 series_uid=series)  # same series, other orientation, not flagged as localizer
    write_non_image(tmp_path / "sr", "SR", study, series)
    write_non_image(tmp_path / "pr", "PR", study, series)
    groups = group_series(read_header(p) for p in iter_files(tmp_path))
    assert list(groups) == [series] and len(groups[series]) == 10
    kept, dropped = select_slices(groups[series])
    assert len(kept) == 6 and all(h.orientation == AXIAL for h in kept)
    assert dropped == Counter({"non-image": 2, "localizer": 1, "off-orientation": 1})


# --------------------------------------------------------------------------- geometry


def _headers(positions: np.ndarray, orientation=AXIAL, spacing=(1.0, 1.0), rows=4, cols=4) -> list[SliceHeader]:
    return [SliceHeader(path=f"f{k}", series_uid="s", orientation=tuple(orientation),
                        position=tuple(float(v) for v in p), pixel_spacing=spacing, rows=rows, cols=cols,
                        thickness=None)
            for k, p in enumerate(positions)]


def test_analyse_geometry_sorts_and_finds_missing_slices() -> None:
    z = np.array([0.0, 2.0, 4.0, 8.0, 10.0, 12.0, 18.0, 20.0])  # gaps: 4 (1 missing), 6 (2 missing)
    perm = [5, 0, 7, 2, 1, 6, 3, 4]
    pos = np.stack([np.zeros(8), np.zeros(8), z[perm]], axis=1)
    geom = analyse_geometry(_headers(pos))
    assert [h.path for h in geom.slices] == [f"f{perm.index(k)}" for k in range(8)]
    assert geom.median_spacing == pytest.approx(2.0) and geom.max_gap == pytest.approx(6.0)
    assert geom.missing_slices == 3 and geom.uneven and geom.tilt_deg == pytest.approx(0.0, abs=1e-6)
    assert not geom.sheared and geom.thickness == pytest.approx(2.0)  # no SliceThickness: median spacing


def test_analyse_geometry_measures_tilt_and_rejects_duplicates() -> None:
    pos = np.stack([np.zeros(5), np.zeros(5), np.arange(5) * 2.0], axis=1)
    geom = analyse_geometry(_headers(pos, tilted_orientation(20.0), (1.0, 1.0)))
    assert geom.tilt_deg == pytest.approx(20.0, abs=1e-6) and geom.sheared
    assert geom.median_spacing == pytest.approx(2.0 * math.cos(math.radians(20.0)))
    with pytest.raises(DicomError, match="share a position") as info:
        analyse_geometry(_headers(np.concatenate([pos, pos[:1]])))
    assert isinstance(info.value, BadInputError)
    with pytest.raises(DicomError, match="1 slice"):
        analyse_geometry(_headers(pos[:1]))


# --------------------------------------------------------------------------- resampling


def test_uneven_spacing_is_resampled_onto_a_uniform_grid(tmp_path: Path) -> None:
    rows, cols, spacing = 12, 10, (0.8, 0.6)
    z = 5.0 + uneven_z(15, 2.0)
    pos = np.stack([np.full(15, -3.0), np.full(15, -4.0), z], axis=1)
    write_series(tmp_path, sample_slices(pos, AXIAL, spacing, rows, cols), pos, AXIAL, spacing)
    hu, affine = read_dicom_series(tmp_path)
    a = affine[:3, :3]
    assert np.allclose(a, np.diag(np.diag(a)))  # axis-aligned, no shear
    step = affine[2, 2]
    assert hu.shape[:2] == (cols, rows) and step == pytest.approx(np.median(np.diff(z)), rel=0.1)
    assert (hu.shape[2] - 1) * step == pytest.approx(z[-1] - z[0], abs=1e-4)  # first to last slice exactly
    truth = linear_hu(voxel_world_lps(affine, hu.shape))
    assert np.abs(hu - truth).max() < 1.0  # linear in z: interpolation exact up to int16 storage


def assert_matches_tilted_truth(hu: np.ndarray, affine: np.ndarray, positions: np.ndarray, orientation,
                                spacing: tuple[float, float], rows: int, cols: int) -> None:
    """Check a resampled tilted series (positions stepping along z) against ``linear_hu``.

    Orthogonal affine, a grid covering every scanned voxel centre with under a voxel to spare on
    each side, HU equal to the analytic function inside the scanned prism and -1024 well outside.
    Points between two slices are projected along the normal onto both, so the prism's slanted
    faces lose a sliver as wide as the in-plane shift between neighbouring slices.
    """
    a = affine[:3, :3]
    gram = a.T @ a
    assert np.allclose(gram, np.diag(np.diag(gram)), atol=1e-6)  # orthogonal grid, no shear
    sp = np.sqrt(np.diag(gram))
    # The scanned prism: X = P0 + t * z_hat + alpha * r + beta * c.
    r, c = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    basis = np.stack([np.array([0.0, 0.0, 1.0]), r, c], axis=1)  # [3 world, 3 (t, alpha, beta)]
    lim = np.array([positions[-1, 2] - positions[0, 2], (cols - 1) * spacing[1], (rows - 1) * spacing[0]])
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * lim @ basis.T + positions[0]
    # Physical extent, in voxel units of the grid: the corners lie inside it, less than a voxel from its faces.
    idx = (corners * [-1.0, -1.0, 1.0] - affine[:3, 3]) @ np.linalg.inv(a).T  # [8, 3]
    top = np.array(hu.shape) - 1
    assert np.all(idx.min(0) > -1e-3) and np.all(idx.max(0) < top + 1e-3), (idx.min(0), idx.max(0), top)
    assert np.all(idx.min(0) < 1.0) and np.all(idx.max(0) > top - 1.0), (idx.min(0), idx.max(0), top)

    world = voxel_world_lps(affine, hu.shape)  # [X, Y, Z, 3]
    coef = np.linalg.solve(basis, (world - positions[0]).reshape(-1, 3).T).T.reshape(*hu.shape, 3)
    shift = np.abs(np.diff(positions, axis=0) @ np.stack([r, c], axis=1)).max(axis=0)  # (along r, along c)
    margin = np.r_[0.0, shift] + 0.01
    inside = np.all((coef >= margin) & (coef <= lim - margin), axis=-1)
    outside = np.any((coef < -2 * sp.max()) | (coef > lim + 2 * sp.max()), axis=-1)
    assert inside.sum() > 0.5 * rows * cols * len(positions)
    err = np.abs(hu - linear_hu(world))[inside]
    assert err.max() < 1.5, err.max()  # int16 input and output rounding only
    assert np.all(hu[outside] == -1024.0) and hu.min() == -1024.0


def tilted_case(tilt: float, orientation: tuple[float, ...] | None = None) -> dict:
    """A 32 x 30 series of 20 slices tilted by ``tilt`` degrees, uneven steps along z, linear HU."""
    rows, cols, spacing = 32, 30, (1.5, 1.25)
    orientation = orientation or tilted_orientation(tilt)
    z = 10.0 + uneven_z(20, 2.5, seed=1)
    pos = np.stack([np.full(20, -18.0), np.full(20, -20.0), z], axis=1)  # stepping along z only
    return dict(hu=sample_slices(pos, orientation, spacing, rows, cols), positions=pos, orientation=orientation,
                spacing=spacing)


@pytest.mark.parametrize("tilt", [15.0, -25.0])
def test_tilted_series_matches_the_analytic_truth(tmp_path: Path, tilt: float) -> None:
    case = tilted_case(tilt)
    write_series(tmp_path, **case)
    hu, affine = read_dicom_series(tmp_path)
    a = affine[:3, :3]
    assert np.allclose(a, np.diag(np.diag(a)), atol=1e-6)  # aligned with the world axes for this tilt
    assert abs(a[0, 0]) == pytest.approx(1.25) and abs(a[1, 1]) == pytest.approx(1.5)
    assert_matches_tilted_truth(hu, affine, case["positions"], case["orientation"], case["spacing"], 32, 30)


def test_oblique_tilted_series_takes_the_general_path(tmp_path: Path) -> None:
    # Rows with a z component (not orthogonal to the table): the grid is aligned with the table and
    # the row direction made orthogonal to it, sampled point by point (map_coordinates).
    rot = Rotation_zxy(10.0, 20.0, 8.0)
    case = tilted_case(20.0, tuple(rot[:, 0]) + tuple(rot[:, 1]))
    write_series(tmp_path, **case)
    hu, affine = read_dicom_series(tmp_path)
    assert not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3])), atol=1e-3)
    assert_matches_tilted_truth(hu, affine, case["positions"], case["orientation"], case["spacing"], 32, 30)


def Rotation_zxy(yaw: float, tilt: float, roll: float) -> np.ndarray:  # noqa: N802
    """Rotation matrix rot_z(yaw) @ rot_x(-tilt) @ rot_y(roll) (degrees); columns = row, column, normal dirs."""
    a, t, b = np.radians([yaw, -tilt, roll])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return rz @ rx @ ry


def test_load_hu_applies_rescale_and_clips_air(tmp_path: Path) -> None:
    pos = np.stack([np.zeros(3), np.zeros(3), np.arange(3.0)], axis=1)
    values = np.full((3, 4, 4), 40.0)
    values[:, 0, 0] = -3000.0  # outside the scan field
    write_series(tmp_path, values, pos, slope=2.0, intercept=-3000.0, shuffle=False)
    geom = analyse_geometry(select_slices([read_header(p) for p in iter_files(tmp_path)])[0])
    stack = load_hu(geom)
    assert stack.dtype == np.float32 and stack.shape == (3, 4, 4)
    assert np.all(stack[:, 1:, :] == 40.0) and np.all(stack[:, 0, 0] == -1024.0)
    hu, affine = resample_to_grid(stack, geom)
    assert hu.shape == (4, 4, 3) and np.allclose(affine, np.diag([-1.0, -1.0, 1.0, 1.0]))


def test_files_without_preamble_are_read(tmp_path: Path) -> None:
    pos = np.stack([np.zeros(4), np.zeros(4), np.arange(4.0)], axis=1)
    write_series(tmp_path, np.full((4, 6, 6), 55.0), pos)
    for f in tmp_path.iterdir():  # drop the 128-byte preamble and 'DICM' (older exports)
        f.write_bytes(f.read_bytes()[132:])
    hu, _ = read_dicom_series(tmp_path)
    assert hu.shape == (6, 6, 4) and np.all(hu == 55.0)


def test_read_dicom_series_refuses_folder_without_one_series(tmp_path: Path) -> None:
    write_non_image(tmp_path, "SR")
    with pytest.raises(DicomError, match="found 0"):
        read_dicom_series(tmp_path)


# --------------------------------------------------------------------------- criteria and ids


def _slice(**kw) -> SliceHeader:
    base = dict(path="x", series_uid="s", modality="CT", study_description="CT HEAD WO", kvp="120",
                kernel="H30s", body_part="")
    base.update(kw)
    return SliceHeader(**base)


def test_criteria_patterns(tmp_path: Path) -> None:
    path = tmp_path / "crit.csv"
    path.write_text("# head only\nStudyDescription,KVP,ConvolutionKernel\n*head*,100-140,H3?s|standard\n"
                    "*BRAIN*,80,*\n")
    crit = Criteria(patterns=load_criteria(path), min_slices=10)
    assert crit.check_header(_slice()) is None
    assert crit.check_header(_slice(kernel="STANDARD", kvp="140.0")) is None
    assert crit.check_header(_slice(study_description="ct brain", kvp="80", kernel="B70f")) is None
    assert "not in criteria" in crit.check_header(_slice(kernel="B70f"))
    assert "not in criteria" in crit.check_header(_slice(kvp="80"))
    assert "not in criteria" in crit.check_header(_slice(study_description="CT CHEST"))
    assert "modality MR" in crit.check_header(_slice(modality="MR"))
    assert Criteria().check_header(_slice(study_description="", kvp="")) is None  # no patterns: any


def test_criteria_geometry_rules() -> None:
    pos = np.stack([np.zeros(12), np.zeros(12), np.r_[np.arange(11) * 1.0, 17.0]], axis=1)
    crit = Criteria(min_slices=10, min_thickness=0.5, max_thickness=5.0, max_gap_mm=5.0)
    geom = analyse_geometry(_headers(pos))
    assert "gap of 7.00 mm" in crit.check_geometry(geom)
    assert Criteria(min_slices=10, max_gap_mm=8.0).check_geometry(geom) is None
    assert "< minimum 20" in Criteria(min_slices=20).check_geometry(geom)
    geom.thickness = 6.0
    assert "thickness 6.00" in crit.check_geometry(geom)
    # A regular 5 mm series is never dropped for its own spacing.
    thick = analyse_geometry(_headers(np.stack([np.zeros(30), np.zeros(30), np.arange(30) * 5.0], axis=1)))
    assert Criteria(min_slices=20).check_geometry(thick) is None


def test_criteria_files_and_bad_arguments(tmp_path: Path) -> None:
    default = Criteria(patterns=load_criteria(DEFAULT_CRITERIA))
    assert default.check_header(_slice()) is None
    assert default.check_header(_slice(study_description="", body_part="HEAD")) is None
    assert default.check_header(_slice(study_description="CT Schädel nativ")) is None
    assert default.check_header(_slice(study_description="CT ABDOMEN")) is not None
    bad = tmp_path / "bad.csv"
    bad.write_text("StudyDescription,PatientName\n*,*\n")
    with pytest.raises(ValueError, match="PatientName"):
        load_criteria(bad)
    with pytest.raises(ValueError, match="min_slices"):
        Criteria(min_slices=1)
    with pytest.raises(ValueError, match="thickness"):
        Criteria(min_thickness=3.0, max_thickness=1.0)
    assert Criteria().fingerprint() != Criteria(max_gap_mm=4.0).fingerprint()


def test_pseudonym_is_keyed_and_stable() -> None:
    a = pseudonym("salt", "series", "1.2.3")
    assert a == pseudonym("salt", "series", "1.2.3") and len(a) == 16
    assert a != pseudonym("other", "series", "1.2.3") and a != pseudonym("salt", "study", "1.2.3")
    with pytest.raises(ValueError):
        pseudonym("", "series", "1.2.3")
