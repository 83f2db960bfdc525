"""Linear probe on cached features: standardised features -> logistic regression per label (scikit-learn)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from evaluation.scoring import sigmoid


class LogisticProbe:
    """Standardised features -> one L2-regularised logistic regression per label (scikit-learn).

    ``C`` is chosen from a small sweep by validation macro AUROC (ties: the smaller C, i.e. the
    stronger regularisation); without validation data (or without a defined validation AUROC) ``C = 1``.

    Args:
        label_names: the L labels.
        Cs: inverse regularisation strengths to try.
        class_weight: ``"balanced"`` (n_neg / n_pos reweighting, as pos_weight) or None.
        seed: solver seed.
    """

    def __init__(self, label_names: Sequence[str], Cs: Sequence[float] = (0.001, 0.01, 0.1, 1.0, 10.0),
                 class_weight: Optional[str] = "balanced", seed: int = 0) -> None:
        self.names, self.Cs = list(label_names), [float(c) for c in Cs]
        self.class_weight, self.seed = class_weight, int(seed)
        self.C: Optional[float] = None
        self.sweep: list[dict] = []
        self.mean = self.scale = None
        self.coef: Optional[np.ndarray] = None  # [L, D]
        self.intercept: Optional[np.ndarray] = None  # [L]

    def _fit_C(self, x: np.ndarray, y: np.ndarray, C: float) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.linear_model import LogisticRegression
        coef, intercept = [], []
        for j, name in enumerate(self.names):
            keep = ~np.isnan(y[:, j])
            yj = y[keep, j].astype(np.int64)
            if len(np.unique(yj)) < 2:
                raise ValueError(f"label {name!r} has one class only among the training features "
                                 f"({int(yj.sum())} positives of {yj.size}); a classifier needs both")
            clf = LogisticRegression(C=C, class_weight=self.class_weight, max_iter=5000, random_state=self.seed)
            clf.fit(x[keep], yj)
            coef.append(clf.coef_[0])
            intercept.append(clf.intercept_[0])
        return np.stack(coef), np.asarray(intercept)

    def fit(self, train_x: np.ndarray, train_y: np.ndarray, val_x: Optional[np.ndarray] = None,
            val_y: Optional[np.ndarray] = None) -> "LogisticProbe":
        """Fit on ``train_x [N, D]``, ``train_y [N, L]`` (NaN = blank); choose C on validation when given."""
        from evaluation.metrics import multilabel_metrics
        x = np.asarray(train_x, dtype=np.float64)
        y = np.asarray(train_y, dtype=np.float64).reshape(len(x), -1)
        self.mean = x.mean(axis=0)
        self.scale = x.std(axis=0)
        self.scale[self.scale < 1e-8] = 1.0
        xs = (x - self.mean) / self.scale
        if val_x is None:
            self.C = 1.0
            self.coef, self.intercept = self._fit_C(xs, y, self.C)
            return self
        best = -math.inf
        self.sweep, self.C = [], None
        fits = {}
        for C in self.Cs:
            coef, intercept = fits[C] = self._fit_C(xs, y, C)
            self.coef, self.intercept = coef, intercept
            m = multilabel_metrics(np.asarray(val_y, dtype=np.float64).reshape(len(val_x), -1),
                                   self.predict_proba(val_x), self.names, n_bootstrap=0)
            auc = m["macro"]["auroc"]
            self.sweep.append({"C": C, "val_auroc_macro": auc})
            score = -math.inf if auc is None else auc
            if score > best or self.C is None:
                best, self.C, keep = score, C, (coef, intercept)
        if best == -math.inf:  # validation has one class only: no AUROC to choose by
            self.C = 1.0
            keep = fits.get(self.C) or self._fit_C(xs, y, self.C)
        self.coef, self.intercept = keep
        return self

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Logits ``[N, L]``."""
        if self.coef is None:
            raise RuntimeError("LogisticProbe.fit must run first")
        xs = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        return xs @ self.coef.T + self.intercept

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, L]``."""
        return sigmoid(self.decision_function(x))

    def state_dict(self) -> dict:
        """Tensors and plain values (loadable with ``torch.load(weights_only=True)``)."""
        return {"mean": torch.from_numpy(self.mean), "scale": torch.from_numpy(self.scale),
                "coef": torch.from_numpy(self.coef), "intercept": torch.from_numpy(self.intercept),
                "C": self.C, "labels": list(self.names)}
