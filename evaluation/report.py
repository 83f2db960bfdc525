"""Plain-text results tables for the console/log, the few-shot summary over seeds, and the one call
that writes a downstream run's evaluation files (:func:`write_evaluation`)."""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import numpy as np

from evaluation.metrics import SplitPredictions, evaluate_split, write_metrics_json, write_predictions_csv
from evaluation.plots import plot_roc_pr

#: sections of a metrics.json in the order they are printed
SECTIONS = ("val", "test", "test_group")


def _is_split_shaped(metrics: dict[str, Any]) -> bool:
    """True for ``{"val": ..., "test": ..., "test_group": ...}``, False for ``{label: ..., "macro": ...}``."""
    return any(k in metrics for k in SECTIONS) and all(
        k in SECTIONS or not isinstance(v, dict) for k, v in metrics.items())


def _num(v: Any, fmt: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return format(v, fmt)


def _label_table(per_label: dict[str, dict[str, Any]]) -> str:
    header = ["label", "n_pos/n_neg", "AUROC [95% CI]", "AP", "F1", "sens", "spec", "thr"]
    rows = []
    for name, m in per_label.items():
        if name == "macro":
            counts = f"{m.get('n_labels', 0)} labels"
        else:
            counts = f"{m.get('n_pos', 0)}/{m.get('n_neg', 0)}"
        ci = m.get("auroc_ci95")
        auroc = _num(m.get("auroc"))
        if ci and m.get("auroc") is not None:
            auroc += f" [{_num(ci[0])}, {_num(ci[1])}]"
        thr = "" if name == "macro" else _num(m.get("threshold"))
        rows.append([name, counts, auroc, _num(m.get("ap")), _num(m.get("f1")), _num(m.get("sensitivity")),
                     _num(m.get("specificity")), thr])
    # macro last, after a rule
    rows.sort(key=lambda r: r[0] == "macro")
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    def line(r: list) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    out = [line(header), "-" * len(line(header))]
    for r in rows:
        if r[0] == "macro" and len(rows) > 1:
            out.append("-" * len(line(header)))
        out.append(line(r))
    notes = [f"  {name}: {m['reason']}" for name, m in per_label.items() if m.get("reason")]
    return "\n".join(out + (["notes:"] + notes if notes else []))


def format_results_table(metrics: dict[str, Any], sections: Sequence[str] = ("test", "test_group")) -> str:
    """A plain-text table per section: label, n_pos/n_neg, AUROC [95% CI], AP, F1, sens, spec, threshold.

    Args:
        metrics: the dict of a ``metrics.json`` (``{"val", "test", "test_group"}`` as returned by
            :func:`evaluation.metrics.evaluate_split`) or one section (``{label: ..., "macro": ...}``).
        sections: which sections of a split-shaped dict to print, when present.

    Returns:
        The table text (no trailing newline); undefined values print as ``n/a``.
    """
    if not _is_split_shaped(metrics):
        return _label_table(metrics)
    parts = []
    for s in sections:
        if s in metrics:
            parts.append(f"[{s}]\n{_label_table(metrics[s])}")
    return "\n\n".join(parts)


def _numeric(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _summarize_section(runs: Sequence[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    labels: list[str] = []
    for r in runs:
        labels += [k for k in r if k not in labels]
    out: dict[str, dict[str, Any]] = {}
    for name in labels:
        present = [r[name] for r in runs if isinstance(r.get(name), dict)]
        keys: list[str] = []
        for m in present:
            keys += [k for k, v in m.items() if k not in keys and _numeric(v) is not None]
        summary: dict[str, Any] = {"n_seeds": len(present)}
        for k in keys:
            vals = [x for x in (_numeric(m.get(k)) for m in present) if x is not None]
            summary[f"{k}_mean"] = float(np.mean(vals)) if vals else None
            # sample std over seeds (ddof=1); undefined for a single value
            summary[f"{k}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        out[name] = summary
    return out


def summarize_seeds(list_of_metrics: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds (few-shot draws) of every numeric metric.

    Args:
        list_of_metrics: one metrics dict per seed, either ``{label: {...}, "macro": {...}}`` or the
            split shape ``{"val", "test", "test_group"}`` of ``metrics.json``.

    Returns:
        For label-shaped input ``{"<label>": {"auroc_mean", "auroc_std", "ap_mean", ...,
        "n_seeds"}, "macro": {...}}``; for split-shaped input the same per section
        (``{"test": {...}, "test_group": {...}, "val": {...}}``) plus ``"n_seeds"``. Means skip
        seeds where a value is undefined; std is the sample std (ddof=1), ``None`` below 2 values.
    """
    runs = list(list_of_metrics)
    if not runs:
        raise ValueError("summarize_seeds needs at least one metrics dict")
    if _is_split_shaped(runs[0]):
        out: dict[str, Any] = {}
        for s in SECTIONS:
            section = [r[s] for r in runs if s in r]
            if section:
                out[s] = _summarize_section(section)
        out["n_seeds"] = len(runs)
        return out
    return _summarize_section(runs)


def format_summary_table(summary: dict[str, Any], sections: Sequence[str] = ("test", "test_group")) -> str:
    """Plain-text table of :func:`summarize_seeds` output: AUROC, AP, F1, sens, spec as mean ± std.

    Args:
        summary: output of :func:`summarize_seeds`.
        sections: sections to print when the summary is split-shaped.
    """
    def table(sec: dict[str, dict[str, Any]]) -> str:
        keys = ("auroc", "ap", "f1", "sensitivity", "specificity")
        header = ["label", "seeds"] + ["AUROC", "AP", "F1", "sens", "spec"]
        rows = []
        for name, m in sorted(sec.items(), key=lambda kv: kv[0] == "macro"):
            cells = [name, str(m.get("n_seeds", ""))]
            for k in keys:
                mean, std = m.get(f"{k}_mean"), m.get(f"{k}_std")
                cells.append(_num(mean) + ("" if std is None else f" ± {_num(std)}"))
            rows.append(cells)
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        def fmt(r: list[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        return "\n".join([fmt(header), "-" * len(fmt(header))] + [fmt(r) for r in rows])

    if any(s in summary for s in SECTIONS):
        return "\n\n".join(f"[{s}, mean ± std over {summary.get('n_seeds', '?')} seeds]\n{table(summary[s])}"
                           for s in sections if s in summary)
    return table(summary)


def write_evaluation(output_dir: str, label_names: Sequence[str], test: SplitPredictions,
                     val: Optional[SplitPredictions] = None, n_bootstrap: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """Evaluate and write a downstream run's files; returns the metrics dict.

    Writes into ``output_dir``: ``predictions.csv`` (test), ``predictions_val.csv`` (when
    validation predictions with ids are given), ``metrics.json``
    (:func:`evaluation.metrics.evaluate_split`: thresholds from validation, group level when
    ``test.groups`` is given) and ``roc_pr.png`` (test, scan level). Call it on rank 0 only.

    Args:
        output_dir: the run folder.
        label_names: the L labels.
        test: test ids, groups (or None), probabilities ``[Nt, L]`` and targets ``[Nt, L]`` (0/1/NaN).
        val: the same for validation, or None (thresholds then chosen on test).
        n_bootstrap: bootstrap resamples (``DOWNSTREAM.BOOTSTRAP``).
        seed: bootstrap seed (``SEED``).
    """
    os.makedirs(output_dir, exist_ok=True)
    names = list(label_names)
    metrics = evaluate_split(test, names, val, n_bootstrap=n_bootstrap, seed=seed)
    write_predictions_csv(os.path.join(output_dir, "predictions.csv"), test.ids, test.groups, names,
                          test.prob, test.true)
    if val is not None and val.ids is not None:
        write_predictions_csv(os.path.join(output_dir, "predictions_val.csv"), val.ids, val.groups, names,
                              val.prob, val.true)
    write_metrics_json(os.path.join(output_dir, "metrics.json"), metrics)
    plot_roc_pr(os.path.join(output_dir, "roc_pr.png"), test.true, test.prob, names, title="test")
    return metrics
