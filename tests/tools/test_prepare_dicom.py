"""Tests of tools/prepare_dicom.py: a synthetic study tree, resumability, privacy, and a real head CT
re-acquired with gantry tilt and uneven gaps (the issue's 'done when')."""
from __future__ import annotations

import csv
import gzip
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.uid import generate_uid
from scipy.ndimage import map_coordinates

from data.dicom import Criteria, load_criteria, pseudonym
from tests.data.test_dicom import (
    AXIAL,
    PHI,
    assert_matches_tilted_truth,
    linear_hu,
    sample_slices,
    tilted_case,
    tilted_orientation,
    uneven_z,
    voxel_world_lps,
    write_non_image,
    write_series,
)
import tools.prepare_dicom as prepare_module
from tools.prepare_dicom import MANIFEST_COLUMNS, REPORT_COLUMNS, main, prepare_dicom

REPO = Path(__file__).resolve().parents[2]
REAL_CT = Path(__file__).resolve().parents[3] / "shared" / "data" / "headsq_quarter.nii.gz"
CRITERIA = "StudyDescription,KVP,ConvolutionKernel\n*HEAD*,100-140,H3?s|H4?s\n"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def axial(z: np.ndarray, rows: int = 16, cols: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(hu [K, rows, cols], positions [K, 3]) of an axial series at heights z with linear HU."""
    pos = np.stack([np.full(len(z), -10.0), np.full(len(z), -12.0), z], axis=1)
    return sample_slices(pos, AXIAL, (1.0, 1.0), rows, cols), pos


def build_tree(root: Path) -> dict[str, str]:
    """A patient with two studies and every kind of series; returns {name: SeriesInstanceUID}."""
    head, other = generate_uid(), generate_uid()
    uids = {}
    case = tilted_case(15.0)
    uids["tilted"] = write_series(root / "p1" / "s1" / "tilted", **case, study_uid=head)
    z = np.arange(21) * 2.0
    hu, pos = axial(np.delete(z, 7))  # one missing slice: a 4 mm gap
    uids["missing"] = write_series(root / "p1" / "s1" / "missing", hu, pos, study_uid=head, thickness=2.0)
    hu, pos = axial(np.r_[np.arange(12) * 2.0, 40.0 + np.arange(10) * 2.0])  # an 18 mm gap
    uids["gap"] = write_series(root / "p1" / "s1" / "gap", hu, pos, study_uid=head, thickness=2.0)
    sag = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    lpos = np.array([[0.0, -60.0, 90.0], [0.0, -60.0, 90.5]])
    uids["localizer"] = write_series(root / "p1" / "s1" / "loc", sample_slices(lpos, sag, (1.0, 1.0), 16, 16),
                                     lpos, sag, study_uid=head, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    uids["sr"] = write_non_image(root / "p1" / "s1" / "sr", "SR", head)
    uids["pr"] = write_non_image(root / "p1" / "s1" / "pr", "PR", head)
    hu, pos = axial(uneven_z(20, 1.0, seed=3))
    for name, kw in {
        "chest": dict(study_description="CT CHEST"),
        "kvp80": dict(kvp="80"),
        "bone": dict(kernel="H70h"),
        "thick": dict(thickness=8.0),
        "mr": dict(modality="MR"),
    }.items():
        uids[name] = write_series(root / "p1" / "s2" / name, hu, pos, study_uid=other, **kw)
    uids["few"] = write_series(root / "p1" / "s2" / "few", hu[:5], pos[:5], study_uid=other)
    uids["uneven"] = write_series(root / "p1" / "s2" / "uneven", hu, pos, study_uid=other, explicit=True)
    (root / "p1" / "README.txt").write_text("exported by a PACS\n")
    (root / "DICOMDIR_like.bin").write_bytes(b"\x00" * 300)
    return uids


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    """The tree converted once with 2 workers (module scope: several tests read the outputs)."""
    root = tmp_path_factory.mktemp("dicom")
    uids = build_tree(root / "in")
    crit_file = root / "criteria.csv"
    crit_file.write_text(CRITERIA)
    criteria = Criteria(patterns=load_criteria(crit_file), min_slices=10)
    chunk, prepare_module.HEADER_CHUNK = prepare_module.HEADER_CHUNK, 64  # headers read by 2 processes too
    try:
        counts = prepare_dicom(root / "in", root / "out", criteria, workers=2)
    finally:
        prepare_module.HEADER_CHUNK = chunk
    salt = (root / "out" / ".salt").read_text().strip()
    ids = {name: pseudonym(salt, "series", uid) for name, uid in uids.items()}
    report = {row["id"]: row for row in read_csv(root / "out" / "series_report.csv")}
    return dict(root=root, out=root / "out", uids=uids, ids=ids, report=report, counts=counts, criteria=criteria)


def test_every_series_is_reported_with_its_fate(converted: dict) -> None:
    ids, report, counts = converted["ids"], converted["report"], converted["counts"]
    assert counts["series"] == len(ids) == len(report) and counts["not_dicom"] == 2
    status = {name: report[i]["status"] for name, i in ids.items()}
    assert {n for n, s in status.items() if s == "kept"} == {"tilted", "missing", "uneven"}
    assert set(status.values()) == {"kept", "dropped"}
    reason = {name: report[i]["reason"] for name, i in ids.items()}
    assert "gap of 18.00 mm" in reason["gap"]
    assert "localizer:2" in reason["localizer"]
    assert "non-image" in reason["sr"] and "non-image" in reason["pr"]
    assert "StudyDescription='CT CHEST'" in reason["chest"]
    assert "KVP='80'" in reason["kvp80"] and "ConvolutionKernel='H70h'" in reason["bone"]
    assert "thickness 8.00" in reason["thick"] and "modality MR" in reason["mr"]
    assert "5 slices < minimum 10" in reason["few"]
    missing = report[ids["missing"]]
    assert missing["missing_slices"] == "1" and "1 missing slice" in missing["notes"]
    tilted = report[ids["tilted"]]
    assert float(tilted["tilt_deg"]) == pytest.approx(15.0, abs=0.01) and "gantry tilt" in tilted["notes"]
    assert report[ids["uneven"]]["missing_slices"] == "0" and "uneven" in report[ids["uneven"]]["notes"]
    assert list(read_csv(converted["out"] / "series_report.csv")[0]) == REPORT_COLUMNS


def test_manifest_and_nifti_geometry(converted: dict) -> None:
    out, ids, report = converted["out"], converted["ids"], converted["report"]
    rows = read_csv(out / "manifest.csv")
    assert list(rows[0]) == MANIFEST_COLUMNS
    assert {r["id"] for r in rows} == {ids["tilted"], ids["missing"], ids["uneven"]}
    assert len({r["patient_id"] for r in rows}) == 1 and len({r["study_id"] for r in rows}) == 2
    for r in rows:
        assert r["img_path"] == f"images/{r['id']}.nii.gz" and (out / r["img_path"]).is_file()
        assert r["series_id"] == r["id"] and r["study_id"] == report[r["id"]]["study_id"]
    img = nib.load(out / f"images/{ids['tilted']}.nii.gz")
    assert img.get_data_dtype() == np.int16 and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    case = tilted_case(15.0)
    assert_matches_tilted_truth(img.get_fdata(), img.affine, case["positions"], case["orientation"],
                                case["spacing"], 32, 30)
    # Uneven and missing slices: a uniform grid whose values are the linear HU of their world points.
    for name in ("missing", "uneven"):
        img = nib.load(out / f"images/{ids[name]}.nii.gz")
        hu = img.get_fdata()
        a = img.affine[:3, :3]
        assert np.allclose(a, np.diag(np.diag(a))) and hu.shape[:2] == (16, 16)
        assert np.abs(hu - linear_hu(voxel_world_lps(img.affine, hu.shape))).max() < 1.5


def test_no_identifying_tags_in_any_output(converted: dict) -> None:
    needles = [v.encode() for v in PHI.values()] + [b"Doe", b"Jane"]
    needles += [uid.encode() for uid in converted["uids"].values()]
    needles += [str(converted["root"] / "in").encode()]
    files = [p for p in converted["out"].rglob("*") if p.is_file()]
    assert len(files) >= 5
    for path in files:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data += gzip.decompress(data)
        for needle in needles:
            assert needle not in data, f"{needle!r} found in {path.name}"


def test_rerun_does_no_work_and_resumes(converted: dict) -> None:
    out, ids, criteria = converted["out"], converted["ids"], converted["criteria"]
    images = sorted((out / "images").glob("*.nii.gz"))
    stamps = [p.stat().st_mtime_ns for p in images]
    report_before = (out / "series_report.csv").read_text()
    counts = prepare_dicom(converted["root"] / "in", out, criteria, workers=1)
    assert counts["processed"] == 0 and counts["reused"] == len(ids) and counts["kept"] == 3
    assert [p.stat().st_mtime_ns for p in images] == stamps
    assert (out / "series_report.csv").read_text() == report_before
    # An interrupted run: one volume missing and a torn report line -> only that series is redone.
    (out / f"images/{ids['missing']}.nii.gz").unlink()
    with open(out / "series_report.csv", "a") as f:
        f.write(f"{ids['tilted']},ke")
    counts = prepare_dicom(converted["root"] / "in", out, criteria, workers=1)
    assert counts["processed"] == 1 and (out / f"images/{ids['missing']}.nii.gz").is_file()
    assert len(read_csv(out / "series_report.csv")) == len(ids)
    # Other settings redo every series (here the 18 mm gap becomes acceptable).
    loose = Criteria(patterns=criteria.patterns, min_slices=10, max_gap_mm=20.0)
    counts = prepare_dicom(converted["root"] / "in", out, loose, workers=1)
    assert counts["processed"] == len(ids) and counts["kept"] == 4


def test_salt_given_or_stored(tmp_path: Path) -> None:
    hu, pos = axial(np.arange(10) * 2.0, 8, 8)
    uid = write_series(tmp_path / "in", hu, pos)
    counts = prepare_dicom(tmp_path / "in", tmp_path / "out", Criteria(min_slices=10), salt="k")
    assert counts["kept"] == 1 and not (tmp_path / "out" / ".salt").exists()
    assert read_csv(tmp_path / "out" / "manifest.csv")[0]["id"] == pseudonym("k", "series", uid)
    # An output folder inside the input is not read back as input.
    nested = tmp_path / "in" / "converted"
    first = prepare_dicom(tmp_path / "in", nested, Criteria(min_slices=10))
    again = prepare_dicom(tmp_path / "in", nested, Criteria(min_slices=10))
    assert first["files"] == again["files"] == 10 and again["reused"] == 1 and again["not_dicom"] == 0
    with pytest.raises(ValueError, match="another salt"):
        prepare_dicom(tmp_path / "in", nested, Criteria(min_slices=10), salt="k")
    with pytest.raises(ValueError, match="another salt"):
        prepare_dicom(tmp_path / "in", tmp_path / "out", Criteria(min_slices=10), salt="j")
    with pytest.raises(ValueError, match="pass the same --salt"):
        prepare_dicom(tmp_path / "in", tmp_path / "out", Criteria(min_slices=10))
    assert prepare_dicom(tmp_path / "in", tmp_path / "out", Criteria(min_slices=10), salt="k")["reused"] == 1


def test_unreadable_pixels_are_an_error_and_retried(tmp_path: Path) -> None:
    hu, pos = axial(np.arange(12) * 2.0, 8, 8)
    write_series(tmp_path / "in" / "Doe^Jane", hu, pos)
    victim = sorted((tmp_path / "in" / "Doe^Jane").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:-60])  # truncated pixel data
    counts = prepare_dicom(tmp_path / "in", tmp_path / "out", Criteria(min_slices=10))
    (row,) = read_csv(tmp_path / "out" / "series_report.csv")
    assert counts["error"] == 1 and row["status"] == "error" and "cannot read pixel data" in row["reason"]
    assert "Doe" not in (tmp_path / "out" / "series_report.csv").read_text()
    assert not read_csv(tmp_path / "out" / "manifest.csv")
    assert prepare_dicom(tmp_path / "in", tmp_path / "out", Criteria(min_slices=10))["processed"] == 1


def test_cli_errors(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit, match="input folder not found"):
        main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out"), "--criteria", ""])
    bad = tmp_path / "bad.csv"
    bad.write_text("PatientName\nDoe\n")
    (tmp_path / "in").mkdir()
    with pytest.raises(SystemExit, match="unknown criteria column"):
        main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--criteria", str(bad)])
    with pytest.raises(SystemExit, match="min_slices"):
        main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--min-slices", "1"])


def test_real_tilted_head_ct_with_uneven_gaps(tmp_path: Path) -> None:
    """The issue's 'done when': a real head CT, re-acquired as DICOM with a 15 degree gantry tilt,
    uneven steps and dropped slices, goes through the CLI, is kept, and comes out on an orthogonal
    grid with the right physical extent and HU."""
    if not REAL_CT.is_file():
        pytest.skip(f"real head CT sample not found at {REAL_CT}")
    src_path = tmp_path / REAL_CT.name
    shutil.copy(REAL_CT, src_path)
    src = nib.load(src_path)
    vol, src_aff = src.get_fdata(), src.affine  # HU [64, 64, 93], 3.2 x 3.2 x 1.5 mm
    to_src = np.linalg.inv(src_aff)

    def src_hu(points_lps: np.ndarray) -> np.ndarray:  # the source's HU at LPS world points
        idx = (points_lps * [-1.0, -1.0, 1.0]) @ to_src[:3, :3].T + to_src[:3, 3]
        return map_coordinates(vol, np.moveaxis(idx, -1, 0), order=1, mode="constant", cval=-1024.0)

    tilt, rows, cols, spacing = 15.0, 64, 64, (3.2, 3.2)
    orientation = tilted_orientation(tilt)
    rng = np.random.default_rng(0)
    z = np.delete(np.arange(0.0, 190.0, 1.5), [30, 31, 80, 100])  # 4 slices missing (gaps of 3 and 4.5 mm)
    z = z + rng.uniform(-0.3, 0.3, len(z))  # uneven steps
    pos = np.stack([np.full(len(z), -201.6), np.full(len(z), -198.0), z], axis=1)  # stepping along z
    hu_in = sample_slices(pos, orientation, spacing, rows, cols, fn=src_hu)
    write_series(tmp_path / "in" / "Doe^Jane", hu_in, pos, orientation, spacing, thickness=1.5,
                 study_description="CT HEAD", intercept=-1024.0)

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tools.prepare_dicom", "--input", str(tmp_path / "in"),
                           "--output", str(tmp_path / "out"), "--workers", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    (row,) = read_csv(tmp_path / "out" / "series_report.csv")
    print(f"real CT: {len(z)} slices, {row['seconds']} s in the worker, {wall:.2f} s for the CLI")
    assert row["status"] == "kept", row["reason"]
    assert row["missing_slices"] == "4" and float(row["tilt_deg"]) == pytest.approx(tilt, abs=0.01)
    (entry,) = read_csv(tmp_path / "out" / "manifest.csv")
    img = nib.load(tmp_path / "out" / entry["img_path"])
    out, aff = img.get_fdata(), img.affine

    a = aff[:3, :3]
    gram = a.T @ a
    assert np.allclose(gram, np.diag(np.diag(gram)), atol=1e-6)  # orthogonal: no shear
    # Physical extent: the world box of the grid is the box of the scanned voxel centres (+< 1 voxel).
    r, c = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    corners = np.array([p + i * spacing[0] * c + j * spacing[1] * r
                        for p in (pos[0], pos[-1]) for i in (0, rows - 1) for j in (0, cols - 1)])
    world = voxel_world_lps(aff, out.shape)
    lo, hi = world.reshape(-1, 3).min(0), world.reshape(-1, 3).max(0)
    step = np.abs(a).max(axis=1)
    assert np.all(lo <= corners.min(0) + 1e-3) and np.all(corners.min(0) - lo < step)
    assert np.all(hi >= corners.max(0) - 1e-3) and np.all(hi - corners.max(0) < step)
    # HU range like the source: air at -1024, bone in the thousands, never beyond the source maximum.
    assert out.min() == -1024.0 and 1500.0 < out.max() <= vol.max() + 0.5
    # Values at world points: inside the source volume and the scanned prism, tissue voxels.
    idx = (world * [-1.0, -1.0, 1.0]) @ to_src[:3, :3].T + to_src[:3, 3]
    in_src = np.all((idx >= 1) & (idx <= np.array(vol.shape) - 2), axis=-1)
    basis = np.stack([np.array([0.0, 0.0, 1.0]), r, c], axis=1)
    coef = np.linalg.solve(basis, (world - pos[0]).reshape(-1, 3).T).T.reshape(*out.shape, 3)
    lim = np.array([z[-1] - z[0], (cols - 1) * spacing[1], (rows - 1) * spacing[0]])
    in_prism = np.all((coef >= 3.2) & (coef <= lim - 3.2), axis=-1)
    truth = src_hu(world)
    tissue = in_src & in_prism & (truth > -500)
    assert tissue.sum() > 50_000
    diff = np.median(np.abs(out - truth)[tissue])
    shifted = np.median(np.abs(out - src_hu(world + [0.0, 0.0, 1.5]))[tissue])  # 1.5 mm off along z
    corr = np.corrcoef(out[tissue], truth[tissue])[0, 1]
    print(f"real CT: median |HU - source| {diff:.1f} (1.5 mm shift: {shifted:.1f}), r = {corr:.3f}, "
          f"max {out.max():.0f} HU, grid {out.shape}")
    assert diff < 12.0 and diff < 0.6 * shifted, (diff, shifted)
    assert corr > 0.95
