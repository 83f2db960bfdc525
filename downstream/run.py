"""The downstream run: fine-tuning, linear probing (trained, or on cached features), few-shot.

What ``main_downstream.py`` runs (:func:`run_downstream`), as ``engine.launch.pretrain`` is what the
pretraining scripts run; it sits above the objective (:mod:`methods.classify`), the engine
(:class:`engine.trainer.Trainer`, :mod:`engine.samplers`, :mod:`engine.embed`) and the evaluation
(:mod:`evaluation.scoring`, :mod:`evaluation.probe`, :mod:`evaluation.report`).

``DOWNSTREAM.MODE finetune`` trains backbone and head; ``linear`` freezes the backbone (and, with
``DOWNSTREAM.FEATURE_CACHE``, fits a scikit-learn logistic regression on features extracted once);
``fewshot`` draws ``FEW_SHOT_K`` positives and negatives per label for each of ``FEW_SHOT_SEEDS``
seeds and trains each draw as ``FEW_SHOT_BASE`` into ``OUTPUT/seed_<s>/``. Every run writes
predictions.csv, metrics.json (thresholds by Youden's J on validation, AUROC with bootstrap CIs,
patient level with ``DOWNSTREAM.GROUP_COLUMN``) and roc_pr.png beside the engine's files, and
prints a results table.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import numpy as np
import torch

from config import ConfigError, save_config
from data.datasets import VolumeDataset, collate
from data.manifest import Manifest, few_shot_indices
from engine import checkpoint as ckpt
from engine import dist
from engine.embed import embed, predict_gathered
from engine.launch import build_backbone_from_cfg
from engine.logging import RunLogger
from engine.samplers import build_train_sampler
from engine.trainer import Trainer
from evaluation.probe import LogisticProbe
from evaluation.scoring import ValidationScorer, sigmoid
from methods.classify import average_buffers, backbone_checksum, build_classifier, label_counts

ViewBuilder = Callable[[object, bool], Callable]  # build_view(cfg, train) -> view(hu, meta, rng)


def check_config(cfg) -> None:
    """What config.validate cannot know about a downstream run; raises ConfigError naming the key."""
    if not cfg.DATA.TRAIN_CSV or not cfg.DATA.TEST_CSV:
        raise ConfigError("DATA.TRAIN_CSV and DATA.TEST_CSV must name manifest CSVs (DATA.VAL_CSV is "
                          "recommended: it picks the best epoch and the decision thresholds)")
    d = cfg.DOWNSTREAM
    if d.FEATURE_CACHE and d.MODE == "fewshot" and d.FEW_SHOT_BASE == "finetune":
        raise ConfigError("DOWNSTREAM.FEATURE_CACHE = True needs a frozen backbone, but FEW_SHOT_BASE = 'finetune'")
    if d.FEATURE_CACHE and d.HEAD != "linear":
        raise ConfigError(f"DOWNSTREAM.FEATURE_CACHE fits a logistic regression on pooled features; "
                          f"DOWNSTREAM.HEAD = {d.HEAD!r} needs the trained path (FEATURE_CACHE False)")


def read_manifests(cfg) -> dict[str, Optional[Manifest]]:
    """train / val / test manifests with the label and group columns (val None when DATA.VAL_CSV is '')."""
    csvs = {"train": cfg.DATA.TRAIN_CSV, "val": cfg.DATA.VAL_CSV, "test": cfg.DATA.TEST_CSV}
    return {s: Manifest.read(p, root=cfg.DATA.ROOT, label_columns=list(cfg.DOWNSTREAM.LABELS),
                             group_column=cfg.DOWNSTREAM.GROUP_COLUMN) if p else None for s, p in csvs.items()}


def describe(manifests: dict, names: list[str]) -> str:
    lines = []
    for split, m in manifests.items():
        if m is not None:
            pos, neg = label_counts(m.labels)
            counts = ", ".join(f"{n} {int(p)}+/{int(q)}-" for n, p, q in zip(names, pos, neg))
            lines.append(f"{split}: {len(m)} scans ({counts})")
    return "; ".join(lines)


def eval_loader(cfg, manifest: Manifest, build_view: ViewBuilder):
    """Centred, deterministic views (``build_view(cfg, False)``); each sample on exactly one rank."""
    return dist.make_loader(VolumeDataset(manifest, cfg, build_view(cfg, False)), cfg, train=False,
                            collate_fn=collate)


def write_results(cfg, log: RunLogger, parts: dict) -> dict:
    """predictions.csv, metrics.json, roc_pr.png, TensorBoard scalars and the results table (rank 0).

    Args:
        parts: ``{"test": (manifest, index [N], probs [N, L]), "val": ... (optional)}``.
    """
    from evaluation.metrics import SplitPredictions
    from evaluation.report import format_results_table, write_evaluation
    grouped = bool(cfg.DOWNSTREAM.GROUP_COLUMN)
    preds = {split: SplitPredictions(prob=prob, true=m.labels[idx].astype(np.float64), ids=[m.ids[i] for i in idx],
                                     groups=[m.groups[i] for i in idx] if grouped else None)
             for split, (m, idx, prob) in parts.items()}
    metrics = write_evaluation(cfg.OUTPUT, list(cfg.DOWNSTREAM.LABELS), preds["test"], preds.get("val"),
                               n_bootstrap=cfg.DOWNSTREAM.BOOTSTRAP, seed=cfg.SEED)
    row = {f"{section}_{k}_{label}": m.get(k) for section, res in metrics.items() for label, m in res.items()
           for k in ("auroc", "ap", "f1", "sensitivity", "specificity")}
    log.metrics(row, tb_step=0, tb_prefix="eval")
    log.info("results (thresholds by Youden's J on validation)\n" + format_results_table(metrics))
    log.info(f"wrote predictions.csv, metrics.json and roc_pr.png to {cfg.OUTPUT}")
    return metrics


def fit_then_best(cfg, method, loader, scorer, num_train: int, score: str, why_none: str) -> tuple[Trainer, RunLogger]:
    """Train ``method`` (the trainer keeps OUTPUT's lock: the caller writes its results, then calls
    ``trainer.release_lock()``), then load the best validation epoch (``checkpoint_best.pth``) or, without
    one, average BatchNorm buffers over ranks and evaluate the last epoch; returns (trainer, an open log)
    with ``method`` in eval mode. ``score`` names the validation score, ``why_none`` when there is none."""
    trainer = Trainer(cfg, method, loader, None, scorer, num_train_samples=num_train)
    trainer.fit(keep_lock=True)  # OUTPUT stays this run's until its results are written (or the process exits)
    trainer.log.close()
    method.check_frozen()  # a frozen backbone is bit-identical to its start

    log = RunLogger(cfg.OUTPUT, dist.is_main())
    dist.barrier()
    best = os.path.join(cfg.OUTPUT, "checkpoint_best.pth")
    if trainer.best_epoch >= 0 and os.path.isfile(best):
        state = ckpt.load(best)
        ckpt.load_state_strict(method, state["model"], f"best checkpoint {best}")
        method.check_frozen()
        log.info(f"evaluating epoch {state['epoch']} (best validation {score} {state['score']:.4f})")
    else:
        average_buffers(method)
        log.warning(f"no validation {score} to choose an epoch ({why_none}): evaluating the last epoch")
    method.eval()
    return trainer, log


def train_and_evaluate(cfg, manifests: dict, frozen: bool, build_view: ViewBuilder) -> Optional[dict]:
    """Train (fine-tune, or linear probe on a frozen backbone), then evaluate the best epoch on val + test."""
    names, skip = list(cfg.DOWNSTREAM.LABELS), cfg.DATA.ON_ERROR == "skip"
    train_m, val_m, test_m = manifests["train"], manifests["val"], manifests["test"]
    os.makedirs(cfg.OUTPUT, exist_ok=True)
    log = RunLogger(cfg.OUTPUT, dist.is_main())
    log.info(f"{'linear probe (frozen backbone)' if frozen else 'fine-tuning'} of {cfg.MODEL.NAME} on "
             f"{names}: {describe(manifests, names)}")
    dist.seed_everything(cfg.SEED)  # the same init on every rank
    method = build_classifier(cfg, build_backbone_from_cfg(cfg, log), train_m.labels, frozen)
    if method.pos_weight is not None:
        log.info("pos_weight (n_neg / n_pos): " + ", ".join(f"{n} {w:.3g}" for n, w in zip(names, method.pos_weight)))
    log.close()
    sampler = build_train_sampler(cfg, train_m.labels)
    loader = dist.make_loader(VolumeDataset(train_m, cfg, build_view(cfg, True)), cfg, train=True,
                              collate_fn=collate, sampler=sampler)
    val_loader = eval_loader(cfg, val_m, build_view) if val_m is not None else None
    scorer = ValidationScorer(val_loader, val_m.labels, names, cfg.TRAIN.AMP, skip) if val_m is not None else None
    trainer, log = fit_then_best(cfg, method, loader, scorer, len(train_m), "macro AUROC",
                                 "DATA.VAL_CSV empty or one class" +
                                 ("" if val_m is not None else "; thresholds are chosen on test (optimistic)"))
    parts = {}
    for split, m, ldr in (("val", val_m, val_loader), ("test", test_m, None)):
        if m is not None:
            split_loader = ldr or eval_loader(cfg, m, build_view)
            idx, logits = predict_gathered(method.logits, split_loader, len(m), trainer.device, cfg.TRAIN.AMP, skip)
            parts[split] = (m, idx, sigmoid(logits))
    metrics = write_results(cfg, log, parts) if dist.is_main() else None
    log.close()
    dist.barrier()
    trainer.release_lock()
    return metrics


def extract_features(cfg, manifests: dict, build_view: ViewBuilder) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Pooled backbone features of every split, eval views, gathered on every rank: split -> (index, [N, D])."""
    os.makedirs(cfg.OUTPUT, exist_ok=True)
    log = RunLogger(cfg.OUTPUT, dist.is_main())
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dist.seed_everything(cfg.SEED)
    backbone = build_backbone_from_cfg(cfg, log).to(device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    before = backbone_checksum(backbone)
    feats = {}
    for split, m in manifests.items():
        if m is not None:
            feats[split] = embed(backbone, eval_loader(cfg, m, build_view), len(m), cfg.TRAIN.AMP,
                                 cfg.DATA.ON_ERROR == "skip")
            log.info(f"extracted {split} features {tuple(feats[split][1].shape)}")
    if backbone_checksum(backbone) != before:
        raise RuntimeError("the backbone changed during feature extraction")
    log.close()
    return feats


def fit_cached(cfg, manifests: dict, feats: dict, train_rows: Optional[np.ndarray] = None) -> Optional[dict]:
    """Linear probe on cached features: logistic regression, C chosen on validation macro AUROC (rank 0)."""
    names = list(cfg.DOWNSTREAM.LABELS)
    if dist.is_main():
        save_config(cfg, cfg.OUTPUT)
    log = RunLogger(cfg.OUTPUT, dist.is_main())
    metrics = None
    if dist.is_main():
        idx, x = feats["train"]
        if train_rows is not None:
            keep = np.isin(idx, train_rows)
            idx, x = idx[keep], x[keep]
        train_m = manifests["train"]
        log.info(f"logistic-regression probe on cached features of {cfg.MODEL.NAME} ({len(idx)} training scans): "
                 f"{describe({k: v for k, v in manifests.items() if k != 'train'}, names)}")
        val = feats.get("val")
        val_args = (val[1], manifests["val"].labels[val[0]]) if val is not None else (None, None)
        probe = LogisticProbe(names, class_weight=None if cfg.DOWNSTREAM.IMBALANCE == "none" else "balanced",
                              seed=cfg.SEED).fit(x, train_m.labels[idx], *val_args)
        for i, row in enumerate(probe.sweep):
            log.metrics(row, tb_step=i, tb_prefix="sweep")
        if not probe.sweep:
            how = " (no validation set)"
        elif all(r["val_auroc_macro"] is None for r in probe.sweep):
            how = " (validation AUROC undefined: the validation labels have one class only)"
        else:
            aucs = [r["val_auroc_macro"] for r in probe.sweep]
            how = " by validation macro AUROC: " + ", ".join(
                f"C {r['C']:g}: {auc if auc is None else round(auc, 4)}" for r, auc in zip(probe.sweep, aucs))
        log.info(f"C = {probe.C} chosen{how}")
        ckpt.atomic_save(probe.state_dict(), os.path.join(cfg.OUTPUT, "probe.pth"))
        parts = {s: (manifests[s], feats[s][0], probe.predict_proba(feats[s][1]))
                 for s in ("val", "test") if s in feats}
        metrics = write_results(cfg, log, parts)
    log.close()
    dist.barrier()
    return metrics


def fewshot_rows(train_m: Manifest, names: list[str], k: int, seed: int) -> np.ndarray:
    """Union over labels of K positives and K negatives drawn without replacement (data.manifest)."""
    return np.unique(np.concatenate([few_shot_indices(train_m, n, k, seed) for n in names]))


def seed_config(cfg, seed: int, n_train: int):
    """The config of one few-shot draw: OUTPUT/seed_<s>, SEED s, a batch no larger than the draw."""
    c = cfg.clone()
    c.defrost()
    c.OUTPUT, c.SEED = os.path.join(cfg.OUTPUT, f"seed_{seed}"), seed
    world = dist.get_world_size()
    if n_train < world:
        raise ConfigError(f"a few-shot draw of {n_train} scans cannot feed {world} processes; raise "
                          "DOWNSTREAM.FEW_SHOT_K")
    c.DATA.BATCH_SIZE = min(cfg.DATA.BATCH_SIZE, n_train // world)
    c.freeze()
    return c


def run_fewshot(cfg, manifests: dict, build_view: ViewBuilder) -> Optional[dict]:
    """FEW_SHOT_SEEDS draws, each a full run in OUTPUT/seed_<s>/, then mean and std in OUTPUT/metrics.json."""
    from evaluation.metrics import write_metrics_json
    from evaluation.report import format_summary_table, summarize_seeds
    d, names = cfg.DOWNSTREAM, list(cfg.DOWNSTREAM.LABELS)
    os.makedirs(cfg.OUTPUT, exist_ok=True)
    if dist.is_main():
        save_config(cfg, cfg.OUTPUT)
    seeds = [cfg.SEED + i for i in range(d.FEW_SHOT_SEEDS)]
    feats = extract_features(cfg, manifests, build_view) if d.FEATURE_CACHE else None
    results = []
    for s in seeds:
        rows = fewshot_rows(manifests["train"], names, d.FEW_SHOT_K, s)
        c = seed_config(cfg, s, len(rows))
        done = os.path.join(c.OUTPUT, "metrics.json")
        if os.path.isfile(done):  # finished before a requeue
            with open(done) as f:
                results.append(json.load(f))
            continue
        os.makedirs(c.OUTPUT, exist_ok=True)
        sub = {**manifests, "train": manifests["train"].subset(rows)}
        if dist.is_main():
            sub["train"].write(os.path.join(c.OUTPUT, "fewshot_train.csv"))
        results.append(fit_cached(c, manifests, feats, rows) if feats is not None
                       else train_and_evaluate(c, sub, d.FEW_SHOT_BASE == "linear", build_view))
    if not dist.is_main():
        return None
    summary = summarize_seeds(results)
    summary["seeds"] = seeds
    write_metrics_json(os.path.join(cfg.OUTPUT, "metrics.json"), summary)
    log = RunLogger(cfg.OUTPUT, True)
    log.info(f"few-shot ({d.FEW_SHOT_K} positives + {d.FEW_SHOT_K} negatives per label, {d.FEW_SHOT_BASE}), "
             f"seeds {seeds}\n" + format_summary_table(summary))
    log.info(f"wrote metrics.json (mean and std over seeds) to {cfg.OUTPUT}; one folder per seed: seed_<s>/")
    log.close()
    return summary


def run_downstream(cfg, build_view: ViewBuilder) -> Optional[dict]:
    """Check the config, start the processes, run ``DOWNSTREAM.MODE``; the metrics (rank 0, else None).

    ``DOWNSTREAM.TASK segment`` runs :func:`downstream.segment.run_segment` instead (``build_view`` unused).

    Args:
        cfg: the frozen config.
        build_view: ``build_view(cfg, train)``: the view of a scan for training (True) and for
            evaluation (False, centred and deterministic); ``methods.registry.DOWNSTREAM_VIEW``.
    """
    check_config(cfg)
    if cfg.DOWNSTREAM.TASK == "segment":
        from downstream.segment import run_segment
        return run_segment(cfg)
    dist.init_distributed()
    try:
        manifests = read_manifests(cfg)
        if cfg.DOWNSTREAM.MODE == "fewshot":
            return run_fewshot(cfg, manifests, build_view)
        if cfg.DOWNSTREAM.FEATURE_CACHE:
            return fit_cached(cfg, manifests, extract_features(cfg, manifests, build_view))
        return train_and_evaluate(cfg, manifests, cfg.DOWNSTREAM.MODE == "linear", build_view)
    finally:
        dist.cleanup()
