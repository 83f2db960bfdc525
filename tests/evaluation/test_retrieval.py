"""Tests of evaluation/retrieval.py: top-k, AP@k and its exact chance level, metrics, neighbour index."""
from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest

from evaluation import retrieval as R
from evaluation.retrieval import (ap_at_k, cosine_topk, expected_ap_at_k_random, l2_normalize,
                                  retrieval_metrics, write_neighbor_index)


def brute_topk(x: np.ndarray, k: int, groups=None, candidates=None) -> list[list[int]]:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    n = len(x)
    g = np.arange(n) if groups is None else np.asarray(groups)
    out = []
    for i in range(n):
        ok = [j for j in range(n) if g[j] != g[i] and (candidates is None or candidates[j])]
        out.append(sorted(ok, key=lambda j: (-sim[i, j], j))[:k])
    return out


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_cosine_topk_matches_brute_force_with_groups_and_candidates(chunk_size) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 5))
    groups = rng.integers(0, 9, size=23)
    cand = rng.random(23) < 0.7
    idx, sim = cosine_topk(x, 4, groups=groups, candidates=cand, chunk_size=chunk_size)
    expect = brute_topk(x, 4, groups, cand)
    for i in range(23):
        got = [int(j) for j in idx[i] if j >= 0]
        assert got == expect[i]
        assert np.isnan(sim[i, len(got):]).all()
        assert np.all(np.diff(sim[i, :len(got)]) <= 1e-6)  # best first
    xn = l2_normalize(x)
    np.testing.assert_allclose(sim[0, 0], xn[0] @ xn[idx[0, 0]], rtol=1e-5)


def test_cosine_topk_never_returns_self_or_group_and_pads() -> None:
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # rows 0 and 1 identical
    idx, _ = cosine_topk(x, 2)
    assert idx[0, 0] == 1 and idx[1, 0] == 0  # leave-one-out: the twin is found
    idx, sim = cosine_topk(x, 2, groups=["a", "a", "b"])
    assert idx[0].tolist() == [2, -1] and idx[2].tolist() == [0, 1]  # same group excluded, padded
    assert np.isnan(sim[0, 1])
    idx, _ = cosine_topk(x, 5, queries=np.array([2]))
    assert idx.shape == (1, 5) and idx[0, :2].tolist() == [0, 1] and (idx[0, 2:] == -1).all()


def test_chunks_bound_memory(monkeypatch) -> None:
    monkeypatch.setattr(R, "CHUNK_ELEMENTS", 40)
    x = l2_normalize(np.random.default_rng(1).normal(size=(20, 3)))
    shapes = [sim.shape for _, sim in R.iter_similarity_chunks(x, np.arange(20), np.arange(20))]
    assert all(s[0] * s[1] <= 40 for s in shapes) and sum(s[0] for s in shapes) == 20
    a = cosine_topk(x, 3)[0]
    monkeypatch.setattr(R, "CHUNK_ELEMENTS", 1 << 25)
    np.testing.assert_array_equal(a, cosine_topk(x, 3)[0])


def test_l2_normalize_rejects_nan_and_bad_shape() -> None:
    with pytest.raises(ValueError, match="row 1"):
        l2_normalize(np.array([[1.0, 2.0], [np.nan, 0.0]]))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        l2_normalize(np.zeros(3))
    np.testing.assert_allclose(np.linalg.norm(l2_normalize(np.array([[3.0, 4.0]])), axis=1), 1.0)


def test_ap_at_k_hand_examples() -> None:
    rel = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
    ap = ap_at_k(rel, np.array([2, 3, 5, 1]), 3)
    np.testing.assert_allclose(ap, [(1 + 2 / 3) / 2, 0.0, 1.0, 0.5])


@pytest.mark.parametrize("r, c, k", [(1, 1, 10), (1, 5, 3), (2, 6, 3), (3, 7, 2), (4, 6, 6), (5, 7, 10), (2, 2, 1)])
def test_expected_ap_is_exact_under_random_ranking(r, c, k) -> None:
    """Average of AP@k over every ranking of C candidates holding R relevant ones."""
    values = []
    for perm in itertools.permutations(range(c)):
        rel = np.array([[p < r for p in perm[:k]]])
        values.append(ap_at_k(rel, np.array([r]), k)[0] if rel.shape[1] == k else
                      ap_at_k(np.pad(rel, ((0, 0), (0, k - rel.shape[1]))), np.array([r]), k)[0])
    np.testing.assert_allclose(expected_ap_at_k_random(np.array([r]), np.array([c]), k)[0], np.mean(values),
                               rtol=1e-12)


def test_expected_ap_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        expected_ap_at_k_random(np.array([0]), np.array([3]), 2)
    with pytest.raises(ValueError):
        expected_ap_at_k_random(np.array([4]), np.array([3]), 2)


def _dataset(n: int, seed: int, noise: float):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 2)) < [0.3, 0.5]).astype(np.float64)
    feats = np.concatenate([labels * 2.0, np.zeros((n, 6))], axis=1) + noise * rng.normal(size=(n, 8))
    return feats, labels


def test_supervised_signal_gives_map_far_above_chance_and_random_gives_chance() -> None:
    feats, labels = _dataset(300, 0, noise=0.5)
    res = retrieval_metrics(feats, labels, ["A", "B"], k=10)
    for name in ("A", "B"):
        e = res["labels"][name]
        assert e["map_at_k"] > e["map_chance"] + 0.4
        assert e["precision_at_k"] > e["precision_chance"] + 0.3
        assert e["n_queries"] == int(labels[:, "AB".index(name)].sum())
    rng = np.random.default_rng(5)
    maps, chances = [], []
    for s in range(5):
        r = retrieval_metrics(rng.normal(size=(300, 16)), labels, ["A", "B"], k=10)["labels"]["A"]
        maps.append(r["map_at_k"])
        chances.append(r["map_chance"])
    assert abs(np.mean(maps) - np.mean(chances)) < 0.03
    assert res["labels"]["A"]["precision_chance"] == pytest.approx((labels[:, 0].sum() - 1) / 299)


def test_perfect_features_score_one() -> None:
    labels = np.array([[1], [1], [1], [0], [0], [0]], dtype=float)
    feats = np.concatenate([labels, 1 - labels], axis=1)  # positives and negatives orthogonal
    res = retrieval_metrics(feats, labels, ["L"], k=2)
    e = res["labels"]["L"]
    assert e["map_at_k"] == pytest.approx(1.0) and e["precision_at_k"] == pytest.approx(1.0)
    assert e["map_chance"] < 1 and e["precision_chance"] == pytest.approx(2 / 5)


def test_groups_are_left_out_and_blanks_are_neither_queries_nor_candidates() -> None:
    # scans 0/1 are one patient with identical features; scan 2 is positive elsewhere
    feats = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [0.7, 0.7], [1.0, 0.05]])
    labels = np.array([[1], [1], [1], [0], [np.nan], [0]], dtype=float)
    plain = retrieval_metrics(feats, labels, ["L"], k=1)["labels"]["L"]
    grouped = retrieval_metrics(feats, labels, ["L"], k=1, groups=["p", "p", "q", "r", "s", "t"])["labels"]["L"]
    assert plain["map_at_k"] > grouped["map_at_k"]  # the twin no longer counts
    assert plain["n_known"] == 5 and plain["n_queries"] == 3
    # scan 4 (blank) is the nearest to nobody's benefit: never a candidate
    idx, _ = cosine_topk(feats, 5, candidates=~np.isnan(labels[:, 0]))
    assert 4 not in idx
    # a label whose positives are all one patient has no usable query
    lab2 = np.array([[1], [1], [0], [0], [0], [0]], dtype=float)
    e = retrieval_metrics(feats, lab2, ["M"], k=2, groups=["p", "p", "q", "r", "s", "t"])["labels"]["M"]
    assert e["map_at_k"] is None and e["n_queries_without_relevant"] == 2
    assert e["reason"] == "none of the 2 positive scans has a positive candidate outside its own group"


def test_a_label_without_queries_says_why() -> None:
    feats = np.eye(4)
    none = np.array([[0], [0], [np.nan], [0]], dtype=float)
    one = np.array([[1], [0], [0], [0]], dtype=float)
    res = retrieval_metrics(feats, np.concatenate([none, one], axis=1), ["none", "one"], k=2)
    assert res["labels"]["none"]["reason"] == "no positive scan among the 3 with a known label"
    assert res["labels"]["one"]["reason"] == "only one positive scan: it has no other positive to retrieve"
    assert res["macro"]["n_labels"] == 0 and res["macro"]["map_at_k"] is None


def test_retrieval_metrics_checks_inputs() -> None:
    feats = np.zeros((3, 2)) + 1
    with pytest.raises(ValueError, match="expected 0, 1 or blank"):
        retrieval_metrics(feats, np.array([[1], [2], [0]]), ["L"])
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        retrieval_metrics(feats, np.zeros((3, 2)), ["L"])
    with pytest.raises(ValueError, match="k = 0"):
        retrieval_metrics(feats, np.zeros((3, 1)), ["L"], k=0)


def test_chunked_metrics_equal_unchunked() -> None:
    feats, labels = _dataset(60, 3, noise=2.0)
    a = retrieval_metrics(feats, labels, ["A", "B"], k=5, groups=np.arange(60) // 2, chunk_size=1)
    b = retrieval_metrics(feats, labels, ["A", "B"], k=5, groups=np.arange(60) // 2)
    assert a == b


def test_write_neighbor_index(tmp_path) -> None:
    feats = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    path = tmp_path / "sub" / "nn.csv"
    n = write_neighbor_index(str(path), feats, ["a", "b", "c", "d"], k=2, groups=["p", "p", "q", "r"])
    rows = list(csv.DictReader(open(path)))
    assert n == len(rows) == 8
    first = [r for r in rows if r["query_id"] == "a"]
    assert [r["neighbor_id"] for r in first] == ["d", "c"] and [r["rank"] for r in first] == ["1", "2"]
    assert all(r["neighbor_id"] != r["query_id"] for r in rows)
    assert float(rows[0]["similarity"]) == pytest.approx(float(l2_normalize(feats)[0] @ l2_normalize(feats)[3]),
                                                         abs=1e-6)
    assert not list(tmp_path.glob("sub/*.tmp"))
