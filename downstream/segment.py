"""The segmentation downstream run (``DOWNSTREAM.TASK segment``): a decoder around the pretrained encoder.

``finetune`` trains encoder and decoder, ``linear`` only the decoder (the encoder frozen and checked),
``fewshot`` trains ``FEW_SHOT_BASE`` on ``FEW_SHOT_K`` labelled volumes drawn per seed. The trainer,
DDP, AMP and resume are the classification run's (:class:`engine.trainer.Trainer`); the validation
score that picks ``checkpoint_best.pth`` is the pooled ("global") Dice on the preprocessed grid, averaged over
the classes (:class:`SegValidationScorer`). The test set is
predicted with MONAI's ``sliding_window_inference`` (``DATA.ROI`` windows, ``DOWNSTREAM.SEG_OVERLAP``,
Gaussian blending) over each whole preprocessed volume, each case on one rank; the label map is
mapped back by nearest neighbour onto the SOURCE image's grid and written with its affine
(``predictions/<id>.nii.gz``, label values as in the masks), and scored there against the mask
(:mod:`evaluation.segmentation`): ``per_case.csv``, ``metrics.json``, ``segmentation.png``.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch

from config import ConfigError, save_config
from data.datasets import VolumeDataset, collate
from data.io import BadInputError, Volume, spacing_from_affine
from data.manifest import Manifest
from data.views.segment import SegmentView, map_classes
from engine import dist
from engine.amp import autocast
from engine.launch import build_backbone_from_cfg
from engine.logging import RunLogger
from methods.classify import average_buffers
from methods.segment import Segmenter, build_segmentation_method

N_FIGURE_CASES = 3  # test cases drawn in segmentation.png (the first rows of the manifest)


def class_names(cfg) -> list[str]:
    """``class_<value>`` for each ``DOWNSTREAM.SEG_CLASSES`` value."""
    return [f"class_{v}" for v in cfg.DOWNSTREAM.SEG_CLASSES]


def read_manifests(cfg) -> dict[str, Optional[Manifest]]:
    """train / val / test manifests (val None when DATA.VAL_CSV is ''); each must have a ``mask_path`` column."""
    from data.manifest import ManifestError
    out = {}
    for split, p in (("train", cfg.DATA.TRAIN_CSV), ("val", cfg.DATA.VAL_CSV), ("test", cfg.DATA.TEST_CSV)):
        out[split] = Manifest.read(p, root=cfg.DATA.ROOT) if p else None
        if out[split] is not None and out[split].masks is None:
            raise ManifestError(f"{p}: no mask_path column; DOWNSTREAM.TASK segment needs a label map per row")
    return out


def mask_values(ds: VolumeDataset, i: int) -> list[int]:
    """Label values held by row ``i``'s mask (the cache sidecar when there is a cache, else the file)."""
    from data import cache as cache_lib
    from data.masks import read_mask
    path, mask = ds.manifest.paths[i], ds.manifest.masks[i]
    if not mask:
        raise BadInputError(path, f"{ds.row_name(i)} has no mask_path; segmentation needs a label map per row")
    if ds.cache_root:
        return cache_lib.read_mask_entry(ds.cache_root, path, mask)[1]
    return [int(v) for v in np.unique(read_mask(mask, ds.row_name(i)).array)]


def check_classes(cfg, ds: VolumeDataset, log) -> None:
    """Every ``DOWNSTREAM.SEG_CLASSES`` value must occur in some training mask; bad masks raise (or, under
    DATA.ON_ERROR skip, are left to the dataset, which lists them in skipped.csv)."""
    seen: dict[int, int] = {}
    for i in range(len(ds)):
        try:
            for v in mask_values(ds, i):
                seen[v] = seen.get(v, 0) + 1
        except BadInputError:
            if cfg.DATA.ON_ERROR != "skip":
                raise
    missing = [v for v in cfg.DOWNSTREAM.SEG_CLASSES if v not in seen]
    if missing:
        raise ConfigError(f"DOWNSTREAM.SEG_CLASSES value(s) {missing} occur in no mask of {ds.manifest.source} "
                          f"({len(ds)} rows); the masks hold the values {sorted(seen)}")
    log.info("training masks holding each class: " + ", ".join(
        f"{v}: {seen[v]}/{len(ds)}" for v in cfg.DOWNSTREAM.SEG_CLASSES))


@torch.no_grad()
def predict_volume(method: Segmenter, image: torch.Tensor, cfg, device: torch.device) -> np.ndarray:
    """Class indices ``[X, Y, Z]`` (int16) of a whole volume ``image [1, C, X, Y, Z]`` by sliding windows.

    ``DATA.ROI`` windows, ``DOWNSTREAM.SEG_OVERLAP``, Gaussian blending, ``DOWNSTREAM.SEG_SW_BATCH`` windows
    per forward on ``device``; the blended logits are held on the CPU (a large volume does not fill the GPU).
    """
    from monai.inferers import sliding_window_inference
    with autocast(device.type, cfg.TRAIN.AMP):
        logits = sliding_window_inference(image, roi_size=list(cfg.DATA.ROI), sw_batch_size=cfg.DOWNSTREAM.SEG_SW_BATCH,
                                          predictor=method.logits, overlap=cfg.DOWNSTREAM.SEG_OVERLAP, mode="gaussian",
                                          sw_device=device, device=torch.device("cpu"))
    return logits.float().argmax(dim=1)[0].to(torch.int16).numpy()


def eval_loader(cfg, m: Manifest):
    """Whole volumes, one per batch, each on exactly one rank."""
    return dist.make_loader(VolumeDataset(m, cfg, SegmentView(cfg, train=False), masks=True), cfg, train=False,
                            collate_fn=collate, batch_size=1)


class SegValidationScorer:
    """The trainer's ``evaluator(method, epoch)`` on the validation volumes (preprocessed grid); every rank
    predicts its share, the per-case counts are gathered.

    ``score`` (what picks ``checkpoint_best.pth``) is ``val_dice_global``: per class the Dice of all validation
    voxels pooled, ``2 sum|P & R| / (sum|P| + sum|R|)`` over the cases, then the mean over the classes. Unlike
    the per-case mean (``val_dice_macro``, also logged, where a healthy scan predicted empty scores 1) it gives
    nothing for predicting nothing, and it still counts false positives on healthy scans; so an early epoch
    that has not yet learnt to find a lesion is not chosen over one that has. A class that no validation
    reference holds and nothing predicts scores 1.
    """

    def __init__(self, cfg, loader, n_classes: int) -> None:
        self.cfg, self.loader, self.k = cfg, loader, n_classes

    def __call__(self, method: Segmenter, epoch: int) -> dict:
        average_buffers(method)
        was_training = method.training
        method.eval()
        device = next(method.parameters()).device
        local = {}
        try:
            for batch in self.loader:
                pred = predict_volume(method, batch["image"], self.cfg, device)
                ref = batch["target"][0, 0].numpy()
                # per class: |P & R|, |P|, |R|; both scores derive from these counts
                local[int(batch["index"][0])] = [(int(np.count_nonzero((pred == k) & (ref == k))),
                                                  int(np.count_nonzero(pred == k)), int(np.count_nonzero(ref == k)))
                                                 for k in range(1, self.k + 1)]
        finally:
            method.train(was_training)
        merged = {}
        for part in dist.all_gather_object(local):
            merged.update(part)
        if not merged:
            return {"val_dice_macro": None, "val_dice_global": None, "score": None}
        counts = np.asarray(list(merged.values()), np.float64)  # [N cases, K, 3]

        def dice(inter, n_pred, n_ref):  # 2|P & R| / (|P| + |R|); 1 when both are empty (MONAI's ignore_empty=False)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(n_pred + n_ref > 0, 2 * inter / (n_pred + n_ref), 1.0)

        macro = float(dice(*np.moveaxis(counts, -1, 0)).mean())  # per case and class, then the mean
        pooled = float(dice(*np.moveaxis(counts.sum(axis=0), -1, 0)).mean())  # per class over all cases
        return {"val_dice_macro": macro, "val_dice_global": pooled, "score": pooled}


def source_grid(path: str) -> Volume:
    """The source image's grid (shape and affine from the header; the array is a zero-size stand-in)."""
    import nibabel as nib
    img = nib.load(path)
    shape = tuple(int(s) for s in img.shape[:3])
    affine = np.asarray(img.affine, np.float64)
    return Volume(np.broadcast_to(np.int8(0), shape), affine, spacing_from_affine(affine))


def write_label_map(path: str, classes: np.ndarray, values: list[int], affine: np.ndarray) -> None:
    """Class indices -> the masks' label values, written as NIfTI (uint8, or int16 above 255) with ``affine``."""
    import nibabel as nib
    lut = np.asarray([0] + list(values), dtype=np.int64)
    arr = lut[classes.astype(np.int64)].astype(np.uint8 if max(values) < 256 else np.int16)
    img = nib.Nifti1Image(arr, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    tmp = path[: -len(".nii.gz")] + f".{os.getpid()}.tmp.nii.gz"
    nib.save(img, tmp)
    os.replace(tmp, path)


def predict_test(cfg, method: Segmenter, m: Manifest, device: torch.device) -> tuple[list[dict], list[dict]]:
    """Predict, write and score this rank's share of the test cases; ``(rows, figure slices)`` of every rank.

    Each case: sliding-window prediction on the preprocessed grid, nearest neighbour onto the source
    image's grid, ``predictions/<id>.nii.gz`` with the source affine, metrics against the mask on that grid.
    """
    from data.masks import align_mask, labels_to_grid, read_mask
    from evaluation.segmentation import case_metrics
    values, names = list(cfg.DOWNSTREAM.SEG_CLASSES), class_names(cfg)
    out_dir = os.path.join(cfg.OUTPUT, "predictions")
    os.makedirs(out_dir, exist_ok=True)
    ds_rows: list[dict] = []
    figures: list[dict] = []
    seen: set[int] = set()
    skipped: list[tuple[str, str]] = []
    loader = eval_loader(cfg, m)
    for batch in loader:
        skipped += batch["skipped"]
        i = int(batch["index"][0])
        if i in seen:  # a skipped row's replacement
            continue
        seen.add(i)
        sid = m.ids[i]
        pred = predict_volume(method, batch["image"], cfg, device)  # preprocessed grid
        grid = source_grid(m.paths[i])
        pred_src = labels_to_grid(pred, batch["affine"][0].numpy(), grid.array.shape, grid.affine, outside="zero")
        write_label_map(os.path.join(out_dir, f"{sid}.nii.gz"), pred_src, values, grid.affine)
        where = f"row {i + 1} (id {sid}) of {m.source}"
        ref = map_classes(align_mask(read_mask(m.masks[i], where), grid, m.masks[i], where), values)
        for r in case_metrics(pred_src, ref, names, grid.spacing):
            ds_rows.append({"id": sid, "index": i, "value": values[names.index(r["class"])], **r})
        if i < N_FIGURE_CASES:
            target = batch["target"][0, 0].numpy()
            z = int(np.argmax((target > 0).sum(axis=(0, 1)))) if target.any() else target.shape[2] // 2
            figures.append({"index": i, "id": sid, "image": batch["image"][0, 0, :, :, z].numpy(),
                            "ref": target[:, :, z], "pred": pred[:, :, z]})
    rows, figs, bad = [], [], []
    for part_rows, part_figs, part_bad in dist.all_gather_object((ds_rows, figures, skipped)):
        rows += part_rows
        figs += part_figs
        bad += part_bad
    if bad and dist.is_main():
        from data.io import write_skipped
        write_skipped(os.path.join(cfg.OUTPUT, "skipped.csv"), bad)
    # under DATA.ON_ERROR skip a bad row's replacement may have been read on two ranks: each case once
    rows = list({(r["index"], r["class"]): r for r in rows}.values())
    figs = list({f["index"]: f for f in figs}.values())
    rows.sort(key=lambda r: (r["index"], names.index(r["class"])))
    figs.sort(key=lambda f: f["index"])
    return rows, figs


def write_results(cfg, log: RunLogger, rows: list[dict], figs: list[dict]) -> dict:
    """per_case.csv, metrics.json (``{"test": {class: ..., "macro": ...}}``), segmentation.png, the table (rank 0)."""
    from evaluation.metrics import write_metrics_json
    from evaluation.segmentation import format_table, plot_cases, summarize, write_per_case
    names = class_names(cfg)
    ids = list(dict.fromkeys(r["id"] for r in rows))
    at = {(r["id"], r["class"]): r for r in rows}
    dice = np.array([[at[(i, n)]["dice"] for n in names] for i in ids], dtype=np.float64).reshape(len(ids), len(names))
    hd95 = np.array([[at[(i, n)]["hd95"] for n in names] for i in ids], dtype=np.float64).reshape(len(ids), len(names))
    present = np.array([[at[(i, n)]["ref_ml"] > 0 for n in names] for i in ids], dtype=bool).reshape(dice.shape)
    metrics = {"test": summarize(dice, hd95, present, names, cfg.DOWNSTREAM.BOOTSTRAP, cfg.SEED)}
    write_per_case(os.path.join(cfg.OUTPUT, "per_case.csv"), rows)
    write_metrics_json(os.path.join(cfg.OUTPUT, "metrics.json"), metrics)
    if figs:
        plot_cases(os.path.join(cfg.OUTPUT, "segmentation.png"), figs)
    log.metrics({f"test_{k}_{name}": m[k] for name, m in metrics["test"].items()
                 for k in ("dice", "hd95", "dice_present")},
                tb_step=0, tb_prefix="eval")
    log.info("test segmentation (Dice and HD95 on the source grid; 95% CIs by bootstrap over cases; 'with it': "
             "the cases whose reference holds the class, and the Dice over those)\n"
             + format_table(metrics["test"]))
    log.info(f"wrote predictions/<id>.nii.gz, per_case.csv, metrics.json and segmentation.png to {cfg.OUTPUT}")
    return metrics


def train_and_evaluate(cfg, manifests: dict, frozen: bool) -> Optional[dict]:
    """Train the segmenter (encoder frozen or not), then predict and score the test set with the best epoch."""
    train_m, val_m, test_m = manifests["train"], manifests["val"], manifests["test"]
    os.makedirs(cfg.OUTPUT, exist_ok=True)
    log = RunLogger(cfg.OUTPUT, dist.is_main())
    train_ds = VolumeDataset(train_m, cfg, SegmentView(cfg, train=True), masks=True)
    log.info(f"segmentation ({'frozen encoder, decoder trained' if frozen else 'fine-tuning'}) of {cfg.MODEL.NAME} "
             f"on classes {list(cfg.DOWNSTREAM.SEG_CLASSES)}: " + "; ".join(
                 f"{s} {len(m)} scans" for s, m in manifests.items() if m is not None))
    check_classes(cfg, train_ds, log)
    dist.seed_everything(cfg.SEED)  # the same init on every rank
    method = build_segmentation_method(cfg, build_backbone_from_cfg(cfg, log), frozen)
    log.close()
    loader = dist.make_loader(train_ds, cfg, train=True, collate_fn=collate)
    scorer = SegValidationScorer(cfg, eval_loader(cfg, val_m), len(cfg.DOWNSTREAM.SEG_CLASSES)) \
        if val_m is not None else None
    from downstream.run import fit_then_best
    trainer, log = fit_then_best(cfg, method, loader, scorer, len(train_m), "global Dice", "DATA.VAL_CSV empty")
    rows, figs = predict_test(cfg, method, test_m, trainer.device)
    metrics = write_results(cfg, log, rows, figs) if dist.is_main() else None
    log.close()
    dist.barrier()
    trainer.release_lock()
    return metrics


def labelled_rows(cfg, m: Manifest) -> np.ndarray:
    """Rows of ``m`` whose mask holds at least one ``DOWNSTREAM.SEG_CLASSES`` value (bad masks: see check_classes)."""
    ds = VolumeDataset(m, cfg, SegmentView(cfg, train=False), masks=True)
    keep = []
    for i in range(len(m)):
        try:
            if set(mask_values(ds, i)) & set(cfg.DOWNSTREAM.SEG_CLASSES):
                keep.append(i)
        except BadInputError:
            if cfg.DATA.ON_ERROR != "skip":
                raise
    return np.asarray(keep, dtype=np.int64)


def fewshot_rows(candidates: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``k`` of the ``candidates`` (row indices) drawn without replacement by ``seed`` (sorted)."""
    candidates = np.asarray(candidates, dtype=np.int64)
    if k > len(candidates):
        raise ConfigError(f"DOWNSTREAM.FEW_SHOT_K = {k} labelled volumes, but only {len(candidates)} training masks "
                          "hold a DOWNSTREAM.SEG_CLASSES value")
    return np.sort(np.random.default_rng(seed).choice(candidates, size=k, replace=False))


def run_fewshot(cfg, manifests: dict) -> Optional[dict]:
    """FEW_SHOT_SEEDS draws of FEW_SHOT_K labelled volumes (masks holding a class; healthy scans are not drawn),
    each a run in OUTPUT/seed_<s>/; mean and std over the seeds."""
    from downstream.run import seed_config
    from evaluation.metrics import write_metrics_json
    from evaluation.report import summarize_seeds
    d = cfg.DOWNSTREAM
    os.makedirs(cfg.OUTPUT, exist_ok=True)
    if dist.is_main():
        save_config(cfg, cfg.OUTPUT)
    seeds = [cfg.SEED + i for i in range(d.FEW_SHOT_SEEDS)]
    results = []
    candidates = labelled_rows(cfg, manifests["train"])
    for s in seeds:
        rows = fewshot_rows(candidates, d.FEW_SHOT_K, s)
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
        results.append(train_and_evaluate(c, sub, d.FEW_SHOT_BASE == "linear"))
    if not dist.is_main():
        return None
    summary = summarize_seeds(results)
    summary["seeds"] = seeds
    write_metrics_json(os.path.join(cfg.OUTPUT, "metrics.json"), summary)
    log = RunLogger(cfg.OUTPUT, True)
    macro = summary["test"]["macro"]
    there = (f"{macro['dice_present_mean']:.3f} +- {macro['dice_present_std'] or 0:.3f}"
             if macro.get("dice_present_mean") is not None else "n/a")
    log.info(f"few-shot segmentation ({d.FEW_SHOT_K} labelled volumes, {d.FEW_SHOT_BASE}), seeds {seeds}: macro Dice "
             f"{macro['dice_mean']:.3f} +- {macro['dice_std'] or 0:.3f}, on the cases holding a class {there}; "
             "wrote metrics.json, one folder per seed")
    log.close()
    return summary


def run_segment(cfg) -> Optional[dict]:
    """``DOWNSTREAM.TASK segment``: start the processes, run ``DOWNSTREAM.MODE``; the metrics (rank 0, else None)."""
    dist.init_distributed()
    try:
        manifests = read_manifests(cfg)
        if cfg.DOWNSTREAM.MODE == "fewshot":
            return run_fewshot(cfg, manifests)
        return train_and_evaluate(cfg, manifests, cfg.DOWNSTREAM.MODE == "linear")
    finally:
        dist.cleanup()
