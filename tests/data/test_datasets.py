import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from config import get_defaults
from data.cache import preprocess_manifests
from data.datasets import SkipTracker, VolumeDataset, build_dataset, collate
from data.io import BadInputError, TooManyBadInputs, read_skipped
from data.manifest import Manifest
from data.views import SingleView


def synthetic_head(shape=(32, 32, 32)) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float32)
    r = np.sqrt(sum((g - (n - 1) / 2) ** 2 for g, n in zip(grid, shape)))
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[r < 0.4 * min(shape)] = 1000.0
    hu[r < 0.33 * min(shape)] = 40.0
    return hu


def setup_scans(tmp_path, n=4, broken=()):
    """n scans (3 mm voxels), some broken; manifest with an ICH label (row 1 blank)."""
    rows = []
    for i in range(n):
        p = tmp_path / f"ct{i}.nii.gz"
        if i in broken:
            p.write_bytes(b"")
        else:
            hu = synthetic_head() + np.random.default_rng(i).normal(0, 20, (32, 32, 32)).astype(np.float32)
            affine = np.diag([-3.0, -3.0, 3.0, 1.0])  # LPS: reoriented on the way
            nib.save(nib.Nifti1Image(hu, affine), str(p))
        rows.append(f"{p.name},scan{i},{'' if i == 1 else i % 2}\n")
    csv = tmp_path / "m.csv"
    csv.write_text("img_path,id,ICH\n" + "".join(rows))
    return csv


def make_cfg(tmp_path, csv, cache=False, **data):
    cfg = get_defaults()
    cfg.SEED = 7
    cfg.DATA.TRAIN_CSV = str(csv)
    cfg.DATA.SPACING = [2.0, 2.0, 2.0]
    cfg.DATA.ROI = [16, 16, 16]
    cfg.DATA.NUM_WORKERS = 0
    cfg.DATA.CACHE_DIR = str(tmp_path / "cache") if cache else ""
    for k, v in data.items():
        cfg.DATA[k] = v
    return cfg


def test_cache_and_source_give_the_same_array(tmp_path):
    csv = setup_scans(tmp_path)
    src = build_dataset(make_cfg(tmp_path, csv), csv, SingleView(make_cfg(tmp_path, csv), train=False))
    cfg_c = make_cfg(tmp_path, csv, cache=True)
    preprocess_manifests(cfg_c, progress=False, log=lambda *_: None)
    cached = build_dataset(cfg_c, csv, SingleView(cfg_c, train=False))
    for i in range(4):
        a, meta_a = src.load(i)
        b, meta_b = cached.load(i)
        assert a.dtype == np.float32 and isinstance(b, np.memmap) and b.dtype == np.int16
        np.testing.assert_array_equal(np.rint(a).astype(np.int16), b)
        np.testing.assert_allclose(meta_a["affine"], meta_b["affine"])
        assert meta_a["spacing"] == pytest.approx(meta_b["spacing"]) == (2.0, 2.0, 2.0)
        torch.testing.assert_close(src[i]["image"], cached[i]["image"], atol=1 / 80, rtol=0)


def test_sample_keys_labels_and_collate(tmp_path):
    csv = setup_scans(tmp_path)
    cfg = make_cfg(tmp_path, csv)
    ds = build_dataset(cfg, csv, SingleView(cfg, train=True), label_columns=["ICH"])
    s = ds[(2, 3)]
    assert set(s) == {"image", "index", "id", "skipped", "label"}
    assert s["image"].shape == (3, 16, 16, 16) and s["image"].dtype == torch.float32
    assert s["index"] == 2 and s["id"] == "scan2" and s["skipped"] == []
    assert ds.describe(2) == f"scan2 ({tmp_path / 'ct2.nii.gz'})"  # how loader errors name the row
    assert s["label"].dtype == torch.float32 and s["label"].tolist() == [0.0]
    assert torch.isnan(ds[1]["label"]).all()
    batch = collate([ds[0], ds[1], ds[3]])
    assert batch["image"].shape == (3, 3, 16, 16, 16) and batch["label"].shape == (3, 1)
    assert batch["id"] == ["scan0", "scan1", "scan3"] and batch["skipped"] == []
    assert batch["index"].tolist() == [0, 1, 3]
    assert "label" not in build_dataset(cfg, csv, SingleView(cfg, train=False))[0]
    with pytest.raises(IndexError):
        ds[4]


def test_dataloader_with_workers(tmp_path):
    csv = setup_scans(tmp_path)
    cfg_c = make_cfg(tmp_path, csv, cache=True)
    preprocess_manifests(cfg_c, progress=False, log=lambda *_: None)
    ds = build_dataset(cfg_c, csv, SingleView(cfg_c, train=True))
    loader = DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["image"].shape == (2, 3, 16, 16, 16)
    torch.testing.assert_close(batches[1]["image"][0], ds[2]["image"])  # same sample in a worker


@pytest.mark.parametrize("cache", [False, True])
def test_skip_replaces_bad_scan_by_next_good_row(tmp_path, cache):
    csv = setup_scans(tmp_path, n=5, broken=(1, 2))
    cfg = make_cfg(tmp_path, csv, cache=cache, ON_ERROR="skip", MAX_BAD_FRACTION=0.5)
    if cache:
        preprocess_manifests(cfg, progress=False, log=lambda *_: None)
    ds = build_dataset(cfg, csv, SingleView(cfg, train=False))
    s = ds[1]
    assert s["index"] == 3 and s["id"] == "scan3"
    assert [p for p, _ in s["skipped"]] == [str(tmp_path / "ct1.nii.gz"), str(tmp_path / "ct2.nii.gz")]
    reason = s["skipped"][0][1]
    assert ("skipped at preprocessing: file is empty" if cache else "file is empty") in reason
    batch = collate([ds[0], ds[1], ds[2]])
    assert len(batch["skipped"]) == 3 and batch["id"] == ["scan0", "scan3", "scan3"]


def test_raise_propagates_and_missing_cache_entry_says_what_to_run(tmp_path):
    csv = setup_scans(tmp_path, n=3, broken=(1,))
    cfg = make_cfg(tmp_path, csv)
    ds = build_dataset(cfg, csv, SingleView(cfg, train=False))
    with pytest.raises(BadInputError, match="ct1.nii.gz: file is empty"):
        ds[1]
    cfg_c = make_cfg(tmp_path, csv, cache=True)  # cache never built
    with pytest.raises(BadInputError, match=r"ct0.nii.gz: not in the preprocessing cache .*tools/preprocess.py"):
        build_dataset(cfg_c, csv, SingleView(cfg_c, train=False))[0]


def test_too_many_consecutive_bad_rows(tmp_path):
    csv = setup_scans(tmp_path, n=3, broken=(0, 1, 2))
    cfg = make_cfg(tmp_path, csv, ON_ERROR="skip")
    with pytest.raises(TooManyBadInputs):
        build_dataset(cfg, csv, SingleView(cfg, train=False))[0]


def test_skip_tracker_writes_unique_rows_and_enforces_fraction(tmp_path):
    seen = []
    t = SkipTracker(tmp_path / "run" / "skipped.csv", max_bad_fraction=0.3, total=10, logger=seen.append)
    assert t.add([("/a", "empty"), ("/a", "empty"), ("/b", "truncated")]) == 2
    assert t.add([("/a", "empty")]) == 0
    assert read_skipped(tmp_path / "run" / "skipped.csv") == {"/a": "empty", "/b": "truncated"}
    assert seen == ["skipped /a: empty", "skipped /b: truncated"]
    t.add([("/c", "x")])
    with pytest.raises(TooManyBadInputs, match="4 of 10"):
        t.add([("/d", "y")])
    # a resumed run picks the list up again
    assert len(SkipTracker(tmp_path / "run" / "skipped.csv", 0.5, 10).seen) == 4


def test_dataset_from_manifest_object(tmp_path):
    csv = setup_scans(tmp_path, n=2)
    cfg = make_cfg(tmp_path, csv)
    ds = VolumeDataset(Manifest.read(csv), cfg, lambda hu, meta, rng: {"x": torch.tensor(hu.shape)})
    shape = ds[0]["x"].tolist()  # the head cropped out of 48^3 (32 voxels of 3 mm -> 2 mm)
    assert len(ds) == 2 and len(shape) == 3 and all(20 < n <= 48 for n in shape)
