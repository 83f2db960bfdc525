"""Validation scoring of a classifier during training: loss and AUROC each epoch, for the trainer.

:class:`ValidationScorer` is the ``evaluator(method, epoch)`` the downstream job hands to
:class:`engine.trainer.Trainer`; its ``score`` (validation macro AUROC) picks ``checkpoint_best.pth``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from engine.embed import predict_gathered
from methods.classify import Classifier, average_buffers, masked_bce


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


class ValidationScorer:
    """The trainer's ``evaluator(method, epoch)``: validation loss and AUROC, ``score`` = macro AUROC.

    Runs on every rank: averages the ranks' BatchNorm statistics, predicts the validation set
    (each sample on one rank), gathers the logits by index, and scores them against the manifest.

    Args:
        loader: validation eval loader.
        labels: ``[N, L]`` validation targets (NaN = blank), in dataset order.
        label_names: the L names.
        amp: TRAIN.AMP.
        allow_missing: DATA.ON_ERROR == 'skip'.
    """

    def __init__(self, loader, labels: np.ndarray, label_names: Sequence[str], amp: str = "none",
                 allow_missing: bool = False) -> None:
        self.loader, self.labels = loader, np.asarray(labels, dtype=np.float64)
        self.names, self.amp, self.allow_missing = list(label_names), amp, allow_missing

    def __call__(self, method: Classifier, epoch: int) -> dict:
        from evaluation.metrics import multilabel_metrics
        average_buffers(method)
        was_training = method.training
        method.eval()
        try:
            device = next(method.parameters()).device
            idx, logits = predict_gathered(method.logits, self.loader, len(self.labels), device, self.amp,
                                           self.allow_missing)
        finally:
            method.train(was_training)
        target = self.labels[idx]
        loss = masked_bce(torch.from_numpy(logits), torch.from_numpy(target).float(), method.pos_weight.cpu()
                          if method.pos_weight is not None else None)
        m = multilabel_metrics(target, sigmoid(logits), self.names, n_bootstrap=0)
        row = {"val_loss": float(loss), "val_auroc_macro": m["macro"]["auroc"]}
        if len(self.names) > 1:
            row.update({f"val_auroc_{n}": m[n]["auroc"] for n in self.names})
        row["score"] = m["macro"]["auroc"]
        return row
