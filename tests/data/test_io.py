import gzip
import json
import pickle

import nibabel as nib
import numpy as np
import pytest

from data.io import (AIR_HU, BadInputError, Volume, check_hu, read_cached, read_skipped, read_volume,
                     spacing_from_affine, write_skipped)


def synthetic_head(shape=(32, 32, 32)) -> np.ndarray:
    """Air around a sphere of brain (40 HU) inside a skull shell (1000 HU)."""
    grid = np.indices(shape, dtype=np.float32)
    r = np.sqrt(sum((g - (n - 1) / 2) ** 2 for g, n in zip(grid, shape)))
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[r < 0.4 * min(shape)] = 1000.0
    hu[r < 0.33 * min(shape)] = 40.0
    return hu


def save(path, data, affine=None, slope=None, inter=None, dtype=None):
    img = nib.Nifti1Image(data if dtype is None else data.astype(dtype), np.diag([2.0, 2.0, 2.0, 1.0])
                          if affine is None else affine)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


def test_read_applies_slope_intercept_and_keeps_geometry(tmp_path):
    hu = synthetic_head()
    stored = ((hu + 1024) / 2).astype(np.int16)  # HU = 2 * stored - 1024
    affine = np.array([[-0.5, 0, 0, 10], [0, 0.6, 0, -20], [0, 0, 1.5, 30], [0, 0, 0, 1]])
    img = nib.Nifti1Image(stored, affine)
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(2.0, -1024.0)
    p = tmp_path / "ct.nii.gz"
    nib.save(img, str(p))
    vol = read_volume(p)
    assert vol.array.dtype == np.float32 and vol.array.shape == (32, 32, 32)
    np.testing.assert_allclose(vol.array, stored * 2.0 - 1024.0)
    np.testing.assert_allclose(vol.affine, affine)
    np.testing.assert_allclose(vol.spacing, (0.5, 0.6, 1.5), rtol=1e-6)


def test_singleton_fourth_axis_is_squeezed(tmp_path):
    p = save(tmp_path / "ct4.nii.gz", synthetic_head()[..., None])
    vol = read_volume(p)
    assert vol.array.shape == (32, 32, 32)


def _bad_cases(tmp_path):
    good = save(tmp_path / "good.nii.gz", synthetic_head())
    raw = good.read_bytes()
    cases = {}
    cases["does not exist"] = tmp_path / "missing.nii.gz"
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    cases["empty"] = tmp_path / "empty.nii.gz"
    (tmp_path / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    cases["truncated or corrupt"] = tmp_path / "trunc.nii.gz"
    (tmp_path / "text.nii.gz").write_bytes(gzip.compress(b"this is not an image " * 40))
    cases["not a readable NIfTI"] = tmp_path / "text.nii.gz"
    (tmp_path / "plain.nii").write_text("hello " * 100)
    cases["not a readable NIfTI "] = tmp_path / "plain.nii"
    cases["holds 3 volumes"] = save(tmp_path / "4d.nii.gz", np.stack([synthetic_head()] * 3, axis=-1))
    nan = synthetic_head()
    nan[3, 4, 5] = np.nan
    cases["NaN or inf"] = save(tmp_path / "nan.nii.gz", nan)
    inf = synthetic_head()
    inf[0, 0, 0] = np.inf
    cases["NaN or inf "] = save(tmp_path / "inf.nii.gz", inf)
    cases["constant volume"] = save(tmp_path / "const.nii.gz", np.full((16, 16, 16), 40, np.float32))
    cases["no air below -500"] = save(tmp_path / "noair.nii.gz", synthetic_head() + 1024)  # no intercept
    cases["no tissue above 0"] = save(tmp_path / "notissue.nii.gz", synthetic_head() * 0.1 - 900)
    cases["2D image"] = save(tmp_path / "2d.nii.gz", synthetic_head()[:, :, 0])
    return cases


def test_every_bad_input_names_file_and_reason(tmp_path):
    for reason, path in _bad_cases(tmp_path).items():
        with pytest.raises(BadInputError) as info:
            read_volume(path)
        e = info.value
        assert e.path == str(path)
        assert reason.strip() in e.reason, (reason, e.reason)
        assert str(e) == f"{path}: {e.reason}"


def test_bad_input_error_survives_pickling():
    e = pickle.loads(pickle.dumps(BadInputError("/x.nii.gz", "file does not exist")))
    assert isinstance(e, ValueError) and e.path == "/x.nii.gz" and e.reason == "file does not exist"
    assert str(e) == "/x.nii.gz: file does not exist"


def test_check_hu_accepts_real_ct_range():
    check_hu(synthetic_head(), "x")  # no error


def test_read_cached_is_memory_mapped(tmp_path):
    hu = synthetic_head().astype(np.int16)
    npy = tmp_path / "e.npy"
    np.save(npy, hu)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [5, 6, 7]
    (tmp_path / "e.json").write_text(json.dumps({"shape": list(hu.shape), "spacing": [1, 1, 1],
                                                 "affine": affine.tolist()}))
    vol = read_volume(npy)
    assert isinstance(vol.array, np.memmap) and vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, hu)
    np.testing.assert_allclose(vol.affine, affine)
    (tmp_path / "e.json").unlink()
    with pytest.raises(BadInputError, match="no sidecar"):
        read_cached(npy)


def test_spacing_from_affine_is_column_norm():
    a = np.eye(4)
    a[:3, :3] = [[0, 0, -3.0], [0.7, 0, 0], [0, 1.5, 0]]
    assert spacing_from_affine(a) == pytest.approx((0.7, 1.5, 3.0))


def test_write_skipped_merges_unique_rows(tmp_path):
    csv_path = tmp_path / "run" / "skipped.csv"
    assert write_skipped(csv_path, []) == 0 and not csv_path.exists()
    assert write_skipped(csv_path, [("/a", "bad one"), ("/b", "bad, two")]) == 2
    assert write_skipped(csv_path, [("/a", "other"), ("/c", "three")]) == 3
    assert read_skipped(csv_path) == {"/a": "bad one", "/b": "bad, two", "/c": "three"}
    assert csv_path.read_text().splitlines()[0] == "path,reason"
    assert write_skipped(csv_path, [("/z", "z")], replace=True) == 1
    assert read_skipped(csv_path) == {"/z": "z"}


def test_volume_dataclass_fields():
    v = Volume(np.zeros((2, 2, 2), np.float32) + AIR_HU, np.eye(4), (1.0, 1.0, 1.0))
    assert v.array.shape == (2, 2, 2) and v.spacing == (1.0, 1.0, 1.0)
