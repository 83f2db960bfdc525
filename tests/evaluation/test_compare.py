"""Paired model comparison: DeLong's test, the paired bootstrap, predictions.csv matching, the CLI."""
import json
import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from evaluation.compare import (compare_auroc, compare_predictions, delong_test, format_comparison,
                                paired_bootstrap_diff)
from evaluation.metrics import write_predictions_csv
from tools import compare as compare_cli


def _delong_slow(y, a, b):
    """DeLong from its definition: O(m n) kernel psi(x, y) = 1 / 0.5 / 0 for x > / = / < y."""
    y = np.asarray(y)
    comps = []
    for s in (np.asarray(a), np.asarray(b)):
        xp, xn = s[y == 1], s[y == 0]
        psi = (xp[:, None] > xn[None, :]) + 0.5 * (xp[:, None] == xn[None, :])  # [m, n]
        comps.append((psi.mean(axis=1), psi.mean(axis=0), psi.mean()))
    (v10a, v01a, auc_a), (v10b, v01b, auc_b) = comps
    m, n = len(v10a), len(v01a)
    var = (np.var(v10a - v10b, ddof=1) / m) + (np.var(v01a - v01b, ddof=1) / n)
    z = (auc_a - auc_b) / math.sqrt(var)
    return auc_a, auc_b, z, 2 * norm.sf(abs(z))


def test_delong_hand_computed():
    # A: positives 0.9, 0.4; negatives 0.6, 0.1 -> V10 = [1, 0.5], V01 = [0.5, 1], AUROC 0.75
    # B separates perfectly: V10 = V01 = [1, 1], AUROC 1; var(diff) = 0.125/2 + 0.125/2 = 0.125
    y = [1, 1, 0, 0]
    r = delong_test(y, [0.9, 0.4, 0.6, 0.1], [0.8, 0.7, 0.3, 0.2])
    assert r["auroc_a"] == pytest.approx(0.75) and r["auroc_b"] == pytest.approx(1.0)
    assert r["diff"] == pytest.approx(-0.25)
    assert r["se"] == pytest.approx(math.sqrt(0.125))
    assert r["z"] == pytest.approx(-0.25 / math.sqrt(0.125))
    assert r["p_value"] == pytest.approx(0.47950, abs=1e-5)  # 2 * (1 - Phi(0.7071))


def test_delong_matches_definition_and_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    a = np.round(y * 0.8 + rng.normal(0, 1, 300), 1)  # rounding makes many ties
    b = np.round(y * 0.4 + 0.5 * a + rng.normal(0, 1, 300), 1)
    r = delong_test(y, a, b)
    auc_a, auc_b, z, p = _delong_slow(y, a, b)
    assert r["auroc_a"] == pytest.approx(roc_auc_score(y, a), abs=1e-12) == pytest.approx(auc_a)
    assert r["auroc_b"] == pytest.approx(roc_auc_score(y, b), abs=1e-12) == pytest.approx(auc_b)
    assert r["z"] == pytest.approx(z, rel=1e-9) and r["p_value"] == pytest.approx(p, rel=1e-9)


def test_blank_targets_excluded_and_one_class_not_comparable():
    y = np.array([1, 0, np.nan, 1, 0, np.nan])
    a, b = np.array([0.9, 0.1, 0.0, 0.8, 0.3, 1.0]), np.array([0.6, 0.5, 1.0, 0.4, 0.2, 0.0])
    keep = ~np.isnan(y)
    assert delong_test(y, a, b)["z"] == pytest.approx(delong_test(y[keep], a[keep], b[keep])["z"])
    r = compare_auroc([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1], n_bootstrap=50)
    assert r["diff"] is None and r["ci95"] is None and not r["significant"]
    assert "not comparable" in r["sentence"] and "positives" in r["sentence"]
    with pytest.raises(ValueError, match="shape"):
        delong_test([1, 0], [0.1, 0.2], [0.1, 0.2, 0.3])


def test_paired_bootstrap_uses_the_same_resample_for_both_models():
    rng = np.random.default_rng(1)
    y = np.array([1] * 12 + [0] * 20)
    a, b = rng.random(32) + 0.3 * y, np.round(rng.random(32), 1)
    got = paired_bootstrap_diff(y, a, b, n_bootstrap=40, seed=7)
    # the same generator calls by hand: positives then negatives, one resample per row
    gen = np.random.default_rng(7)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    idx = np.concatenate([pos[gen.integers(0, 12, (40, 12))], neg[gen.integers(0, 20, (40, 20))]], axis=1)
    want = [roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]) for i in idx]
    np.testing.assert_allclose(got, want, atol=1e-12)
    # several draws per model (few-shot seeds): the mean over draws of the paired differences
    a2, b2 = np.stack([a, a ** 2, 1 - a]), np.stack([b, b + a, b])
    got2 = paired_bootstrap_diff(y, a2, b2, n_bootstrap=40, seed=7)
    want2 = [np.mean([roc_auc_score(y[i], sa[i]) - roc_auc_score(y[i], sb[i]) for sa, sb in zip(a2, b2)])
             for i in idx]
    np.testing.assert_allclose(got2, want2, atol=1e-12)


def test_bootstrap_spread_agrees_with_delong_se():
    # two estimates of the same standard error: they must agree on a few hundred cases
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 400)
    a = y * 1.0 + rng.normal(0, 1, 400)
    b = y * 0.6 + 0.5 * a + rng.normal(0, 1, 400)
    boots = paired_bootstrap_diff(y, a, b, n_bootstrap=2000, seed=0)
    assert np.std(boots) == pytest.approx(delong_test(y, a, b)["se"], rel=0.12)


def test_significance_and_sentences():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    strong, weak = y * 2.0 + rng.normal(0, 1, 300), y * 0.2 + rng.normal(0, 1, 300)
    r = compare_auroc(y, strong, weak, n_bootstrap=500, name_a="MAE", name_b="random")
    assert r["significant"] and r["diff"] > 0.2 and r["ci95"][0] > 0 and r["p_value"] < 1e-6
    assert r["sentence"].startswith("MAE is significantly better than random")
    r = compare_auroc(y, weak, strong, n_bootstrap=500, name_a="MAE", name_b="random")
    assert r["significant"] and r["sentence"].startswith("random is significantly better than MAE")
    same = compare_auroc(y, strong, strong.copy(), n_bootstrap=200)
    assert same["diff"] == 0 and same["p_value"] == 1.0 and same["ci95"] == [0.0, 0.0]
    assert not same["significant"] and "not significant" in same["sentence"]
    noise = compare_auroc(y, weak, weak + rng.normal(0, 0.01, 300), n_bootstrap=500)
    assert not noise["significant"] and "cannot tell" in noise["sentence"]


def _write(path, ids, probs, targets, groups=None, names=("ICH", "SDH")):
    write_predictions_csv(str(path), ids, groups, list(names), probs, targets)
    return str(path)


@pytest.fixture
def two_runs(tmp_path):
    rng = np.random.default_rng(4)
    n = 60
    ids = [f"scan{i:02d}" for i in range(n)]
    groups = [f"pat{i // 2:02d}" for i in range(n)]  # two scans per patient
    t = rng.integers(0, 2, (n, 2)).astype(float)
    t[5, 1] = np.nan  # a blank target
    pa = 1 / (1 + np.exp(-(2 * t + rng.normal(0, 1, (n, 2)))))
    pa = np.nan_to_num(pa, nan=0.5)
    pb = rng.random((n, 2))
    perm = rng.permutation(n)  # B's file lists the cases in another order
    a = _write(tmp_path / "a.csv", ids, pa, t, groups)
    b = _write(tmp_path / "b.csv", [ids[i] for i in perm], pb[perm], t[perm], [groups[i] for i in perm])
    return {"a": a, "b": b, "t": t, "pa": pa, "pb": pb, "groups": groups, "ids": ids, "tmp": tmp_path}


def test_compare_predictions_matches_rows_by_id_and_groups(two_runs):
    r = compare_predictions(two_runs["a"], two_runs["b"], n_bootstrap=300, seed=1)
    assert set(r["scan"]) == {"ICH", "SDH"} and set(r["group"]) == {"ICH", "SDH"}
    t, pa, pb = two_runs["t"], two_runs["pa"], two_runs["pb"]
    for j, name in enumerate(("ICH", "SDH")):
        want = compare_auroc(t[:, j], pa[:, j], pb[:, j], n_bootstrap=300, seed=1)
        assert r["scan"][name]["diff"] == pytest.approx(want["diff"])
        assert r["scan"][name]["ci95"] == pytest.approx(want["ci95"])
        assert r["scan"][name]["p_value"] == pytest.approx(want["p_value"])
    # group level: MAX probability per patient, any-positive target
    g = np.array(two_runs["groups"])
    tg = np.array([np.nanmax(t[g == k, 0]) for k in sorted(set(g))])
    ga = np.array([pa[g == k, 0].max() for k in sorted(set(g))])
    gb = np.array([pb[g == k, 0].max() for k in sorted(set(g))])
    assert r["group"]["ICH"]["n"] == 30
    assert r["group"]["ICH"]["auroc_a"] == pytest.approx(roc_auc_score(tg, ga))
    assert r["group"]["ICH"]["auroc_b"] == pytest.approx(roc_auc_score(tg, gb))
    assert r["scan"]["SDH"]["n"] == 59  # the blank target is left out
    text = format_comparison(r)
    assert "scan" in text and "group" in text and "DeLong p" in text and "ICH" in text
    only = compare_predictions(two_runs["a"], two_runs["b"], labels=["SDH"], n_bootstrap=50)
    assert set(only["scan"]) == {"SDH"}


def test_compare_predictions_names_bad_input(two_runs):
    tmp, ids, t, pa = two_runs["tmp"], two_runs["ids"], two_runs["t"], two_runs["pa"]
    fewer = _write(tmp / "fewer.csv", ids[:-1], pa[:-1], t[:-1], two_runs["groups"][:-1])
    with pytest.raises(ValueError, match=r"different cases: 1 ids only in the first \(e.g. \['scan59'\]\)"):
        compare_predictions(two_runs["a"], fewer, n_bootstrap=10)
    flipped = t.copy()
    flipped[3, 0] = 1 - flipped[3, 0]
    other = _write(tmp / "flipped.csv", ids, pa, flipped, two_runs["groups"])
    with pytest.raises(ValueError, match="case 'scan03', label 'ICH': target"):
        compare_predictions(two_runs["a"], other, n_bootstrap=10)
    with pytest.raises(ValueError, match="no label 'EDH'"):
        compare_predictions(two_runs["a"], two_runs["b"], labels=["EDH"], n_bootstrap=10)
    moved = list(two_runs["groups"])
    moved[0] = "pat99"
    regrouped = _write(tmp / "regrouped.csv", ids, pa, t, moved)
    with pytest.raises(ValueError, match="case 'scan00' is in group 'pat00'"):
        compare_predictions(two_runs["a"], regrouped, n_bootstrap=10)
    dup = _write(tmp / "dup.csv", ids[:-1] + ids[:1], pa, t, two_runs["groups"])
    with pytest.raises(ValueError, match="id 'scan00' appears more than once"):
        compare_predictions(dup, two_runs["b"], n_bootstrap=10)
    # without a group column in one file there is no group level
    nogroup = _write(tmp / "nogroup.csv", ids, pa, t, None)
    assert "group" not in compare_predictions(nogroup, two_runs["b"], n_bootstrap=10)


def test_cli_prints_table_and_writes_json(two_runs, capsys):
    out = two_runs["tmp"] / "cmp.json"
    compare_cli.main([two_runs["a"], two_runs["b"], "--names", "probe", "random", "--n-bootstrap", "100",
                      "--json", str(out)])
    text = capsys.readouterr().out
    assert "paired 95% CI" in text and "probe" in text and "random" in text
    saved = json.loads(out.read_text())
    assert set(saved["scan"]) == {"ICH", "SDH"} and "group" in saved
    with pytest.raises(SystemExit) as e:
        compare_cli.main([two_runs["a"], str(two_runs["tmp"] / "missing.csv")])
    assert e.value.code == 2
    assert "missing.csv: no such file" in capsys.readouterr().err
