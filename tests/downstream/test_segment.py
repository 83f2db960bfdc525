"""main_downstream.py with DOWNSTREAM.TASK segment on a tiny phantom: the contract's files, predictions on the
source grid with its affine, per_case.csv recomputed from the written label maps, the linear mode's frozen
encoder, an LPS image overlaid exactly, the refusals of bad masks, and two processes scoring each case once."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import main_downstream
from config import ConfigError, get_defaults
from data.datasets import VolumeDataset
from data.io import BadInputError
from data.manifest import Manifest
from data.views.segment import SegmentView
from downstream.segment import check_classes, fewshot_rows, predict_test

ROOT = Path(__file__).resolve().parents[2]
CLASSES = [3, 5]  # phantom SDH and SAH


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """12 phantom scans of 32^3 (7.5 mm) with label maps (mask_path)."""
    from data.phantom import write_dataset
    out = tmp_path_factory.mktemp("phantom_seg")
    write_dataset(out, n=12, size=32, seed=0, label_maps=True)
    return out


def opts(phantom, out, *extra):
    return ["--opts", "OUTPUT", str(out), "DATA.TRAIN_CSV", str(phantom / "train.csv"),
            "DATA.VAL_CSV", str(phantom / "val.csv"), "DATA.TEST_CSV", str(phantom / "test.csv"),
            "DATA.SPACING", "[7.5, 7.5, 7.5]", "DATA.ROI", "[16, 16, 16]", "DATA.WINDOWS", "['brain']",
            "DATA.NUM_WORKERS", "0", "DATA.BATCH_SIZE", "2", "MODEL.NAME", "segresnet", "MODEL.FEATURE_SIZE", "4",
            "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.SAVE_EVERY", "0", "TRAIN.BASE_LR", "0.05",
            "DOWNSTREAM.BOOTSTRAP", "50", "DOWNSTREAM.TASK", "segment", "DOWNSTREAM.SEG_CLASSES", str(CLASSES),
            *extra]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 if not a.any() and not b.any() else 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def check_outputs(out: Path, phantom: Path) -> list[dict]:
    for name in ["config.yaml", "log.txt", "metrics.jsonl", "per_case.csv", "metrics.json", "segmentation.png",
                 "checkpoint_last.pth", "backbone.pth"]:
        assert (out / name).is_file(), name
    test = Manifest.read(phantom / "test.csv")
    rows = list(csv.DictReader(open(out / "per_case.csv")))
    assert [(r["id"], r["value"]) for r in rows] == [(i, str(v)) for i in test.ids for v in CLASSES]
    for i, sid in enumerate(test.ids):
        src, ref = nib.load(test.paths[i]), np.asarray(nib.load(test.masks[i]).dataobj)
        pred = nib.load(out / "predictions" / f"{sid}.nii.gz")
        assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)  # the source grid
        p = np.asarray(pred.dataobj)
        assert set(np.unique(p)) <= {0, *CLASSES}
        for r in rows:
            if r["id"] == sid:
                v = int(r["value"])
                assert float(r["dice"]) == pytest.approx(dice(p == v, ref == v), abs=1e-5)
                assert float(r["ref_ml"]) == pytest.approx((ref == v).sum() * 7.5 ** 3 / 1000, rel=1e-5)
    m = json.load(open(out / "metrics.json"))["test"]
    assert set(m) == {"class_3", "class_5", "macro"}
    for v in m.values():
        assert {"dice", "dice_ci95", "hd95", "hd95_ci95", "n_cases"} <= set(v) and v["n_cases"] == len(test)
    return rows


def test_finetune_then_linear_on_its_encoder(phantom, tmp_path):
    ft = tmp_path / "ft"
    main_downstream.main(opts(phantom, ft))
    check_outputs(ft, phantom)
    log = (ft / "log.txt").read_text()
    assert "training masks holding each class: 3:" in log and "best validation global Dice" in log
    lin = tmp_path / "lin"
    main_downstream.main(opts(phantom, lin, "DOWNSTREAM.MODE", "linear", "MODEL.PRETRAINED", str(ft / "backbone.pth")))
    check_outputs(lin, phantom)
    a, b = torch.load(ft / "backbone.pth"), torch.load(lin / "backbone.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # frozen: weights and BN statistics
    assert "loaded" in (lin / "log.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("family", [
    ["MODEL.NAME", "vit_tiny", "MODEL.PATCH_SIZE", "[8, 8, 8]"],
    ["MODEL.NAME", "swin", "MODEL.FEATURE_SIZE", "12", "DATA.ROI", "[64, 64, 64]"],  # 32k, at least 64 (config.py)
    ["MODEL.NAME", "resnet18", "MODEL.FEATURE_SIZE", "4", "DATA.ROI", "[32, 32, 32]"],  # divisible by 32
], ids=["vit", "swin", "resnet"])
def test_every_family_segments_end_to_end(phantom, tmp_path, family):
    """The whole job (train, best epoch, sliding window, writing back) with each decoder; segresnet is above."""
    main_downstream.main(opts(phantom, tmp_path, *family))
    check_outputs(tmp_path, phantom)
    assert f"NAME: {family[1]}" in (tmp_path / "config.yaml").read_text()


class Threshold:
    """A stand-in segmenter: class 1 where the first window channel exceeds 0.5 (HU above the window centre)."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, :1] - 0.5
        return torch.cat([-v, v], dim=1)


def lps_case(tmp_path: Path, phantom: Path) -> Path:
    """A phantom scan rewritten in LPS storage, with the mask 'HU > 300' on that grid."""
    img = nib.load(phantom / "images" / "P0000_S1.nii.gz")
    hu = img.get_fdata(dtype=np.float32)  # HU (slope and intercept applied)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(hu.shape[:2]) - 1
    affine = img.affine @ flip  # the same world voxels, array x and y reversed
    hu = hu[::-1, ::-1].copy()
    assert "".join(nib.aff2axcodes(affine)) == "LPS"
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), str(tmp_path / "lps.nii.gz"))
    nib.save(nib.Nifti1Image((hu > 300).astype(np.uint8), affine), str(tmp_path / "lps_mask.nii.gz"))
    (tmp_path / "lps.csv").write_text("img_path,id,mask_path\nlps.nii.gz,lps,lps_mask.nii.gz\n")
    return tmp_path / "lps.csv"


def seg_cfg(tmp_path, **data):
    cfg = get_defaults()
    cfg.OUTPUT = str(tmp_path / "run")
    cfg.DATA.SPACING, cfg.DATA.ROI, cfg.DATA.WINDOWS = [7.5, 7.5, 7.5], [16, 16, 16], ["300,400"]
    cfg.DATA.NUM_WORKERS, cfg.DOWNSTREAM.SEG_CLASSES, cfg.DOWNSTREAM.BOOTSTRAP = 0, [1], 20
    for k, v in data.items():
        cfg.DATA[k] = v
    return cfg


def test_lps_prediction_overlays_the_source_image_exactly(phantom, tmp_path):
    m = Manifest.read(lps_case(tmp_path, phantom))
    cfg = seg_cfg(tmp_path)  # spacing of the source: only reorientation and the head crop between the grids
    rows, figs = predict_test(cfg, Threshold(), m, torch.device("cpu"))
    out = nib.load(tmp_path / "run" / "predictions" / "lps.nii.gz")
    src = nib.load(tmp_path / "lps.nii.gz")
    assert out.shape == src.shape and np.allclose(out.affine, src.affine)
    np.testing.assert_array_equal(np.asarray(out.dataobj), np.asarray(nib.load(tmp_path / "lps_mask.nii.gz").dataobj))
    assert rows[0]["dice"] == 1.0 and rows[0]["hd95"] == 0.0 and figs[0]["id"] == "lps"


def test_resampled_prediction_returns_to_the_source_grid(phantom, tmp_path):
    m = Manifest.read(lps_case(tmp_path, phantom))
    cfg = seg_cfg(tmp_path, SPACING=[5.0, 5.0, 5.0])  # another grid: nearest neighbour back onto the source
    rows, _ = predict_test(cfg, Threshold(), m, torch.device("cpu"))
    out = nib.load(tmp_path / "run" / "predictions" / "lps.nii.gz")
    assert out.shape == (32, 32, 32) and np.allclose(out.affine, nib.load(tmp_path / "lps.nii.gz").affine)
    assert rows[0]["dice"] > 0.8  # linear resampling of the image blurs the bone outline only


def test_bad_masks_stop_naming_the_file_and_row_or_are_skipped(phantom, tmp_path):
    lps_case(tmp_path, phantom)
    bad = np.zeros((32, 32, 32), np.float32)
    bad[3, 3, 3] = 1.5
    nib.save(nib.Nifti1Image(bad, nib.load(tmp_path / "lps.nii.gz").affine), str(tmp_path / "frac.nii.gz"))
    (tmp_path / "bad.csv").write_text("img_path,id,mask_path\nlps.nii.gz,frac,frac.nii.gz\n"
                                      "lps.nii.gz,lps,lps_mask.nii.gz\nlps.nii.gz,gone,gone.nii.gz\n")
    m = Manifest.read(tmp_path / "bad.csv")
    cfg = seg_cfg(tmp_path)
    with pytest.raises(BadInputError, match=r"frac.nii.gz: mask holds 1 non-integer voxels \(row 1 \(id frac\) of "
                                            r".*bad.csv\), values e.g. \[1.5\]"):
        predict_test(cfg, Threshold(), m, torch.device("cpu"))
    cfg = seg_cfg(tmp_path, ON_ERROR="skip", MAX_BAD_FRACTION=1.0)
    rows, _ = predict_test(cfg, Threshold(), m, torch.device("cpu"))
    assert [r["id"] for r in rows] == ["lps"]
    skipped = list(csv.DictReader(open(tmp_path / "run" / "skipped.csv")))
    assert {Path(r["path"]).name for r in skipped} == {"frac.nii.gz", "gone.nii.gz"}
    assert any("does not exist (row 3 (id gone)" in r["reason"] for r in skipped)


def test_a_class_absent_from_every_mask_stops_naming_the_values(phantom, tmp_path):
    cfg = seg_cfg(tmp_path)
    cfg.DATA.SPACING = [7.5, 7.5, 7.5]
    cfg.DOWNSTREAM.SEG_CLASSES = [3, 9]
    ds = VolumeDataset(Manifest.read(phantom / "train.csv"), cfg, SegmentView(cfg, True), masks=True)
    with pytest.raises(ConfigError, match=r"SEG_CLASSES value\(s\) \[9\] occur in no mask of .*train.csv .*values "
                                          r"\[0, "):
        check_classes(cfg, ds, type("L", (), {"info": print})())


def test_config_refuses_bad_segmentation_settings(phantom, tmp_path):
    for extra, match in ((["DOWNSTREAM.SEG_CLASSES", "[]"], "SEG_CLASSES"),
                         (["DOWNSTREAM.SEG_CLASSES", "[0, 1]"], "SEG_CLASSES"),
                         (["DOWNSTREAM.SEG_OVERLAP", "1.0"], "SEG_OVERLAP"),
                         (["MODEL.NAME", "swin", "DATA.ROI", "[32, 32, 32]"], r"DATA.ROI = \[32, 32, 32\]: the Swin"),
                         (["MODEL.NAME", "resnet18", "DATA.ROI", "[48, 48, 48]"], "divisible by 32")):
        with pytest.raises(ConfigError, match=match):
            main_downstream.main(opts(phantom, tmp_path / "x", *extra))
    draw = fewshot_rows(np.arange(2, 12), 3, 0)
    assert len(set(draw)) == 3 and list(draw) == sorted(draw) and draw.min() >= 2
    with pytest.raises(ConfigError, match="FEW_SHOT_K = 11 labelled volumes, but only 10"):
        fewshot_rows(np.arange(10), 11, 0)


def test_two_processes_score_every_test_case_once(phantom, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "main_downstream.py")] + opts(phantom, out)
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = check_outputs(out, phantom)  # each (case, class) exactly once, in manifest order
    assert len(rows) == len({(r["id"], r["value"]) for r in rows})
    log = (out / "log.txt").read_text()
    assert "on 2 process(es)" in log and log.count("test segmentation (Dice") == 1


TOTALSEG = ROOT.parent / "shared" / "data" / "totalseg"


@pytest.mark.skipif(not (TOTALSEG / "example_ct_sm.nii.gz").is_file(), reason="../shared/data/totalseg not present")
def test_real_abdomen_ct_with_41_structures(tmp_path):
    """A real 3 mm CT and its TotalSegmentator labels: read together, trained a few steps on three organs at
    6 mm, predicted by sliding windows and written back on the source grid with its affine."""
    from data.masks import labels_to_grid
    img, seg = TOTALSEG / "example_ct_sm.nii.gz", TOTALSEG / "example_seg.nii.gz"
    classes = [5, 20, 1]  # the three largest structures of this scan
    (tmp_path / "m.csv").write_text("img_path,id,mask_path\n" + "".join(f"{img},{k},{seg}\n" for k in ("a", "b")))
    (tmp_path / "t.csv").write_text(f"img_path,id,mask_path\n{img},ct,{seg}\n")
    cfg = get_defaults()
    cfg.DATA.SPACING, cfg.DOWNSTREAM.SEG_CLASSES = [6.0, 6.0, 6.0], classes
    ds = VolumeDataset(Manifest.read(tmp_path / "t.csv"), cfg, SegmentView(cfg, False), masks=True)
    hu, meta = ds.load(0)
    assert hu.shape == meta["mask"].shape  # the labels on the image's preprocessed grid
    src = nib.load(seg)
    ref = np.asarray(src.dataobj)
    back = labels_to_grid(np.asarray(meta["mask"]), meta["affine"], ref.shape, src.affine)
    for v in classes:  # nearest neighbour to 6 mm and back keeps the large organs in place
        assert dice(back == v, ref == v) > 0.75
    out = tmp_path / "run"
    main_downstream.main(["--opts", "OUTPUT", str(out), "DATA.TRAIN_CSV", str(tmp_path / "m.csv"),
                          "DATA.TEST_CSV", str(tmp_path / "t.csv"), "DATA.SPACING", "[6.0, 6.0, 6.0]",
                          "DATA.ROI", "[32, 32, 16]", "DATA.WINDOWS", "['soft_tissue']", "DATA.NUM_WORKERS", "0",
                          "DATA.BATCH_SIZE", "2", "MODEL.NAME", "segresnet", "MODEL.FEATURE_SIZE", "4",
                          "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.BASE_LR", "0.1",
                          "DOWNSTREAM.BOOTSTRAP", "20", "DOWNSTREAM.TASK", "segment",
                          "DOWNSTREAM.SEG_CLASSES", str(classes)])
    pred = nib.load(out / "predictions" / "ct.nii.gz")
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, *classes}
    rows = list(csv.DictReader(open(out / "per_case.csv")))
    assert [int(r["value"]) for r in rows] == classes
    assert float(rows[0]["ref_ml"]) == pytest.approx((ref == 5).sum() * 27 / 1000, rel=1e-5)  # 6 digits in the CSV


def test_fewshot_draws_k_labelled_volumes_per_seed(phantom, tmp_path):
    out = tmp_path / "fs"
    summary = main_downstream.main(opts(phantom, out, "DOWNSTREAM.MODE", "fewshot", "DOWNSTREAM.FEW_SHOT_K", "2",
                                        "DOWNSTREAM.FEW_SHOT_SEEDS", "2", "DOWNSTREAM.FEW_SHOT_BASE", "finetune",
                                        "DATA.VAL_CSV", ""))
    train = Manifest.read(phantom / "train.csv")
    drawn = []
    for s in (0, 1):
        rows = Manifest.read(out / f"seed_{s}" / "fewshot_train.csv")
        assert len(rows) == 2 and set(rows.ids) <= set(train.ids)
        for path in rows.masks:  # only scans whose mask holds a class are drawn
            assert np.isin(np.asarray(nib.load(path).dataobj), CLASSES).any()
        drawn.append(list(rows.ids))
        check_outputs(out / f"seed_{s}", phantom)
    labelled = [i for i, p in enumerate(train.masks) if np.isin(np.asarray(nib.load(p).dataobj), CLASSES).any()]
    assert drawn == [[train.ids[i] for i in fewshot_rows(np.array(labelled), 2, s)] for s in (0, 1)]
    per_seed = [json.load(open(out / f"seed_{s}" / "metrics.json"))["test"]["macro"]["dice"] for s in (0, 1)]
    assert summary["test"]["macro"]["dice_mean"] == pytest.approx(np.mean(per_seed))
    assert summary["test"]["macro"]["n_seeds"] == 2 and summary["seeds"] == [0, 1]
    assert json.load(open(out / "metrics.json"))["seeds"] == [0, 1]


class _Echo(torch.nn.Module):
    """A stand-in segmenter whose prediction is its input: channel 0 holds the class index of each voxel."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.w = torch.nn.Parameter(torch.zeros(1))

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1, ...] -> [B, K + 1, ...] one-hot
        return torch.nn.functional.one_hot(x[:, 0].long(), self.k + 1).movedim(-1, 1).float()


def test_validation_score_is_the_pooled_dice_which_gives_nothing_for_predicting_nothing():
    from downstream.segment import SegValidationScorer
    cfg = get_defaults()
    cfg.DATA.ROI = [8, 8, 8]
    cfg.DOWNSTREAM.SEG_OVERLAP = 0.0
    healthy, lesion = np.zeros((8, 8, 8), np.int64), np.zeros((8, 8, 8), np.int64)
    lesion[2:4, 2:4, 2:4] = 1  # 8 voxels
    hit = np.zeros_like(lesion)
    hit[2:4, 2:4, 2:3] = 1  # 4 of them
    fp = np.zeros_like(lesion)
    fp[5:7, 5:7, 5:6] = 1  # 4 voxels on a healthy scan

    def loader(cases):
        return [{"image": torch.from_numpy(p)[None, None].float(), "target": torch.from_numpy(r)[None, None],
                 "index": torch.tensor([i])} for i, (p, r) in enumerate(cases)]

    found = SegValidationScorer(cfg, loader([(healthy, healthy), (hit, lesion), (fp, healthy)]), 1)(_Echo(1), 0)
    assert found["val_dice_macro"] == pytest.approx((1 + 2 * 4 / 12 + 0) / 3)  # per case: 1, 0.667, 0
    assert found["val_dice_global"] == pytest.approx(2 * 4 / (8 + 8)) == found["score"]  # 2 x 4 / (8 pred + 8 ref)
    nothing = SegValidationScorer(cfg, loader([(healthy, healthy), (healthy, lesion), (healthy, healthy)]), 1)(
        _Echo(1), 0)
    assert nothing["val_dice_macro"] == pytest.approx(2 / 3) and nothing["score"] == 0.0
    assert nothing["val_dice_macro"] > found["val_dice_macro"] and nothing["score"] < found["score"]
