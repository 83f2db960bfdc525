"""A second opinion: our DICOM conversion against dcm2niix, the field's reference converter.

dcm2niix (the PyPI wheel ships its binary; requirements.txt) converts the same series with its
gantry-tilt correction (``*_Tilt_1.nii.gz``) and its equidistant resampling of varying slice
spacing (``*_Eq_1.nii.gz``). Both volumes are compared in world space: dcm2niix's is sampled at our
voxel centres. Our grid is the bounding box of the tilted slab with axes along the table;
dcm2niix keeps the slice planes as grid planes (its axes are tilted with the gantry) and shifts
each slice in-plane, so only the covered head is compared, and the grid extents only along axes
the two grids share.
"""
from __future__ import annotations

import csv
import math
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from data.dicom import AIR_HU, Criteria
from tests.data.test_dicom import sample_slices, tilted_orientation, write_series
from tools.prepare_dicom import prepare_dicom

PHILIPS_TILT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom_philips_tilt"
HEAD_HU = -300.0  # above: tissue of the head (skull, brain, phantom material), below: air


def dcm2niix_binary() -> str:
    """The dcm2niix executable beside this Python (the wheel's console script), else on PATH."""
    beside = Path(sys.executable).with_name("dcm2niix")
    found = str(beside) if beside.is_file() else shutil.which("dcm2niix")
    if not found:
        pytest.skip("dcm2niix not found (pip install dcm2niix, listed in requirements.txt)")
    return found


def run_dcm2niix(folder: Path, out: Path) -> dict[str, Path]:
    """Convert ``folder`` with dcm2niix; returns its outputs by kind: 'plain', 'tilt', 'eq', 'tilt_eq'."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([dcm2niix_binary(), "-z", "y", "-f", "series", "-o", str(out), str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kinds = {"series": "plain", "series_Tilt_1": "tilt", "series_Eq_1": "eq", "series_Tilt_Eq_1": "tilt_eq"}
    return {kinds[p.name[:-7]]: p for p in out.glob("*.nii.gz") if p.name[:-7] in kinds}


def convert_ours(folder: Path, out: Path) -> tuple[nib.Nifti1Image, dict[str, str]]:
    """Our NIfTI of the one series under ``folder`` (tools/prepare_dicom, no selection patterns)."""
    counts = prepare_dicom(folder, out, Criteria(min_slices=10, max_thickness=10.0), salt="test")
    with open(out / "series_report.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert counts["kept"] == 1, row["reason"]
    return nib.load(out / row["img_path"]), row


def voxel_extent(affine: np.ndarray) -> np.ndarray:
    """World extent (mm, per world axis) of one voxel of a grid: sum of |axis vectors|."""
    return np.abs(affine[:3, :3]).sum(axis=1)


def world_box(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) world mm of a grid's voxel centres."""
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def sample_at_voxels(img: nib.Nifti1Image, grid: nib.Nifti1Image, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """``img`` (trilinear) at every ``stride``-th voxel centre of ``grid``: (HU, inside img's grid),
    both shaped like ``grid`` strided; computed a slab at a time (bounded memory)."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    to_img = np.linalg.inv(img.affine) @ grid.affine  # grid voxel -> img voxel
    axes = [np.arange(0, s, stride, dtype=np.float64) for s in grid.shape]
    values = np.empty([len(a) for a in axes], dtype=np.float32)
    inside = np.empty(values.shape, dtype=bool)
    for n, i in enumerate(axes[0]):
        idx = np.stack(np.meshgrid([i], axes[1], axes[2], indexing="ij"), axis=-1)[0]  # [Y, Z, 3]
        idx = idx @ to_img[:3, :3].T + to_img[:3, 3]
        inside[n] = np.all((idx >= -1e-3) & (idx <= np.array(data.shape) - 1 + 1e-3), axis=-1)
        values[n] = map_coordinates(data, np.moveaxis(idx, -1, 0), order=1, mode="nearest")
    return values, inside


def compare(ours: nib.Nifti1Image, ref: nib.Nifti1Image, stride: int = 1) -> dict:
    """Agreement of two volumes in world space: dcm2niix's sampled at (every ``stride``-th of) our
    voxel centres, where both cover the volume.

    Returns: axcodes of both (after reorienting to the closest RAS axes), largest angle between
    corresponding axes (deg), HU correlation over the head, the head voxel count and the fraction
    of it that only dcm2niix covers, the head's world extent (HU > HEAD_HU) in each volume on these
    common points and their difference per world axis, one voxel of our grid per world axis as the
    tolerance, and the grid extent difference along the world axes both grids have an axis
    parallel to (NaN for the others).
    """
    ours, ref = nib.as_closest_canonical(ours), nib.as_closest_canonical(ref)
    a, b = ours.affine[:3, :3], ref.affine[:3, :3]
    cos = np.sum(a * b, axis=0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))
    angles = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))

    hu = np.asarray(ours.dataobj, dtype=np.float32)[::stride, ::stride, ::stride]
    ref_hu, inside = sample_at_voxels(ref, ours, stride)
    # Our fill marks points outside the scanned slab (a sliver at its slanted faces, as wide as one
    # slice's in-plane shift, that dcm2niix's sheared slices still reach): not covered by both.
    both = inside & (hu > AIR_HU)
    head = both & ((hu > HEAD_HU) | (ref_hu > HEAD_HU))
    corr = float(np.corrcoef(hu[head], ref_hu[head])[0, 1])
    uncovered = float(np.mean(hu[inside & (ref_hu > HEAD_HU)] <= AIR_HU))

    def extent(mask: np.ndarray) -> np.ndarray:  # [2, 3] world min, max of the voxels in mask
        world = (np.argwhere(mask) * stride) @ a.T + ours.affine[:3, 3]
        return np.stack([world.min(axis=0), world.max(axis=0)])

    ext_ours, ext_ref = extent(both & (hu > HEAD_HU)), extent(both & (ref_hu > HEAD_HU))
    (glo_a, ghi_a), (glo_b, ghi_b) = world_box(ours.affine, ours.shape), world_box(ref.affine, ref.shape)
    grid_diff = np.maximum(np.abs(glo_a - glo_b), np.abs(ghi_a - ghi_b))
    shared = np.array([angles[np.argmax(np.abs(a[w]))] < 0.5 for w in range(3)])  # world axis w: parallel axes
    return dict(axcodes=(nib.aff2axcodes(ours.affine), nib.aff2axcodes(ref.affine)), max_angle=float(angles.max()),
                corr=corr, n_head=int(head.sum()), uncovered_head=uncovered, head_ours=ext_ours, head_ref=ext_ref,
                head_diff=np.abs(ext_ours - ext_ref).max(axis=0), tol=voxel_extent(ours.affine),
                grid_diff=np.where(shared, grid_diff, np.nan))


def assert_agrees(result: dict, tilt: float, min_corr: float = 0.97) -> None:
    assert result["axcodes"][0] == result["axcodes"][1] == ("R", "A", "S")
    assert result["max_angle"] <= abs(tilt) + 0.1, result["max_angle"]  # tilted with the gantry, no more
    assert result["corr"] >= min_corr, result["corr"]
    assert result["uncovered_head"] < 0.005, result["uncovered_head"]  # fill in under 0.5 % of the head
    assert np.all(result["head_diff"] <= result["tol"]), (result["head_diff"], result["tol"])
    shared = ~np.isnan(result["grid_diff"])
    assert shared[0] and np.all(result["grid_diff"][shared] <= result["tol"][shared]), result["grid_diff"]


# --------------------------------------------------------------------------- the real tilted CT


def test_real_tilted_ct_agrees_with_dcm2niix(tmp_path: Path) -> None:
    if not PHILIPS_TILT.is_dir():
        pytest.skip(f"real DICOM sample not found at {PHILIPS_TILT}")
    ref = run_dcm2niix(PHILIPS_TILT, tmp_path / "dcm2niix")
    assert "tilt" in ref, f"dcm2niix wrote no tilt-corrected volume: {sorted(ref)}"
    ours, row = convert_ours(PHILIPS_TILT, tmp_path / "ours")
    assert float(row["tilt_deg"]) == pytest.approx(18.5, abs=0.05) and row["n_slices"] == "54"
    result = compare(ours, nib.load(ref["tilt"]), stride=2)
    print(f"Philips tilt -18.5 deg vs dcm2niix: r = {result['corr']:.5f} over {result['n_head']} head voxels "
          f"(every 2nd; {100 * result['uncovered_head']:.2f} % ours leaves out), "
          f"head extent diff {np.round(result['head_diff'], 2)} mm (tol {np.round(result['tol'], 2)}), "
          f"grid x diff {result['grid_diff'][0]:.3f} mm, axes up to {result['max_angle']:.2f} deg apart")
    assert result["n_head"] > 100_000
    assert_agrees(result, tilt=18.5)


# --------------------------------------------------------------------------- synthetic series


def head_phantom(points_lps: np.ndarray) -> np.ndarray:
    """HU at LPS mm [..., 3] of a sphere 'head' in air (-1000): brain 40, a 5 mm skull of 1000 and an
    80 HU blob, with edges blurred over about 2 mm (as a scanner's resolution would), so that
    comparisons measure geometry rather than the aliasing of step edges between thick slices."""
    centre = np.array([0.0, 0.0, 60.0])
    r = np.linalg.norm(points_lps - centre, axis=-1)
    blob = np.linalg.norm(points_lps - centre - [10.0, -12.0, 15.0], axis=-1)

    def inside(dist: np.ndarray, radius: float) -> np.ndarray:  # 1 inside, 0 outside, smooth edge
        return 1.0 / (1.0 + np.exp((dist - radius) / 0.7))

    head, brain = inside(r, 45.0), inside(r, 40.0)
    return -1000.0 + 1040.0 * head + 960.0 * (head - brain) + 40.0 * inside(blob, 9.0)


def contiguous_series(thickness: np.ndarray, tilt: float, rows: int = 64, spacing: float = 1.6) -> dict:
    """write_series arguments: contiguous slices of the given thicknesses around the phantom, the table
    stepping along z (slices tilted by ``tilt`` about x), as a scanner numbers them (in order)."""
    orientation = tilted_orientation(tilt)
    normal = np.concatenate([[0.0], np.cumsum((thickness[:-1] + thickness[1:]) / 2)])  # centres along n
    z = normal / math.cos(math.radians(tilt))
    z += 60.0 - z.mean()
    half = (rows - 1) * spacing / 2
    pos = np.stack([np.full(len(z), -half), np.full(len(z), -half), z], axis=1)
    return dict(hu=sample_slices(pos, orientation, (spacing, spacing), rows, rows, fn=head_phantom), positions=pos,
                orientation=orientation, spacing=(spacing, spacing), thickness=thickness, shuffle=False,
                tags={"GantryDetectorTilt": -tilt, "PatientPosition": "HFS", "Manufacturer": "Philips"})


@pytest.mark.parametrize("tilt, mixed", [(18.5, False), (0.0, True), (18.5, True)])
def test_synthetic_series_agree_with_dcm2niix(tmp_path: Path, tilt: float, mixed: bool) -> None:
    thickness = np.r_[np.full(10, 4.0), np.full(12, 7.0)] if mixed else np.full(40, 2.5)
    write_series(tmp_path / "in", **contiguous_series(thickness, tilt))
    ref = run_dcm2niix(tmp_path / "in", tmp_path / "dcm2niix")
    kind = {(True, False): "tilt", (False, True): "eq", (True, True): "tilt_eq"}[(tilt != 0, mixed)]
    assert kind in ref, f"dcm2niix wrote {sorted(ref)}"
    ours, row = convert_ours(tmp_path / "in", tmp_path / "ours")
    if mixed:
        assert (row["thickness_min"], row["thickness_max"], row["missing_slices"]) == ("4", "7", "0")
        assert float(row["max_uncovered"]) == pytest.approx(0.0, abs=1e-3)
        step = 4.0 / math.cos(math.radians(tilt))  # the thin part's spacing (along the table with tilt)
        assert np.linalg.norm(ours.affine[:3, 2]) == pytest.approx(step, rel=0.02)
    result = compare(ours, nib.load(ref[kind]))
    if not mixed:  # the comparison sees a 2 mm error of our world coordinates (sub-voxel along z)
        moved = ours.affine.copy()
        moved[2, 3] += 2.0
        shifted = nib.Nifti1Image(np.asarray(ours.dataobj), moved)
        wrong = compare(shifted, nib.load(ref[kind]))
        assert wrong["corr"] < 0.9, wrong["corr"]
    print(f"synthetic tilt {tilt} mixed {mixed} vs dcm2niix {kind}: r = {result['corr']:.4f} "
          f"({100 * result['uncovered_head']:.2f} % of the head ours leaves out), "
          f"head extent diff {np.round(result['head_diff'], 2)} (tol {np.round(result['tol'], 2)})")
    assert_agrees(result, tilt=tilt)
