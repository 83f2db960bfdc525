import json
import os

import nibabel as nib
import numpy as np
import pytest

from config import get_defaults
from data.cache import (cache_key, cache_root, entry_name, entry_path, is_done, preprocess_manifests,
                        read_entry, skipped_reasons, write_entry)
from data.io import BadInputError, TooManyBadInputs, read_skipped, read_volume
from data.transforms import preprocess_volume


def synthetic_head(shape=(32, 32, 32), radius=0.4) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float32)
    r = np.sqrt(sum((g - (n - 1) / 2) ** 2 for g, n in zip(grid, shape)))
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[r < radius * min(shape)] = 1000.0
    hu[r < (radius - 0.07) * min(shape)] = 40.0
    return hu


def save_ct(path, seed=0, spacing=2.0):
    hu = synthetic_head() + np.random.default_rng(seed).normal(0, 5, (32, 32, 32)).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, np.diag([spacing, spacing, spacing, 1.0])), str(path))
    return path


def make_cfg(tmp_path, csv, **data):
    cfg = get_defaults()
    cfg.DATA.TRAIN_CSV = str(csv)
    cfg.DATA.CACHE_DIR = str(tmp_path / "cache")
    cfg.DATA.SPACING = [2.0, 2.0, 2.0]
    cfg.DATA.NUM_WORKERS = 0
    for k, v in data.items():
        cfg.DATA[k] = v
    return cfg


def manifest(tmp_path, names, name="m.csv"):
    csv = tmp_path / name
    csv.write_text("img_path\n" + "".join(f"{n}\n" for n in names))
    return csv


def test_cache_key_covers_preprocessing_parameters_only(tmp_path):
    cfg = make_cfg(tmp_path, "x.csv")
    key = cache_key(cfg)
    for k, v in (("SPACING", [1.0, 1.0, 1.0]), ("HEAD_THRESHOLD", -200.0)):
        other = cfg.clone()
        other.DATA[k] = v
        assert cache_key(other) != key, k
    same = cfg.clone()
    same.DATA.BATCH_SIZE = 3
    same.DATA.WINDOWS = ["bone"]
    same.DATA.ROI = [32, 32, 32]
    assert cache_key(same) == key
    assert cache_root(cfg) == tmp_path / "cache" / key


def test_entry_name_uses_resolved_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert entry_name("a/b.nii.gz") == entry_name(str(tmp_path / "a" / "x" / ".." / "b.nii.gz"))
    assert entry_name("a/b.nii.gz") != entry_name("a/c.nii.gz")


def test_write_and_read_entry_round_trip(tmp_path):
    src = save_ct(tmp_path / "ct.nii.gz")
    vol = preprocess_volume(read_volume(src), (2.0, 2.0, 2.0), -300.0)
    root = tmp_path / "cache" / "k"
    npy = write_entry(root, src, vol, {"p": 1})
    assert npy == entry_path(root, src) and is_done(root, src)
    assert not [p for p in npy.parent.iterdir() if p.name.endswith(".tmp")]
    meta = json.loads(npy.with_suffix(".json").read_text())
    assert meta["source"] == str(src) and meta["shape"] == list(vol.array.shape) and meta["params"] == {"p": 1}
    cached = read_entry(root, src)
    assert isinstance(cached.array, np.memmap) and cached.array.dtype == np.int16
    np.testing.assert_array_equal(cached.array, np.rint(vol.array).astype(np.int16))
    np.testing.assert_allclose(cached.affine, vol.affine)
    assert cached.spacing == pytest.approx(vol.spacing)


def test_read_entry_missing_or_skipped(tmp_path):
    root = tmp_path / "cache" / "k"
    with pytest.raises(BadInputError, match=r"not in the preprocessing cache .*tools/preprocess.py") as info:
        read_entry(root, tmp_path / "a.nii.gz")
    assert info.value.path == str(tmp_path / "a.nii.gz")
    with pytest.raises(BadInputError, match="skipped at preprocessing: file is empty"):
        read_entry(root, tmp_path / "b.nii.gz", skipped={str(tmp_path / "b.nii.gz"): "file is empty"})


def test_preprocess_resumes_and_invalidates_on_parameter_change(tmp_path):
    for i in range(3):
        save_ct(tmp_path / f"ct{i}.nii.gz", seed=i)
    csv = manifest(tmp_path, [f"ct{i}.nii.gz" for i in range(3)])
    cfg = make_cfg(tmp_path, csv)
    s1 = preprocess_manifests(cfg, progress=False, log=lambda *_: None)
    assert (s1["total"], s1["done"], s1["already_done"], s1["bad"]) == (3, 3, 0, 0)
    root = cache_root(cfg)
    npy = entry_path(root, tmp_path / "ct0.nii.gz")
    mtime = os.stat(npy).st_mtime_ns
    s2 = preprocess_manifests(cfg, progress=False, log=lambda *_: None)  # idempotent: nothing to do
    assert (s2["done"], s2["already_done"]) == (0, 3) and os.stat(npy).st_mtime_ns == mtime
    os.unlink(npy.with_suffix(".json"))  # an interrupted entry (array without sidecar) is redone
    assert preprocess_manifests(cfg, progress=False, log=lambda *_: None)["done"] == 1
    # a new spacing gets a new folder, never the stale arrays
    cfg3 = make_cfg(tmp_path, csv, SPACING=[4.0, 4.0, 4.0])
    s3 = preprocess_manifests(cfg3, progress=False, log=lambda *_: None)
    assert s3["done"] == 3 and cache_root(cfg3) != root
    a2 = read_entry(root, tmp_path / "ct0.nii.gz").array
    a4 = read_entry(cache_root(cfg3), tmp_path / "ct0.nii.gz").array
    assert a4.shape[0] < a2.shape[0]
    assert json.loads((cache_root(cfg3) / "params.json").read_text())["spacing"] == [4.0, 4.0, 4.0]
    cfg4 = make_cfg(tmp_path, csv, HEAD_THRESHOLD=-100.0)
    assert preprocess_manifests(cfg4, progress=False, log=lambda *_: None)["done"] == 3


def _broken_set(tmp_path):
    good = [save_ct(tmp_path / f"good{i}.nii.gz", seed=i) for i in range(4)]
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    raw = good[0].read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), 5.0, np.float32), np.eye(4)), str(tmp_path / "const.nii.gz"))
    bad = ["missing.nii.gz", "empty.nii.gz", "trunc.nii.gz", "const.nii.gz"]
    return [p.name for p in good], bad


def test_preprocess_raise_stops_on_first_bad(tmp_path):
    good, bad = _broken_set(tmp_path)
    csv = manifest(tmp_path, good[:2] + bad[:1] + good[2:])
    cfg = make_cfg(tmp_path, csv)
    with pytest.raises(BadInputError, match="missing.nii.gz: file does not exist"):
        preprocess_manifests(cfg, progress=False, log=lambda *_: None)
    assert not (cache_root(cfg) / "skipped.csv").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_preprocess_skip_lists_every_broken_file(tmp_path, workers):
    good, bad = _broken_set(tmp_path)
    csv = manifest(tmp_path, good + bad)
    cfg = make_cfg(tmp_path, csv, ON_ERROR="skip", MAX_BAD_FRACTION=0.6)
    lines = []
    s = preprocess_manifests(cfg, num_workers=workers, progress=False, log=lines.append)
    root = cache_root(cfg)
    assert (s["done"], s["bad"]) == (4, 4)
    skipped = read_skipped(root / "skipped.csv")
    assert sorted(skipped) == sorted(str(tmp_path / b) for b in bad)
    assert "does not exist" in skipped[str(tmp_path / "missing.nii.gz")]
    assert "constant volume" in skipped[str(tmp_path / "const.nii.gz")]
    assert all(is_done(root, tmp_path / g) for g in good)
    assert sum("skipped" in line for line in lines) >= 4
    # fixing a file removes it from skipped.csv on the next run; the others stay
    save_ct(tmp_path / "empty.nii.gz")
    s2 = preprocess_manifests(cfg, num_workers=workers, progress=False, log=lambda *_: None)
    assert s2["done"] == 1 and str(tmp_path / "empty.nii.gz") not in skipped_reasons(root)
    assert len(skipped_reasons(root)) == 3


def test_preprocess_stops_above_max_bad_fraction(tmp_path):
    good, bad = _broken_set(tmp_path)
    csv = manifest(tmp_path, bad + good)
    cfg = make_cfg(tmp_path, csv, ON_ERROR="skip", MAX_BAD_FRACTION=0.2)
    with pytest.raises(TooManyBadInputs, match=r"of 8 inputs are bad") as info:
        preprocess_manifests(cfg, progress=False, log=lambda *_: None)
    assert "MAX_BAD_FRACTION" in str(info.value)
    assert len(read_skipped(cache_root(cfg) / "skipped.csv")) == 2  # listed up to the stop


def test_manifests_share_entries(tmp_path):
    save_ct(tmp_path / "ct.nii.gz")
    (tmp_path / "sub").mkdir()
    a = manifest(tmp_path, ["ct.nii.gz"], "a.csv")
    b = manifest(tmp_path / "sub", ["../ct.nii.gz"], "b.csv")
    cfg = make_cfg(tmp_path, a)
    cfg.DATA.VAL_CSV = str(b)
    s = preprocess_manifests(cfg, progress=False, log=lambda *_: None)
    assert (s["total"], s["done"]) == (1, 1)
