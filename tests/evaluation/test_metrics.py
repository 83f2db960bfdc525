import json
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from evaluation.metrics import (SplitPredictions, _auroc_resamples, _score_levels, binary_metrics, bootstrap_auroc,
                                evaluate_split, group_aggregate, multilabel_metrics, read_predictions_csv,
                                stratified_resamples, write_metrics_json, write_predictions_csv, youden_threshold)

Y = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1], dtype=float)
P = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.6, 0.55, 0.7, 0.3, 0.45, 0.65])


def _noisy(n=400, seed=0, tie_round=None):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(float)
    p = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.2 * y)))
    return y, (p.round(tie_round) if tie_round else p)


def test_point_metrics_match_sklearn():
    m = binary_metrics(Y, P, threshold=0.5, n_bootstrap=0)
    pred = (P >= 0.5).astype(int)
    assert m["auroc"] == pytest.approx(roc_auc_score(Y, P))
    assert m["ap"] == pytest.approx(average_precision_score(Y, P))
    assert m["f1"] == pytest.approx(f1_score(Y, pred))
    tp = int(((pred == 1) & (Y == 1)).sum())
    tn = int(((pred == 0) & (Y == 0)).sum())
    assert m["sensitivity"] == pytest.approx(tp / 6) and m["specificity"] == pytest.approx(tn / 6)
    assert m["accuracy"] == pytest.approx((tp + tn) / 12)
    assert (m["n_pos"], m["n_neg"], m["threshold"], m["threshold_source"]) == (6, 6, 0.5, "given")
    assert m["auroc_ci95"] is None and "reason" not in m


def test_vectorised_resamples_equal_sklearn_with_weights():
    y, p = _noisy(300, seed=1, tie_round=2)  # rounding creates ties
    levels, n_levels = _score_levels(p)
    idx = np.random.default_rng(3).integers(0, y.size, (6, y.size))
    fast = _auroc_resamples(y, levels, n_levels, idx)
    ref = [roc_auc_score(y, p, sample_weight=np.bincount(i, minlength=y.size)) for i in idx]
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-12)


def test_bootstrap_ci_contains_estimate_and_is_reproducible():
    y, p = _noisy(400)
    m = binary_metrics(y, p, n_bootstrap=500, seed=7)
    lo, hi = m["auroc_ci95"]
    assert lo < m["auroc"] < hi and hi - lo < 0.2
    assert binary_metrics(y, p, n_bootstrap=500, seed=7)["auroc_ci95"] == [lo, hi]
    assert binary_metrics(y, p, n_bootstrap=500, seed=8)["auroc_ci95"] != [lo, hi]


def delong_se(y, p):
    """DeLong's standard error of one AUROC, from its structural components (midranks for ties)."""
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    v10 = (np.searchsorted(neg, pos, "left") + np.searchsorted(neg, pos, "right")) / (2 * neg.size)
    v01 = 1 - (np.searchsorted(pos, neg, "left") + np.searchsorted(pos, neg, "right")) / (2 * pos.size)
    return math.sqrt(v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size)


def stratified_by_hand(y, n_bootstrap, seed, sizes):
    """The resamples of ``bootstrap_auroc``: per chunk of ``sizes[k]`` rows, positives then negatives
    drawn with replacement from one generator."""
    gen = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    return np.concatenate([np.concatenate([pos[gen.integers(0, pos.size, (b, pos.size))],
                                           neg[gen.integers(0, neg.size, (b, neg.size))]], axis=1) for b in sizes])


def test_bootstrap_10k_samples_resamples_values_and_spread():
    y, p = _noisy(10_000, seed=2)
    aucs = bootstrap_auroc(y, p, 1000, 0)
    assert aucs.shape == (1000,) and np.isfinite(aucs).all()
    # the resamples: several chunks of one generator stream, each keeping the class counts
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    chunks = list(stratified_resamples(pos, neg, 1000, 0))
    sizes = [idx.shape[0] for _, idx in chunks]
    assert len(chunks) > 1 and sum(sizes) == 1000 and [s for s, _ in chunks] == list(np.cumsum([0] + sizes[:-1]))
    idx = np.concatenate([c for _, c in chunks])
    np.testing.assert_array_equal(idx, stratified_by_hand(y, 1000, 0, sizes))
    assert (y[idx] == 1).sum(axis=1).tolist() == [pos.size] * 1000
    # each value is sklearn's AUROC of its resample (every 20th and both sides of every chunk edge)
    edges = np.cumsum(sizes)
    check = sorted(set(range(0, 1000, 20)) | set(edges[:-1]) | set(edges - 1))
    want = [roc_auc_score(y[idx[k]], p[idx[k]]) for k in check]
    np.testing.assert_allclose(aucs[check], want, rtol=0, atol=1e-12)
    # the spread is AUROC's sampling error: DeLong's SE, and centred on the estimate
    auc, se = roc_auc_score(y, p), delong_se(y, p)
    assert np.std(aucs) == pytest.approx(se, rel=0.1)
    assert np.mean(aucs) == pytest.approx(auc, abs=4 * se / math.sqrt(1000))
    ci = binary_metrics(y, p, n_bootstrap=1000, seed=0)["auroc_ci95"]
    np.testing.assert_allclose(ci, np.percentile(aucs, [2.5, 97.5]), rtol=0, atol=1e-12)
    assert ci[0] == pytest.approx(auc - 1.96 * se, abs=0.006) and ci[1] == pytest.approx(auc + 1.96 * se, abs=0.006)


def test_youden_separable_and_applied():
    y = np.array([0, 0, 0, 1, 1, 1], dtype=float)
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    t = youden_threshold(y, p)
    assert 0.3 < t <= 0.7
    m = binary_metrics(y, p)
    assert m["threshold_source"] == "youden" and m["sensitivity"] == 1 and m["specificity"] == 1 and m["f1"] == 1
    with pytest.raises(ValueError, match="both classes"):
        youden_threshold(np.zeros(4), np.linspace(0, 1, 4))


def test_nan_targets_excluded_per_label():
    t = np.stack([Y, Y], axis=1)
    t[[0, 3, 5], 1] = np.nan
    p = np.stack([P, P], axis=1)
    out = multilabel_metrics(t, p, ["a", "b"], n_bootstrap=0)
    keep = ~np.isnan(t[:, 1])
    assert out["a"]["n_pos"] + out["a"]["n_neg"] == 12
    assert out["b"]["n_pos"] + out["b"]["n_neg"] == 9
    assert out["b"]["auroc"] == pytest.approx(roc_auc_score(Y[keep], P[keep]))
    assert out["macro"]["auroc"] == pytest.approx((out["a"]["auroc"] + out["b"]["auroc"]) / 2)


def test_single_class_label_gives_none(tmp_path):
    t = np.stack([Y, np.zeros(12), np.full(12, np.nan)], axis=1)
    p = np.stack([P, P, P], axis=1)
    out = multilabel_metrics(t, p, ["ok", "neg_only", "blank"], n_bootstrap=100)
    assert out["neg_only"]["auroc"] is None and out["neg_only"]["ap"] is None
    assert "one class" in out["neg_only"]["reason"] and out["neg_only"]["specificity"] is not None
    assert out["blank"]["auroc"] is None and out["blank"]["reason"] == "no labelled samples"
    assert out["macro"]["auroc"] == pytest.approx(out["ok"]["auroc"]) and out["macro"]["n_labels"] == 1
    write_metrics_json(str(tmp_path / "m.json"), out)
    back = json.loads((tmp_path / "m.json").read_text())
    assert back["neg_only"]["auroc"] is None and back["neg_only"]["auroc_ci95"] is None


def auroc_by_definition(y, p):
    """P(positive scores above negative) + 1/2 P(tie), over all positive-negative pairs."""
    pos, neg = p[y == 1][:, None], p[y == 0][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def joint_macro_by_hand(t, p, n_bootstrap, seed):
    """Macro AUROC of each joint resample: one generator draw of N rows for all labels; a label's blank
    rows count for neither class; a resample where some label lacks a class has no macro (NaN)."""
    idx = np.random.default_rng(seed).integers(0, t.shape[0], (n_bootstrap, t.shape[0]))
    macro = []
    for i in idx:
        per = []
        for j in range(t.shape[1]):
            keep = ~np.isnan(t[i, j])
            yy, pp = t[i, j][keep], p[i, j][keep]
            per.append(auroc_by_definition(yy, pp) if 0 < yy.sum() < yy.size else np.nan)
        macro.append(np.mean(per))
    return np.array(macro)


@pytest.mark.parametrize("n,seed", [(300, 3), (12, 0)])
def test_macro_ci_joint_bootstrap(n, seed):
    y1, p1 = _noisy(n, seed=4)
    y2, p2 = _noisy(n, seed=5)
    if n == 12:  # few positives: some resamples lack one, and are left out
        y1 = np.array([1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0], dtype=float)
        y2 = np.array([0, 1, 0, 0, 0, 1, 0, 0, 1, 0, 1, 0], dtype=float)
    t, p = np.stack([y1, y2], 1), np.stack([p1, p2], 1)
    t[::5, 1] = np.nan  # blanks in one label
    out = multilabel_metrics(t, p, ["a", "b"], n_bootstrap=300, seed=seed)
    macro = joint_macro_by_hand(t, p, 300, seed)
    kept = macro[np.isfinite(macro)]
    assert (kept.size < 300) == (n == 12)
    np.testing.assert_allclose(out["macro"]["auroc_ci95"], np.percentile(kept, [2.5, 97.5]), rtol=0, atol=1e-12)
    lo, hi = out["macro"]["auroc_ci95"]
    assert lo < out["macro"]["auroc"] < hi
    # each label's own CI: the stratified bootstrap with seed + j over its labelled rows
    for j, name in enumerate(["a", "b"]):
        keep = ~np.isnan(t[:, j])
        yj, pj = t[keep, j], p[keep, j]
        idx = stratified_by_hand(yj, 300, seed + j, [300])
        want = np.percentile([auroc_by_definition(yj[i], pj[i]) for i in idx], [2.5, 97.5])
        np.testing.assert_allclose(out[name]["auroc_ci95"], want, rtol=0, atol=1e-12)
    # one label: the macro CI is that label's CI
    one = multilabel_metrics(t[:, :1], p[:, :1], ["a"], n_bootstrap=300, seed=seed)
    assert one["macro"]["auroc_ci95"] == one["a"]["auroc_ci95"] == out["a"]["auroc_ci95"]


def test_group_aggregate_max_and_nan():
    t = np.array([[0, np.nan], [1, np.nan], [0, 0], [np.nan, np.nan], [0, 1]], dtype=float)
    p = np.array([[0.1, 0.5], [0.7, 0.2], [0.3, 0.9], [0.8, 0.1], [0.2, 0.3]])
    groups = ["p1", "p1", "p2", "p3", "p3"]
    tg, pg, ids = group_aggregate(t, p, groups)
    assert ids.tolist() == ["p1", "p2", "p3"]
    np.testing.assert_array_equal(pg, [[0.7, 0.5], [0.3, 0.9], [0.8, 0.3]])
    np.testing.assert_array_equal(np.isnan(tg), [[False, True], [False, False], [False, False]])
    assert tg[0, 0] == 1 and tg[1].tolist() == [0, 0] and tg[2].tolist() == [0, 1]
    t1, p1, _ = group_aggregate(t[:, 0], p[:, 0], groups)
    assert t1.shape == (3,) and p1.tolist() == [0.7, 0.3, 0.8]
    with pytest.raises(ValueError, match="group ids"):
        group_aggregate(t, p, groups[:4])


def test_evaluate_split_thresholds_from_val():
    yv, pv = _noisy(200, seed=10)
    yt, pt = _noisy(200, seed=11)
    groups = [f"g{i // 2}" for i in range(200)]
    out = evaluate_split(SplitPredictions(pt[:, None], yt[:, None], groups=groups), ["ICH"],
                         SplitPredictions(pv[:, None], yv[:, None], groups=groups), n_bootstrap=50)
    assert set(out) == {"val", "test", "test_group"}
    assert out["test"]["ICH"]["threshold"] == out["val"]["ICH"]["threshold"]
    assert out["test"]["ICH"]["threshold_source"] == "val"
    assert out["test_group"]["ICH"]["threshold_source"] == "val_group"
    assert out["test_group"]["ICH"]["n_pos"] + out["test_group"]["ICH"]["n_neg"] == 100
    for key in ("auroc", "auroc_ci95", "ap", "f1", "sensitivity", "specificity", "accuracy", "threshold",
                "n_pos", "n_neg"):
        assert key in out["test"]["ICH"]
    assert "macro" in out["test"] and "macro" in out["test_group"]
    no_val = evaluate_split(SplitPredictions(pt, yt), ["ICH"], n_bootstrap=0)
    assert set(no_val) == {"test"} and no_val["test"]["ICH"]["threshold_source"] == "test"
    # a validation label with one class falls back to 0.5 on test
    one = evaluate_split(SplitPredictions(pt, yt), ["ICH"], SplitPredictions(np.linspace(0, 1, 10), np.zeros(10)),
                         n_bootstrap=0)
    assert one["test"]["ICH"]["threshold"] == 0.5 and one["test"]["ICH"]["threshold_source"] == "default"


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="targets must be 0, 1 or NaN"):
        binary_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="non-finite"):
        binary_metrics([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="label names"):
        multilabel_metrics(np.zeros((3, 2)), np.zeros((3, 2)), ["a"])


def test_predictions_and_metrics_round_trip(tmp_path):
    probs = np.array([[0.125, 0.5], [0.9, 0.25], [0.3333333, 0.75]], dtype=np.float32)
    targets = np.array([[0, 1], [1, np.nan], [0, 0]], dtype=np.float32)
    path = tmp_path / "predictions.csv"
    write_predictions_csv(str(path), ["a", "b", "c"], ["p1", "p1", "p2"], ["ICH", "SDH"], probs, targets)
    header = path.read_text().splitlines()[0]
    assert header == "id,group,ICH_prob,ICH_target,SDH_prob,SDH_target"
    ids, groups, names, p, t = read_predictions_csv(str(path))
    assert ids == ["a", "b", "c"] and groups == ["p1", "p1", "p2"] and names == ["ICH", "SDH"]
    np.testing.assert_allclose(p, probs, rtol=1e-7)
    np.testing.assert_array_equal(np.isnan(t), np.isnan(targets))
    write_predictions_csv(str(path), ["a", "b", "c"], None, ["ICH", "SDH"], probs, targets)
    assert read_predictions_csv(str(path))[1] is None

    metrics = {"test": {"ICH": {"auroc": np.float64(0.8), "auroc_ci95": [0.7, 0.9], "ap": float("nan"),
                                "n_pos": np.int64(3), "threshold": np.float32(0.5)}}}
    mpath = tmp_path / "metrics.json"
    write_metrics_json(str(mpath), metrics)
    back = json.loads(mpath.read_text())
    assert back == {"test": {"ICH": {"auroc": 0.8, "auroc_ci95": [0.7, 0.9], "ap": None, "n_pos": 3,
                                     "threshold": 0.5}}}
    assert "NaN" not in mpath.read_text() and not (tmp_path / "metrics.json.tmp").exists()
    assert not math.isnan(back["test"]["ICH"]["auroc"])
