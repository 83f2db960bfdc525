import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from data.io import AIR_HU, Volume, read_volume
from data.transforms import (crop_pad, crop_pad_offsets, fit_to_roi, head_bbox, orient_ras,
                             preprocess_volume, resample)

# tests/data/test_transforms.py -> parents[2] is the repository root; ../shared/data beside it
REAL_CT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "headsq_quarter.nii.gz"


def world(affine, ijk):
    return (affine @ np.append(np.asarray(ijk, dtype=np.float64), 1.0))[:3]


def synthetic_head_and_bed(shape=(48, 48, 40)):
    """Head (sphere of 40 HU in a 1000 HU skull) above a bed plate, joined by a thin holder strut."""
    hu = np.full(shape, -1000.0, dtype=np.float32)
    g = np.indices(shape, dtype=np.float32)
    center = (24, 28, 20)
    r = np.sqrt(sum((gi - c) ** 2 for gi, c in zip(g, center)))
    hu[r < 14] = 1000.0
    hu[r < 12] = 40.0
    hu[:, 4:8, :] = 300.0  # bed: a plate across X and Z, posterior (low Y)
    hu[23:25, 8:15, 19:21] = 200.0  # thin holder strut touching the head (2 voxels thick)
    return hu, center


def test_orient_lps_to_ras_keeps_world_coordinates():
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(6, 7, 8)).astype(np.float32)
    affine = np.array([[-0.8, 0, 0, 50], [0, -0.9, 0, 60], [0, 0, 2.5, -30], [0, 0, 0, 1]])  # LPS
    ijk = (1, 5, 6)
    arr[ijk] = 100.0  # marked voxel
    out = orient_ras(Volume(arr, affine, (0.8, 0.9, 2.5)))
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    assert out.array.shape == (6, 7, 8)
    new_ijk = np.argwhere(out.array == 100.0)[0]
    np.testing.assert_allclose(world(out.affine, new_ijk), world(affine, ijk))
    # every voxel, not just the mark: world position of each value is unchanged
    for idx in [(0, 0, 0), (5, 6, 7), (2, 3, 4)]:
        src = np.round(np.linalg.solve(affine, np.append(world(out.affine, idx), 1))[:3]).astype(int)
        assert out.array[idx] == arr[tuple(src)]
    assert out.spacing == pytest.approx((0.8, 0.9, 2.5))


def test_orient_permuted_axes(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    affine = np.array([[0, 0, 1.0, 0], [2.0, 0, 0, 0], [0, -3.0, 0, 0], [0, 0, 0, 1]])  # axes S? -> mixed
    out = orient_ras(Volume(arr, affine, (2.0, 3.0, 1.0)))
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S") and out.array.shape == (4, 2, 3)
    for idx in np.ndindex(out.array.shape):
        src = np.round(np.linalg.solve(affine, np.append(world(out.affine, idx), 1))[:3]).astype(int)
        assert out.array[idx] == arr[tuple(src)]


def test_resample_anisotropic_to_2mm_shape_and_affine():
    shape = (32, 32, 32)
    affine = np.diag([3.2, 3.2, 1.5, 1.0])
    affine[:3, 3] = [-50, -40, 10]
    # a linear ramp in world x + 2y - z: linear interpolation reproduces it exactly inside the grid
    g = np.indices(shape, dtype=np.float64)
    wx, wy, wz = (affine[i, i] * g[i] + affine[i, 3] for i in range(3))
    arr = (wx + 2 * wy - wz).astype(np.float32)
    out = resample(Volume(arr, affine, (3.2, 3.2, 1.5)), (2.0, 2.0, 2.0))
    assert out.array.shape == (51, 51, 24)  # floor(32 * 3.2 / 2), floor(32 * 1.5 / 2)
    assert out.spacing == pytest.approx((2.0, 2.0, 2.0))
    np.testing.assert_allclose(np.diag(out.affine)[:3], [2, 2, 2])
    # the grids share their first corner (voxel -0.5, -0.5, -0.5)
    np.testing.assert_allclose(world(out.affine, (-0.5, -0.5, -0.5)), world(affine, (-0.5, -0.5, -0.5)),
                               atol=1e-9)
    # values sit at the world positions the affine claims (interior voxels)
    for idx in [(5, 7, 3), (25, 25, 12), (45, 40, 20)]:
        x, y, z = world(out.affine, idx)
        assert out.array[idx] == pytest.approx(x + 2 * y - z, abs=1e-3)


def test_resample_is_identity_at_target_spacing():
    vol = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4), (1.0, 1.0, 1.0))
    assert resample(vol, (1.0, 1.0, 1.0)) is vol
    with pytest.raises(ValueError):
        resample(vol, (1.0, 0.0, 1.0))


def test_head_crop_excludes_bed_and_holder():
    hu, center = synthetic_head_and_bed()
    box = head_bbox(hu, (1.0, 1.0, 1.0), threshold=-300, margin_mm=2, opening_mm=2)
    # head: center +- 14 voxels (skull), plus a 2-voxel margin
    for axis, s in enumerate(box):
        assert s.start == pytest.approx(center[axis] - 13 - 2, abs=1)
        assert s.stop == pytest.approx(center[axis] + 14 + 2, abs=1)
    assert box[1].start > 8  # bed (Y 4..7) is out


def test_preprocess_volume_affine_maps_crop_to_same_world():
    hu, _ = synthetic_head_and_bed()
    affine = np.diag([-1.5, -1.5, 2.0, 1.0])  # LPS-ish, anisotropic
    affine[:3, 3] = [40, 50, -20]
    vol = Volume(hu, affine, (1.5, 1.5, 2.0))
    out = preprocess_volume(vol, (1.5, 1.5, 2.0), head_threshold=-300)
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    assert out.array.dtype == np.float32 and out.array.shape[1] < hu.shape[1]
    for idx in [(0, 0, 0), (5, 9, 3), tuple(np.array(out.array.shape) - 1)]:
        src = np.linalg.solve(affine, np.append(world(out.affine, idx), 1))[:3]
        np.testing.assert_allclose(src, np.round(src), atol=1e-6)  # no resampling needed: same grid
        assert out.array[idx] == hu[tuple(np.round(src).astype(int))]


def test_head_crop_on_real_ct(tmp_path):
    if not REAL_CT.exists():
        pytest.skip(f"real head CT sample not found at {REAL_CT}")
    p = tmp_path / REAL_CT.name
    shutil.copy(REAL_CT, p)
    vol = read_volume(p)
    out = preprocess_volume(vol, (2.0, 2.0, 2.0), head_threshold=-300)
    assert out.spacing == pytest.approx((2.0, 2.0, 2.0))
    # the crop holds the head: all but a sliver (thin parts cut by the opening, e.g. ear rims) of the
    # body voxels of the source, located by their world coordinates
    to_out = np.linalg.solve(out.affine, vol.affine)  # source voxel -> output voxel
    body = np.argwhere(vol.array > -300)
    ijk = body @ to_out[:3, :3].T + to_out[:3, 3]
    inside = ((ijk >= -0.5) & (ijk <= np.array(out.array.shape) - 0.5)).all(axis=1)
    assert inside.mean() >= 0.999, inside.mean()
    # air trimmed: smaller than the field of view (64 voxels of 3.2 mm = 102 voxels of 2 mm; this
    # scan is framed tightly, so only a few millimetres go)
    assert out.array.shape[0] < 102 and out.array.shape[1] < 102
    # values sit where the affine says: trilinear interpolation of the source at that world point
    to_src = np.linalg.solve(vol.affine, out.affine)
    rng = np.random.default_rng(0)
    pts = rng.integers(2, np.array(out.array.shape) - 2, size=(50, 3))
    src = pts @ to_src[:3, :3].T + to_src[:3, 3]
    ok = ((src >= 0) & (src <= np.array(vol.array.shape) - 1)).all(axis=1)
    expected = ndimage.map_coordinates(vol.array, src[ok].T, order=1)
    np.testing.assert_allclose(out.array[tuple(pts[ok].T)], expected, atol=1e-2)


def test_head_crop_on_real_ct_with_a_bed_below(tmp_path):
    if not REAL_CT.exists():
        pytest.skip(f"real head CT sample not found at {REAL_CT}")
    p = tmp_path / REAL_CT.name
    shutil.copy(REAL_CT, p)
    vol = read_volume(p)
    pad = 12  # voxels of air added posterior (low Y), then a 3-voxel (~10 mm) bed plate in them
    hu = np.concatenate([np.full((64, pad, 93), AIR_HU, np.float32), vol.array], axis=1)
    hu[:, 2:5, :] = 400.0
    affine = vol.affine.copy()
    affine[1, 3] -= pad * vol.spacing[1]
    out = preprocess_volume(Volume(hu, affine, vol.spacing), (2.0, 2.0, 2.0), head_threshold=-300)
    plain = preprocess_volume(vol, (2.0, 2.0, 2.0), head_threshold=-300)
    np.testing.assert_allclose(out.affine, plain.affine, atol=1e-6)  # same world box: bed left out
    assert out.array.shape == plain.array.shape


def test_nothing_above_threshold_raises():
    with pytest.raises(ValueError, match="head threshold"):
        head_bbox(np.full((8, 8, 8), -1000.0), (1, 1, 1), threshold=-300)


def test_crop_pad_offsets_centred_and_random():
    assert crop_pad_offsets((10, 4, 7), (6, 8, 7)) == (2, -2, 0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = crop_pad_offsets((10, 4, 7), (6, 8, 7), rng)
        assert 0 <= s[0] <= 4 and -4 <= s[1] <= 0 and s[2] == 0


def test_fit_crop_pad_pads_with_air_and_reads_memmap_window(tmp_path):
    hu = np.arange(10 * 4 * 7, dtype=np.int16).reshape(10, 4, 7)
    np.save(tmp_path / "a.npy", hu)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    out = fit_to_roi(mm, (6, 8, 7))
    assert type(out) is np.ndarray and out.dtype == np.int16 and out.shape == (6, 8, 7)
    np.testing.assert_array_equal(out[:, 2:6], hu[2:8])
    assert (out[:, :2] == AIR_HU).all() and (out[:, 6:] == AIR_HU).all()
    inside = crop_pad(mm, (3, 3, 3), (1, 1, 1))
    assert type(inside) is np.ndarray
    np.testing.assert_array_equal(inside, hu[1:4, 1:4, 1:4])
    a = fit_to_roi(mm, (6, 8, 7), rng=np.random.default_rng(3))
    b = fit_to_roi(mm, (6, 8, 7), rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)


def test_fit_resize_keeps_aspect_and_whole_head():
    hu = np.full((40, 20, 10), 100.0, dtype=np.float32)  # a box of tissue filling the array
    out = fit_to_roi(hu, (16, 16, 16), mode="resize")
    assert out.shape == (16, 16, 16) and out.dtype == np.float32
    body = np.argwhere(out > 0)
    extent = body.max(0) - body.min(0) + 1
    np.testing.assert_array_equal(extent, [16, 8, 4])  # scale 0.4 on every axis
    assert (out[:, :4] == AIR_HU).all()  # padded with air, centred
    with pytest.raises(ValueError):
        fit_to_roi(hu, (16, 16, 16), mode="stretch")
