"""ROC and precision-recall curves of a downstream run (``roc_pr.png``).

Drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas: no pyplot, no global
backend switch, safe in headless jobs and in processes that also use pyplot elsewhere.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve


def plot_roc_pr(path_png: str, y_true: Any, y_prob: Any, label_names: Sequence[str], title: str = "") -> str:
    """ROC curves (left) and PR curves (right), one line per label, AUROC / AP in the legends.

    A label with only one class present (or no labelled sample) is listed in the legend as
    undefined and drawn nowhere. Blank (NaN) targets are excluded per label.

    Args:
        path_png: output PNG path (written atomically).
        y_true: ``[N, L]`` (or ``[N]``) targets 0/1/NaN.
        y_prob: ``[N, L]`` (or ``[N]``) probabilities.
        label_names: the L label names.
        title: optional figure title (e.g. ``"test"``).

    Returns:
        ``path_png``.
    """
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    t, p = t.reshape(t.shape[0], -1), p.reshape(p.shape[0], -1)  # [N, L]
    names = list(label_names)
    if t.shape != p.shape or t.shape[1] != len(names):
        raise ValueError(f"y_true {t.shape}, y_prob {p.shape} and {len(names)} label names do not match")

    fig = Figure(figsize=(11, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax_roc, ax_pr = fig.subplots(1, 2)
    ax_roc.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    for j, name in enumerate(names):
        keep = ~np.isnan(t[:, j])
        tj, pj = t[keep, j], p[keep, j]
        n_pos = int(tj.sum())
        if n_pos == 0 or n_pos == tj.size:
            # an empty line keeps the label in both legends with the reason
            line, = ax_roc.plot([], [], label=f"{name}: undefined (one class)")
            ax_pr.plot([], [], color=line.get_color(), label=f"{name}: undefined (one class)")
            continue
        fpr, tpr, _ = roc_curve(tj, pj)
        line, = ax_roc.plot(fpr, tpr, linewidth=1.5,
                            label=f"{name}: AUROC {roc_auc_score(tj, pj):.3f} (n+={n_pos}, n-={tj.size - n_pos})")
        prec, rec, _ = precision_recall_curve(tj, pj)
        ax_pr.step(rec, prec, where="post", color=line.get_color(), linewidth=1.5,
                   label=f"{name}: AP {average_precision_score(tj, pj):.3f} (prevalence {n_pos / tj.size:.2f})")
    ax_roc.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)",
               title="ROC")
    ax_pr.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall")
    for ax in (ax_roc, ax_pr):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if ax is ax_roc else "lower left", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path_png))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path_png)}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path_png)
    return path_png
