"""benchmarks/pretrain_gain.py end to end on a few real AdrenalMNIST3D volumes (--tiny: one epoch per
run, two draws and inits, a ViT and a CNN), its label budgets, and its paired bootstrap against a direct
computation."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from benchmarks.pretrain_gain import (budget_name, budget_rows, main, mean_auroc, mean_paired_diff, parse_budget,
                                      pretrain_finished)
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


def test_mean_auroc_is_the_mean_over_draws_with_a_bootstrap_ci():
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(30), np.zeros(50)].astype(int)
    p = rng.normal(size=(3, 80)) + y
    r = mean_auroc(y, p, n_bootstrap=400, seed=0)
    assert r["auroc"] == pytest.approx(np.mean([roc_auc_score(y, row) for row in p]))
    assert r["aurocs"] == pytest.approx([roc_auc_score(y, row) for row in p])
    assert r["ci95"][0] < r["auroc"] < r["ci95"][1] and r["ci95"][1] - r["ci95"][0] < 0.3
    # the CI is the percentile of the per-resample mean AUROC: rebuild one resample by hand
    from evaluation.metrics import stratified_resamples
    _, idx = next(stratified_resamples(np.flatnonzero(y == 1), np.flatnonzero(y == 0), 400, 0))
    by_hand = np.array([np.mean([roc_auc_score(y[i], row[i]) for row in p]) for i in idx])
    assert np.percentile(by_hand, [2.5, 97.5]) == pytest.approx(r["ci95"], abs=1e-9)


def test_budgets_are_class_stratified_draws():
    assert parse_budget("16") == ("per_class", 16) and parse_budget("10%") == ("fraction", 0.1)
    assert budget_name("16") == "k16" and budget_name("10%") == "p10" and budget_name("100%") == "p100"
    for bad in ("0", "-3", "1.5", "0%", "150%", "ten"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)
    y = np.r_[np.ones(40), np.zeros(160), [np.nan] * 5]
    k = budget_rows(y, "16", seed=0)
    assert (y[k] == 1).sum() == 16 and (y[k] == 0).sum() == 16
    assert not np.array_equal(k, budget_rows(y, "16", seed=1))  # draws differ
    assert np.array_equal(k, budget_rows(y, "16", seed=0))  # and repeat
    f = budget_rows(y, "10%", seed=0)
    assert (y[f] == 1).sum() == 4 and (y[f] == 0).sum() == 16
    assert np.array_equal(budget_rows(y, "100%", seed=3), np.flatnonzero(~np.isnan(y)))
    with pytest.raises(ValueError, match="class 1"):
        budget_rows(y, "1%", seed=0)  # 0.4 positives: the class would be empty
    with pytest.raises(ValueError, match="class 1"):
        budget_rows(y, "41", seed=0)


def test_an_interrupted_pretraining_is_not_finished(tmp_path):
    """backbone.pth is written after every epoch: the study resumes a run whose checkpoint lacks epochs."""
    from config import get_config, save_config
    save_config(get_config(["--opts", "TRAIN.EPOCHS", "3", "TRAIN.WARMUP_EPOCHS", "1", "OUTPUT", str(tmp_path)]),
                str(tmp_path))
    assert not pretrain_finished(tmp_path)  # no checkpoint yet
    (tmp_path / "backbone.pth").write_bytes(b"")
    for epoch, done in ((2, False), (3, True)):
        torch.save({"epoch": epoch}, tmp_path / "checkpoint_last.pth")
        assert pretrain_finished(tmp_path) is done


def test_bad_study_input_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no train.csv"):
        main(["--data", str(tmp_path), "--out", str(tmp_path / "o")])
    for s in ("train", "val", "test"):
        (tmp_path / f"{s}.csv").write_text(f"img_path,id,label\na.nii.gz,{s}_a,1\nb.nii.gz,{s}_b,0\n")
    (tmp_path / "dup").mkdir()
    for s in ("train", "val", "test"):
        (tmp_path / "dup" / f"{s}.csv").write_text("img_path,id,label\na.nii.gz,a,1\nb.nii.gz,b,0\n")
    with pytest.raises(SystemExit, match="ids repeat across train/val/test"):
        main(["--data", str(tmp_path / "dup"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="leaves the class empty"):
        main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--budgets", "10%"])
    with pytest.raises(SystemExit, match="--archs vgg"):
        main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--archs", "vgg", "--budgets", "100%"])
    with pytest.raises(SystemExit, match="--methods byol: neither a method nor a backbone of --archs vit_tiny"):
        main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--archs", "vit_tiny", "--methods", "byol",
              "--budgets", "100%"])
    bad = tmp_path / "archs.yaml"
    bad.write_text("a:\n  model: {}\n  pretrain:\n    dino_x: {method: byol}\n")
    with pytest.raises(SystemExit, match=r"a.pretrain.dino_x has no known method"):
        main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--archs-file", str(bad), "--archs", "a",
              "--budgets", "100%"])


def test_recipe_variants_of_the_archs_file_name_their_method():
    from benchmarks.pretrain_gain import method_of, read_archs
    archs = read_archs(Path(__file__).resolve().parents[2] / "benchmarks" / "pretrain_gain_archs.yaml", ["vit_tiny"])
    variants = archs["vit_tiny"]["pretrain"]
    assert method_of("dino_koleo", variants["dino_koleo"]) == "dino" and method_of("mae", variants["mae"]) == "mae"


@pytest.mark.slow
@pytest.mark.skipif(not ADRENAL.is_file(), reason=f"{ADRENAL} (shared data) not present")
def test_study_runs_end_to_end_on_a_tiny_setting(tmp_path):
    data = tmp_path / "adrenal"
    convert(str(ADRENAL), str(data), limit=16)  # 16 scans per split: both classes in each
    out = tmp_path / "study"
    argv = ["--data", str(data), "--out", str(out), "--tiny", "--archs", "vit_tiny", "resnet18",
            "--methods", "simclr", "--budgets", "2"]  # 100 % is budget_rows' (tested above): one budget keeps it short
    report = main(argv)
    assert report["archs"] == ["vit_tiny", "resnet18"] and report["draws"] == 2
    for arch, res in report["results"].items():
        assert list(res["pretrain"]) == ["simclr"]
        p = res["pretrain"]["simclr"]
        assert p["epochs"] == 1 and p["feature_rank_init"] >= 1 and len(p["feature_rank"]) == 1  # the monitor
        assert set(res["features"]) == {"simclr", "random_s0", "random_s1"}
        assert res["features"]["simclr"]["pool"] in (("cls", "mean") if arch == "vit_tiny" else ("avg",))
        # two random inits: two different backbones
        w0, w1 = (torch.load(out / arch / "random_init" / f"seed_{i}" / "backbone.pth", weights_only=True)
                  for i in (0, 1))
        assert any(not torch.equal(w0[k], w1[k]) for k in w0 if w0[k].is_floating_point())
        for proto in ("linear", "finetune"):
            assert list(res[proto]) == ["k2"]
            k2 = res[proto]["k2"]
            assert k2["n_labelled"] == 4
            assert len(k2["simclr"]["aurocs"]) == 2
            assert len(k2["random"]["aurocs"]) == (4 if proto == "linear" else 2)  # inits x draws / draw d <-> init d
            vs = k2["simclr"]["vs_random"]
            assert -1 <= vs["diff"] <= 1 and vs["ci95"][0] <= vs["ci95"][1]
        # fine-tuning: draw d of the pretrained backbone against random init d, both read from their files
        ft = res["finetune"]["k2"]
        folders = [out / arch / f"ft_{b}_k2_d{d}_lr{res['finetune_lr']['chosen']:g}" for b in ("simclr", "random")
                   for d in (0, 1)]
        aurocs = [json.loads((f / "metrics.json").read_text())["test"]["label"]["auroc"] for f in folders]
        assert ft["simclr"]["aurocs"] + ft["random"]["aurocs"] == pytest.approx(aurocs, abs=1e-9)
        assert ft["simclr"]["vs_random"]["diff"] == pytest.approx(np.mean(aurocs[:2]) - np.mean(aurocs[2:]))
        cfg = (folders[2] / "config.yaml").read_text()
        assert "random_init/seed_0/backbone.pth" in cfg and "k2_d0.csv" in cfg
        draw = (out / "draws" / "k2_d0.csv").read_text().splitlines()
        assert len(draw) == 1 + 4
    # the resnet18 lr grid of pretrain_gain_archs.yaml ran on validation at the first budget below 100 %
    lr = report["results"]["resnet18"]["finetune_lr"]
    assert lr["budget"] == "2" and len(lr["val_auroc"]) == 2 and lr["chosen"] in (2e-3, 8e-3)
    saved = json.loads((out / "pretrain_gain.json").read_text())
    assert saved["tiny"] and saved["machine"]["cpu_cores"] >= 1
    md = (out / "pretrain_gain.md").read_text()
    assert "### vit_tiny" in md and "### resnet18" in md and md.count("| simclr |") == 2
    assert (out / "label_efficiency.png").stat().st_size > 10_000
    # a second call reuses every finished run
    again = main(argv)
    assert again["seconds"] == {}


@pytest.mark.slow
@pytest.mark.skipif(not ADRENAL.is_file(), reason=f"{ADRENAL} (shared data) not present")
def test_the_study_alice_recipe_pairs_volumes_through_the_identity_template(tmp_path):
    """MedMNIST volumes are centred: configs/study/alice.yaml takes DATA.TEMPLATE identity, so every anchor
    view comes from another volume (cross_fraction 1) without any registration."""
    import subprocess
    import sys
    from benchmarks.pretrain_gain import method_of, read_archs
    repo = Path(__file__).resolve().parents[2]
    archs = read_archs(repo / "benchmarks" / "pretrain_gain_archs.yaml", ["vit_tiny"])
    assert method_of("alice", archs["vit_tiny"]["pretrain"]["alice"]) == "alice"
    data = tmp_path / "adrenal"
    convert(str(ADRENAL), str(data), limit=8)
    r = subprocess.run([sys.executable, "main_pretrain_alice.py", "--cfg", "configs/study/alice.yaml", "--opts",
                        "OUTPUT", str(tmp_path / "run"), "DATA.TRAIN_CSV", str(data / "train.csv"),
                        "DATA.VAL_CSV", "", "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "DATA.BATCH_SIZE", "4",
                        "DATA.NUM_WORKERS", "0", "MONITOR.NUM_SCANS", "4"],
                       cwd=repo, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epoch = [row for row in rows if "epoch_s" in row][-1]
    assert epoch["cross_fraction"] == 1.0 and np.isfinite(epoch["loss"]) and "feature_rank" in epoch
    assert (tmp_path / "run" / "backbone.pth").is_file()
