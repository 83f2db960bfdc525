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


def test_dataset_download_path_uses_the_medmnist_package(tmp_path, monkeypatch):
    """--dataset NAME --size 64: the medmnist package is asked for every split, then its file converted.

    The package downloads from the network, which tests may not use; a stand-in module with the
    package's interface (INFO, one class per set taking split/download/size/root) writes the file
    where medmnist puts it (``<root>/<flag>_<size>.npz``)."""
    import sys
    import types

    from tools.medmnist_to_manifest import main

    calls = []

    class AdrenalMNIST3D:
        def __init__(self, split, download, size, root):
            calls.append((split, download, size))
            target = Path(root) / f"adrenalmnist3d_{size}.npz" if size != 28 else Path(root) / "adrenalmnist3d.npz"
            if not target.exists():
                fake_npz(target)

    stub = types.ModuleType("medmnist")
    stub.INFO = {"adrenalmnist3d": {"python_class": "AdrenalMNIST3D"}, "pathmnist": {"python_class": "PathMNIST"}}
    stub.AdrenalMNIST3D = AdrenalMNIST3D
    monkeypatch.setitem(sys.modules, "medmnist", stub)
    out = tmp_path / "out"
    assert main(["--dataset", "adrenalmnist3d", "--size", "64", "--root", str(tmp_path / "dl"), "--out", str(out)]) == 0
    assert calls == [("train", True, 64), ("val", True, 64), ("test", True, 64)]
    assert (tmp_path / "dl" / "adrenalmnist3d_64.npz").is_file()
    assert len(list(csv.DictReader(open(out / "train.csv")))) == 12
    with pytest.raises(ValueError, match="not a MedMNIST set"):
        main(["--dataset", "nosuchmnist3d", "--root", str(tmp_path / "dl"), "--out", str(out)])
    with pytest.raises(ValueError, match="28 or 64"):
        main(["--dataset", "adrenalmnist3d", "--size", "128", "--root", str(tmp_path / "dl"), "--out", str(out)])


def test_dataset_without_medmnist_says_how_to_get_it(tmp_path, monkeypatch):
    import sys

    from tools.medmnist_to_manifest import main

    monkeypatch.setitem(sys.modules, "medmnist", None)  # import medmnist -> ImportError
    with pytest.raises(ImportError, match="pip install medmnist.*--npz"):
        main(["--dataset", "adrenalmnist3d", "--root", str(tmp_path), "--out", str(tmp_path / "o")])
