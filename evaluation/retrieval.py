"""Scan retrieval by cosine similarity: top-k neighbours, mAP@k and precision@k per label.

Definitions (used by ``tools/retrieval.py`` and documented in the README):

* **Candidates** of a query: every other scan, except scans of the query's own group (patient)
  when groups are given (leave-one-out, or leave-one-group-out). For a label L, only candidates
  whose L is known (not blank) take part.
* **Queries** for label L: the scans positive for L (blank and negative scans are not queries).
  A query whose candidates hold no positive for L is left out (its AP is undefined) and counted
  in ``n_queries_without_relevant``.
* **Relevant** neighbour: a candidate positive for L.
* **precision@k** of a query: relevant neighbours among its ``k' = min(k, C)`` nearest candidates
  (``C`` = number of candidates), divided by ``k'``. Chance: ``R / C`` (``R`` = relevant candidates),
  the prevalence among the candidates, which is also the exact expectation under a random ranking.
* **AP@k** of a query: ``sum_{i <= k'} P@i * rel_i / min(k, R)`` (``rel_i`` = 1 when the i-th
  neighbour is relevant), so a ranking that puts ``min(k, R)`` relevant scans first scores 1.
  Chance: its exact expectation under a uniformly random ranking of the query's candidates,
  ``[(R/C) H_k' + R(R-1)/(C(C-1)) (k' - H_k')] / min(k, R)`` with ``H_k'`` the k'-th harmonic
  number (see :func:`expected_ap_at_k_random`). For ``k >= C`` this is the expected full AP,
  close to the prevalence; for small k and ``R >= k`` it is lower (about ``p^2 + p(1-p) H_k / k``
  at prevalence p), so always compare mAP@k with the chance value printed beside it.
* **mAP@k**, **mean precision@k** and their chance levels: means over the label's queries.

Everything runs in numpy on L2-normalised features with chunked matrix products: a chunk of
queries against all candidates at a time (``chunk x N`` floats, never ``N x N``).
"""
from __future__ import annotations

import csv
import os
from typing import Iterator, Optional, Sequence

import numpy as np

CHUNK_ELEMENTS = 1 << 25  # similarity entries per chunk (~128 MB float32) when chunk_size is not given


def l2_normalize(features: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 (a zero row stays zero).

    Args:
        features: ``[N, D]``.
        eps: floor of the norm.
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D]; got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise ValueError(f"features hold NaN or inf (first at row {bad})")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, eps)


def group_codes(groups: Optional[Sequence], n: int) -> np.ndarray:
    """Integer code per row (equal codes = same group); each row its own group when ``groups`` is None.

    Args:
        groups: ``[N]`` group labels (any hashable values) or None.
        n: number of rows.
    """
    if groups is None:
        return np.arange(n, dtype=np.int64)
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must hold one value per row ({n}); got shape {g.shape}")
    return np.unique(g, return_inverse=True)[1].astype(np.int64).reshape(n)


def _chunk_rows(n_queries: int, n: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size = {chunk_size}; it must be >= 1")
        return int(chunk_size)
    return max(1, min(n_queries, CHUNK_ELEMENTS // max(n, 1)))


def iter_similarity_chunks(x: np.ndarray, queries: np.ndarray, codes: np.ndarray, chunk_size: Optional[int] = None
                           ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Cosine similarities of chunks of queries against all rows, own group masked.

    Args:
        x: L2-normalised features ``[N, D]`` (float32).
        queries: row indices of the queries ``[Q]``.
        codes: group code per row ``[N]`` (:func:`group_codes`).
        chunk_size: queries per chunk (default: about :data:`CHUNK_ELEMENTS` / N).

    Yields:
        ``(query_rows [q], sim [q, N])`` with ``-inf`` at the query itself and its group.
    """
    step = _chunk_rows(len(queries), len(x), chunk_size)
    for start in range(0, len(queries), step):
        q = queries[start:start + step]
        sim = x[q] @ x.T  # [q, N]
        sim[codes[q][:, None] == codes[None, :]] = -np.inf  # self and same group (self is in its group)
        yield q, sim


def _top_k(sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` columns per row of ``sim [q, N]``, sorted by decreasing similarity (ties: lower index).

    Returns ``idx [q, k]`` (-1 where a row has fewer than k finite entries) and ``sim [q, k]`` (NaN there).
    """
    n = sim.shape[1]
    kk = min(k, n)
    if kk < n:
        part = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]  # [q, kk] unsorted
    else:
        part = np.broadcast_to(np.arange(n), sim.shape).copy()
    vals = np.take_along_axis(sim, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)  # by similarity, then by index: deterministic ties
    idx = np.take_along_axis(part, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    if kk < k:
        idx = np.concatenate([idx, np.full((idx.shape[0], k - kk), -1, np.int64)], axis=1)
        vals = np.concatenate([vals, np.full((vals.shape[0], k - kk), -np.inf, vals.dtype)], axis=1)
    missing = ~np.isfinite(vals)
    idx = np.where(missing, -1, idx).astype(np.int64)
    vals = np.where(missing, np.nan, vals).astype(np.float32)
    return idx, vals


def cosine_topk(features: np.ndarray, k: int, groups: Optional[Sequence] = None,
                queries: Optional[np.ndarray] = None, candidates: Optional[np.ndarray] = None,
                chunk_size: Optional[int] = None, normalized: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine neighbours of each query among the candidates, leaving out its own group.

    Args:
        features: ``[N, D]``.
        k: neighbours per query (>= 1).
        groups: ``[N]`` group per row (patient); rows of the query's group are never neighbours.
            None: only the query itself is left out.
        queries: row indices of the queries (default: every row).
        candidates: bool ``[N]``, rows that may be neighbours (default: every row).
        chunk_size: queries per matrix product (memory ``chunk_size x N`` floats).
        normalized: ``features`` are already L2-normalised float32.

    Returns:
        ``indices [Q, k]`` int64 (-1 where fewer than k candidates exist) and ``similarities
        [Q, k]`` float32 (NaN there), best first.
    """
    if int(k) < 1:
        raise ValueError(f"k = {k}; it must be >= 1")
    x = np.asarray(features, np.float32) if normalized else l2_normalize(features)
    n = len(x)
    codes = group_codes(groups, n)
    q_rows = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64).reshape(-1)
    cand = None if candidates is None else np.asarray(candidates, dtype=bool)
    if cand is not None and cand.shape != (n,):
        raise ValueError(f"candidates must be a bool mask of {n} rows; got shape {cand.shape}")
    out_idx = np.full((len(q_rows), int(k)), -1, np.int64)
    out_sim = np.full((len(q_rows), int(k)), np.nan, np.float32)
    done = 0
    for q, sim in iter_similarity_chunks(x, q_rows, codes, chunk_size):
        if cand is not None:
            sim[:, ~cand] = -np.inf
        idx, vals = _top_k(sim, int(k))
        out_idx[done:done + len(q)] = idx
        out_sim[done:done + len(q)] = vals
        done += len(q)
    return out_idx, out_sim


def _harmonic(m: np.ndarray) -> np.ndarray:
    """``H_m = sum_{i=1..m} 1/i`` for integer arrays ``m >= 0``."""
    m = np.asarray(m, dtype=np.int64)
    table = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, max(int(m.max(initial=0)), 1) + 1))])
    return table[m]


def expected_ap_at_k_random(n_relevant: np.ndarray, n_candidates: np.ndarray, k: int) -> np.ndarray:
    """Exact expected AP@k (module definition) of a uniformly random ranking.

    With ``k' = min(k, C)``: ``E[sum_{i<=k'} rel_i P@i] = (R/C) H_k' + R(R-1)/(C(C-1)) (k' - H_k')``
    (``E[rel_i] = R/C`` and ``E[rel_i rel_j] = R(R-1)/(C(C-1))`` for ``i != j``), divided by
    ``min(k, R)``.

    Args:
        n_relevant: ``R`` per query (>= 1).
        n_candidates: ``C`` per query (>= R).
        k: cut-off.
    """
    r = np.asarray(n_relevant, dtype=np.float64)
    c = np.asarray(n_candidates, dtype=np.float64)
    if np.any(r < 1) or np.any(c < r):
        raise ValueError("expected_ap_at_k_random needs 1 <= n_relevant <= n_candidates")
    kk = np.minimum(int(k), c).astype(np.int64)
    h = _harmonic(kk)
    pair = np.where(c > 1, r * (r - 1) / np.maximum(c * (c - 1), 1.0), 0.0)
    return ((r / c) * h + pair * (kk - h)) / np.minimum(int(k), r)


def ap_at_k(relevant: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """AP@k per query from the relevance of its ranked neighbours.

    Args:
        relevant: bool ``[Q, k]``, neighbour i of query q is relevant (False for padding).
        n_relevant: ``R`` per query ``[Q]`` (>= 1): relevant candidates in all.
        k: cut-off (``relevant`` has k columns).

    Returns:
        ``[Q]`` float64 in [0, 1].
    """
    rel = np.asarray(relevant, dtype=np.float64)[:, :k]
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    prec = np.cumsum(rel, axis=1) / ranks  # P@i [Q, k]
    return (prec * rel).sum(axis=1) / np.minimum(k, np.asarray(n_relevant, dtype=np.float64))


def retrieval_metrics(features: np.ndarray, labels: np.ndarray, label_names: Sequence[str], k: int = 10,
                      groups: Optional[Sequence] = None, chunk_size: Optional[int] = None) -> dict:
    """mAP@k and precision@k per label, with chance levels (definitions in the module docstring).

    Args:
        features: ``[N, D]`` (cosine similarity; need not be normalised).
        labels: ``[N, L]`` 1 / 0, NaN = blank (unknown: neither query nor candidate for that label).
        label_names: the L names.
        k: cut-off.
        groups: ``[N]`` group per row (patient); a query's own group is never retrieved.
        chunk_size: queries per matrix product (default bounded by :data:`CHUNK_ELEMENTS`).

    Returns:
        ``{"k", "n", "grouped", "labels": {name: {"map_at_k", "map_chance", "precision_at_k",
        "precision_chance", "n_queries", "n_queries_without_relevant", "n_positive", "n_known",
        "prevalence"}}, "macro": {...means over labels with queries...}}``; a label without usable
        queries gets None values and a ``reason``.
    """
    x = l2_normalize(features)
    n = len(x)
    lab = np.asarray(labels, dtype=np.float64)
    if lab.ndim == 1:
        lab = lab[:, None]
    names = list(label_names)
    if lab.shape != (n, len(names)):
        raise ValueError(f"labels must be [N, L] = [{n}, {len(names)}]; got {lab.shape}")
    ok = np.isnan(lab) | (lab == 0) | (lab == 1)
    if not ok.all():
        r, c = np.argwhere(~ok)[0]
        raise ValueError(f"label {names[c]!r} of row {r} is {lab[r, c]!r}; expected 0, 1 or blank (NaN)")
    k = int(k)
    if k < 1:
        raise ValueError(f"k = {k}; it must be >= 1")
    codes = group_codes(groups, n)
    n_groups = int(codes.max()) + 1 if n else 0
    out: dict = {"k": k, "n": n, "grouped": groups is not None, "labels": {}}
    plans = []  # per label: (name, known, pos, query rows, R, C, entry)
    for j, name in enumerate(names):
        known = ~np.isnan(lab[:, j])
        pos = known & (lab[:, j] == 1)
        # candidates of a query = known rows outside its group; relevant = positive ones
        known_in_group = np.bincount(codes[known], minlength=n_groups)
        pos_in_group = np.bincount(codes[pos], minlength=n_groups)
        q_all = np.flatnonzero(pos)  # sorted
        r_q = pos.sum() - pos_in_group[codes[q_all]]
        c_q = known.sum() - known_in_group[codes[q_all]]
        usable = r_q >= 1
        entry = {"n_positive": int(pos.sum()), "n_known": int(known.sum()),
                 "prevalence": float(pos.sum() / known.sum()) if known.any() else None,
                 "n_queries": int(usable.sum()), "n_queries_without_relevant": int((~usable).sum())}
        out["labels"][name] = entry
        plans.append((known, pos, q_all[usable], r_q[usable], c_q[usable], entry))

    # one pass of matrix products over the union of all labels' queries; per label, its own
    # candidates (known rows) and top-k
    union = np.unique(np.concatenate([p[2] for p in plans])) if plans else np.zeros(0, np.int64)
    rel = [np.zeros((len(p[2]), k), dtype=bool) for p in plans]  # [Q_L, k] per label
    for q, sim in iter_similarity_chunks(x, union, codes, chunk_size):
        for (known, pos, q_rows, _, _, _), rel_l in zip(plans, rel):
            sel = np.isin(q, q_rows)
            if not sel.any():
                continue
            s = sim[sel]  # [q', N] copy
            s[:, ~known] = -np.inf
            idx, _ = _top_k(s, k)
            rel_l[np.searchsorted(q_rows, q[sel])] = (idx >= 0) & pos[np.maximum(idx, 0)]

    for (_, _, q_rows, r_q, c_q, entry), rel_l in zip(plans, rel):
        if len(q_rows) == 0:
            entry.update(map_at_k=None, map_chance=None, precision_at_k=None, precision_chance=None,
                         reason=_no_query_reason(entry["n_positive"], entry["n_known"]))
            continue
        entry.update(
            map_at_k=float(ap_at_k(rel_l, r_q, k).mean()),
            map_chance=float(expected_ap_at_k_random(r_q, c_q, k).mean()),
            precision_at_k=float((rel_l.sum(axis=1) / np.minimum(k, c_q)).mean()),
            precision_chance=float((r_q / c_q).mean()),
        )
    scored = [e for e in out["labels"].values() if e["map_at_k"] is not None]
    keys = ("map_at_k", "map_chance", "precision_at_k", "precision_chance")
    out["macro"] = {key: (float(np.mean([e[key] for e in scored])) if scored else None) for key in keys}
    out["macro"]["n_labels"] = len(scored)
    return out


def _no_query_reason(n_positive: int, n_known: int) -> str:
    """Why a label has no usable query (a query needs another positive scan outside its group)."""
    if n_positive == 0:
        return f"no positive scan among the {n_known} with a known label"
    if n_positive == 1:
        return "only one positive scan: it has no other positive to retrieve"
    return f"none of the {n_positive} positive scans has a positive candidate outside its own group"


def write_neighbor_index(path: str, features: np.ndarray, ids: Sequence[str], k: int,
                         groups: Optional[Sequence] = None, chunk_size: Optional[int] = None) -> int:
    """Write every scan's top-k neighbours as CSV ``query_id, rank, neighbor_id, similarity``.

    Rank 1 is the nearest; a scan with fewer than k candidates (all others in its group) has fewer
    lines. Written chunk by chunk through a temporary file, then renamed.

    Args:
        path: output CSV.
        features: ``[N, D]``.
        ids: ``[N]`` scan ids.
        k: neighbours per scan.
        groups: ``[N]`` groups left out of each query's candidates (None: only the scan itself).
        chunk_size: queries per matrix product.

    Returns:
        Number of neighbour lines written.
    """
    x = l2_normalize(features)
    ids = [str(i) for i in ids]
    if len(ids) != len(x):
        raise ValueError(f"{len(ids)} ids for {len(x)} feature rows")
    codes = group_codes(groups, len(x))
    tmp = f"{path}.{os.getpid()}.tmp"
    lines = 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["query_id", "rank", "neighbor_id", "similarity"])
        for q, sim in iter_similarity_chunks(x, np.arange(len(x)), codes, chunk_size):
            idx, vals = _top_k(sim, int(k))
            for row, qi in enumerate(q):
                for r in range(idx.shape[1]):
                    j = idx[row, r]
                    if j < 0:
                        break
                    w.writerow([ids[qi], r + 1, ids[j], f"{vals[row, r]:.6f}"])
                    lines += 1
    os.replace(tmp, path)
    return lines
