"""main_downstream.py end to end on a tiny phantom: finetune, linear (trained and cached features),
fewshot; the contract's files; metrics.json recomputed with scikit-learn from the predictions the run
wrote; a frozen backbone left bit-identical; batch of one; two processes under torchrun writing every
test sample once; few-shot draws."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score, roc_curve

import main_downstream
from config import ConfigError, get_defaults
from data.manifest import Manifest, StringArray
from evaluation.metrics import read_predictions_csv
from downstream.run import fewshot_rows

ROOT = Path(__file__).resolve().parents[2]
METRIC_KEYS = {"auroc", "auroc_ci95", "ap", "f1", "sensitivity", "specificity", "accuracy", "threshold",
               "n_pos", "n_neg"}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """24 phantom scans of 32^3 (7.5 mm) with patient-level splits; two blank SDH labels in train."""
    from data.phantom import write_dataset
    out = tmp_path_factory.mktemp("phantom")
    write_dataset(out, n=24, size=32, seed=0)
    rows = list(csv.DictReader(open(out / "train.csv")))
    for r in rows[:2]:
        r["SDH"] = ""
    with open(out / "train_blank.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def opts(phantom, out, *extra, train="train.csv"):
    return ["--opts", "OUTPUT", str(out), "DATA.TRAIN_CSV", str(phantom / train),
            "DATA.VAL_CSV", str(phantom / "val.csv"), "DATA.TEST_CSV", str(phantom / "test.csv"),
            "DATA.SPACING", "[7.5, 7.5, 7.5]", "DATA.ROI", "[32, 32, 32]", "DATA.WINDOWS", "['brain']",
            "DATA.NUM_WORKERS", "0", "DATA.BATCH_SIZE", "4", "MODEL.NAME", "vit_tiny", "MODEL.PATCH_SIZE",
            "[8, 8, 8]", "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.SAVE_EVERY", "0",
            "TRAIN.BASE_LR", "0.01", "DOWNSTREAM.BOOTSTRAP", "50", "DOWNSTREAM.GROUP_COLUMN", "patient_id", *extra]


def check_run(out: Path, phantom: Path, labels=("ICH",), trained=True) -> dict:
    """The contract's files of a downstream run; returns metrics.json."""
    names = ["config.yaml", "log.txt", "metrics.jsonl", "predictions.csv", "metrics.json", "roc_pr.png"]
    names += ["checkpoint_last.pth", "checkpoint_best.pth", "backbone.pth"] if trained else ["probe.pth"]
    for name in names:
        assert (out / name).is_file(), f"{out}/{name} missing"
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"val", "test", "test_group"}
    for section in metrics.values():
        assert set(section) == set(labels) | {"macro"}
        for label in labels:
            assert METRIC_KEYS <= set(section[label])
    assert metrics["test"][labels[0]]["threshold_source"] == "val"
    ids, groups, pred_labels, probs, targets = read_predictions_csv(str(out / "predictions.csv"))
    test = Manifest.read(phantom / "test.csv", label_columns=list(labels), group_column="patient_id")
    assert sorted(ids) == sorted(test.ids) and len(set(ids)) == len(ids)  # every test scan once
    assert pred_labels == list(labels) and groups is not None
    assert ((probs >= 0) & (probs <= 1)).all()
    log = (out / "log.txt").read_text()
    assert "AUROC [95% CI]" in log and "[test_group]" in log
    check_metrics_from_files(out, metrics, labels)
    return metrics


def read_csv(path: Path, labels) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(groups, probs [N, L], targets [N, L] NaN = blank) of a predictions file, read with csv alone."""
    rows = list(csv.DictReader(open(path)))
    probs = np.array([[float(r[f"{n}_prob"]) for n in labels] for r in rows])
    targets = np.array([[float(r[f"{n}_target"]) if r[f"{n}_target"] else np.nan for n in labels] for r in rows])
    return [r["group"] for r in rows], probs, targets


def by_group(groups, probs, targets):
    """Patient level: the max probability over a patient's scans, positive when any labelled scan is."""
    ids = sorted(set(groups))
    rows = [[i for i, g in enumerate(groups) if g == gid] for gid in ids]
    p = np.array([probs[r].max(axis=0) for r in rows])
    t = np.array([[np.nan if np.isnan(targets[r, j]).all() else np.nanmax(targets[r, j])
                   for j in range(targets.shape[1])] for r in rows])
    return p, t


def youden(y, p):
    fpr, tpr, thr = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return thr[best] if np.isfinite(thr[best]) else np.nextafter(p.max(), np.inf)


def stratified_ci(y, p, n_bootstrap, seed):
    """Percentile CI of the AUROC over resamples drawn by hand: positives, then negatives, one generator."""
    gen = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    pi = pos[gen.integers(0, pos.size, (n_bootstrap, pos.size))]
    ni = neg[gen.integers(0, neg.size, (n_bootstrap, neg.size))]
    aucs = [((p[a][:, None] > p[b][None]) + 0.5 * (p[a][:, None] == p[b][None])).mean() for a, b in zip(pi, ni)]
    return np.percentile(aucs, [2.5, 97.5])


def check_metrics_from_files(out: Path, metrics: dict, labels) -> None:
    """Recompute metrics.json from predictions_val.csv and predictions.csv with scikit-learn: AUROC, AP, the
    Youden thresholds on validation (scan and patient level) applied to test, sensitivity, specificity,
    accuracy, F1, counts, the bootstrap CI (SEED + j, DOWNSTREAM.BOOTSTRAP resamples) and the macro means."""
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    seed, n_boot = cfg["SEED"], cfg["DOWNSTREAM"]["BOOTSTRAP"]
    val_groups, val_p, val_t = read_csv(out / "predictions_val.csv", labels)
    test_groups, test_p, test_t = read_csv(out / "predictions.csv", labels)
    splits = {"val": (val_p, val_t, None), "test": (test_p, test_t, "val"),
              "test_group": (*by_group(test_groups, test_p, test_t), "val_group")}
    val_group_p, val_group_t = by_group(val_groups, val_p, val_t)
    for section, (prob, target, thr_from) in splits.items():
        aucs = []
        for j, name in enumerate(labels):
            m = metrics[section][name]
            keep = ~np.isnan(target[:, j])
            y, p = target[keep, j].astype(int), prob[keep, j]
            assert (m["n_pos"], m["n_neg"]) == (int(y.sum()), int((1 - y).sum())), (section, name)
            if thr_from is None:
                thr = youden(y, p) if 0 < y.sum() < y.size else 0.5
            else:
                vp, vt = (val_p, val_t) if thr_from == "val" else (val_group_p, val_group_t)
                vkeep = ~np.isnan(vt[:, j])
                vy = vt[vkeep, j]
                thr = youden(vy, vp[vkeep, j]) if 0 < vy.sum() < vy.size else 0.5
                assert m["threshold_source"] == (thr_from if 0 < vy.sum() < vy.size else "default")
            assert m["threshold"] == pytest.approx(thr, rel=1e-6), (section, name)  # files hold 8 digits
            pred = (p >= thr).astype(int)  # the threshold as rounded in the file: a validation score itself
            assert m["accuracy"] == pytest.approx((pred == y).mean(), abs=1e-12), (section, name)
            assert m["specificity"] == pytest.approx(((pred == 0) & (y == 0)).sum() / (y == 0).sum(), abs=1e-12)
            if y.sum():
                assert m["sensitivity"] == pytest.approx(((pred == 1) & (y == 1)).sum() / y.sum(), abs=1e-12)
                assert m["f1"] == pytest.approx(f1_score(y, pred), abs=1e-12), (section, name)
            if 0 < y.sum() < y.size:
                aucs.append(roc_auc_score(y, p))
                assert m["auroc"] == pytest.approx(aucs[-1], abs=1e-9), (section, name)
                assert m["ap"] == pytest.approx(average_precision_score(y, p), abs=1e-9), (section, name)
                np.testing.assert_allclose(m["auroc_ci95"], stratified_ci(y, p, n_boot, seed + j), atol=1e-9)
            else:
                assert m["auroc"] is None and m["auroc_ci95"] is None
        assert metrics[section]["macro"]["auroc"] == (pytest.approx(np.mean(aucs), abs=1e-9) if aucs else None)


def test_finetune_multilabel_with_blank_labels_writes_contract_files(phantom, tmp_path):
    out = tmp_path / "ft"
    main_downstream.main(opts(phantom, out, "DOWNSTREAM.MODE", "finetune", "DOWNSTREAM.LABELS", "['ICH', 'SDH']",
                              "TRAIN.LAYER_DECAY", "0.75", train="train_blank.csv"))
    check_run(out, phantom, labels=("ICH", "SDH"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in rows if "epoch_s" in r][-1]
    assert {"val_loss", "val_auroc_macro", "val_auroc_ICH", "val_auroc_SDH", "score"} <= set(epoch)
    assert any("test_auroc_ICH" in r for r in rows)  # the final scalars, also in TensorBoard
    best = torch.load(out / "checkpoint_best.pth", weights_only=True)
    assert best["epoch"] == 0


def test_linear_probe_resnet18_batch_of_one_leaves_pretrained_backbone_bit_identical(phantom, tmp_path):
    cfg = get_defaults()
    cfg.MODEL.NAME, cfg.MODEL.FEATURE_SIZE, cfg.DATA.WINDOWS = "resnet18", 8, ["brain"]
    from models.zoo import build_backbone
    torch.manual_seed(5)
    bb = build_backbone(cfg)
    for m in bb.modules():  # non-trivial BatchNorm statistics that a train-mode pass would move
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    torch.save(bb.state_dict(), tmp_path / "pre.pth")
    out = tmp_path / "lin"
    main_downstream.main(opts(phantom, out, "DOWNSTREAM.MODE", "linear", "MODEL.NAME", "resnet18",
                              "MODEL.FEATURE_SIZE", "8", "MODEL.PRETRAINED", str(tmp_path / "pre.pth"),
                              "DATA.BATCH_SIZE", "1"))
    check_run(out, phantom)
    before = torch.load(tmp_path / "pre.pth", weights_only=True)
    after = torch.load(out / "backbone.pth", weights_only=True)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    best = torch.load(out / "checkpoint_best.pth", weights_only=True)["model"]
    assert all(torch.equal(before[k], best[f"backbone.{k}"]) for k in before)
    log = (out / "log.txt").read_text()
    assert "linear probe (frozen backbone)" in log and "loaded" in log
    assert "0.00M trainable parameters" in log  # only the head (65 weights) trains


def test_linear_feature_cache_fits_logistic_regression_and_adapts_position_embedding(phantom, tmp_path):
    cfg = get_defaults()
    cfg.MODEL.NAME, cfg.MODEL.PATCH_SIZE, cfg.DATA.ROI = "vit_tiny", [8, 8, 8], [16, 16, 16]
    cfg.MODEL.POS_EMBED, cfg.DATA.WINDOWS = "learned", ["brain"]
    from models.zoo import build_backbone
    torch.save(build_backbone(cfg).state_dict(), tmp_path / "roi16.pth")  # pretrained at another ROI
    out = tmp_path / "cache"
    metrics = main_downstream.main(opts(phantom, out, "DOWNSTREAM.MODE", "linear", "DOWNSTREAM.FEATURE_CACHE", "True",
                                        "MODEL.POS_EMBED", "learned", "MODEL.PRETRAINED", str(tmp_path / "roi16.pth")))
    check_run(out, phantom, trained=False)
    assert metrics["test"]["ICH"]["n_pos"] + metrics["test"]["ICH"]["n_neg"] == 5
    log = (out / "log.txt").read_text()
    assert "position embedding resized [2, 2, 2] -> [4, 4, 4]" in log
    assert "chosen by validation macro AUROC" in log
    probe = torch.load(out / "probe.pth", weights_only=True)
    assert probe["coef"].shape == (1, 192)


@pytest.mark.parametrize("cache", [False, True])
def test_fewshot_writes_one_folder_per_seed_and_a_summary(phantom, tmp_path, cache):
    out = tmp_path / "fs"
    summary = main_downstream.main(opts(phantom, out, "DOWNSTREAM.MODE", "fewshot", "DOWNSTREAM.FEW_SHOT_K", "2",
                                        "DOWNSTREAM.FEW_SHOT_SEEDS", "2", "DOWNSTREAM.FEATURE_CACHE", str(cache),
                                        "SEED", "3"))
    draws = []
    for s in (3, 4):
        check_run(out / f"seed_{s}", phantom, trained=not cache)
        rows = list(csv.DictReader(open(out / f"seed_{s}" / "fewshot_train.csv")))
        assert sorted(r["ICH"] for r in rows) == ["0", "0", "1", "1"]
        draws.append(sorted(r["id"] for r in rows))
    assert draws[0] != draws[1]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n_seeds"] == 2 and saved["seeds"] == [3, 4]
    # the summary is the mean and sample std over the seed folders' metrics.json
    per_seed = [json.loads((out / f"seed_{s}" / "metrics.json").read_text()) for s in (3, 4)]
    for section in ("test", "test_group"):
        aucs = [m[section]["ICH"]["auroc"] for m in per_seed if m[section]["ICH"]["auroc"] is not None]
        assert saved[section]["ICH"]["auroc_mean"] == pytest.approx(np.mean(aucs), abs=1e-12)
        assert saved[section]["ICH"]["auroc_std"] == (pytest.approx(np.std(aucs, ddof=1), abs=1e-12)
                                                      if len(aucs) > 1 else None)
    assert summary["test"]["ICH"]["n_seeds"] == 2
    assert "mean ± std over 2 seeds" in (out / "log.txt").read_text()


def few_shot_manifest(n=40):
    rng = np.random.default_rng(0)
    labels = np.stack([rng.random(n) < 0.3, rng.random(n) < 0.5], 1).astype(np.float32)
    labels[::9, 1] = np.nan
    ids = StringArray(f"s{i}" for i in range(n))
    return Manifest(ids, StringArray(f"/x/s{i}.nii" for i in range(n)), labels, ["A", "B"])


def test_fewshot_rows_are_without_replacement_balanced_and_reproducible():
    m = few_shot_manifest()
    rows = fewshot_rows(m, ["A", "B"], 3, seed=7)
    assert len(set(rows)) == len(rows)  # no repeats
    for j in range(2):  # at least k positives and k negatives of every label
        y = m.labels[rows, j]
        assert (y == 1).sum() >= 3 and (y == 0).sum() >= 3
    single = fewshot_rows(m, ["A"], 3, seed=7)
    assert len(single) == 6 and (m.labels[single, 0] == 1).sum() == 3  # exactly k + k for one label
    assert np.array_equal(rows, fewshot_rows(m, ["A", "B"], 3, seed=7))
    assert not np.array_equal(rows, fewshot_rows(m, ["A", "B"], 3, seed=8))
    with pytest.raises(ValueError, match="'A'"):
        fewshot_rows(m, ["A"], 30, seed=0)


def test_config_contradictions_stop_before_anything_runs(phantom, tmp_path):
    with pytest.raises(ConfigError, match="FEATURE_CACHE"):
        main_downstream.main(opts(phantom, tmp_path / "x", "DOWNSTREAM.MODE", "linear", "DOWNSTREAM.FEATURE_CACHE",
                                  "True", "DOWNSTREAM.HEAD", "attentive"))
    with pytest.raises(ConfigError, match="TEST_CSV"):
        main_downstream.main(opts(phantom, tmp_path / "x", "DATA.TEST_CSV", ""))
    assert not (tmp_path / "x").exists()


def test_two_processes_write_every_test_sample_once(phantom, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "main_downstream.py")] + opts(phantom, out, "DOWNSTREAM.MODE", "finetune", "DATA.BATCH_SIZE", "2",
                                                   "TRAIN.EPOCHS", "2", "DOWNSTREAM.HEAD", "attentive")
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    check_run(out, phantom)
    log = (out / "log.txt").read_text()
    assert "on 2 process(es)" in log
    assert log.count("results (thresholds") == 1  # written once, by rank 0
    ids, *_ = read_predictions_csv(str(out / "predictions_val.csv"))
    assert sorted(ids) == sorted(Manifest.read(phantom / "val.csv").ids)
