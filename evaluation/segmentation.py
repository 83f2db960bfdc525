"""Segmentation metrics per class per case (MONAI), bootstrap CIs over cases, and the run's files.

Per case and class (:func:`case_metrics`, on the source image's grid):

* ``dice``: MONAI ``DiceMetric``, ``2 |P & R| / (|P| + |R|)``. An **empty reference** scores 1 when the
  prediction is empty too and 0 when it holds any voxel of the class (``ignore_empty=False``): false
  positives on scans without the structure count against the model.
* ``hd95``: MONAI ``HausdorffDistanceMetric(percentile=95)`` in mm (the voxel spacing is passed):
  the 95th percentile of the distances between the two outlines, both directions. It needs both
  outlines: when the reference or the prediction is empty it is undefined (NaN, blank in
  ``per_case.csv``) and left out of the mean; ``n_cases_hd95`` counts the cases it was scored on.
* ``ref_ml`` / ``pred_ml``: volumes in millilitres.

:func:`summarize` averages over cases and gives percentile-bootstrap 95% CIs by resampling the cases
where the value is defined (all cases for ``dice``; those scored for ``hd95``; those holding the class for
``dice_present``), ``DOWNSTREAM.BOOTSTRAP`` resamples, seed ``SEED``, as the classification metrics do;
``macro`` is the per-case mean over classes. Because an empty reference
predicted empty scores 1, a model that finds nothing still scores high where most cases are healthy; so
every class also has ``dice_present``: the mean Dice over the **cases whose reference holds the class**
(``n_cases_present``), the lesion Dice that a segmentation of bleeds is judged by (for ``macro``, each
case's mean over the classes its reference holds; cases holding none are left out).
"""
from __future__ import annotations

import csv
import os
from typing import Any, Optional, Sequence

import numpy as np
import torch

PER_CASE_FIELDS = ("id", "class", "value", "dice", "hd95", "ref_ml", "pred_ml")


def case_metrics(pred: np.ndarray, ref: np.ndarray, class_names: Sequence[str], spacing: Sequence[float],
                 with_hd95: bool = True) -> list[dict[str, Any]]:
    """Dice, HD95 (mm) and volumes (ml) of each class of one case.

    Args:
        pred: predicted class indices ``[X, Y, Z]`` (0 = background, ``k`` = ``class_names[k-1]``).
        ref: reference class indices on the same grid.
        class_names: the K class names.
        spacing: voxel size in mm of that grid.
        with_hd95: compute HD95 (the costly part; False leaves it NaN, e.g. for validation each epoch).

    Returns:
        One dict per class: ``class``, ``dice``, ``hd95`` (NaN when either mask is empty), ``ref_ml``, ``pred_ml``.
    """
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    rows = []
    for k, name in enumerate(class_names, start=1):
        p, r = torch.from_numpy(pred == k)[None, None], torch.from_numpy(ref == k)[None, None]  # [1, 1, X, Y, Z]
        n_p, n_r = int(p.sum()), int(r.sum())
        dice = float(DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, r)[0, 0])
        hd = float("nan")
        if with_hd95 and n_p and n_r:
            hd = float(HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
                p, r, spacing=[float(s) for s in spacing])[0, 0])
        rows.append({"class": name, "dice": dice, "hd95": hd, "ref_ml": n_r * voxel_ml, "pred_ml": n_p * voxel_ml})
    return rows


def _mean_ci(values: np.ndarray, n_bootstrap: int, seed: int) -> tuple[Optional[float], Optional[list[float]], int]:
    """Mean over the finite values (the cases where the value is defined), the percentile-bootstrap 95% CI of
    that mean over ``n_bootstrap`` resamples of those cases (seed ``seed``; None below two cases), their count."""
    from evaluation.metrics import _percentile_ci

    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return None, None, 0
    if not n_bootstrap or n < 2:
        return float(v.mean()), None, n
    idx = np.random.default_rng(seed).integers(0, n, (n_bootstrap, n))
    return float(v.mean()), _percentile_ci(v[idx].mean(axis=1)), n


def row_mean(values: np.ndarray) -> np.ndarray:
    """``[N, K]`` -> ``[N]``: each case's mean over its finite values (NaN where it has none), e.g. the macro HD95
    over the scored classes, or the macro lesion Dice over the classes a case holds."""
    ok = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, values, 0).sum(axis=1) / ok.sum(axis=1)


def summarize(dice: np.ndarray, hd95: np.ndarray, present: np.ndarray, class_names: Sequence[str],
              n_bootstrap: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per class and macro: ``dice``, ``dice_ci95``, ``hd95``, ``hd95_ci95``, ``n_cases``, ``n_cases_hd95``,
    ``dice_present``, ``dice_present_ci95``, ``n_cases_present``.

    Args:
        dice: ``[N, K]`` per case and class.
        hd95: ``[N, K]`` (NaN = not scored).
        present: ``[N, K]`` bool, the reference holds the class (``ref_ml > 0``).
        class_names: the K names.
        n_bootstrap: resamples of the cases (0 = no CI).
        seed: the resamples' seed.
    """
    dice, hd95, present = np.asarray(dice, np.float64), np.asarray(hd95, np.float64), np.asarray(present, bool)
    if not dice.shape == hd95.shape == present.shape:
        raise ValueError(f"dice {dice.shape}, hd95 {hd95.shape} and present {present.shape} differ in shape")
    out: dict[str, dict[str, Any]] = {}
    lesion = np.where(present, dice, np.nan)  # [N, K]: Dice where the reference holds the class
    columns = [(name, dice[:, k], hd95[:, k], lesion[:, k]) for k, name in enumerate(class_names)]
    columns.append(("macro", dice.mean(axis=1), row_mean(hd95), row_mean(lesion)))
    for name, d, h, p in columns:
        dm, dci, dn = _mean_ci(d, n_bootstrap, seed)
        hm, hci, hn = _mean_ci(h, n_bootstrap, seed)
        pm, pci, pn = _mean_ci(p, n_bootstrap, seed)
        out[name] = {"dice": dm, "dice_ci95": dci, "hd95": hm, "hd95_ci95": hci, "n_cases": dn, "n_cases_hd95": hn,
                     "dice_present": pm, "dice_present_ci95": pci, "n_cases_present": pn}
    return out


def write_per_case(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """``per_case.csv``: one row per case and class (``id, class, value, dice, hd95, ref_ml, pred_ml``)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PER_CASE_FIELDS)
        for r in rows:
            w.writerow([r["id"], r["class"], r["value"]] + [
                "" if not np.isfinite(r[k]) else f"{r[k]:.6g}" for k in ("dice", "hd95", "ref_ml", "pred_ml")])
    os.replace(tmp, path)


def format_table(metrics: dict[str, dict[str, Any]]) -> str:
    """Console table: class, cases, Dice [95% CI], HD95 mm [95% CI], Dice on the cases holding the class."""
    def fmt(v, ci, digits):
        if v is None:
            return "n/a"
        s = f"{v:.{digits}f}"
        return s + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")

    lines = [f"{'class':<12} {'cases':>5}  {'Dice [95% CI]':<24} {'HD95 mm [95% CI]':<26} "
             f"{'with it':>7}  {'Dice there [95% CI]':<24}", "-" * 104]
    for name, m in metrics.items():
        lines.append(f"{name:<12} {m['n_cases']:>5}  {fmt(m['dice'], m['dice_ci95'], 3):<24} "
                     f"{fmt(m['hd95'], m['hd95_ci95'], 1):<26} {m['n_cases_present']:>7}  "
                     f"{fmt(m['dice_present'], m['dice_present_ci95'], 3):<24}")
    return "\n".join(lines)


def plot_cases(path_png: str, cases: Sequence[dict[str, Any]]) -> str:
    """One axial slice per case (the one with the most reference voxels), reference (green) and prediction
    (red) outlined on the image.

    Args:
        path_png: output PNG.
        cases: dicts with ``id``, ``image`` ``[X, Y]`` (display values in [0, 1]), ``ref`` and ``pred`` ``[X, Y]``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    n = max(1, len(cases))
    fig = Figure(figsize=(3.2 * n, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    for i, c in enumerate(cases):
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(np.asarray(c["image"]).T, cmap="gray", origin="lower", vmin=0, vmax=1)  # x right, y up (RAS)
        for key, colour in (("ref", "lime"), ("pred", "red")):
            m = np.asarray(c[key]).T
            if m.any() and not m.all():
                ax.contour(m > 0, levels=[0.5], colors=colour, linewidths=1.0)
        ax.set_title(str(c["id"]), fontsize=9)
        ax.axis("off")
    fig.legend([Line2D([], [], color="lime"), Line2D([], [], color="red")], ["reference", "prediction"],
               loc="lower center", ncol=2, fontsize=9)
    tmp = f"{path_png}.{os.getpid()}.tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, path_png)
    return path_png
