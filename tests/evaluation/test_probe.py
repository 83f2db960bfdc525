"""The logistic probe on cached features: C chosen on validation, coefficients equal to sklearn's fit."""
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from evaluation.probe import LogisticProbe


def sklearn_fit(x_train, y_train, C, x_eval):
    """The reference probe: StandardScaler on all training rows, then one LogisticRegression per label on
    its labelled rows (the probe's solver settings).

    Returns:
        The fits, their logits ``[N, L]`` and probabilities ``[N, L]`` on ``x_eval``. AUROCs are taken
        on probabilities, as the probe and metrics.json take them: a logit above ~37 gives exactly 1.0
        in float64, so strongly separated scores can tie where their logits do not.
    """
    scaler = StandardScaler().fit(x_train)
    fits, logits, probs = [], [], []
    for j in range(y_train.shape[1]):
        keep = ~np.isnan(y_train[:, j])
        clf = LogisticRegression(C=C, class_weight="balanced", max_iter=5000, random_state=0)
        fits.append(clf.fit(scaler.transform(x_train[keep]), y_train[keep, j].astype(int)))
        logits.append(clf.decision_function(scaler.transform(x_eval)))
        probs.append(clf.predict_proba(scaler.transform(x_eval))[:, 1])
    return fits, np.stack(logits, 1), np.stack(probs, 1)


def macro_auroc(y, scores):
    keep = [~np.isnan(y[:, j]) for j in range(y.shape[1])]
    return np.mean([roc_auc_score(y[k, j], scores[k, j]) for j, k in enumerate(keep)])


def assert_probe_equals_sklearn(probe, x_train, y_train, x_eval):
    fits, logits, _ = sklearn_fit(x_train, y_train, probe.C, x_eval)
    np.testing.assert_allclose(probe.coef, np.stack([f.coef_[0] for f in fits]), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(probe.intercept, [f.intercept_[0] for f in fits], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(probe.decision_function(x_eval), logits, rtol=1e-6, atol=1e-8)


def test_logistic_probe_sweeps_C_on_validation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 5))
    y = np.stack([(x[:, 0] > 0), (x[:, 1] + 0.8 * rng.normal(size=80) > 0.3)], 1).astype(np.float64)
    y[::7, 1] = np.nan  # blank labels are left out per label
    y[62::5, 0] = np.nan  # in validation too
    Cs = (0.001, 0.01, 0.1, 1.0)
    probe = LogisticProbe(["a", "b"], Cs=Cs).fit(x[:60], y[:60], x[60:], y[60:])
    # every C scored by the validation macro AUROC of sklearn's own fit
    want = [macro_auroc(y[60:], sklearn_fit(x[:60], y[:60], C, x[60:])[2]) for C in Cs]
    assert [r["C"] for r in probe.sweep] == list(Cs)
    np.testing.assert_allclose([r["val_auroc_macro"] for r in probe.sweep], want, atol=1e-12)
    assert probe.C == Cs[int(np.argmax(want))]  # the best (the first of equals: the smaller C)
    assert_probe_equals_sklearn(probe, x[:60], y[:60], x[60:])
    p = probe.predict_proba(x[60:])
    assert p.shape == (20, 2) and np.allclose(p, 1 / (1 + np.exp(-probe.decision_function(x[60:]))))
    sd = probe.state_dict()
    assert sd["coef"].shape == (2, 5) and sd["labels"] == ["a", "b"] and sd["C"] == probe.C
    with pytest.raises(ValueError, match="one class"):
        LogisticProbe(["a"]).fit(x[:10], np.zeros((10, 1)))


def nuisance_data(n, rng, proxy_holds):
    """Label = sign of s. x0 = s + nu (the signal behind a large nuisance), x1 = nu (a proxy that lets a
    weakly regularised fit subtract the nuisance) or, when ``proxy_holds`` is False, fresh noise of the
    same size (the proxy broke: subtracting it adds noise)."""
    s, nu = rng.normal(size=n), 2 * rng.normal(size=n)
    x1 = nu if proxy_holds else 2 * rng.normal(size=n)
    return np.stack([s + nu, x1], 1), (s > 0).astype(np.float64)[:, None]


@pytest.mark.parametrize("proxy_holds,best_C", [(True, 10.0), (False, 1e-4)])
def test_logistic_probe_chooses_the_C_validation_prefers(proxy_holds, best_C):
    # C = 10 learns x0 - x1 = s (AUROC ~1 where the proxy holds); C = 1e-4 shrinks to the marginal
    # correlations, x0 alone (AUROC ~0.7), which wins where subtracting x1 only adds noise
    rng = np.random.default_rng(0)
    x, y = nuisance_data(200, rng, True)
    xv, yv = nuisance_data(2000, rng, proxy_holds)
    probe = LogisticProbe(["a"], Cs=(1e-4, 10.0)).fit(x, y, xv, yv)
    assert probe.C == best_C
    aucs = {r["C"]: r["val_auroc_macro"] for r in probe.sweep}
    assert aucs[best_C] > aucs[10.0 if best_C == 1e-4 else 1e-4] + 0.03  # a clear preference
    for C, auc in aucs.items():
        assert auc == pytest.approx(roc_auc_score(yv[:, 0], sklearn_fit(x, y, C, xv)[2][:, 0]), abs=1e-12)
    assert_probe_equals_sklearn(probe, x, y, xv)


def test_logistic_probe_tie_takes_the_smaller_C():
    # one feature: every C ranks validation alike, so every C has the same AUROC
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 1))
    y = (x[:, :1] + rng.normal(size=(60, 1)) > 0).astype(np.float64)
    probe = LogisticProbe(["a"]).fit(x[:40], y[:40], x[40:], y[40:])
    assert len({r["val_auroc_macro"] for r in probe.sweep}) == 1
    assert probe.C == min(probe.Cs) == 0.001
    assert_probe_equals_sklearn(probe, x[:40], y[:40], x[40:])


def test_logistic_probe_falls_back_to_C_1_when_validation_has_one_class():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 4))
    y = (x[:, :1] > 0).astype(np.float32)
    probe = LogisticProbe(["a"], Cs=(0.01, 10.0)).fit(x[:40], y[:40], x[40:], np.zeros((10, 1)))
    assert probe.C == 1.0 and all(r["val_auroc_macro"] is None for r in probe.sweep)
    ref = LogisticProbe(["a"]).fit(x[:40], y[:40])
    assert np.allclose(probe.coef, ref.coef) and np.allclose(probe.intercept, ref.intercept)
