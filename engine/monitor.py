"""The collapse monitor every pretraining run carries (``MONITOR.*``).

Before the first step and after every epoch, the backbone that ``backbone.pth`` holds
(:func:`exported_backbone`: DINO's teacher, the backbone of the others), in eval mode, embeds the
same ``MONITOR.NUM_SCANS`` scans (evenly spaced rows of ``DATA.VAL_CSV``, or of ``DATA.TRAIN_CSV``
without one) through the centred downstream view; every rank embeds its share and the features are
gathered. The trainer logs ``feature_rank`` and ``feature_std`` (:mod:`evaluation.collapse`) with
the epoch's row, ``feature_rank_init`` / ``feature_std_init`` (the untrained backbone) in the first
one, and a warning when the rank falls below ``MONITOR.RANK_WARN_FRACTION`` of its initial value.
"""
from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
from torch import nn

from config import ConfigError
from engine import dist
from engine.embed import embed
from evaluation.collapse import effective_rank, feature_std


def exported_backbone(method: nn.Module) -> nn.Module:
    """The module whose weights ``backbone.pth`` holds: ``method.exported_backbone()`` when the
    method defines it (DINO: the EMA teacher), else ``method.backbone``."""
    return method.exported_backbone() if hasattr(method, "exported_backbone") else method.backbone


def monitor_rows(n_rows: int, n_scans: int) -> np.ndarray:
    """``min(n_rows, n_scans)`` evenly spaced row indices of a manifest of ``n_rows`` rows."""
    k = min(int(n_rows), int(n_scans))
    return np.unique(np.linspace(0, n_rows - 1, k).round().astype(np.int64)) if k > 0 else np.zeros(0, np.int64)


class CollapseMonitor:
    """``monitor(method) -> {"feature_rank", "feature_std", "monitor_s"}`` on every rank alike.

    Args:
        cfg: the config (MONITOR.*, DATA.* for the manifest, view and loader).
    """

    def __init__(self, cfg: Any) -> None:
        from data.datasets import VolumeDataset
        from data.manifest import Manifest
        from data.views import SingleView
        csv = cfg.DATA.VAL_CSV or cfg.DATA.TRAIN_CSV
        manifest = Manifest.read(csv, root=cfg.DATA.ROOT)
        rows = monitor_rows(len(manifest), cfg.MONITOR.NUM_SCANS)
        if len(rows) < 2:
            raise ConfigError(f"the collapse monitor needs at least 2 scans; {csv} has {len(manifest)} rows and "
                             f"MONITOR.NUM_SCANS is {cfg.MONITOR.NUM_SCANS} (0 turns the monitor off)")
        self.cfg = cfg
        self.source = csv
        self.dataset = VolumeDataset(manifest.subset(rows), cfg, SingleView(cfg, train=False))
        self.warn_fraction = float(cfg.MONITOR.RANK_WARN_FRACTION)
        self.initial: dict[str, float] = {}  # feature_rank / feature_std of the untrained backbone
        self._loader = None

    def __len__(self) -> int:
        return len(self.dataset)

    def state_dict(self) -> dict:
        return {"initial": dict(self.initial)}

    def load_state_dict(self, state: dict) -> None:
        self.initial = {k: float(v) for k, v in state.get("initial", {}).items()}

    def features(self, method: nn.Module) -> np.ndarray:
        """``[n, E]`` pooled embeddings of the monitor's scans, gathered from every rank, in row order."""
        from data.datasets import collate
        if self._loader is None:  # built lazily: the process group exists by now
            self._loader = dist.make_loader(self.dataset, self.cfg, train=False, collate_fn=collate)
        _, feats = embed(exported_backbone(method), self._loader, len(self.dataset), self.cfg.TRAIN.AMP,
                         allow_missing=self.cfg.DATA.ON_ERROR == "skip")
        return feats

    def __call__(self, method: nn.Module, log=None) -> dict[str, float]:
        """Embed, measure, remember the first values; ``log`` (a RunLogger) gets the collapse warning."""
        t0 = time.perf_counter()
        feats = self.features(method)
        row = {"feature_rank": effective_rank(feats), "feature_std": feature_std(feats),
               "monitor_s": time.perf_counter() - t0}
        if not self.initial:
            self.initial = {"feature_rank": row["feature_rank"], "feature_std": row["feature_std"]}
        elif log is not None and row["feature_rank"] < self.warn_fraction * self.initial["feature_rank"]:
            log.warning(f"collapse monitor: feature_rank {row['feature_rank']:.2f} is below "
                        f"MONITOR.RANK_WARN_FRACTION {self.warn_fraction} x its initial "
                        f"{self.initial['feature_rank']:.2f} (embeddings of {len(self)} scans of {self.source}; "
                        f"feature_std {row['feature_std']:.4f}, initial {self.initial['feature_std']:.4f}): "
                        "the features are collapsing to fewer directions")
        return row


def build_monitor(cfg: Any) -> Optional[CollapseMonitor]:
    """The run's collapse monitor, or None when ``MONITOR.NUM_SCANS`` is 0."""
    return CollapseMonitor(cfg) if cfg.MONITOR.NUM_SCANS > 0 else None
