"""What every pretraining entry script does: processes, data, method, trainer."""
from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn

from engine import dist
from engine.monitor import build_monitor
from engine.trainer import Trainer


def build_backbone_from_cfg(cfg, log: Optional[Any] = None) -> nn.Module:
    """The zoo backbone of MODEL.NAME, initialised from MODEL.PRETRAINED when set.

    Args:
        cfg: the config (MODEL.*, DATA.ROI, DATA.WINDOWS).
        log: where to say what was loaded (tensors loaded of the total, the position embedding
            resized to DATA.ROI) or that the backbone starts from random weights: a RunLogger or
            any object with ``info`` and ``warning``; None says nothing.
    """
    from models.zoo import build_backbone, load_pretrained
    backbone = build_backbone(cfg)
    if cfg.MODEL.PRETRAINED:
        r = load_pretrained(backbone, cfg.MODEL.PRETRAINED, min_fraction=cfg.MODEL.MIN_LOADED_FRACTION)
        resized = r["pos_embed_resized"]
        if log is not None:
            log.info(f"loaded {r['loaded']}/{r['total']} backbone tensors from {r['path']}"
                     + (f"; position embedding resized {resized[0]} -> {resized[1]}" if resized else ""))
    elif log is not None:
        log.warning("MODEL.PRETRAINED is empty: the backbone starts from random weights")
    return backbone


def pretrain(cfg, build_method: Callable[[object, nn.Module], nn.Module],
             build_view: Callable[[object, bool], Callable],
             evaluator: Optional[Callable[[nn.Module, int], dict]] = None) -> dict:
    """Run a pretraining job: ``build_method(cfg, backbone)``, views from ``build_view(cfg, train)``
    (an entry script passes the ``cls``, ``build_view`` and evaluator of its methods/registry.py entry).

    ``evaluator(method, epoch) -> dict`` (optional) is handed to the Trainer (e.g. DINO's k-NN
    monitor); it may build its loaders lazily, once the process group exists.

    Returns the last epoch's metrics row (rank 0; other ranks get the same keys).
    """
    from config import ConfigError
    from data.datasets import build_dataset, collate
    if not cfg.DATA.TRAIN_CSV:
        raise ConfigError("DATA.TRAIN_CSV is empty: set it to a manifest CSV (see datasets/README.md)")
    dist.init_distributed()
    try:
        dist.seed_everything(cfg.SEED)  # the same model init on every rank
        train_set = build_dataset(cfg, cfg.DATA.TRAIN_CSV, build_view(cfg, True))
        val_loader = None
        if cfg.DATA.VAL_CSV:
            val_set = build_dataset(cfg, cfg.DATA.VAL_CSV, build_view(cfg, False))
            val_loader = dist.make_loader(val_set, cfg, train=False, collate_fn=collate)
        method = build_method(cfg, build_backbone_from_cfg(cfg))
        trainer = Trainer(cfg, method, dist.make_loader(train_set, cfg, train=True, collate_fn=collate),
                          val_loader, evaluator=evaluator, monitor=build_monitor(cfg))
        return trainer.fit()
    finally:
        dist.cleanup()
