"""Does pretraining help? Pretrained backbones against random inits of the same architecture, probed
and fine-tuned at several label budgets.

    python -m benchmarks.pretrain_gain --data outputs/adrenal64 --out outputs/pretrain_gain
    python -m benchmarks.pretrain_gain --data DIR --out OUT --archs resnet18     # one architecture
    python -m benchmarks.pretrain_gain --data DIR --out OUT --tiny               # minutes: plumbing only

``--data`` holds ``train.csv``, ``val.csv`` and ``test.csv`` with a 0/1 column ``label``
(``tools/medmnist_to_manifest.py`` writes them). For every architecture of ``--archs``
(``benchmarks/pretrain_gain_archs.yaml``: its MODEL keys, the methods it is pretrained with, its fine-tuning
recipe) the study runs, each step a real run of an entry script or tool into a folder of
``OUT/<arch>/`` (a second call reuses every finished folder, so the study can run in sittings):

1. ``tools/preprocess.py`` once for all (``--cache-dir``, default ``OUT/cache``);
2. ``main_pretrain_<method>.py --cfg configs/study/<method>.yaml`` -> ``pretrain_<backbone>/`` for every
   pretrained backbone of the architecture (a method, or a named recipe variant of one), with the
   collapse monitor's ``feature_rank`` in its ``metrics.jsonl``; ``--random-inits`` untrained backbones
   (torch seeds 0, 1, ...) -> ``random_init/seed_<s>/backbone.pth``;
3. ``tools/extract_features.py`` once per backbone over train + val + test (``features_<backbone>/``):
   the feature spectrum (:func:`evaluation.collapse.spectrum` of the training features) and the
   **linear probe** at every budget and draw (a logistic regression, C chosen on validation, as
   ``main_downstream.py`` fits it on cached features); a ViT's pool (cls or mean token) is chosen on
   validation with all labels (for the random inits, by their mean);
4. **fine-tuning** (``main_downstream.py --cfg configs/study/finetune.yaml``) of every pretrained backbone
   and of random init ``d`` on draw ``d`` of every budget -> ``ft_<backbone>_<budget>_d<d>_lr<lr>/``; the
   lr comes from the architecture's ``finetune_lrs``, chosen on validation (see pretrain_gain_archs.yaml).

Budgets (``--budgets``): ``16`` = 16 labelled scans per class, ``10%`` = a tenth of each class,
``100%`` = every training label. Draws are class-stratified, ``--draws`` per budget (seeds 0, 1, ...;
at 100 % they differ in the fine-tuning seed only), and the same for every backbone.

A gain is AUROC(pretrained) - AUROC(random init), **paired**: the same bootstrap resamples of the test
cases score both (:func:`mean_paired_diff`). Linear probes pair every draw with every random init;
fine-tuning pairs draw d of the pretrained backbone with random init d fine-tuned on draw d.
Writes ``OUT/pretrain_gain.json``, ``OUT/pretrain_gain.md`` (the tables of the docs) and
``OUT/label_efficiency.png`` (test AUROC against labelled scans, one line per backbone with its 95 % CI).
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import yaml
from sklearn.metrics import roc_auc_score

from benchmarks.common import REPO, header, write_json
from evaluation.collapse import spectrum
from evaluation.compare import paired_bootstrap_diff
from evaluation.metrics import read_predictions_csv
from methods.registry import METHODS as REGISTERED

LABEL = "label"
METHODS = tuple(REGISTERED)  # main_pretrain_<method>.py exists for each
SPLITS = ("train", "val", "test")
# --tiny: every stage runs, each as short as it can be (the test of this script)
# (given again after an architecture's own keys, so that its epochs do not override them)
TINY_OPTS = ["TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "0",
             "MONITOR.NUM_SCANS", "8", "DOWNSTREAM.SAMPLES_PER_EPOCH", "16"]


# ------------------------------------------------------------------------------------------ runs
def run(cmd: Sequence[str], log_path: Path) -> float:
    """Run one entry script (output to ``log_path``); returns its wall seconds, raises naming the log on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.call(list(cmd), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = "".join(open(log_path).readlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[1:4])} failed (exit {rc}); log {log_path}:\n{tail}")
    return time.time() - t0


def as_opts(mapping: Optional[dict]) -> list[str]:
    """``{"MODEL.NAME": "vit_tiny", "MODEL.PATCH_SIZE": [8, 8, 8]}`` -> yacs ``--opts`` pairs."""
    out: list[str] = []
    for k, v in (mapping or {}).items():
        out += [str(k), json.dumps(v) if isinstance(v, (list, tuple)) else str(v)]
    return out


def method_of(name: str, overrides: Optional[dict]) -> str:
    """The method of a pretrained backbone of the archs file: its ``method`` key, else its name."""
    return str((overrides or {}).get("method", name))


def read_archs(path: Path, names: Sequence[str]) -> dict[str, dict]:
    """The architectures ``names`` of the archs file; raises naming the file and an unknown one."""
    with open(path) as f:
        archs = yaml.safe_load(f)
    for n in names:
        if n not in archs:
            raise SystemExit(f"--archs {n}: not in {path} (it has {', '.join(archs)})")
        for b, over in archs[n].get("pretrain", {}).items():
            if method_of(b, over) not in METHODS:
                raise SystemExit(f"{path}: {n}.pretrain.{b} has no known method (method: one of {METHODS}, or a "
                                 "method's name as its own name)")
            if b == "random":
                raise SystemExit(f"{path}: {n}.pretrain.random: 'random' names the random inits; rename it")
    return {n: archs[n] for n in names}


# --------------------------------------------------------------------------------------- budgets
def parse_budget(spec: str) -> tuple[str, float]:
    """``"16"`` -> ("per_class", 16); ``"10%"`` -> ("fraction", 0.1); raises ValueError naming ``spec``."""
    s = str(spec).strip()
    try:
        if s.endswith("%"):
            f = float(s[:-1]) / 100.0
            if 0 < f <= 1:
                return "fraction", f
        elif int(s) > 0 and str(int(s)) == s:
            return "per_class", float(int(s))
    except ValueError:
        pass
    raise ValueError(f"budget {spec!r}: give scans per class (e.g. 16) or a percentage in (0, 100] (e.g. 10%)")


def budget_name(spec: str) -> str:
    kind, v = parse_budget(spec)
    return f"k{int(v)}" if kind == "per_class" else f"p{v * 100:g}"


def budget_rows(labels: np.ndarray, spec: str, seed: int) -> np.ndarray:
    """Sorted training rows of one class-stratified draw (``labels [N]`` 0/1, NaN = unlabelled).

    Raises:
        ValueError: naming the budget and the class when a class would be empty or is too small.
    """
    kind, v = parse_budget(spec)
    y = np.asarray(labels, dtype=np.float64)
    rng = np.random.default_rng([seed, 7919])
    rows = []
    for c in (0, 1):
        idx = np.flatnonzero(y == c)
        n = int(v) if kind == "per_class" else int(round(v * idx.size))
        if n < 1:
            raise ValueError(f"budget {spec}: {v:.0%} of the {idx.size} scans of class {c} leaves the class empty")
        if n > idx.size:
            raise ValueError(f"budget {spec}: {n} scans of class {c} asked, the training set has {idx.size}")
        rows.append(idx if n == idx.size else rng.choice(idx, n, replace=False))
    return np.sort(np.concatenate(rows))


def read_labels(csv_path: Path) -> tuple[list[str], np.ndarray]:
    """Ids and ``label`` values ``[N]`` (NaN = blank) of a study manifest; raises naming the file."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or LABEL not in rows[0] or "id" not in rows[0]:
        raise SystemExit(f"{csv_path}: needs columns id and {LABEL!r} (tools/medmnist_to_manifest.py writes them)")
    return [r["id"] for r in rows], np.array([float(r[LABEL]) if r[LABEL] != "" else np.nan for r in rows])


def write_rows(parts: Sequence[tuple[Path, Optional[np.ndarray]]], dst: Path) -> Path:
    """One manifest ``dst`` of the rows of each ``(source manifest, rows)`` in turn (``rows`` None =
    all), img_path made absolute; kept when it exists. Raises naming a source whose columns differ."""
    if not dst.is_file():
        fields, out = None, []
        for src, rows in parts:
            with open(src, newline="") as f:
                reader = csv.DictReader(f)
                table = list(reader)
            if fields is None:
                fields = reader.fieldnames
            elif reader.fieldnames != fields:
                raise SystemExit(f"{src}: columns {reader.fieldnames} differ from {parts[0][0]}'s {fields}")
            for i in range(len(table)) if rows is None else rows:
                out.append({**table[int(i)], "img_path": str((src.parent / table[int(i)]["img_path"]).resolve())})
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(out)
        tmp.replace(dst)
    return dst


# ---------------------------------------------------------------------------------------- scores
def mean_paired_diff(y: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray, n_bootstrap: int,
                     seed: int) -> dict[str, Any]:
    """Mean over paired rows of AUROC(A) - AUROC(B), with one paired bootstrap over the test cases.

    A row is one pairing: a draw (A and B trained on the same rows), a random init (A repeated
    against each init of B), or both.

    Args:
        y: ``[N]`` 0/1 test targets (the same cases for every row).
        prob_a: ``[S, N]`` probabilities of model A, one row per pairing.
        prob_b: ``[S, N]`` model B, row s paired with A's row s.
        n_bootstrap: resamples (positives and negatives resampled apart, as the metrics' CIs).
        seed: resampling seed.

    Returns:
        ``diff`` (mean over rows), ``diff_std`` (over rows), ``diff_range`` ([min, max] over rows),
        ``ci95``, ``p_bootstrap`` (two-sided) and ``significant`` (the CI excludes 0).
    """
    if prob_a.shape != prob_b.shape or prob_a.shape[1] != len(y):
        raise ValueError(f"paired predictions of shapes {prob_a.shape} and {prob_b.shape} for {len(y)} test cases")
    per_row = np.array([roc_auc_score(y, a) - roc_auc_score(y, b) for a, b in zip(prob_a, prob_b)])
    boots = paired_bootstrap_diff(y, prob_a, prob_b, n_bootstrap, seed)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    p = min(1.0, 2 * min(np.mean(boots <= 0), np.mean(boots >= 0)))
    return {"diff": float(per_row.mean()), "diff_std": float(per_row.std(ddof=1)) if len(per_row) > 1 else 0.0,
            "diff_range": [float(per_row.min()), float(per_row.max())],
            "ci95": [float(lo), float(hi)], "p_bootstrap": float(p), "significant": bool(lo > 0 or hi < 0)}


def mean_auroc(y: np.ndarray, probs: np.ndarray, n_bootstrap: int, seed: int) -> dict[str, Any]:
    """Mean test AUROC over the rows of ``probs [S, N]`` (draws), its sd, and a bootstrap 95% CI of the mean.

    The CI resamples the test cases (stratified); a constant score has AUROC 0.5 on every resample,
    so the paired difference against it plus 0.5 is the mean AUROC of each resample.
    """
    aucs = [roc_auc_score(y, p) for p in probs]
    boots = paired_bootstrap_diff(y, probs, np.zeros_like(probs), n_bootstrap, seed) + 0.5
    return {"auroc": float(np.mean(aucs)), "auroc_sd": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0,
            "aurocs": [float(a) for a in aucs], "ci95": [float(v) for v in np.percentile(boots, [2.5, 97.5])]}


def label_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Ids, targets ``[N]`` and probabilities ``[N]`` of the study's label in a ``predictions.csv``, sorted by id."""
    ids, _, labels, prob, target = read_predictions_csv(str(path))
    j = labels.index(LABEL)
    order = np.argsort(ids)
    return [ids[i] for i in order], target[order, j], prob[order, j]


def stack_predictions(paths: Sequence[Path]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Ids, targets ``[N]`` and probabilities ``[len(paths), N]``; raises when the files hold different cases."""
    ids0, y0, probs = None, None, []
    for p in paths:
        ids, y, prob = label_predictions(p)
        if ids0 is None:
            ids0, y0 = ids, y
        elif ids != ids0 or not np.array_equal(y, y0):
            raise ValueError(f"{p}: test cases or targets differ from {paths[0]}")
        probs.append(prob)
    return ids0, y0, np.stack(probs)


# ------------------------------------------------------------------------------------- the study
class Study:
    """The runs of one ``--out`` folder: commands, folders, timings."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.data, self.out = Path(args.data).resolve(), Path(args.out).resolve()
        self.cfgs = Path(args.configs).resolve()
        for s in SPLITS:
            if not (self.data / f"{s}.csv").is_file():
                raise SystemExit(f"--data {self.data}: no {s}.csv (tools/medmnist_to_manifest.py writes them)")
        self.cache = Path(args.cache_dir).resolve() if args.cache_dir else self.out / "cache"
        self.tiny = bool(args.tiny)
        self.draws = 2 if self.tiny else args.draws
        self.n_init = 2 if self.tiny else args.random_inits
        self.n_boot = 100 if self.tiny else args.bootstrap
        if self.n_init < self.draws:
            raise SystemExit(f"--random-inits {self.n_init} < --draws {self.draws}: fine-tuning pairs draw d with "
                             "random init d")
        self.budgets = list(args.budgets)
        for b in self.budgets:
            try:
                parse_budget(b)
            except ValueError as e:
                raise SystemExit(f"--budgets: {e}") from None
        self.common = ["DATA.TRAIN_CSV", str(self.data / "train.csv"), "DATA.VAL_CSV", str(self.data / "val.csv"),
                       "DATA.TEST_CSV", str(self.data / "test.csv"), "DATA.CACHE_DIR", str(self.cache)]
        self.common += (TINY_OPTS if self.tiny else []) + list(args.opts)
        self.times: dict[str, float] = {}
        table = {s: read_labels(self.data / f"{s}.csv") for s in SPLITS}
        self.ids = {s: table[s][0] for s in SPLITS}
        self.labels = {s: table[s][1] for s in SPLITS}
        all_ids = [i for s in SPLITS for i in self.ids[s]]
        if len(set(all_ids)) != len(all_ids):
            raise SystemExit(f"{self.data}: ids repeat across train/val/test; the study needs unique ids")
        for b in self.budgets:  # a budget that leaves a class empty stops the study before any run
            try:
                budget_rows(self.labels["train"], b, 0)
            except ValueError as e:
                raise SystemExit(f"--budgets: {e} ({self.data / 'train.csv'})") from None

    def entry(self, script: str, cfg: str, folder: Path, *opts: str) -> list[str]:
        return [sys.executable, script, "--cfg", str(self.cfgs / cfg), "--opts", "OUTPUT", str(folder),
                *self.common, *opts]

    def step(self, name: str, finished: bool, cmd: list[str], log: Path) -> None:
        """Run ``cmd`` unless an earlier call ``finished`` it."""
        if not finished:
            print(f"[pretrain_gain] {name}", flush=True)
            self.times[name] = run(cmd, log)

    def preprocess(self) -> None:
        self.step("preprocess", (self.out / "logs" / "preprocess.done").is_file(),
                  [sys.executable, "-m", "tools.preprocess", "--cfg", str(self.cfgs / "base.yaml"), "--no-progress",
                   "--opts", *self.common], self.out / "logs" / "preprocess.log")
        (self.out / "logs" / "preprocess.done").touch()

    def draw_csv(self, spec: str, d: int) -> Path:
        rows = budget_rows(self.labels["train"], spec, d)
        return write_rows([(self.data / "train.csv", rows)], self.out / "draws" / f"{budget_name(spec)}_d{d}.csv")


def random_backbone(study: Study, model_opts: list[str], seed: int, path: Path) -> str:
    """Write an untrained backbone of the architecture, initialised from torch seed ``seed``."""
    if not path.is_file():
        from config import get_config
        from engine.checkpoint import atomic_save
        from models.zoo import build_backbone

        cfg = get_config(["--cfg", str(study.cfgs / "base.yaml"), "--opts", *study.common, *model_opts])
        torch.manual_seed(seed)
        atomic_save(build_backbone(cfg).state_dict(), str(path))
    return str(path)


def pretrain_finished(folder: Path) -> bool:
    """True when the run in ``folder`` trained all its ``TRAIN.EPOCHS`` (``backbone.pth`` is written
    after every epoch, so its presence alone does not say the run is complete)."""
    if not (folder / "checkpoint_last.pth").is_file() or not (folder / "config.yaml").is_file():
        return False
    from config import load_config
    state = torch.load(folder / "checkpoint_last.pth", map_location="cpu", weights_only=True)
    return int(state["epoch"]) >= int(load_config(str(folder / "config.yaml")).TRAIN.EPOCHS)


def pretrain_summary(folder: Path) -> dict[str, Any]:
    """Losses and the collapse monitor of a pretraining run's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in open(folder / "metrics.jsonl")]
    ep = [r for r in rows if "epoch_s" in r]  # the epoch-end rows
    first = ep[0] if ep else {}
    return {"epochs": len(ep), "first_loss": first.get("loss"), "last_loss": ep[-1]["loss"] if ep else None,
            "feature_rank_init": first.get("feature_rank_init"),
            "feature_rank": [r.get("feature_rank") for r in ep], "feature_std": [r.get("feature_std") for r in ep]}


def features(study: Study, arch: str, adir: Path, name: str, ckpt: str, model_opts: list[str],
             pools: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """``pool -> split -> [N, D]`` pooled features of one backbone (one extraction over all splits)."""
    folder = adir / f"features_{name}"
    all_csv = write_rows([(study.data / f"{s}.csv", None) for s in SPLITS], study.out / "draws" / "all.csv")
    vit = pools != ["avg"]
    study.step(f"features {arch} {name}", (folder / "features.npy").is_file(),
               [sys.executable, "-m", "tools.extract_features", "--cfg", str(study.cfgs / "base.yaml"), "--opts",
                "OUTPUT", str(folder), *study.common, "DATA.TEST_CSV", str(all_csv), *model_opts,
                "MODEL.PRETRAINED", ckpt, *(["MODEL.POOL", "cls+mean"] if vit else [])],
               study.out / "logs" / arch / f"features_{name}.log")
    x = np.load(folder / "features.npy")
    with open(folder / "features.csv", newline="") as f:
        row_of = {r["id"]: i for i, r in enumerate(csv.DictReader(f))}
    out: dict[str, dict[str, np.ndarray]] = {}
    half = x.shape[1] // 2  # a ViT's cls+mean features: the cls token, then the mean of the patch tokens
    for pool in pools:
        cols = slice(None) if not vit else (slice(0, half) if pool == "cls" else slice(half, None))
        out[pool] = {s: x[[row_of[i] for i in study.ids[s]], cols] for s in SPLITS}
    return out


def probe(study: Study, feats: dict[str, np.ndarray], rows: np.ndarray, seed: int) -> tuple[float, np.ndarray]:
    """Validation AUROC and test probabilities ``[N]`` of a logistic regression on ``rows`` of the training features."""
    from evaluation.probe import LogisticProbe
    y = study.labels
    p = LogisticProbe([LABEL], seed=seed).fit(feats["train"][rows], y["train"][rows, None], feats["val"],
                                               y["val"][:, None])
    val = roc_auc_score(y["val"], p.predict_proba(feats["val"])[:, 0])
    return float(val), p.predict_proba(feats["test"])[:, 0]


def run_arch(study: Study, arch: str, spec: dict, methods: Sequence[str]) -> dict[str, Any]:
    """Every stage of one architecture; returns its part of the JSON."""
    adir = study.out / arch
    model_opts = as_opts(spec["model"])
    pools = list(spec.get("pools", ["avg"]))
    logs = study.out / "logs" / arch
    res: dict[str, Any] = {"model": spec["model"], "pretrain": {}, "features": {}, "linear": {}, "finetune": {}}
    backbones: dict[str, str] = {}
    for b, over in spec.get("pretrain", {}).items():
        m = method_of(b, over)
        if b not in methods and m not in methods:
            continue
        folder = adir / f"pretrain_{b}"
        recipe = {k: v for k, v in (over or {}).items() if k != "method"}
        study.step(f"pretrain {arch} {b}", pretrain_finished(folder),
                   study.entry(f"main_pretrain_{m}.py", f"{m}.yaml", folder, *model_opts,
                               *as_opts(recipe), *(TINY_OPTS if study.tiny else [])),
                   logs / f"pretrain_{b}.log")
        backbones[b] = str(folder / "backbone.pth")
        res["pretrain"][b] = {**pretrain_summary(folder), "method": m, "recipe": recipe,
                              "seconds": study.times.get(f"pretrain {arch} {b}")}
    pretrained = list(backbones)
    randoms = [f"random_s{i}" for i in range(study.n_init)]
    for i, r in enumerate(randoms):
        backbones[r] = random_backbone(study, model_opts, i, adir / "random_init" / f"seed_{i}" / "backbone.pth")

    # features once per backbone: spectrum, pool choice, linear probes at every budget and draw
    feats = {b: features(study, arch, adir, b, ckpt, model_opts, pools) for b, ckpt in backbones.items()}
    all_rows = np.arange(len(study.labels["train"]))
    val_all = {b: {p: probe(study, feats[b][p], all_rows, 0)[0] for p in pools} for b in backbones}
    pool_of = {b: max(pools, key=lambda p: val_all[b][p]) for b in pretrained}
    pool_of.update({r: max(pools, key=lambda p: np.mean([val_all[q][p] for q in randoms])) for r in randoms})
    for b in backbones:
        res["features"][b] = {"pool": pool_of[b], "val_auroc_by_pool": val_all[b],
                              **spectrum(feats[b][pool_of[b]]["train"])}
    y = study.labels["test"]
    for spec_b in study.budgets:
        bn = budget_name(spec_b)
        draws = [budget_rows(study.labels["train"], spec_b, d) for d in range(study.draws)]
        probs = {b: np.stack([probe(study, feats[b][pool_of[b]], rows, d)[1] for d, rows in enumerate(draws)])
                 for b in backbones}
        rand = np.concatenate([probs[r] for r in randoms])  # [R * D, N], init-major
        entry: dict[str, Any] = {"n_labelled": float(np.mean([len(r) for r in draws])),
                                 "random": mean_auroc(y, rand, study.n_boot, 0)}
        for b in pretrained:
            entry[b] = mean_auroc(y, probs[b], study.n_boot, 0)
            entry[b]["vs_random"] = mean_paired_diff(y, np.tile(probs[b], (study.n_init, 1)), rand, study.n_boot, 0)
        res["linear"][bn] = entry

    # fine-tuning: lr chosen on validation at the first budget below 100 %, then every budget and draw
    ft_backbones = pretrained + ["random"]

    def ckpt_of(b: str, d: int) -> str:
        return backbones[f"random_s{d}"] if b == "random" else backbones[b]

    def ft(b: str, spec_b: str, d: int, lr: float) -> Path:
        folder = adir / f"ft_{b}_{budget_name(spec_b)}_d{d}_lr{lr:g}"
        study.step(f"finetune {arch} {b} {spec_b} draw {d} lr {lr:g}", (folder / "metrics.json").is_file(),
                   study.entry("main_downstream.py", "finetune.yaml", folder, *model_opts,
                               *as_opts(spec.get("finetune")), *(TINY_OPTS if study.tiny else []),
                               "DATA.TRAIN_CSV", str(study.draw_csv(spec_b, d)), "SEED", str(d),
                               "TRAIN.BASE_LR", str(lr), "MODEL.PRETRAINED", ckpt_of(b, d)),
                   logs / f"{folder.name}.log")
        return folder

    lrs = [float(v) for v in spec.get("finetune_lrs", [4e-3])]
    lr_budget = next((b for b in study.budgets if parse_budget(b) != ("fraction", 1.0)), study.budgets[0])
    sweep = {}
    for lr in lrs if len(lrs) > 1 else []:
        sweep[f"{lr:g}"] = {b: read_val_auroc(ft(b, lr_budget, 0, lr)) for b in ft_backbones}
    lr = max(lrs, key=lambda v: np.mean(list(sweep[f"{v:g}"].values()))) if sweep else lrs[0]
    res["finetune_lr"] = {"chosen": lr, "budget": lr_budget, "val_auroc": sweep}
    for spec_b in study.budgets:
        folders = {b: [ft(b, spec_b, d, lr) for d in range(study.draws)] for b in ft_backbones}
        files = [f / "predictions.csv" for b in ft_backbones for f in folders[b]]
        _, y_ft, p = stack_predictions(files)
        probs = {b: p[i * study.draws:(i + 1) * study.draws] for i, b in enumerate(ft_backbones)}
        entry = {"n_labelled": float(np.mean([len(budget_rows(study.labels["train"], spec_b, d))
                                              for d in range(study.draws)]))}
        for b in ft_backbones:
            entry[b] = mean_auroc(y_ft, probs[b], study.n_boot, 0)
            entry[b]["val_auroc"] = [read_val_auroc(f) for f in folders[b]]
            if b != "random":
                entry[b]["vs_random"] = mean_paired_diff(y_ft, probs[b], probs["random"], study.n_boot, 0)
        res["finetune"][budget_name(spec_b)] = entry
    return res


def read_val_auroc(folder: Path) -> float:
    with open(folder / "metrics.json") as f:
        v = json.load(f)["val"][LABEL]["auroc"]
    return float(v) if v is not None else float("nan")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder with train.csv, val.csv, test.csv (column 'label')")
    ap.add_argument("--out", required=True, help="output folder (every run in a subfolder; reused when run again)")
    ap.add_argument("--cache-dir", default="", help="preprocessed cache (default OUT/cache)")
    ap.add_argument("--configs", default=str(REPO / "configs" / "study"),
                    help="folder with base/mae/dino/simclr/finetune.yaml")
    ap.add_argument("--archs-file", default=str(REPO / "benchmarks" / "pretrain_gain_archs.yaml"),
                    help="the architectures: MODEL keys, pretraining methods, fine-tuning recipe")
    ap.add_argument("--archs", nargs="+", default=["vit_tiny", "resnet18", "segresnet"],
                    help="architectures of --archs-file")
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    help="pretrained backbones: methods (every backbone of --archs-file pretrained with one) or "
                         "backbone names of --archs-file (a recipe variant such as dino_koleo)")
    ap.add_argument("--budgets", nargs="+", default=["16", "10%", "100%"],
                    help="labelled training scans: N per class or P%% of each class")
    ap.add_argument("--draws", type=int, default=3, help="class-stratified draws per budget (seeds 0..)")
    ap.add_argument("--random-inits", type=int, default=5,
                    help="random backbones per architecture (torch seeds 0..R-1); at least --draws")
    ap.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples")
    ap.add_argument("--tiny", action="store_true", help="one epoch everywhere, 2 draws and inits, 100 resamples")
    ap.add_argument("--opts", nargs="*", default=[], help="yacs KEY VALUE pairs added to every run")
    args = ap.parse_args(argv)

    study = Study(args)
    archs = read_archs(Path(args.archs_file).resolve(), args.archs)
    known = set(METHODS) | {b for spec in archs.values() for b in spec.get("pretrain", {})}
    if set(args.methods) - known:
        raise SystemExit(f"--methods {' '.join(sorted(set(args.methods) - known))}: neither a method nor a "
                         f"backbone of --archs {' '.join(args.archs)} in {args.archs_file}")
    t_start = time.time()
    study.preprocess()
    # architectures of earlier calls on the same --out stay in the JSON (run them in separate sittings)
    old = study.out / "pretrain_gain.json"
    results: dict[str, Any] = json.loads(old.read_text()).get("results", {}) if old.is_file() else {}
    for arch, spec in archs.items():
        results[arch] = run_arch(study, arch, spec, args.methods)
        report = header(benchmark="pretrain_gain", data=str(study.data), archs=list(results),
                        methods=list(args.methods), budgets=study.budgets, draws=study.draws,
                        random_inits=study.n_init, bootstrap=study.n_boot, tiny=study.tiny, opts=list(args.opts),
                        results=results, seconds_total=time.time() - t_start, seconds=study.times)
        write_json(study.out / "pretrain_gain.json", report)  # after every architecture: partial results kept
    (study.out / "pretrain_gain.md").write_text(markdown_tables(report))
    plot_label_efficiency(report, study.out / "label_efficiency.png")
    print(markdown_tables(report))
    print(f"[pretrain_gain] {report['seconds_total'] / 60:.1f} min; wrote {study.out / 'pretrain_gain.json'}, "
          ".md and label_efficiency.png")
    return report


# --------------------------------------------------------------------------------------- reports
def fmt_ci(v: Optional[float], ci: Optional[Sequence[float]], signed: bool = False) -> str:
    if v is None:
        return "n/a"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(v)} [{f.format(ci[0])}, {f.format(ci[1])}]" if ci else f.format(v)


def markdown_tables(r: dict[str, Any]) -> str:
    """One table per architecture: test AUROC (mean ± sd over draws) and the paired gain over random init
    per protocol and budget, the feature rank and the pretraining's collapse monitor."""
    out = []
    for arch, res in r["results"].items():
        budgets = list(res["linear"])
        head = ["backbone", "feature eff. rank (pool)"]
        head += [f"{proto} {b}: AUROC, gain [95% CI]" for proto in ("linear", "finetune") for b in budgets]
        lines = [f"### {arch}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        names = ["random"] + list(res["pretrain"])
        for b in names:
            if b == "random":
                ranks = [v["effective_rank"] for k, v in res["features"].items() if k.startswith("random_s")]
                f0 = res["features"]["random_s0"]
                rank = f"{np.mean(ranks):.1f} ({min(ranks):.1f}-{max(ranks):.1f}) of {f0['dim']} ({f0['pool']})"
                name = f"random init ({r['random_inits']} inits)"
            else:
                f0 = res["features"][b]
                rank, name = f"{f0['effective_rank']:.1f} of {f0['dim']} ({f0['pool']})", b
            row = [name, rank]
            for proto in ("linear", "finetune"):
                for bud in budgets:
                    e = res[proto].get(bud, {}).get(b)
                    if e is None:
                        row.append("—")
                        continue
                    cell = f"{e['auroc']:.3f} ± {e['auroc_sd']:.3f}"
                    if "vs_random" in e:
                        cell += ", " + fmt_ci(e["vs_random"]["diff"], e["vs_random"]["ci95"], signed=True)
                    row.append(cell)
            lines.append("| " + " | ".join(row) + " |")
        lr = res.get("finetune_lr", {})
        lines += ["", "Labelled scans per budget: " + ", ".join(
            f"{b} = {res['linear'][b]['n_labelled']:.0f}" for b in budgets)
                  + f"; fine-tuning lr (BASE_LR) {lr.get('chosen')} chosen on validation at {lr.get('budget')}."]
        for m, p in res["pretrain"].items():
            ranks = [v for v in p["feature_rank"] if v is not None]
            lines.append(f"Pretraining {m}: {p['epochs']} epochs, loss {p['first_loss']:.3f} -> {p['last_loss']:.3f}"
                         + (f", monitor feature_rank {p['feature_rank_init']:.1f} (init) -> {ranks[-1]:.1f}"
                            if ranks and p["feature_rank_init"] is not None else ""))
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def plot_label_efficiency(r: dict[str, Any], path: Path) -> None:
    """Test AUROC against labelled scans (log x), one line per backbone with its 95% CI band; a panel per
    protocol (rows) and architecture (columns)."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(r["results"])
    fig, axes = plt.subplots(2, len(archs), figsize=(4.2 * len(archs), 7), squeeze=False, sharey=True)
    for j, arch in enumerate(archs):
        res = r["results"][arch]
        for i, proto in enumerate(("linear", "finetune")):
            ax = axes[i, j]
            budgets = list(res[proto])
            names = ["random"] + list(res["pretrain"])
            for b in names:
                pts = [(res[proto][k]["n_labelled"], res[proto][k][b]) for k in budgets if b in res[proto][k]]
                if not pts:
                    continue
                x = [p[0] for p in pts]
                ax.plot(x, [p[1]["auroc"] for p in pts], marker="o", label=b, color="black" if b == "random" else None)
                ax.fill_between(x, [p[1]["ci95"][0] for p in pts], [p[1]["ci95"][1] for p in pts], alpha=0.15,
                                color="black" if b == "random" else ax.lines[-1].get_color())
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_title(f"{arch}: {'linear probe' if proto == 'linear' else 'fine-tuning'}")
            ax.set_xlabel("labelled training scans")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("test AUROC (mean over draws, 95% CI)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
