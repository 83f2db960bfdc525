"""tools/medmnist_to_manifest.py on a fake MedMNIST 3D .npz: NIfTI volumes the reader accepts,
manifests, the documented window mapping 0..255 to [0, 1], and a short adrenal_resnet18 run."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from config import get_defaults, merge_file
from data.datasets import build_dataset
from data.io import read_volume
from data.views import SingleView
from tools.medmnist_to_manifest import convert, label_columns, to_hu

ROOT = Path(__file__).resolve().parents[2]


def fake_npz(path: Path, n=(12, 6, 6), multiclass=False) -> Path:
    """Blobs of random size in 28^3 volumes; label 1 = a larger blob (like 'mass')."""
    rng = np.random.default_rng(0)
    arrays = {}
    grid = np.stack(np.meshgrid(*[np.arange(28)] * 3, indexing="ij"), -1)
    for split, count in zip(("train", "val", "test"), n):
        labels = np.arange(count) % (3 if multiclass else 2)
        vols = np.zeros((count, 28, 28, 28), np.uint8)
        for i, y in enumerate(labels):
            r = 4 + 3 * y + rng.uniform(0, 1)
            vols[i][np.linalg.norm(grid - 14 + rng.normal(0, 1, 3), axis=-1) < r] = 255
        arrays[f"{split}_images"] = vols
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    np.savez(path, **arrays)
    return path


def test_to_hu_mapping_and_range_check():
    v = np.array([[[0, 128, 255]]], dtype=np.uint8)
    assert to_hu(v).tolist() == [[[-1000, 280, 1550]]]
    assert to_hu(np.array([[[0.0, 1.0]]])).tolist() == [[[-1000, 1550]]]  # floats in [0, 1]
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        to_hu(np.array([[[300.0]]]))


def test_label_columns_binary_multiclass_multilabel():
    names, y = label_columns({"train": np.array([[0], [1]])})
    assert names == ["label"] and y["train"].tolist() == [[0], [1]]
    names, y = label_columns({"train": np.array([[0], [2]]), "val": np.array([[1]])})
    assert names == ["class_0", "class_1", "class_2"] and y["train"].tolist() == [[1, 0, 0], [0, 0, 1]]
    names, _ = label_columns({"train": np.array([[0, 1, 1]])})
    assert names == ["label_0", "label_1", "label_2"]


def test_convert_writes_readable_volumes_and_manifests(tmp_path):
    paths = convert(str(fake_npz(tmp_path / "fake.npz")), str(tmp_path / "out"))
    rows = list(csv.DictReader(open(paths["train"])))
    assert len(rows) == 12 and list(rows[0]) == ["img_path", "id", "label"]
    vol = read_volume(tmp_path / "out" / rows[1]["img_path"])  # passes the not-CT checks
    assert vol.array.shape == (28, 28, 28) and vol.spacing == (1.0, 1.0, 1.0)
    assert vol.array.min() == -1000 and vol.array.max() == 1550
    cfg = get_defaults()
    merge_file(cfg, str(ROOT / "configs" / "downstream" / "adrenal_resnet18.yaml"))
    ds = build_dataset(cfg, paths["train"], SingleView(cfg, train=False), label_columns=["label"])
    sample = ds[1]
    img = sample["image"]
    assert img.shape == (1, 32, 32, 32)  # 28^3 kept whole (no head crop), padded to the ROI
    assert float(img.max()) == pytest.approx(1.0) and float(img.min()) == 0.0
    assert int((img > 0.5).sum()) == int((vol.array > 275).sum())  # every voxel kept
    with pytest.raises(ValueError, match="missing arrays"):
        np.savez(tmp_path / "bad.npz", train_images=np.zeros((1, 28, 28, 28)))
        convert(str(tmp_path / "bad.npz"), str(tmp_path / "bad"))


def test_adrenal_config_runs_end_to_end_on_fake_data(tmp_path):
    import main_downstream
    out = tmp_path / "run"
    convert(str(fake_npz(tmp_path / "fake.npz", n=(16, 8, 8))), str(tmp_path / "adrenal"))
    d = tmp_path / "adrenal"
    metrics = main_downstream.main([
        "--cfg", str(ROOT / "configs" / "downstream" / "adrenal_resnet18.yaml"), "--opts", "OUTPUT", str(out),
        "DATA.TRAIN_CSV", str(d / "train.csv"), "DATA.VAL_CSV", str(d / "val.csv"),
        "DATA.TEST_CSV", str(d / "test.csv"),
        "DATA.NUM_WORKERS", "0", "DATA.BATCH_SIZE", "8", "MODEL.FEATURE_SIZE", "8", "TRAIN.EPOCHS", "2",
        "TRAIN.WARMUP_EPOCHS", "0", "DOWNSTREAM.BOOTSTRAP", "20"])
    assert set(json.loads((out / "metrics.json").read_text())) == {"val", "test"}
    assert metrics["test"]["label"]["n_pos"] == 4 and metrics["test"]["label"]["n_neg"] == 4
    for name in ("predictions.csv", "roc_pr.png", "checkpoint_best.pth", "backbone.pth"):
        assert (out / name).is_file()
