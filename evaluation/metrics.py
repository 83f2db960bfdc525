"""Binary and multi-label classification metrics with bootstrap confidence intervals.

Conventions used everywhere in this module:
- Targets are float arrays with 1 = positive, 0 = negative and NaN = blank (unknown). A blank
  target excludes that sample for that label only.
- A sample is predicted positive when ``prob >= threshold`` (the convention of
  :func:`sklearn.metrics.roc_curve`). The threshold is chosen on validation data by Youden's J
  and passed in for the test data, so test metrics never see test labels twice.
- A metric that cannot be computed (a label with only one class present) is ``None`` (JSON
  ``null``) and the label's dict gets a ``"reason"``; nothing crashes.

Point estimates come from scikit-learn (``roc_auc_score``, ``average_precision_score``,
``roc_curve``, ``f1_score``, ``confusion_matrix``). The bootstrap evaluates the same AUROC on
1000 resamples at once through the Mann-Whitney form on score levels (ties count one half, as in
sklearn); tests check it equals ``roc_auc_score`` with the resample counts as sample weights.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
from sklearn.metrics import (average_precision_score, confusion_matrix, f1_score, roc_auc_score,
                             roc_curve)

#: numeric keys of a per-label result averaged into "macro"
MACRO_KEYS = ("auroc", "ap", "f1", "sensitivity", "specificity", "accuracy")
#: elements of the bootstrap index matrix processed at once (bounds memory to ~100 MB)
_CHUNK_ELEMENTS = 4_000_000


# ---------------------------------------------------------------------------------------------
# input checks
def _as_1d(name: str, a: Any) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _check_pair(y_true: Any, y_prob: Any) -> tuple[np.ndarray, np.ndarray]:
    """1-D float copies; targets in {0, 1, NaN}, probabilities finite, same length."""
    t, p = _as_1d("y_true", y_true), _as_1d("y_prob", y_prob)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.shape[0]} entries but y_prob has {p.shape[0]}")
    bad = ~np.isnan(t) & (t != 0) & (t != 1)
    if bad.any():
        raise ValueError(f"y_true holds {t[bad][0]!r} at index {int(np.flatnonzero(bad)[0])}; "
                         "targets must be 0, 1 or NaN (blank)")
    if not np.isfinite(p).all():
        i = int(np.flatnonzero(~np.isfinite(p))[0])
        raise ValueError(f"y_prob holds non-finite value {p[i]!r} at index {i}")
    return t, p


def _check_matrix(name: str, a: Any, n_labels: Optional[int] = None) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be [N] or [N, L], got shape {arr.shape}")
    if n_labels is not None and arr.shape[1] != n_labels:
        raise ValueError(f"{name} has {arr.shape[1]} label columns but {n_labels} label names were given")
    return arr


# ---------------------------------------------------------------------------------------------
# threshold and bootstrap
def youden_threshold(y_true: Any, y_prob: Any) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1 on the given data.

    Use it on validation data and pass the result to :func:`binary_metrics` for the test data.

    Args:
        y_true: ``[N]`` targets 0/1 (NaN = blank, ignored).
        y_prob: ``[N]`` predicted probabilities (or any scores; higher = more positive).

    Returns:
        The threshold ``t``; ``prob >= t`` is predicted positive. When no cut beats predicting
        everything negative, a value just above the largest score is returned (all negative).

    Raises:
        ValueError: when fewer than two classes are present (J is undefined).
    """
    t, p = _check_pair(y_true, y_prob)
    keep = ~np.isnan(t)
    t, p = t[keep], p[keep]
    n_pos = int(t.sum())
    if n_pos == 0 or n_pos == t.size:
        raise ValueError(f"Youden threshold needs both classes; got {n_pos} positives and "
                         f"{t.size - n_pos} negatives")
    fpr, tpr, thr = roc_curve(t, p)
    best = int(np.argmax(tpr - fpr))  # first maximum = highest threshold among ties
    if not np.isfinite(thr[best]):  # sklearn's leading +inf point: nothing predicted positive
        return float(np.nextafter(p.max(), np.inf))
    return float(thr[best])


def _auroc_resamples(y: np.ndarray, levels: np.ndarray, n_levels: int, idx: np.ndarray) -> np.ndarray:
    """AUROC of each resample, vectorised over resamples.

    Args:
        y: ``[n]`` targets 0/1/NaN (NaN samples count for neither class).
        levels: ``[n]`` rank of each sample's score among the unique scores (0 = lowest).
        n_levels: number of unique scores.
        idx: ``[B, m]`` sample indices of B resamples (with repetition).

    Returns:
        ``[B]`` AUROC per resample, NaN where a resample lacks a class.
    """
    out = np.empty(idx.shape[0])
    chunk = max(1, _CHUNK_ELEMENTS // max(idx.shape[1], n_levels))
    for s in range(0, idx.shape[0], chunk):
        ix = idx[s:s + chunk]  # [b, m]
        b = ix.shape[0]
        lv = levels[ix] + n_levels * np.arange(b)[:, None]  # [b, m] level offset per resample
        yy = y[ix]
        neg = np.bincount(lv[yy == 0], minlength=b * n_levels).reshape(b, n_levels)  # [b, U]
        pos = np.bincount(lv[yy == 1], minlength=b * n_levels).reshape(b, n_levels)  # [b, U]
        # each positive at level u beats the negatives below u and ties with those at u (1/2)
        below = np.cumsum(neg, axis=1) - 0.5 * neg  # [b, U]
        wins = (pos * below).sum(axis=1)
        n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[s:s + b] = np.where((n_pos > 0) & (n_neg > 0), wins / (n_pos * n_neg), np.nan)
    return out


def _score_levels(p: np.ndarray) -> tuple[np.ndarray, int]:
    uniq, inv = np.unique(p, return_inverse=True)
    return inv.reshape(-1), int(uniq.size)


def stratified_resamples(pos_i: np.ndarray, neg_i: np.ndarray, n_bootstrap: int, seed: int):
    """Yield ``(start, idx [b, N])`` chunks of ``n_bootstrap`` resamples, positives and negatives apart.

    Every resample keeps the class counts (``len(pos_i)`` positives, then ``len(neg_i)`` negatives);
    chunks bound memory to about :data:`_CHUNK_ELEMENTS` indices. The same seed gives the same resamples.
    """
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // (pos_i.size + neg_i.size))
    for s in range(0, n_bootstrap, rows):
        b = min(rows, n_bootstrap - s)
        yield s, np.concatenate([pos_i[rng.integers(0, pos_i.size, (b, pos_i.size))],
                                 neg_i[rng.integers(0, neg_i.size, (b, neg_i.size))]], axis=1)


def bootstrap_auroc(y_true: Any, y_prob: Any, n_bootstrap: int = 1000, seed: int = 0) -> np.ndarray:
    """AUROC of ``n_bootstrap`` stratified resamples (positives and negatives resampled apart).

    Stratified resampling keeps the class counts of the data, so no resample lacks a class.

    Args:
        y_true: ``[N]`` targets 0/1 (NaN = blank, excluded).
        y_prob: ``[N]`` scores.
        n_bootstrap: number of resamples.
        seed: seed of the resampling generator (same seed, same resamples).

    Returns:
        ``[n_bootstrap]`` AUROC values (empty when a class is absent).
    """
    t, p = _check_pair(y_true, y_prob)
    keep = ~np.isnan(t)
    t, p = t[keep], p[keep]
    pos_i, neg_i = np.flatnonzero(t == 1), np.flatnonzero(t == 0)
    if n_bootstrap <= 0 or pos_i.size == 0 or neg_i.size == 0:
        return np.empty(0)
    levels, n_levels = _score_levels(p)
    out = np.empty(n_bootstrap)
    for s, idx in stratified_resamples(pos_i, neg_i, n_bootstrap, seed):
        out[s:s + idx.shape[0]] = _auroc_resamples(t, levels, n_levels, idx)
    return out


def _percentile_ci(values: np.ndarray) -> Optional[list[float]]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


# ---------------------------------------------------------------------------------------------
# metrics
def binary_metrics(y_true: Any, y_prob: Any, threshold: Optional[float] = None, n_bootstrap: int = 1000,
                   seed: int = 0) -> dict[str, Any]:
    """Metrics of one binary label.

    Args:
        y_true: ``[N]`` targets 0/1, NaN = blank (excluded).
        y_prob: ``[N]`` predicted probabilities.
        threshold: decision threshold (``prob >= threshold`` is positive), normally the value
            :func:`youden_threshold` chose on validation data. ``None`` chooses it on these data by
            Youden's J (do this for validation only), or uses 0.5 when only one class is present.
        n_bootstrap: stratified bootstrap resamples for ``auroc_ci95`` (0 = no CI).
        seed: seed of the bootstrap.

    Returns:
        ``{"auroc", "auroc_ci95": [lo, hi], "ap", "f1", "sensitivity", "specificity", "accuracy",
        "threshold", "threshold_source": "given" | "youden" | "default", "n_pos", "n_neg"}`` with
        ``None`` for what is undefined, plus ``"reason"`` saying why when something is.
    """
    t, p = _check_pair(y_true, y_prob)
    keep = ~np.isnan(t)
    t, p = t[keep].astype(np.int64), p[keep]
    n_pos, n_neg = int(t.sum()), int(t.size - t.sum())
    both = n_pos > 0 and n_neg > 0
    reasons = []
    if threshold is not None:
        thr, source = float(threshold), "given"
    elif both:
        thr, source = youden_threshold(t, p), "youden"
    else:
        thr, source = 0.5, "default"
    out: dict[str, Any] = {"auroc": None, "auroc_ci95": None, "ap": None, "f1": None, "sensitivity": None,
                           "specificity": None, "accuracy": None, "threshold": thr,
                           "threshold_source": source, "n_pos": n_pos, "n_neg": n_neg}
    if t.size == 0:
        out["reason"] = "no labelled samples"
        return out
    if both:
        out["auroc"] = float(roc_auc_score(t, p))
        out["ap"] = float(average_precision_score(t, p))
        if n_bootstrap > 0:
            out["auroc_ci95"] = _percentile_ci(bootstrap_auroc(t, p, n_bootstrap, seed))
    else:
        reasons.append(f"only one class present ({n_pos} positives, {n_neg} negatives): AUROC and AP "
                       "undefined")
    pred = (p >= thr).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(t, pred, labels=[0, 1]).ravel())
    out["accuracy"] = (tp + tn) / t.size
    if n_pos:
        out["sensitivity"] = tp / n_pos
        out["f1"] = float(f1_score(t, pred, labels=[0, 1], zero_division=0.0))
    if n_neg:
        out["specificity"] = tn / n_neg
    if not n_pos:
        reasons.append("no positives: sensitivity and F1 undefined")
    if reasons:
        out["reason"] = "; ".join(reasons)
    return out


def _macro(per_label: dict[str, dict[str, Any]], ci: Optional[list[float]] = None) -> dict[str, Any]:
    macro: dict[str, Any] = {}
    for key in MACRO_KEYS:
        vals = [m[key] for m in per_label.values() if m.get(key) is not None]
        macro[key] = float(np.mean(vals)) if vals else None
    macro["auroc_ci95"] = ci
    macro["n_labels"] = sum(m.get("auroc") is not None for m in per_label.values())
    return macro


def _macro_auroc_ci(t: np.ndarray, p: np.ndarray, cols: list[int], n_bootstrap: int,
                    seed: int) -> Optional[list[float]]:
    """Percentile CI of the macro AUROC: rows resampled jointly (plain bootstrap) for all labels."""
    if n_bootstrap <= 0 or not cols:
        return None
    n = t.shape[0]
    rng = np.random.default_rng(seed)
    levels = [_score_levels(p[:, j]) for j in cols]
    macro = np.empty(n_bootstrap)
    rows = max(1, _CHUNK_ELEMENTS // n)
    for s in range(0, n_bootstrap, rows):
        idx = rng.integers(0, n, (min(rows, n_bootstrap - s), n))  # [b, N] same rows for every label
        per = np.stack([_auroc_resamples(t[:, j], lv, u, idx) for j, (lv, u) in zip(cols, levels)])  # [L, b]
        macro[s:s + idx.shape[0]] = per.mean(axis=0)  # NaN when a resample lacks a class: skipped
    return _percentile_ci(macro)


def multilabel_metrics(y_true: Any, y_prob: Any, label_names: Sequence[str],
                       thresholds: Optional[Sequence[Optional[float]] | dict[str, float]] = None,
                       n_bootstrap: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per-label :func:`binary_metrics` plus their macro means.

    Args:
        y_true: ``[N, L]`` targets 0/1/NaN (``[N]`` for one label).
        y_prob: ``[N, L]`` probabilities.
        label_names: the L label names, in column order.
        thresholds: per-label thresholds (list in column order or dict by name; ``None`` entries
            or a missing name = choose by Youden's J on these data).
        n_bootstrap: bootstrap resamples for the AUROC CIs (0 = none).
        seed: bootstrap seed (label j uses ``seed + j``).

    Returns:
        ``{"<label>": {...binary_metrics...}, "macro": {auroc, ap, f1, sensitivity, specificity,
        accuracy (means over labels where defined), auroc_ci95 (joint bootstrap of the macro
        AUROC over labels with a defined AUROC), n_labels (labels with a defined AUROC)}}``.
    """
    names = [str(n) for n in label_names]
    if "macro" in names:
        raise ValueError("'macro' cannot be a label name (it holds the means over labels)")
    if len(set(names)) != len(names):
        raise ValueError(f"label names repeat: {names}")
    t = _check_matrix("y_true", y_true, len(names))
    p = _check_matrix("y_prob", y_prob, len(names))
    if t.shape != p.shape:
        raise ValueError(f"y_true has shape {t.shape} but y_prob has shape {p.shape}")
    if isinstance(thresholds, dict):
        thr_list = [thresholds.get(n) for n in names]
    elif thresholds is None:
        thr_list = [None] * len(names)
    else:
        thr_list = list(thresholds)
        if len(thr_list) != len(names):
            raise ValueError(f"{len(thr_list)} thresholds for {len(names)} labels")
    out = {n: binary_metrics(t[:, j], p[:, j], thr_list[j], n_bootstrap, seed + j)
           for j, n in enumerate(names)}
    cols = [j for j, n in enumerate(names) if out[n]["auroc"] is not None]
    ci = _macro_auroc_ci(t, p, cols, n_bootstrap, seed) if len(cols) > 1 else (
        out[names[cols[0]]]["auroc_ci95"] if cols else None)
    out["macro"] = _macro(out, ci)
    return out


def group_aggregate(y_true: Any, y_prob: Any, groups: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scan-level -> group-level (e.g. patient) predictions: MAX probability, any-positive target.

    Per label, the group target is the max over the group's non-blank targets (NaN when all are
    blank); the group probability is the max over all of the group's scans.

    Args:
        y_true: ``[N]`` or ``[N, L]`` targets 0/1/NaN.
        y_prob: same shape, probabilities.
        groups: ``[N]`` group ids (converted to str).

    Returns:
        ``(y_true_g, y_prob_g, group_ids)``: ``[G]`` or ``[G, L]`` arrays (float64) and the ``[G]``
        sorted unique group ids (str).
    """
    t_in, p_in = np.asarray(y_true, dtype=np.float64), np.asarray(y_prob, dtype=np.float64)
    if t_in.shape != p_in.shape or t_in.ndim not in (1, 2):
        raise ValueError(f"y_true {t_in.shape} and y_prob {p_in.shape} must have the same [N] or [N, L] shape")
    g = np.asarray([str(x) for x in groups])
    if g.shape[0] != t_in.shape[0]:
        raise ValueError(f"{g.shape[0]} group ids for {t_in.shape[0]} samples")
    if g.size and (g == "").any():
        raise ValueError(f"empty group id at row {int(np.flatnonzero(g == '')[0])}")
    t, p = t_in.reshape(t_in.shape[0], -1), p_in.reshape(p_in.shape[0], -1)  # [N, L]
    ids, inv = np.unique(g, return_inverse=True)
    inv = inv.reshape(-1)
    t_g = np.full((ids.size, t.shape[1]), np.nan)
    np.fmax.at(t_g, inv, t)  # fmax ignores NaN: blank targets do not erase known ones
    p_g = np.full((ids.size, p.shape[1]), -np.inf)
    np.maximum.at(p_g, inv, p)
    if t_in.ndim == 1:
        return t_g[:, 0], p_g[:, 0], ids
    return t_g, p_g, ids


@dataclass
class SplitPredictions:
    """One split's predictions, row-aligned.

    Args:
        prob: ``[N, L]`` probabilities (or ``[N]`` for one label).
        true: ``[N, L]`` targets 0/1, NaN = blank.
        ids: ``[N]`` scan ids (for ``predictions.csv``), or None.
        groups: ``[N]`` group ids (``DOWNSTREAM.GROUP_COLUMN``), or None (no group-level metrics).
    """

    prob: Any
    true: Any
    ids: Optional[Sequence[Any]] = None
    groups: Optional[Sequence[Any]] = None


def evaluate_split(test: SplitPredictions, label_names: Sequence[str], val: Optional[SplitPredictions] = None,
                   n_bootstrap: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Validation and test metrics in the shape of a downstream run's ``metrics.json``.

    Thresholds are chosen per label on validation (Youden's J) and applied unchanged on test.
    Group-level thresholds are chosen on validation groups when ``val.groups`` is given, else
    the scan-level validation thresholds are reused. Without validation data the thresholds are
    chosen on test itself and every label says ``"threshold_source": "test"`` (optimistic). A label
    with one class in validation uses 0.5 on test (``"threshold_source": "default"``).

    Args:
        test: the test predictions; ``test.groups`` enables ``"test_group"``.
        label_names: the L label names.
        val: the validation predictions, or None (no validation set).
        n_bootstrap: bootstrap resamples for the CIs.
        seed: bootstrap seed.

    Returns:
        ``{"val": {label: ..., "macro": ...}, "test": {...}, "test_group": {...}}`` (``"val"``
        absent without validation data, ``"test_group"`` absent without ``test.groups``).
    """
    names = list(label_names)
    out: dict[str, dict[str, Any]] = {}
    thr: list[Optional[float]] = [None] * len(names)  # None = Youden on test (no validation data)
    source = ["test"] * len(names)
    if val is not None:
        out["val"] = multilabel_metrics(val.true, val.prob, names, None, n_bootstrap, seed)
        thr, source = _val_thresholds(out["val"], names, "val")
    out["test"] = multilabel_metrics(test.true, test.prob, names, thr, n_bootstrap, seed)
    _mark_source(out["test"], names, source)
    if test.groups is not None:
        tg, pg, _ = group_aggregate(_check_matrix("test_true", test.true), _check_matrix("test_prob", test.prob),
                                    test.groups)
        thr_g, source_g = thr, source
        if val is not None and val.groups is not None:
            vg_t, vg_p, _ = group_aggregate(_check_matrix("val_true", val.true),
                                            _check_matrix("val_prob", val.prob), val.groups)
            thr_g, source_g = _val_thresholds(multilabel_metrics(vg_t, vg_p, names, None, 0, seed), names,
                                              "val_group")
        out["test_group"] = multilabel_metrics(tg, pg, names, thr_g, n_bootstrap, seed)
        _mark_source(out["test_group"], names, source_g)
    return out


def _val_thresholds(val: dict[str, dict[str, Any]], names: list[str],
                    where: str) -> tuple[list[Optional[float]], list[str]]:
    """Thresholds Youden chose on validation; 0.5 ('default') where validation had one class."""
    thr = [val[n]["threshold"] for n in names]
    source = [where if val[n]["threshold_source"] == "youden" else "default" for n in names]
    return thr, source


def _mark_source(metrics: dict[str, dict[str, Any]], names: list[str], source: list[str]) -> None:
    """Say where each label's threshold came from: 'val', 'val_group', 'test' or 'default' (0.5)."""
    for n, s in zip(names, source):
        if metrics[n]["threshold_source"] == "given":
            metrics[n]["threshold_source"] = s
        elif metrics[n]["threshold_source"] == "youden":
            metrics[n]["threshold_source"] = "test"


# ---------------------------------------------------------------------------------------------
# files
def write_predictions_csv(path: str, ids: Sequence[Any], groups: Optional[Sequence[Any]],
                          label_names: Sequence[str], probs: Any, targets: Any) -> None:
    """Write ``predictions.csv`` atomically: id, group (when given), ``<label>_prob``, ``<label>_target``.

    Args:
        path: output file.
        ids: ``[N]`` sample ids.
        groups: ``[N]`` group ids, or None (no group column).
        label_names: the L label names.
        probs: ``[N, L]`` probabilities.
        targets: ``[N, L]`` targets 0/1/NaN (NaN written blank).
    """
    names = list(label_names)
    p = _check_matrix("probs", probs, len(names))
    t = _check_matrix("targets", targets, len(names))
    ids = list(ids)
    if not (len(ids) == p.shape[0] == t.shape[0]) or (groups is not None and len(groups) != len(ids)):
        raise ValueError(f"lengths differ: {len(ids)} ids, {p.shape[0]} prob rows, {t.shape[0]} target rows"
                         + (f", {len(groups)} groups" if groups is not None else ""))
    header = ["id"] + (["group"] if groups is not None else [])
    for n in names:
        header += [f"{n}_prob", f"{n}_target"]
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, sid in enumerate(ids):
            row = [sid] + ([groups[i]] if groups is not None else [])
            for j in range(len(names)):
                row += [f"{p[i, j]:.8g}", "" if np.isnan(t[i, j]) else f"{int(t[i, j])}"]
            w.writerow(row)
    os.replace(tmp, path)


def read_predictions_csv(path: str) -> tuple[list[str], Optional[list[str]], list[str], np.ndarray, np.ndarray]:
    """Read a ``predictions.csv`` back.

    Returns:
        ``(ids, groups or None, label_names, probs [N, L], targets [N, L] with NaN = blank)``.
    """
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    has_group = len(header) > 1 and header[1] == "group"
    first = 2 if has_group else 1
    names = [h[:-len("_prob")] for h in header[first::2]]
    if header[0] != "id" or [h for h in header[first + 1::2]] != [f"{n}_target" for n in names]:
        raise ValueError(f"{path}: header {header} is not id[,group],<label>_prob,<label>_target,...")
    ids = [r[0] for r in rows]
    groups = [r[1] for r in rows] if has_group else None
    probs = np.array([[float(v) for v in r[first::2]] for r in rows], dtype=np.float64).reshape(len(rows), len(names))
    targets = np.array([[float(v) if v != "" else np.nan for v in r[first + 1::2]] for r in rows],
                       dtype=np.float64).reshape(len(rows), len(names))
    return ids, groups, names, probs, targets


def to_jsonable(obj: Any) -> Any:
    """Nested dicts/lists/numpy values -> plain JSON types, with NaN/inf -> None."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_metrics_json(path: str, metrics: dict[str, Any]) -> None:
    """Write metrics as JSON atomically (temporary file + rename); NaN and inf become ``null``.

    Args:
        path: output file (e.g. ``OUTPUT/metrics.json``).
        metrics: nested dict as returned by :func:`evaluate_split` or :func:`multilabel_metrics`.
    """
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(to_jsonable(metrics), f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
