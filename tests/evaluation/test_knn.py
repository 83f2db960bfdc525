"""k-NN evaluation: leave-one-out weighted scores, and the DINO k-NN monitor's config check."""
import numpy as np
import pytest

from config import get_defaults
from evaluation.knn import KNNMonitor, collapsed, knn_k, knn_scores


def test_knn_scores_leave_one_out():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(10, 4)) * 0.1 + np.array([1, 0, 0, 0])
    b = rng.normal(size=(10, 4)) * 0.1 + np.array([0, 1, 0, 0])
    feats = np.concatenate([a, b])
    labels = np.array([0] * 10 + [1] * 10)
    s = knn_scores(feats, labels, k=3)
    assert (s[:10] < 0.5).all() and (s[10:] > 0.5).all()
    # leave-one-out: a lone sample of its own class is not its own neighbour
    lone = knn_scores(np.array([[1.0, 0], [0, 1.0], [0.1, 1.0]]), np.array([1, 0, 0]), k=1)
    assert lone[0] == 0.0


def test_knn_monitor_needs_val_csv():
    cfg = get_defaults()
    cfg.DINO.KNN_EVERY = 1
    with pytest.raises(ValueError, match="DATA.VAL_CSV"):
        KNNMonitor(cfg)


def test_k_near_n_inverts_the_auroc_and_the_cap_prevents_it():
    from sklearn.metrics import roc_auc_score
    same = np.ones((8, 4))  # identical features: equal weights over the neighbours
    labels = np.array([0, 1] * 4)
    # k = n - 1: each scan is scored by all the others' labels, so positives score lower than negatives
    assert roc_auc_score(labels, knn_scores(same, labels, k=7)) == 0.0
    assert knn_k(20, 8) == 3 and knn_k(3, 100) == 3 and knn_k(5, 2) == 1
    assert collapsed(same) and collapsed(same * np.arange(1, 9)[:, None])  # scaled copies: one direction
    rng = np.random.default_rng(0)
    assert not collapsed(rng.normal(size=(8, 4)))
