"""Samplers: the engine's epoch sampler keys, the downstream sampler's balance, seeding, resumption and
sharding, and the sampler the config asks for."""
import numpy as np
import pytest

from config import get_defaults
from engine.samplers import RandomEpochSampler, balanced_weights, build_train_sampler


def tiny_cfg(**downstream):
    cfg = get_defaults()
    for k, v in downstream.items():
        cfg.DOWNSTREAM[k] = v
    return cfg


def test_balanced_weights_give_classes_equal_mass():
    y = np.array([1, 0, 0, 0, 0, 0, 0, np.nan, 0, 0])
    w = balanced_weights(y)
    assert w.sum() == pytest.approx(1.0)
    assert w[y == 1].sum() == pytest.approx(w[y == 0].sum())
    assert w[np.isnan(y)].sum() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="positives and negatives"):
        balanced_weights(np.zeros(5))


def test_balanced_sampler_balances_is_seeded_and_distributed():
    y = np.array([1.0] * 10 + [0.0] * 90)
    w = balanced_weights(y)
    ranks = [RandomEpochSampler(100, 4000, w, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for s in ranks:
        s.set_epoch(1)
    draws = [np.array([i for i, e in s]) for s in ranks]
    assert all(len(d) == 2000 == len(s) for d, s in zip(draws, ranks))
    assert all(e == 1 for _, e in ranks[0])
    both = np.concatenate(draws)
    assert 0.45 < (y[both] == 1).mean() < 0.55  # balanced although 10% are positive
    again = RandomEpochSampler(100, 4000, w, seed=3, num_replicas=2, rank=0)
    again.set_epoch(1, start=5)
    assert [i for i, _ in again] == list(draws[0][5:])  # same stream, resumable
    again.set_epoch(2)
    assert [i for i, _ in again] != list(draws[0])  # another epoch, another draw


def test_samples_per_epoch_without_weights_is_a_permutation_pass():
    s = RandomEpochSampler(50, 20, None, seed=0, num_replicas=1, rank=0)
    idx = [i for i, _ in s]
    assert len(idx) == 20 and len(set(idx)) == 20  # a random subset, no repeats
    s = RandomEpochSampler(10, 30, None, seed=0, num_replicas=1, rank=0)
    idx = [i for i, _ in s]
    assert sorted(idx) == sorted(list(range(10)) * 3)  # three full passes


def test_build_train_sampler_follows_the_config():
    y = np.array([[1.0], [0.0], [0.0], [0.0]])
    assert build_train_sampler(tiny_cfg(IMBALANCE="pos_weight"), y) is None  # the engine's full pass
    s = build_train_sampler(tiny_cfg(IMBALANCE="none", SAMPLES_PER_EPOCH=12), y)
    assert s.weights is None and len(s) == 12
    s = build_train_sampler(tiny_cfg(IMBALANCE="balanced_sampler"), y)
    assert s.weights is not None and len(s) == 4
