"""The collapse monitor's numbers on constructed features: isotropic, rank 1, rank 2, constant."""
import numpy as np
import pytest

from evaluation.collapse import effective_rank, feature_std, spectrum


def rankme_by_definition(x: np.ndarray) -> float:
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum()
    return float(np.exp(-sum(pk * np.log(pk) for pk in p if pk > 0)))


def test_isotropic_features_use_every_direction():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 16))
    assert effective_rank(x) == pytest.approx(16, abs=0.05)  # equal singular values -> D
    assert feature_std(x) == pytest.approx(1 / np.sqrt(16), rel=0.02)  # SimSiam's healthy value
    s = spectrum(x)
    assert s["dim"] == 16 and s["n"] == 20000 and s["healthy_std"] == pytest.approx(0.25)
    assert s["top1_share"] == pytest.approx(1 / 16, abs=0.01)


def test_rank_one_features():
    rng = np.random.default_rng(1)
    x = np.outer(rng.normal(size=500), rng.normal(size=8))  # every scan on one line
    assert effective_rank(x) == pytest.approx(1.0, abs=1e-6)
    # on a line through 0, l2-normalised rows are +-u: the std is |u| per dimension, not 0
    u = np.abs(x[0] / np.linalg.norm(x[0]))
    assert feature_std(x) == pytest.approx(u.mean() * np.sqrt(1 - np.mean(np.sign(x[:, 0])) ** 2), rel=1e-6)
    one_direction = np.outer(np.abs(rng.normal(size=500)) + 0.1, rng.normal(size=8))  # same direction, any length
    assert effective_rank(one_direction) == pytest.approx(1.0, abs=1e-6)
    assert feature_std(one_direction) == pytest.approx(0.0, abs=1e-9)  # complete collapse


def test_rank_two_features():
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(2000, 2)))  # orthonormal columns: singular values = the scales
    equal = np.c_[q * 5.0, np.zeros((2000, 6))]
    assert effective_rank(equal) == pytest.approx(2.0, abs=1e-9)
    unequal = np.c_[q @ np.diag([3.0, 1.0]), np.zeros((2000, 6))]
    p = np.array([3.0, 1.0]) / 4.0
    assert effective_rank(unequal) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)  # 1.75
    mixed = unequal @ rng.normal(size=(8, 8))  # a rotation and scaling of the same 2-d subspace
    assert effective_rank(mixed) == pytest.approx(rankme_by_definition(mixed), rel=1e-9)
    assert 1.0 < effective_rank(mixed) <= 2.0 + 1e-9


def test_zero_features_and_bad_input():
    assert effective_rank(np.zeros((10, 4))) == 1.0
    assert feature_std(np.zeros((10, 4))) == 0.0
    with pytest.raises(ValueError, match="shape"):
        effective_rank(np.ones(5))
    with pytest.raises(ValueError, match="shape"):
        feature_std(np.ones((1, 5)))
    bad = np.ones((4, 3))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="1 non-finite"):
        effective_rank(bad)
