"""How many directions a backbone's embeddings use: the numbers of the collapse monitor.

A self-supervised objective can be satisfied by embeddings that vary along only a few
directions (dimensional collapse) or not at all (complete collapse); the loss alone does not
show it. Two numbers do, computed on the embeddings ``[N, D]`` of a fixed set of scans:

- :func:`effective_rank`, RankMe (Garrido et al., ICML 2023): ``exp(H(p))`` with
  ``p_k = s_k / sum(s)`` over the singular values ``s`` of the embedding matrix. About
  ``min(N, D)`` for isotropic embeddings, 1 for embeddings on a single line.
- :func:`feature_std`, SimSiam's monitor (Chen & He, CVPR 2021): the standard deviation over
  scans of the l2-normalised embeddings, averaged over dimensions. About ``1 / sqrt(D)`` for
  isotropic embeddings, 0 when every scan gets the same direction.
"""
from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-12


def _matrix(features: Any) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D]; got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"features hold {int((~np.isfinite(x)).sum())} non-finite values")
    return x


def effective_rank(features: Any) -> float:
    """RankMe effective rank of ``features [N, D]`` (not centred, as in the paper).

    Returns:
        ``exp(-sum p_k log p_k)``, ``p_k = s_k / sum(s)``, in ``[1, min(N, D)]``; 1.0 for all-zero
        features.
    """
    s = np.linalg.svd(_matrix(features), compute_uv=False)
    if s.sum() <= EPS:
        return 1.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def feature_std(features: Any) -> float:
    """Mean over dimensions of the std over scans of the l2-normalised ``features [N, D]``."""
    x = _matrix(features)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), EPS)
    return float(x.std(axis=0).mean())


def spectrum(features: Any) -> dict[str, Any]:
    """Both monitor numbers and the share of variance in the top principal directions.

    Returns:
        ``dim``, ``n``, ``effective_rank``, ``feature_std``, ``healthy_std`` (``1 / sqrt(dim)``),
        ``top1_share`` and ``top10_share`` of the centred features' variance.
    """
    x = _matrix(features)
    var = np.linalg.svd(x - x.mean(axis=0), compute_uv=False) ** 2
    share = var / var.sum() if var.sum() > EPS else np.full_like(var, 1.0 / var.size)
    return {"dim": int(x.shape[1]), "n": int(x.shape[0]), "effective_rank": effective_rank(x),
            "feature_std": feature_std(x), "healthy_std": float(1.0 / np.sqrt(x.shape[1])),
            "top1_share": float(share[0]), "top10_share": float(share[:10].sum())}
