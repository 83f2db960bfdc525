"""Is segmenter A better than segmenter B on the same test cases? Paired Dice comparison.

Both runs' ``per_case.csv`` are matched by ``(id, class)`` (both must hold the same cases and
classes, scored against the same references). For every class and for the macro Dice (per-case mean
over classes), over all cases and again over the cases whose reference holds the class (``present``:
where both models predict nothing on healthy scans they tie at 1, which hides a lesion difference):

* the mean paired difference ``Dice(A) - Dice(B)`` over cases;
* a **paired bootstrap** 95% CI: the cases are resampled and the *same* resample scores both models
  (independent resampling would ignore that both err on the same hard cases);
* the **Wilcoxon signed-rank** test of the per-case differences (two-sided; cases where both
  models score the same carry no information and are dropped, ``zero_method="wilcox"``).

A difference is called significant when the CI excludes 0 and p < 0.05; when the two disagree the
sentence says it is borderline, as :mod:`evaluation.compare` does for AUROC.
"""
from __future__ import annotations

import csv
from typing import Any

import numpy as np

from evaluation.metrics import _percentile_ci
from evaluation.segmentation import row_mean

ALPHA = 0.05


def read_per_case(path: str) -> dict[tuple[str, str], tuple[float, bool]]:
    """``{(id, class): (dice, the reference holds the class)}`` of a ``per_case.csv``."""
    with open(path, newline="") as f:
        return {(r["id"], r["class"]): (float(r["dice"]), float(r["ref_ml"]) > 0) for r in csv.DictReader(f)}


def paired_dice(a: np.ndarray, b: np.ndarray, n_bootstrap: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean of ``a - b`` over cases, its paired bootstrap 95% CI and the Wilcoxon signed-rank p.

    Args:
        a: ``[N]`` Dice of model A per case.
        b: ``[N]`` Dice of model B on the same cases.
        n_bootstrap: case resamples.
        seed: their seed.
    """
    from scipy.stats import wilcoxon

    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    n = d.size
    out: dict[str, Any] = {"n_cases": int(n), "dice_a": float(np.mean(a)) if n else None,
                           "dice_b": float(np.mean(b)) if n else None, "diff": float(d.mean()) if n else None,
                           "ci95": None, "p_value": None}
    if n >= 2:
        idx = np.random.default_rng(seed).integers(0, n, (n_bootstrap, n))
        out["ci95"] = _percentile_ci(d[idx].mean(axis=1))
    if np.count_nonzero(d) >= 1:
        out["p_value"] = float(wilcoxon(d, zero_method="wilcox").pvalue)
    lo, hi = out["ci95"] or (0.0, 0.0)
    out["significant"] = bool(out["ci95"]) and (lo > 0 or hi < 0) and out["p_value"] is not None \
        and out["p_value"] < ALPHA
    return out


def sentence(r: dict[str, Any], name_a: str, name_b: str, what: str = "Dice", none: str = "no common cases") -> str:
    """One plain sentence: which is better, by how much, and whether that is significant (``none``: what to
    say when there is no case)."""
    if r["diff"] is None:
        return f"{name_a} vs {name_b}: {none}."
    lo, hi = r["ci95"] if r["ci95"] else (float("nan"), float("nan"))
    p = r["p_value"]
    ci = f"paired 95% CI [{lo:+.3f}, {hi:+.3f}]" if r["ci95"] else f"no CI from {r['n_cases']} case"
    stats = f"{r['diff']:+.3f} {what}, {ci}" + (
        f", Wilcoxon p = {p:.3g}" if p is not None else ", identical on every case")
    if r["significant"]:
        better, worse = (name_a, name_b) if r["diff"] > 0 else (name_b, name_a)
        return f"{better} is significantly better than {worse} ({stats})."
    if (r["ci95"] and (lo > 0 or hi < 0)) or (p is not None and p < ALPHA):
        return (f"{name_a} vs {name_b}: the difference is borderline ({stats}); the paired bootstrap and the "
                "Wilcoxon test disagree at 5%, so do not claim it.")
    return (f"{name_a} vs {name_b}: the difference is not significant ({stats}); these test cases cannot tell "
            "the two models apart.")


def compare_per_case(path_a: str, path_b: str, n_bootstrap: int = 2000, seed: int = 0, name_a: str = "A",
                     name_b: str = "B") -> dict[str, Any]:
    """Per class and macro: :func:`paired_dice` of two ``per_case.csv`` plus its sentence, over all cases, and
    under ``"present"`` the same over the cases whose reference holds the class (the lesion Dice; for ``macro``
    each case's mean over the classes it holds).

    Raises:
        ValueError: when the files do not hold the same (case, class) pairs or references (names a few).
    """
    a, b = read_per_case(path_a), read_per_case(path_b)
    if a.keys() != b.keys():
        only_a, only_b = sorted(set(a) - set(b))[:3], sorted(set(b) - set(a))[:3]
        raise ValueError(f"{path_a} and {path_b} hold different (case, class) pairs: only in A e.g. {only_a}, "
                         f"only in B e.g. {only_b}")
    differ = [k for k in a if a[k][1] != b[k][1]]
    if differ:
        raise ValueError(f"{path_a} and {path_b} disagree on which references hold the class (ref_ml), e.g. "
                         f"{differ[:3]}: they were not scored against the same masks")
    ids = list(dict.fromkeys(k[0] for k in a))
    classes = list(dict.fromkeys(k[1] for k in a))
    da = np.array([[a[(i, c)][0] for c in classes] for i in ids]).reshape(len(ids), len(classes))  # [N, K]
    db = np.array([[b[(i, c)][0] for c in classes] for i in ids]).reshape(da.shape)
    present = np.array([[a[(i, c)][1] for c in classes] for i in ids]).reshape(da.shape)
    out: dict[str, Any] = {}
    for k, c in enumerate(classes + ["macro"]):
        if c != "macro":
            xa, xb, there = da[:, k], db[:, k], present[:, k]
            pa, pb = xa[there], xb[there]
        else:  # each case's mean over the classes it holds, as evaluation.segmentation.summarize does
            xa, xb, there = da.mean(axis=1), db.mean(axis=1), present.any(axis=1)
            pa, pb = (row_mean(np.where(present, d, np.nan))[there] for d in (da, db))
        r = paired_dice(xa, xb, n_bootstrap, seed)
        r["sentence"] = sentence(r, name_a, name_b)
        r["present"] = paired_dice(pa, pb, n_bootstrap, seed)
        r["present"]["sentence"] = sentence(r["present"], name_a, name_b, "Dice on the cases holding the class",
                                            none="no test reference holds the class")
        out[c] = r
    return out


def format_comparison(result: dict[str, Any]) -> str:
    """Two tables (all cases; the cases holding the class) of class, cases, Dice A, Dice B, A - B [CI], p,
    and the sentences."""
    def table(rows: dict[str, Any]) -> list[str]:
        lines = [f"{'class':<12} {'cases':>5} {'Dice A':>7} {'Dice B':>7}  {'A - B [paired 95% CI]':<26} {'p':>7}",
                 "-" * 72]
        for c, r in rows.items():
            if not r["n_cases"]:
                lines.append(f"{c:<12} {0:>5}   (no case)")
                continue
            ci = f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]" if r["ci95"] else ""
            p = f"{r['p_value']:.3g}" if r["p_value"] is not None else "-"
            lines.append(f"{c:<12} {r['n_cases']:>5} {r['dice_a']:>7.3f} {r['dice_b']:>7.3f}  "
                         f"{r['diff']:+.3f} {ci:<19} {p:>7}")
        return lines

    present = {c: r["present"] for c, r in result.items()}
    return "\n".join(["All test cases (an empty reference predicted empty scores 1):"] + table(result) + [""]
                     + ["The cases whose reference holds the class:"] + table(present) + [""]
                     + [f"{c}: {r['sentence']}" for c, r in result.items()]
                     + [f"{c}, cases holding it: {r['sentence']}" for c, r in present.items()])
