"""Is model A better than model B on the same test cases? Paired AUROC comparison.

Two tests of the same question, both paired (each test case scores both models):

* **DeLong's test** (DeLong, DeLong & Clarke-Pearson 1988, in the midrank form of Sun & Xu 2014):
  the AUROC of each model is the mean of its per-case "structural components"; their covariance
  across the two models gives the variance of the difference, and ``z = diff / se`` a two-sided
  normal p-value.
* **Paired bootstrap**: positives and negatives are resampled apart (as the CIs of
  :mod:`evaluation.metrics`), the *same* resample scores both models, and the 2.5 / 97.5
  percentiles of ``AUROC(A) - AUROC(B)`` are the 95% CI. Resampling the models independently would
  ignore that they err on the same hard cases and give CIs far too wide.

Differences are always ``A - B``. A difference is called significant when the bootstrap CI excludes 0
and DeLong's p < 0.05; when the two disagree the sentence says so (borderline).

``compare_predictions`` reads two ``predictions.csv`` files (the output of ``main_downstream.py``),
matches rows by ``id`` (both must hold the same cases with the same targets) and compares every
label at scan level, and at group level (MAX probability per group, as the metrics' ``test_group``)
when both files have a ``group`` column. ``tools/compare.py`` is its command line.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from scipy.stats import norm, rankdata

from evaluation.metrics import (_auroc_resamples, _check_pair, _percentile_ci, _score_levels, group_aggregate,
                                read_predictions_csv, stratified_resamples)

ALPHA = 0.05


def _paired_inputs(y_true: Any, score_a: Any, score_b: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets ``[n]`` (blanks dropped) and both models' scores ``[S, n]`` (one row per draw)."""
    a, b = np.asarray(score_a, dtype=np.float64), np.asarray(score_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"model A has scores of shape {a.shape} but model B {b.shape}")
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    t, _ = _check_pair(y_true, a2[0])
    for row in (*a2, *b2):
        _check_pair(t, row)
    keep = ~np.isnan(t)
    return t[keep], a2[:, keep], b2[:, keep]


def delong_test(y_true: Any, score_a: Any, score_b: Any) -> dict[str, Any]:
    """DeLong's test of ``AUROC(A) == AUROC(B)`` on the same cases.

    Args:
        y_true: ``[N]`` targets 0/1 (NaN = blank, excluded).
        score_a: ``[N]`` scores of model A (higher = more positive).
        score_b: ``[N]`` scores of model B on the same cases.

    Returns:
        ``auroc_a``, ``auroc_b``, ``diff`` (A - B), ``se`` of the difference, ``z`` and the two-sided
        ``p_value``; all None (with a ``reason``) when a class is absent. When the difference has
        zero variance (e.g. identical models) ``z`` is None and ``p_value`` is 1.0 if ``diff == 0``
        else 0.0.
    """
    t, a, b = _paired_inputs(y_true, score_a, score_b)
    if a.shape[0] != 1:
        raise ValueError("delong_test compares one score vector per model, got several rows")
    pos, neg = t == 1, t == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m == 0 or n == 0:
        return {"auroc_a": None, "auroc_b": None, "diff": None, "se": None, "z": None, "p_value": None,
                "reason": f"{m} positives and {n} negatives: AUROC needs both"}
    v10, v01 = [], []  # structural components [2, m] and [2, n]
    for s in (a[0], b[0]):
        r_all = rankdata(s)  # midranks: ties count one half
        r_pos, r_neg = rankdata(s[pos]), rankdata(s[neg])
        v10.append((r_all[pos] - r_pos) / n)  # share of negatives each positive beats
        v01.append(1.0 - (r_all[neg] - r_neg) / m)  # share of positives that beat each negative
    v10, v01 = np.array(v10), np.array(v01)
    auc = v10.mean(axis=1)
    s10 = np.cov(v10) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(v01) if n > 1 else np.zeros((2, 2))
    contrast = np.array([1.0, -1.0])
    var = float(contrast @ s10 @ contrast / m + contrast @ s01 @ contrast / n)
    diff = float(auc[0] - auc[1])
    if var <= 1e-15:
        z, p = None, (1.0 if abs(diff) < 1e-12 else 0.0)
    else:
        z = diff / np.sqrt(var)
        p = float(2.0 * norm.sf(abs(z)))
        z = float(z)
    return {"auroc_a": float(auc[0]), "auroc_b": float(auc[1]), "diff": diff, "se": float(np.sqrt(max(var, 0.0))),
            "z": z, "p_value": p}


def paired_bootstrap_diff(y_true: Any, score_a: Any, score_b: Any, n_bootstrap: int = 1000,
                          seed: int = 0) -> np.ndarray:
    """``AUROC(A) - AUROC(B)`` on ``n_bootstrap`` paired, stratified resamples of the cases.

    Args:
        y_true: ``[N]`` targets 0/1 (NaN = blank, excluded).
        score_a: ``[N]`` scores of model A, or ``[S, N]``: S draws of A (e.g. few-shot seeds); the
            difference is then the mean over draws of ``AUROC(A_s) - AUROC(B_s)``.
        score_b: the same shape for model B (row s paired with A's row s).
        n_bootstrap: number of resamples; each scores both models on the same cases.
        seed: seed of the resampling generator.

    Returns:
        ``[n_bootstrap]`` differences (empty when a class is absent).
    """
    t, a, b = _paired_inputs(y_true, score_a, score_b)
    pos_i, neg_i = np.flatnonzero(t == 1), np.flatnonzero(t == 0)
    if n_bootstrap <= 0 or pos_i.size == 0 or neg_i.size == 0:
        return np.empty(0)
    levels = [_score_levels(row) for row in (*a, *b)]
    out = np.empty(n_bootstrap)
    for s, idx in stratified_resamples(pos_i, neg_i, n_bootstrap, seed):
        aucs = np.stack([_auroc_resamples(t, lv, n_lv, idx) for lv, n_lv in levels])  # [2S, k]
        out[s:s + idx.shape[0]] = (aucs[:a.shape[0]] - aucs[a.shape[0]:]).mean(axis=0)
    return out


def _sentence(r: dict[str, Any], name_a: str, name_b: str) -> str:
    """One plain sentence: which model is better, by how much, and whether that is significant."""
    if r["diff"] is None:
        return f"{name_a} vs {name_b}: not comparable ({r['reason']})."
    lo, hi = r["ci95"] if r["ci95"] else (float("nan"), float("nan"))
    p = r["p_value"]
    stats = f"{r['diff']:+.3f} AUROC, paired 95% CI [{lo:+.3f}, {hi:+.3f}]" + (
        f", DeLong p = {p:.3g}" if p is not None else "")
    ci_excludes = bool(r["ci95"]) and (lo > 0 or hi < 0)
    p_small = p is not None and p < ALPHA
    if r["significant"]:
        better, worse = (name_a, name_b) if r["diff"] > 0 else (name_b, name_a)
        return f"{better} is significantly better than {worse} ({stats})."
    if ci_excludes or p_small:
        return (f"{name_a} vs {name_b}: the difference is borderline ({stats}); the paired bootstrap and "
                "DeLong's test disagree at 5%, so do not claim it.")
    return (f"{name_a} vs {name_b}: the difference is not significant ({stats}); these test cases cannot tell "
            "the two models apart.")


def compare_auroc(y_true: Any, score_a: Any, score_b: Any, n_bootstrap: int = 1000, seed: int = 0,
                  name_a: str = "A", name_b: str = "B") -> dict[str, Any]:
    """AUROC of both models, their difference with a paired bootstrap CI, DeLong's p and a sentence.

    Args:
        y_true: ``[N]`` targets 0/1 (NaN = blank, excluded).
        score_a: ``[N]`` scores of model A.
        score_b: ``[N]`` scores of model B on the same cases.
        n_bootstrap: bootstrap resamples for the CI.
        seed: bootstrap seed.
        name_a: how the sentence names model A.
        name_b: how the sentence names model B.

    Returns:
        ``n``, ``n_pos``, ``n_neg``, ``auroc_a``, ``auroc_b``, ``diff`` (A - B), ``ci95`` (paired
        bootstrap, or None), ``p_value``, ``z``, ``se`` (DeLong), ``significant`` (CI excludes 0 and
        p < 0.05) and ``sentence``.
    """
    t, _, _ = _paired_inputs(y_true, score_a, score_b)
    r: dict[str, Any] = {"n": int(t.size), "n_pos": int((t == 1).sum()), "n_neg": int((t == 0).sum())}
    r.update(delong_test(y_true, score_a, score_b))
    r["ci95"] = _percentile_ci(paired_bootstrap_diff(y_true, score_a, score_b, n_bootstrap, seed))
    r["significant"] = bool(r["ci95"] is not None and r["p_value"] is not None and r["p_value"] < ALPHA
                            and (r["ci95"][0] > 0 or r["ci95"][1] < 0))
    r["sentence"] = _sentence(r, name_a, name_b)
    return r


def _match_rows(path_a: str, path_b: str) -> tuple[dict[str, Any], dict[str, Any], np.ndarray]:
    """Both files read; B's rows reordered to A's ids. Returns (a, b, index of B's row for A's row i)."""
    files = []
    for path in (path_a, path_b):
        ids, groups, names, probs, targets = read_predictions_csv(path)
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"{path}: id {dup!r} appears more than once")
        files.append({"path": path, "ids": ids, "groups": groups, "names": names, "probs": probs,
                      "targets": targets})
    a, b = files
    only_a, only_b = sorted(set(a["ids"]) - set(b["ids"])), sorted(set(b["ids"]) - set(a["ids"]))
    if only_a or only_b:
        raise ValueError(f"{path_a} and {path_b} hold different cases: {len(only_a)} ids only in the first "
                         f"(e.g. {only_a[:3]}), {len(only_b)} only in the second (e.g. {only_b[:3]}); "
                         "compare predictions on the same test split")
    pos_b = {sid: i for i, sid in enumerate(b["ids"])}
    order = np.array([pos_b[sid] for sid in a["ids"]], dtype=np.int64)
    return a, b, order


def compare_predictions(path_a: str, path_b: str, labels: Optional[Sequence[str]] = None, n_bootstrap: int = 1000,
                        seed: int = 0, name_a: str = "A", name_b: str = "B") -> dict[str, Any]:
    """Compare two ``predictions.csv`` files label by label (``A - B``), rows matched by ``id``.

    Args:
        path_a: predictions of model A.
        path_b: predictions of model B on the same cases (any row order).
        labels: labels to compare (default: every label of A; each must be in both files).
        n_bootstrap: bootstrap resamples.
        seed: bootstrap seed.
        name_a: name of model A in the sentences.
        name_b: name of model B in the sentences.

    Returns:
        ``{"a": path_a, "b": path_b, "scan": {label: compare_auroc(...)}, "group": {...}}``; ``"group"``
        only when both files have a group column.

    Raises:
        ValueError: naming the file and id/label when the files hold different cases, a label is
            missing, the targets of a case differ, or a case's group differs.
    """
    a, b, order = _match_rows(path_a, path_b)
    names = list(labels) if labels is not None else list(a["names"])
    for name in names:
        for f in (a, b):
            if name not in f["names"]:
                raise ValueError(f"{f['path']}: no label {name!r} (labels: {f['names']})")
    out: dict[str, Any] = {"a": path_a, "b": path_b, "scan": {}}
    grouped = a["groups"] is not None and b["groups"] is not None
    if grouped:
        gb = [b["groups"][j] for j in order]
        bad = [i for i, (x, y) in enumerate(zip(a["groups"], gb)) if x != y]
        if bad:
            i = bad[0]
            raise ValueError(f"case {a['ids'][i]!r} is in group {a['groups'][i]!r} in {path_a} but "
                             f"{gb[i]!r} in {path_b}")
        out["group"] = {}
    for name in names:
        ja, jb = a["names"].index(name), b["names"].index(name)
        t_a, t_b = a["targets"][:, ja], b["targets"][order, jb]
        differ = ~((t_a == t_b) | (np.isnan(t_a) & np.isnan(t_b)))
        if differ.any():
            i = int(np.flatnonzero(differ)[0])
            raise ValueError(f"case {a['ids'][i]!r}, label {name!r}: target {t_a[i]} in {path_a} but {t_b[i]} in "
                             f"{path_b}; both must score the same labelled cases")
        p_a, p_b = a["probs"][:, ja], b["probs"][order, jb]
        out["scan"][name] = compare_auroc(t_a, p_a, p_b, n_bootstrap, seed, name_a, name_b)
        if grouped:
            tg, pg_a, _ = group_aggregate(t_a, p_a, a["groups"])
            _, pg_b, _ = group_aggregate(t_a, p_b, a["groups"])
            out["group"][name] = compare_auroc(tg, pg_a, pg_b, n_bootstrap, seed, name_a, name_b)
    return out


def format_comparison(result: dict[str, Any]) -> str:
    """A text table of :func:`compare_predictions` (one row per level and label) and its sentences."""
    head = (f"{'level':<6} {'label':<16} {'n':>6} {'AUROC A':>8} {'AUROC B':>8} {'A - B':>7} {'paired 95% CI':>17} "
            f"{'DeLong p':>9}")
    lines, sentences = [head, "-" * len(head)], []

    def num(v: Optional[float], fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    for level in ("scan", "group"):
        for name, r in result.get(level, {}).items():
            ci = "n/a" if not r["ci95"] else f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
            lines.append(f"{level:<6} {name:<16} {r['n']:>6} {num(r['auroc_a'], '.3f'):>8} "
                         f"{num(r['auroc_b'], '.3f'):>8} {num(r['diff'], '+.3f'):>7} {ci:>17} "
                         f"{num(r['p_value'], '.3g'):>9}")
            sentences.append(f"{level} {name}: {r['sentence']}")
    return "\n".join(lines + [""] + sentences)
