import numpy as np
import pytest

from evaluation.metrics import SplitPredictions, evaluate_split, multilabel_metrics
from evaluation.report import format_results_table, format_summary_table, summarize_seeds


def _data(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random((80, 2)) < 0.4).astype(float)
    p = np.clip(0.4 * y + 0.6 * rng.random((80, 2)), 0, 1)
    return y, p


def test_format_results_table_split_and_label_shapes():
    yv, pv = _data(0)
    yt, pt = _data(1)
    yt[:, 1] = 0  # undefined AUROC must print as n/a with its reason
    m = evaluate_split(SplitPredictions(pt, yt, groups=[str(i // 2) for i in range(80)]), ["ICH", "SDH"],
                       SplitPredictions(pv, yv), n_bootstrap=50)
    text = format_results_table(m)
    assert "[test]" in text and "[test_group]" in text and "[val]" not in text
    assert "AUROC [95% CI]" in text and "n/a" in text and "only one class" in text
    ich = next(line for line in text.splitlines() if line.startswith("ICH"))
    assert f"{m['test']['ICH']['auroc']:.3f} [" in ich and f"{m['test']['ICH']['n_pos']}/" in ich
    assert text.splitlines()[-1].startswith("  SDH:")  # notes close the last section
    single = format_results_table(m["test"])
    assert single.splitlines()[0].startswith("label") and "macro" in single


def test_summarize_seeds_mean_std():
    runs = []
    for s in range(3):
        y, p = _data(s)
        runs.append(multilabel_metrics(y, p, ["ICH", "SDH"], n_bootstrap=0))
    summ = summarize_seeds(runs)
    vals = [r["ICH"]["auroc"] for r in runs]
    assert summ["ICH"]["auroc_mean"] == pytest.approx(np.mean(vals))
    assert summ["ICH"]["auroc_std"] == pytest.approx(np.std(vals, ddof=1))
    assert summ["ICH"]["n_seeds"] == 3 and "f1_mean" in summ["ICH"] and "n_pos_mean" in summ["ICH"]
    assert summ["macro"]["auroc_mean"] == pytest.approx(np.mean([r["macro"]["auroc"] for r in runs]))
    assert "auroc_ci95_mean" not in summ["ICH"] and "threshold_source_mean" not in summ["ICH"]


def test_summarize_seeds_split_shape_and_none_values():
    runs = []
    for s in range(2):
        yv, pv = _data(10 + s)
        yt, pt = _data(20 + s)
        if s == 1:
            yt[:, 1] = 1  # SDH undefined in one seed: mean over the defined one, std None
        runs.append(evaluate_split(SplitPredictions(pt, yt), ["ICH", "SDH"], SplitPredictions(pv, yv), n_bootstrap=0))
    summ = summarize_seeds(runs)
    assert set(summ) == {"val", "test", "n_seeds"} and summ["n_seeds"] == 2
    assert summ["test"]["SDH"]["auroc_mean"] == pytest.approx(runs[0]["test"]["SDH"]["auroc"])
    assert summ["test"]["SDH"]["auroc_std"] is None
    text = format_summary_table(summ)
    assert "mean ± std over 2 seeds" in text and "±" in text
    with pytest.raises(ValueError):
        summarize_seeds([])


def test_write_evaluation_files(tmp_path):
    import json

    from evaluation.metrics import read_predictions_csv
    from evaluation.report import write_evaluation

    yv, pv = _data(30)
    yt, pt = _data(31)
    yt[3, 1] = np.nan
    groups = [f"P{i // 2}" for i in range(80)]
    m = write_evaluation(str(tmp_path / "run"), ["ICH", "SDH"],
                         SplitPredictions(pt, yt, ids=[f"t{i}" for i in range(80)], groups=groups),
                         SplitPredictions(pv, yv, ids=[f"v{i}" for i in range(80)], groups=groups),
                         n_bootstrap=100, seed=1)
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["metrics.json", "predictions.csv", "predictions_val.csv", "roc_pr.png"]
    back = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(back) == {"val", "test", "test_group"} and back["test"]["ICH"]["auroc"] == m["test"]["ICH"]["auroc"]
    assert back["test"]["SDH"]["n_pos"] + back["test"]["SDH"]["n_neg"] == 79
    ids, g, names, probs, targets = read_predictions_csv(str(tmp_path / "run" / "predictions.csv"))
    assert ids[0] == "t0" and g[:3] == ["P0", "P0", "P1"] and names == ["ICH", "SDH"] and np.isnan(targets[3, 1])
