"""Segmentation metrics against hand-computed cases: Dice, HD95 in mm with anisotropic voxels, empty
references, volumes; the summary's means, counts and bootstrap CIs; per_case.csv; the figure."""
import csv

import numpy as np
import pytest

from evaluation.segmentation import case_metrics, format_table, plot_cases, summarize, write_per_case


def test_dice_and_volumes_by_hand():
    ref = np.zeros((10, 10, 10), np.int16)
    pred = np.zeros_like(ref)
    ref[2:6, 2:6, 2:6] = 1  # 64 voxels
    pred[3:7, 2:6, 2:6] = 1  # 64 voxels, 48 shared
    ref[8, 8, 8] = 2
    (r1, r2), = [case_metrics(pred, ref, ["a", "b"], [1.0, 2.0, 0.5])]
    assert r1["dice"] == pytest.approx(2 * 48 / 128)
    assert r1["ref_ml"] == pytest.approx(64 * 1.0 / 1000) and r1["pred_ml"] == pytest.approx(64 / 1000)
    assert r2["dice"] == 0.0 and np.isnan(r2["hd95"])  # class b missed entirely: Dice 0, no outline to measure


def test_hd95_in_mm_with_anisotropic_voxels():
    ref = np.zeros((12, 6, 6), np.int16)
    pred = np.zeros_like(ref)
    ref[2, 3, 3] = 1
    pred[5, 3, 3] = 1  # 3 voxels apart along x, 2 mm voxels -> 6 mm
    (r,) = case_metrics(pred, ref, ["a"], [2.0, 1.0, 1.0])
    assert r["hd95"] == pytest.approx(6.0) and r["dice"] == 0.0
    (r,) = case_metrics(pred, ref, ["a"], [2.0, 1.0, 1.0], with_hd95=False)
    assert np.isnan(r["hd95"])


def test_empty_reference():
    ref = np.zeros((6, 6, 6), np.int16)
    (both_empty,) = case_metrics(ref.copy(), ref, ["a"], [1, 1, 1])
    assert both_empty["dice"] == 1.0 and np.isnan(both_empty["hd95"])  # nothing there, nothing predicted
    pred = ref.copy()
    pred[1, 1, 1] = 1
    (false_pos,) = case_metrics(pred, ref, ["a"], [1, 1, 1])
    assert false_pos["dice"] == 0.0 and np.isnan(false_pos["hd95"]) and false_pos["pred_ml"] == pytest.approx(0.001)


def test_summary_means_counts_and_bootstrap():
    dice = np.array([[1.0, 0.5], [0.5, 0.0], [0.0, 1.0], [0.5, 0.5]])
    hd = np.array([[1.0, np.nan], [3.0, 2.0], [np.nan, np.nan], [5.0, 4.0]])
    present = np.array([[True, True], [True, False], [False, True], [True, True]])
    m = summarize(dice, hd, present, ["a", "b"], n_bootstrap=200, seed=0)
    assert m["a"]["dice"] == pytest.approx(0.5) and m["a"]["n_cases"] == 4
    assert m["a"]["hd95"] == pytest.approx(3.0) and m["a"]["n_cases_hd95"] == 3
    assert m["b"]["hd95"] == pytest.approx(3.0) and m["b"]["n_cases_hd95"] == 2
    assert m["macro"]["dice"] == pytest.approx(np.mean([0.75, 0.25, 0.5, 0.5]))
    assert m["macro"]["hd95"] == pytest.approx(np.mean([1.0, 2.5, 4.5]))  # per case over its scored classes
    lo, hi = m["a"]["dice_ci95"]
    assert 0.0 <= lo < 0.5 < hi <= 1.0
    # the lesion Dice: only the cases whose reference holds the class
    assert m["a"]["dice_present"] == pytest.approx(np.mean([1.0, 0.5, 0.5])) and m["a"]["n_cases_present"] == 3
    assert m["b"]["dice_present"] == pytest.approx(np.mean([0.5, 1.0, 0.5])) and m["b"]["n_cases_present"] == 3
    assert m["macro"]["dice_present"] == pytest.approx(np.mean([0.75, 0.5, 1.0, 0.5]))  # case 2: a only
    lo, hi = m["a"]["dice_present_ci95"]
    assert 0.5 <= lo <= m["a"]["dice_present"] <= hi <= 1.0
    assert summarize(dice, hd, present, ["a", "b"], n_bootstrap=200, seed=0) == m  # seeded
    assert summarize(dice, hd, present, ["a", "b"], n_bootstrap=0)["a"]["dice_ci95"] is None
    none = summarize(dice, hd, np.zeros_like(present), ["a", "b"], n_bootstrap=50)
    assert none["a"]["dice_present"] is None and none["a"]["n_cases_present"] == 0 and none["a"]["dice"] == 0.5
    with pytest.raises(ValueError, match="differ in shape"):
        summarize(dice, hd, present[:2], ["a", "b"])
    table = format_table(m)
    assert "macro" in table and "0.500 [" in table and "Dice there" in table


def test_per_case_csv_and_figure(tmp_path):
    rows = [{"id": "s1", "class": "a", "value": 3, "dice": 0.5, "hd95": float("nan"), "ref_ml": 1.0, "pred_ml": 2.0}]
    write_per_case(str(tmp_path / "per_case.csv"), rows)
    got = list(csv.DictReader(open(tmp_path / "per_case.csv")))
    assert got == [{"id": "s1", "class": "a", "value": "3", "dice": "0.5", "hd95": "", "ref_ml": "1",
                    "pred_ml": "2"}]
    m = np.zeros((8, 8), bool)
    m[2:5, 2:5] = True
    plot_cases(str(tmp_path / "f.png"), [{"id": "s1", "image": np.random.rand(8, 8), "ref": m, "pred": m.T}])
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_paired_dice_comparison(tmp_path):
    from evaluation.compare_segmentation import compare_per_case, format_comparison, paired_dice
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.7, 30)
    better = paired_dice(base + 0.1 + rng.normal(0, 0.01, 30), base, n_bootstrap=500)
    assert better["diff"] == pytest.approx(0.1, abs=0.01) and better["significant"]
    assert better["ci95"][0] > 0 and better["p_value"] < 1e-4
    noise = paired_dice(base + rng.normal(0, 0.05, 30), base, n_bootstrap=500)
    assert not noise["significant"] and noise["ci95"][0] < 0 < noise["ci95"][1]
    same = paired_dice(base, base)
    assert same["diff"] == 0 and same["p_value"] is None and not same["significant"]
    # two per_case.csv files: matched by (id, class); macro = per-case mean over classes
    for name, shift in (("a", 0.2), ("b", 0.0)):  # class_1 is absent from the references of cases 0-9
        rows = [{"id": f"s{i}", "class": c, "value": v, "dice": min(1.0, base[i] + shift * (c == "class_1")),
                 "hd95": 1.0, "ref_ml": 0.0 if c == "class_1" and i < 10 else 1.0, "pred_ml": 1.0}
                for i in range(30) for c, v in (("class_1", 1), ("class_2", 2))]
        (tmp_path / name).mkdir()
        write_per_case(str(tmp_path / name / "per_case.csv"), rows)
    r = compare_per_case(str(tmp_path / "a" / "per_case.csv"), str(tmp_path / "b" / "per_case.csv"),
                         name_a="pretrained", name_b="random")
    assert r["class_1"]["significant"] and r["class_2"]["diff"] == 0 and not r["class_2"]["significant"]
    assert r["macro"]["diff"] == pytest.approx(r["class_1"]["diff"] / 2, abs=1e-6)
    assert r["class_1"]["sentence"].startswith("pretrained is significantly better than random")
    assert "cannot tell" in r["class_2"]["sentence"] and "macro" in format_comparison(r)
    # over the cases holding the class: class_1 on cases 10-29, macro per case over the classes it holds
    assert r["class_1"]["present"]["n_cases"] == 20 and r["class_2"]["present"]["n_cases"] == 30
    assert r["class_1"]["present"]["diff"] == pytest.approx(np.mean(np.minimum(1, base[10:] + 0.2) - base[10:]))
    macro_a = [np.mean([min(1, base[i] + 0.2), base[i]]) if i >= 10 else base[i] for i in range(30)]
    assert r["macro"]["present"]["diff"] == pytest.approx(np.mean(np.array(macro_a) - base))
    assert "cases whose reference holds the class" in format_comparison(r)
    from evaluation.compare_segmentation import sentence
    one = paired_dice(np.array([0.7]), np.array([0.5]))
    assert "no CI from 1 case" in sentence(one, "A", "B") and "nan" not in sentence(one, "A", "B")
    assert sentence(paired_dice(np.array([]), np.array([])), "A", "B", none="no test reference holds the class") \
        == "A vs B: no test reference holds the class."
    rows = list(csv.DictReader(open(tmp_path / "b" / "per_case.csv")))[:-1]
    (tmp_path / "c").mkdir()
    write_per_case(str(tmp_path / "c" / "per_case.csv"), [{**r, **{k: float(r[k]) for k in ("dice", "hd95", "ref_ml",
                                                                                           "pred_ml")}} for r in rows])
    with pytest.raises(ValueError, match="different \\(case, class\\) pairs"):
        compare_per_case(str(tmp_path / "a" / "per_case.csv"), str(tmp_path / "c" / "per_case.csv"))
