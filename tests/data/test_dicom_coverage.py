"""The gap rule on uncovered distance, series whose slice thickness changes part-way, and bad input
that must be named in the report (missing slices, mixed orientations, unreadable pixels).

Synthetic series written with pydicom (helpers of tests/data/test_dicom.py), with and without
gantry tilt: the table steps along z, so contiguous slices of thickness t are t / cos(tilt) apart.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.uid import generate_uid

from data.dicom import (
    Criteria,
    SliceHeader,
    analyse_geometry,
    iter_files,
    load_hu,
    pseudonym,
    read_dicom_series,
    read_header,
    resample_to_grid,
    select_slices,
)
from tests.data.test_dicom import (
    assert_matches_tilted_truth,
    linear_hu,
    sample_slices,
    tilted_orientation,
    voxel_world_lps,
    write_series,
)
from tools.prepare_dicom import main, prepare_dicom

THIN_THEN_THICK = np.r_[np.full(14, 4.0), np.full(12, 7.0)]  # posterior fossa 4 mm, then 7 mm (median step 4)
ROWS, COLS, SPACING = 20, 18, (1.5, 1.25)


def table_positions(thickness: np.ndarray, tilt: float, holes: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(positions [K, 3] LPS, thickness [K]) of contiguous slices stepping along z, slices ``holes`` removed."""
    centres = np.concatenate([[0.0], np.cumsum((thickness[:-1] + thickness[1:]) / 2)])  # along the normal
    z = 5.0 + centres / math.cos(math.radians(tilt))
    pos = np.stack([np.full(len(z), -12.0), np.full(len(z), -14.0), z], axis=1)
    keep = np.setdiff1d(np.arange(len(z)), holes)
    return pos[keep], thickness[keep]


def series_case(thickness: np.ndarray, tilt: float, holes: tuple[int, ...] = ()) -> dict:
    """write_series arguments of a series with linear HU (see table_positions)."""
    pos, thick = table_positions(thickness, tilt, holes)
    orientation = tilted_orientation(tilt)
    return dict(hu=sample_slices(pos, orientation, SPACING, ROWS, COLS), positions=pos, orientation=orientation,
                spacing=SPACING, thickness=thick)


def headers(thickness: np.ndarray | None, positions: np.ndarray, tilt: float = 0.0) -> list[SliceHeader]:
    """Headers only (no files): SliceThickness per slice, or none when ``thickness`` is None."""
    return [SliceHeader(path=f"f{k}", series_uid="s", orientation=tilted_orientation(tilt),
                        position=tuple(float(v) for v in p), pixel_spacing=SPACING, rows=ROWS, cols=COLS,
                        thickness=None if thickness is None else float(thickness[k]), instance=k + 1)
            for k, p in enumerate(positions)]


def read_report(out: Path) -> list[dict[str, str]]:
    with open(out / "series_report.csv", newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- geometry and the rule


@pytest.mark.parametrize("tilt", [0.0, 18.5])
def test_thin_then_thick_contiguous_series_has_no_gap(tilt: float) -> None:
    pos, thick = table_positions(THIN_THEN_THICK, tilt)
    geom = analyse_geometry(headers(thick, pos, tilt))
    assert (geom.thickness, geom.max_thickness) == (4.0, 7.0) and geom.mixed_thickness
    assert geom.max_uncovered == pytest.approx(0.0, abs=1e-6) and geom.missing_slices == 0
    assert geom.finest_spacing == pytest.approx(4.0) and geom.slice_step == pytest.approx(4.0)
    assert geom.max_gap == pytest.approx(7.0) and geom.uneven
    assert Criteria().check_geometry(geom) is None  # default criteria: kept (thinnest 4 mm <= 5 mm)
    # Without SliceThickness the spacing itself is limited, as before: the 7 mm steps exceed 1.5 x 4 mm.
    no_tag = analyse_geometry(headers(None, pos, tilt))
    assert no_tag.uncovered is None and no_tag.max_uncovered is None
    assert "gap of 7.00 mm between slices exceeds the limit 6.00 mm" in Criteria().check_geometry(no_tag)


@pytest.mark.parametrize("tilt", [0.0, 18.5])
def test_true_holes_are_dropped_and_small_ones_named(tilt: float) -> None:
    # A 7 mm slice missing: 14 mm between centres, 7 mm uncovered > 5 mm.
    pos, thick = table_positions(THIN_THEN_THICK, tilt, holes=(15,))
    geom = analyse_geometry(headers(thick, pos, tilt))
    assert geom.missing_slices == 1 and geom.max_uncovered == pytest.approx(7.0)
    reason = Criteria().check_geometry(geom)
    assert "gap of 14.00 mm between InstanceNumber 15 and 16 (7.00 mm thick" in reason
    assert "leaves 7.00 mm uncovered, above the limit 5.00 mm" in reason
    assert Criteria(max_gap_mm=7.5).check_geometry(geom) is None
    # A 4 mm slice missing: 4 mm uncovered, kept (interpolated) and counted as one missing slice.
    pos, thick = table_positions(THIN_THEN_THICK, tilt, holes=(4,))
    geom = analyse_geometry(headers(thick, pos, tilt))
    assert geom.missing_slices == 1 and geom.max_uncovered == pytest.approx(4.0)
    assert Criteria().check_geometry(geom) is None
    # Regular but sparse: 1 mm slices every 7 mm leave 6 mm unscanned between each pair.
    z = np.arange(25) * 7.0 / math.cos(math.radians(tilt))
    sparse = analyse_geometry(headers(np.ones(25), np.stack([np.zeros(25), np.zeros(25), z], axis=1), tilt))
    assert sparse.missing_slices == 0 and "6.00 mm uncovered" in Criteria().check_geometry(sparse)
    # Regular and contiguous or overlapping: nothing uncovered.
    z = np.arange(25) * 2.5 / math.cos(math.radians(tilt))
    regular = analyse_geometry(headers(np.full(25, 5.0), np.stack([np.zeros(25), np.zeros(25), z], axis=1), tilt))
    assert regular.max_uncovered == pytest.approx(-2.5) and not regular.mixed_thickness and not regular.uneven
    assert Criteria().check_geometry(regular) is None


def test_thickness_range_applies_to_the_thinnest_slices() -> None:
    pos, thick = table_positions(THIN_THEN_THICK, 0.0)
    geom = analyse_geometry(headers(thick, pos))
    assert Criteria(max_thickness=3.0).check_geometry(geom) == (
        "slice thickness 4.00 mm (thinnest; thickest 7.00 mm) outside [0.5, 3.0]")
    assert Criteria(min_thickness=4.5, max_thickness=8.0).check_geometry(geom).startswith("slice thickness 4.00")


# --------------------------------------------------------------------------- resampling


@pytest.mark.parametrize("tilt", [0.0, 18.5])
def test_thin_then_thick_is_resampled_to_the_thin_spacing(tmp_path: Path, tilt: float) -> None:
    case = series_case(THIN_THEN_THICK, tilt)
    write_series(tmp_path, **case)
    hu, affine = read_dicom_series(tmp_path)
    step = 4.0 / math.cos(math.radians(tilt))  # along the normal, or along the table with tilt
    z = case["positions"][:, 2]
    assert np.linalg.norm(affine[:3, 2]) == pytest.approx(step, rel=0.02)
    if tilt:
        assert_matches_tilted_truth(hu, affine, case["positions"], case["orientation"], SPACING, ROWS, COLS)
    else:
        assert (hu.shape[2] - 1) * affine[2, 2] == pytest.approx(z[-1] - z[0], abs=1e-4)
        assert np.abs(hu - linear_hu(voxel_world_lps(affine, hu.shape))).max() < 1.0


def test_slice_spacing_sets_the_third_axis_exactly(tmp_path: Path) -> None:
    case = series_case(np.full(12, 2.0), 0.0)  # regular: used as it is without slice_spacing
    write_series(tmp_path, **case)
    geom = analyse_geometry(select_slices([read_header(p) for p in iter_files(tmp_path)])[0])
    stack = load_hu(geom)
    hu, affine = resample_to_grid(stack, geom)
    assert hu.shape[2] == 12 and affine[2, 2] == pytest.approx(2.0)
    hu, affine = resample_to_grid(stack, geom, slice_spacing=0.75)
    assert affine[2, 2] == pytest.approx(0.75) and hu.shape[2] == 30  # 22 mm: 29 steps of 0.75 fit
    assert np.abs(hu - linear_hu(voxel_world_lps(affine, hu.shape))).max() < 1.0
    with pytest.raises(ValueError, match="slice_spacing must be > 0"):
        resample_to_grid(stack, geom, slice_spacing=0.0)


# --------------------------------------------------------------------------- the report


@pytest.mark.parametrize("tilt", [0.0, 18.5])
def test_report_keeps_thin_then_thick_and_names_bad_input(tmp_path: Path, tilt: float) -> None:
    study = generate_uid()
    uids = {
        "regular": write_series(tmp_path / "in" / "regular", **series_case(np.full(24, 2.5), tilt), study_uid=study),
        "thin_thick": write_series(tmp_path / "in" / "tt", **series_case(THIN_THEN_THICK, tilt), study_uid=study),
        "hole": write_series(tmp_path / "in" / "hole", **series_case(THIN_THEN_THICK, tilt, holes=(15,)),
                             study_uid=study),
        "missing": write_series(tmp_path / "in" / "missing", **series_case(THIN_THEN_THICK, tilt, holes=(4,)),
                                study_uid=study),
    }
    # Mixed orientations: three slices in the middle of a 2 mm series carry another orientation.
    odd = [11, 12, 13]
    uids["mixed_orient"] = write_series(tmp_path / "in" / "orient", **series_case(np.full(24, 2.0), tilt, holes=odd),
                                        study_uid=study)
    other = series_case(np.full(24, 2.0), tilt + 10.0)
    write_series(tmp_path / "in" / "orient_odd", other["hu"][odd], other["positions"][odd], other["orientation"],
                 SPACING, series_uid=uids["mixed_orient"], study_uid=study, thickness=2.0)
    # A stray slice of another orientation beside a complete series: left out, and said so.
    uids["stray"] = write_series(tmp_path / "in" / "stray", **series_case(np.full(24, 2.5), tilt), study_uid=study)
    write_series(tmp_path / "in" / "stray_odd", other["hu"][:1], other["positions"][:1], other["orientation"],
                 SPACING, series_uid=uids["stray"], study_uid=study)
    # Unreadable pixel data in one slice.
    uids["broken"] = write_series(tmp_path / "in" / "broken", **series_case(np.full(24, 2.5), tilt), study_uid=study)
    victim = sorted((tmp_path / "in" / "broken").iterdir())[5]
    victim.write_bytes(victim.read_bytes()[:-100])

    # The defaults, as a new user runs it (criteria file, 0.5-5 mm, 20 slices, 5 mm gaps).
    assert main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--workers", "1",
                 "--salt", "k"]) == 0
    rows = {row["id"]: row for row in read_report(tmp_path / "out")}
    row = {name: rows[pseudonym("k", "series", uid)] for name, uid in uids.items()}
    status = {name: r["status"] for name, r in row.items()}
    assert status == {"regular": "kept", "thin_thick": "kept", "hole": "dropped", "missing": "kept",
                      "mixed_orient": "dropped", "stray": "kept", "broken": "error"}

    tt = row["thin_thick"]
    assert (tt["thickness_min"], tt["thickness_max"], tt["max_uncovered"], tt["missing_slices"]) == ("4", "7", "0", "0")
    assert "slice thickness 4-7 mm resampled to one spacing" in tt["notes"]
    assert float(tt["spacing"].split("x")[2]) == pytest.approx(4.0 / math.cos(math.radians(tilt)), rel=0.02)
    assert row["regular"]["thickness_min"] == row["regular"]["thickness_max"] == "2.5"
    assert float(row["regular"]["max_uncovered"]) == pytest.approx(0.0, abs=1e-3)
    assert "7.00 mm uncovered" in row["hole"]["reason"] and row["hole"]["max_uncovered"] == "7"
    assert row["missing"]["missing_slices"] == "1"
    assert "1 missing slice(s) interpolated (largest uncovered gap 4 mm)" in row["missing"]["notes"]
    orient = row["mixed_orient"]
    assert orient["dropped_slices"] == "off-orientation:3"  # left out, and the hole they leave is named
    assert "gap of 8.00 mm" in orient["reason"] and "6.00 mm uncovered" in orient["reason"]
    assert "1 slice(s) of another orientation or matrix left out" in row["stray"]["notes"]
    assert "cannot read pixel data of slice" in row["broken"]["reason"]

    img = nib.load(tmp_path / "out" / tt["img_path"])
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    if tilt:
        assert_matches_tilted_truth(img.get_fdata(), img.affine, *[series_case(THIN_THEN_THICK, tilt)[k] for k in (
            "positions", "orientation", "spacing")], ROWS, COLS)
    else:
        assert np.abs(img.get_fdata() - linear_hu(voxel_world_lps(img.affine, img.shape))).max() < 1.5


def test_spacing_mm_option(tmp_path: Path) -> None:
    write_series(tmp_path / "in", **series_case(THIN_THEN_THICK, 0.0))
    counts = prepare_dicom(tmp_path / "in", tmp_path / "out", Criteria(min_slices=10), salt="k", slice_spacing=2.0)
    (row,) = read_report(tmp_path / "out")
    assert counts["kept"] == 1 and row["spacing"] == "1.25x1.5x2" and row["settings"].endswith("-z2")
    again = prepare_dicom(tmp_path / "in", tmp_path / "out", Criteria(min_slices=10), salt="k")
    assert again["processed"] == 1  # another spacing: redone
    with pytest.raises(SystemExit, match="--spacing-mm must be > 0"):
        main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--spacing-mm", "0"])
