"""benchmarks/pretrain_gain.py end to end on a few real AdrenalMNIST3D volumes (--tiny: one epoch per
method, one K, two seeds), and its paired few-shot bootstrap against a direct computation."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from benchmarks.pretrain_gain import feature_spectrum, main, mean_paired_diff
from tools.medmnist_to_manifest import convert

ADRENAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "medmnist" / "adrenalmnist3d_64.npz"


def test_mean_paired_diff_matches_direct_auroc_differences():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(20), np.zeros(40)].astype(int)
    a = rng.normal(size=(3, 60)) + y  # A separates the classes, B hardly
    b = rng.normal(size=(3, 60)) + 0.2 * y
    r = mean_paired_diff(y, a, b, n_bootstrap=300, seed=0)
    direct = np.mean([roc_auc_score(y, a[s]) - roc_auc_score(y, b[s]) for s in range(3)])
    assert r["diff"] == pytest.approx(direct)
    per_row = [roc_auc_score(y, a[s]) - roc_auc_score(y, b[s]) for s in range(3)]
    assert r["diff_range"] == pytest.approx([min(per_row), max(per_row)])
    assert r["ci95"][0] < r["diff"] < r["ci95"][1]
    assert r["significant"] and r["ci95"][0] > 0
    same = mean_paired_diff(y, a, a.copy(), n_bootstrap=50, seed=0)
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0] and not same["significant"]
    # one model against several random inits: the gain over their mean AUROC
    one = mean_paired_diff(y, np.repeat(a[:1], 3, axis=0), b, n_bootstrap=50, seed=0)
    assert one["diff"] == pytest.approx(roc_auc_score(y, a[0]) - np.mean([roc_auc_score(y, row) for row in b]))
    with pytest.raises(ValueError, match="shapes"):
        mean_paired_diff(y, a, b[:2], n_bootstrap=10, seed=0)


def test_feature_spectrum_counts_the_directions_features_use():
    rng = np.random.default_rng(0)
    iso = feature_spectrum(rng.normal(size=(4000, 16)))
    assert iso["dim"] == 16 and 15 < iso["effective_rank"] <= 16 and iso["top10_share"] < 0.7
    line = np.outer(rng.normal(size=500), rng.normal(size=8)) + 1e-6 * rng.normal(size=(500, 8))
    one = feature_spectrum(line)
    assert one["effective_rank"] == pytest.approx(1.0, abs=1e-3) and one["top1_share"] > 0.999
    # two directions of equal variance: exp(log 2) = 2; standardising cannot undo a real collapse
    two = feature_spectrum(np.c_[rng.normal(size=(4000, 2)), np.zeros((4000, 3))])
    assert two["effective_rank"] == pytest.approx(2.0, abs=0.05)
    assert two["effective_rank_standardized"] == pytest.approx(2.0, abs=0.05)


@pytest.mark.slow
@pytest.mark.skipif(not ADRENAL.is_file(), reason=f"{ADRENAL} (shared data) not present")
def test_study_runs_end_to_end_on_a_tiny_setting(tmp_path):
    data = tmp_path / "adrenal"
    convert(str(ADRENAL), str(data), limit=16)  # 16 scans per split: both classes in each
    out = tmp_path / "study"
    report = main(["--data", str(data), "--out", str(out), "--tiny", "--shots", "2"])
    assert set(report["linear"]) == {"random", "mae", "dino", "simclr"}
    for b, r in report["linear"].items():
        assert r["pool"] in ("cls", "mean") and 0 <= r["auroc"] <= 1
        assert 1 <= r["features"]["effective_rank"] <= r["features"]["dim"]
        if b != "random":
            vs = r["vs_random"]
            assert set(vs) >= {"diff", "ci95", "p_bootstrap", "significant", "per_init", "inits_beaten"}
            assert len(vs["per_init"]) == 2 and all("p_value" in c for c in vs["per_init"])
            assert vs["diff"] == pytest.approx(np.mean([c["diff"] for c in vs["per_init"]]))
    # two random inits: two different backbones, one pool for both, the row their mean
    rnd = report["linear"]["random"]
    assert report["random_inits"] == 2 and [d["seed"] for d in rnd["inits"]] == [0, 1]
    w0, w1 = (torch.load(out / "random_init" / f"seed_{i}" / "backbone.pth", weights_only=True) for i in (0, 1))
    assert w0.keys() == w1.keys() and any(not torch.equal(w0[k], w1[k]) for k in w0 if w0[k].is_floating_point())
    assert all(Path(d["folder"]).name.endswith(rnd["pool"]) for d in rnd["inits"])
    assert rnd["auroc"] == pytest.approx(np.mean([d["auroc"] for d in rnd["inits"]]))
    assert rnd["auroc_range"][0] <= rnd["auroc"] <= rnd["auroc_range"][1]
    assert len(report["fewshot"]["2"]["random"]["auroc_init_means"]) == 2
    for m in ("mae", "dino", "simclr"):
        assert report["pretrain"][m]["epochs"] == 1
        f = report["fewshot"]["2"][m]
        assert len(list(Path(f["folder"]).glob("seed_*/predictions.csv"))) == 2
        assert -1 <= f["vs_random"]["diff"] <= 1
    assert "vs_random" in report["supervised"]
    saved = json.loads((out / "pretrain_gain.json").read_text())
    assert saved["tiny"] and saved["machine"]["cpu_cores"] >= 1
    md = (out / "pretrain_gain.md").read_text()
    assert md.count("\n") == 2 + 4 + 1 and "supervised from scratch" in md
    # a second call reuses every finished run
    again = main(["--data", str(data), "--out", str(out), "--tiny", "--shots", "2"])
    assert set(again["seconds"]) == {"preprocess"}
