"""k-NN evaluation of frozen features: leave-one-out weighted k-NN scores and DINO's k-NN monitor."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine import dist
from engine.embed import embed

log = logging.getLogger(__name__)


def knn_scores(features: np.ndarray, labels: np.ndarray, k: int, temperature: float = 0.07) -> np.ndarray:
    """Leave-one-out weighted k-NN score of the positive class, by cosine similarity.

    Each sample's score is ``sum_j w_j y_j / sum_j w_j`` over its k most similar OTHER samples,
    ``w_j = exp(sim_j / temperature)`` (DINO's weighted k-NN).

    Args:
        features: ``[N, D]``.
        labels: ``[N]`` 0/1.
        k: neighbours (clipped to N - 1).
        temperature: similarity temperature.

    Returns:
        ``[N]`` scores in [0, 1].
    """
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"k-NN needs at least 2 samples; got {n}")
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    x = F.normalize(x, dim=1)
    sim = x @ x.t()  # [N, N]
    sim.fill_diagonal_(-float("inf"))  # leave one out
    kk = max(1, min(int(k), n - 1))
    top, idx = sim.topk(kk, dim=1)  # [N, k]
    w = torch.softmax(top / temperature, dim=1)  # exp(sim / T), normalised
    y = torch.from_numpy(np.asarray(labels, dtype=np.float32))[idx]  # [N, k]
    return (w * y).sum(1).numpy()


def knn_k(k: int, n: int) -> int:
    """``k`` capped at half of the ``n - 1`` other scans (at least 1).

    Leave-one-out k-NN with ``k = n - 1`` takes every other scan as a neighbour: a scan's score is
    then the mean of the others' labels, a function of its own label alone (a positive scan has one
    positive fewer among its neighbours), so the AUROC inverts whatever the features. The cap keeps
    the neighbours a choice the features make.
    """
    return max(1, min(int(k), (n - 1) // 2))


def collapsed(features: np.ndarray, tol: float = 1e-6) -> bool:
    """True when every pair of features has the same cosine similarity (within ``tol``): constant or
    fully collapsed features, on which neighbours (and a k-NN AUROC) mean nothing."""
    x = F.normalize(torch.from_numpy(np.asarray(features, dtype=np.float64)), dim=1)
    sim = x @ x.t()
    off = sim[~torch.eye(len(x), dtype=torch.bool)]
    return off.numel() == 0 or float(off.max() - off.min()) < tol


class KNNMonitor:
    """``evaluator(method, epoch)`` for the trainer: k-NN AUROC of frozen TEACHER features.

    Every ``DINO.KNN_EVERY`` epochs (and at the last epoch) the teacher backbone, in eval mode,
    embeds the centred :class:`data.views.SingleView` of every scan of ``DATA.VAL_CSV``; the
    features are gathered from all ranks (:func:`engine.embed.embed`) and scored by
    leave-one-out weighted k-NN (``DINO.KNN_K``, cosine) against the ``DINO.KNN_LABEL`` column
    (blank labels skipped), with k capped by :func:`knn_k` (a warning says so). Logged: ``knn_auroc``
    (also returned as ``score``, so the trainer keeps ``checkpoint_best.pth``; neither when the
    features have :func:`collapsed`), ``knn_n``, ``knn_k``, and ``rank_center_maxdiff`` / ``rank_teacher_maxdiff``
    (largest difference of the centre / a teacher checksum between ranks: 0 when the ranks agree).

    Args:
        cfg: the config (DATA.VAL_CSV, DINO.KNN_*, DATA.* for the view and loader).
    """

    def __init__(self, cfg: Any) -> None:
        from data.datasets import build_dataset
        from data.views import SingleView
        if not cfg.DATA.VAL_CSV:
            raise ValueError(f"DINO.KNN_EVERY = {cfg.DINO.KNN_EVERY} needs a labelled DATA.VAL_CSV (column "
                             f"DINO.KNN_LABEL = {cfg.DINO.KNN_LABEL!r}); set DATA.VAL_CSV or DINO.KNN_EVERY 0")
        self.cfg = cfg
        self.every = int(cfg.DINO.KNN_EVERY)
        self.k = int(cfg.DINO.KNN_K)
        self.label = str(cfg.DINO.KNN_LABEL)
        # reads the CSV now: a missing label column fails at start-up, not epochs later
        self.dataset = build_dataset(cfg, cfg.DATA.VAL_CSV, SingleView(cfg, train=False), label_columns=[self.label])
        self._loader = None
        self._warned = False

    def due(self, epoch: int) -> bool:
        """k-NN runs after epoch ``epoch`` (0-based) when this is True."""
        return self.every > 0 and ((epoch + 1) % self.every == 0 or epoch + 1 == int(self.cfg.TRAIN.EPOCHS))

    def features(self, method: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        """Teacher features ``[n, E]`` and labels ``[n]`` of the validation scans, gathered from every rank."""
        from data.datasets import collate
        if self._loader is None:  # built lazily: the process group exists by now
            self._loader = dist.make_loader(self.dataset, self.cfg, train=False, collate_fn=collate)
        # full precision whatever TRAIN.AMP says: the k-NN scores compare features by cosine
        index, feats = embed(method.teacher["backbone"], self._loader, len(self.dataset), amp="none",
                             allow_missing=self.cfg.DATA.ON_ERROR == "skip")
        return feats, self.dataset.manifest.labels[index, 0].astype(np.float32)

    def __call__(self, method: nn.Module, epoch: int) -> dict:
        out = self.rank_agreement(method)
        if not self.due(epoch):
            return out
        feats, labels = self.features(method)
        keep = ~np.isnan(labels)
        feats, labels = feats[keep], labels[keep]
        out["knn_n"] = int(len(labels))
        if len(labels) < 2 or len(np.unique(labels)) < 2:
            log.warning("k-NN monitor: %d labelled scans in %s with classes %s for %r; AUROC needs both "
                        "classes", len(labels), self.cfg.DATA.VAL_CSV, np.unique(labels).tolist(), self.label)
            return out
        k = knn_k(self.k, len(labels))
        if k < self.k and not self._warned:
            self._warned = True
            log.warning("k-NN monitor: DINO.KNN_K = %d with %d labelled scans in %s; using k = %d. With k near "
                        "n - 1 every scan's neighbours are all the other scans, its score depends only on its "
                        "own label and the AUROC inverts (0 for identical features)", self.k, len(labels),
                        self.cfg.DATA.VAL_CSV, k)
        out["knn_k"] = k
        if collapsed(feats):
            log.warning("k-NN monitor: all %d teacher features point the same way (collapsed); no k-NN AUROC and "
                        "no best checkpoint from this epoch", len(labels))
            return out
        from sklearn.metrics import roc_auc_score
        auroc = float(roc_auc_score(labels, knn_scores(feats, labels, k)))
        out.update({"knn_auroc": auroc, "score": auroc})
        return out

    @staticmethod
    @torch.no_grad()
    def rank_agreement(method: nn.Module) -> dict:
        """Largest difference between ranks of the centre and of a teacher checksum (0 = agree)."""
        center = method.center.detach().float().cpu().numpy().ravel()
        checksum = float(sum(p.detach().double().sum().item() for p in method.teacher.parameters()))
        gathered = dist.all_gather_object((center, checksum))
        c0, s0 = gathered[0]
        return {"rank_center_maxdiff": max(float(np.abs(c - c0).max()) for c, _ in gathered),
                "rank_teacher_maxdiff": max(abs(s - s0) for _, s in gathered)}
