"""k-NN evaluation: leave-one-out weighted scores, and the DINO k-NN monitor's config check."""
import numpy as np
import pytest

from config import get_defaults
from evaluation.knn import KNNMonitor, knn_scores


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
