"""Does pretraining help? MAE, DINO and SimCLR on one backbone and budget against a random backbone.

    python benchmarks/pretrain_gain.py --data data/adrenalmnist3d_64 --out outputs/pretrain_gain
    python benchmarks/pretrain_gain.py --data DIR --out OUT --tiny          # minutes: plumbing only

``--data`` holds ``train.csv``, ``val.csv`` and ``test.csv`` (``tools/medmnist_to_manifest.py``
writes them). Every step is a real run of the entry scripts, in this order, each into a folder of
``--out`` (a second call reuses the finished ones):

1. ``tools/preprocess.py``: the volumes once into the memory-mapped cache (``--cache-dir``);
2. ``main_pretrain_{mae,dino,simclr}.py --cfg configs/study/<method>.yaml`` -> ``pretrain_<method>/``;
3. for every backbone (each pretrained one, and ``--random-inits`` random ones: the same
   architecture untrained, initialised from torch seeds 0, 1, ... -> ``random_init/seed_<s>/``) a
   linear probe on cached features (``main_downstream.py``, ``configs/study/probe.yaml``) with
   ``MODEL.POOL`` ``cls`` and ``mean``; the pool with the better **validation** AUROC is kept
   (for the random backbones, the better mean over inits) (``linear_<backbone>_<pool>/``), the
   test split is only read for the table;
4. few-shot probes with that pool (``DOWNSTREAM.FEW_SHOT_K`` = each of ``--shots``, ``--seeds``
   draws; the same draws for every backbone) -> ``fewshot_<backbone>_k<K>/``;
5. the same backbone fine-tuned with labels from random init (``configs/study/supervised.yaml``)
   -> ``supervised/``;
6. a collapse monitor: every backbone's pooled training features (``tools/extract_features.py``
   -> ``features_<backbone>/``) and their effective rank (:func:`feature_spectrum`).

"Random" is several inits, not one: how well a frozen random ViT separates the classes depends on
its init (on AdrenalMNIST3D the test AUROC of a linear probe on one random init ranged 0.746-0.804
over torch seeds 0-4), so a gain over a single init measures that init as much as the pretraining.
The gain of a backbone is ``AUROC(backbone) - mean over inits of AUROC(random init)``, **paired**:
the same bootstrap resamples of the test cases score every model, the difference averaged over
inits (and few-shot draws) inside each resample (:func:`mean_paired_diff`). Each init is also
compared on its own (``evaluation.compare``: paired bootstrap CI and DeLong's test), and the
table shows the range of those gains and how many inits the backbone beats significantly.
Writes ``OUT/pretrain_gain.json`` and ``OUT/pretrain_gain.md`` (the README's table).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, from any folder

from benchmarks.common import REPO, header, write_json  # noqa: E402
from evaluation.compare import compare_predictions, paired_bootstrap_diff  # noqa: E402
from evaluation.metrics import read_predictions_csv  # noqa: E402

METHODS = ("mae", "dino", "simclr")
POOLS = ("cls", "mean")
LABEL = "label"
# --tiny: every stage runs, each as short as it can be (the test of this script)
TINY_OPTS = ["TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "0"]


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
        raise RuntimeError(f"{cmd[1]} failed (exit {rc}); log {log_path}:\n{tail}")
    return time.time() - t0


def read_metrics(folder: Path) -> dict[str, Any]:
    with open(folder / "metrics.json") as f:
        return json.load(f)


def feature_spectrum(features: np.ndarray) -> dict[str, Any]:
    """How many directions the features use: a collapse monitor for a frozen backbone.

    Args:
        features: ``[N, D]`` pooled features of N scans.

    Returns:
        ``effective_rank`` (exp of the entropy of the centred features' normalised singular-value
        spectrum: D for isotropic features, 1 for a single direction), the same after standardising
        each feature (what the logistic probe sees), and ``top1_share`` / ``top10_share`` of the
        variance in the first 1 / 10 principal directions.
    """
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(axis=0)
    out: dict[str, Any] = {"dim": int(x.shape[1])}
    for key, m in (("effective_rank", x), ("effective_rank_standardized", x / np.maximum(x.std(axis=0), 1e-8))):
        var = np.linalg.svd(m, compute_uv=False) ** 2
        p = var / var.sum() if var.sum() > 0 else np.full_like(var, 1.0 / var.size)
        out[key] = float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))
        if key == "effective_rank":
            out["top1_share"], out["top10_share"] = float(p[0]), float(p[:10].sum())
    return out


def mean_paired_diff(y: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray, n_bootstrap: int,
                     seed: int) -> dict[str, Any]:
    """Mean over paired rows of AUROC(A) - AUROC(B), with one paired bootstrap over the test cases.

    A row is one pairing: a few-shot draw (A and B trained on the same rows), a random init (A
    repeated against each init of B), or both.

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


def random_backbone(cfg_file: Path, opts: Sequence[str], seed: int, path: Path) -> str:
    """Write an untrained backbone of the study's architecture, initialised from torch seed ``seed``."""
    if not path.is_file():
        from config import get_config
        from engine.checkpoint import atomic_save
        from models.zoo import build_backbone

        cfg = get_config(["--cfg", str(cfg_file), "--opts", *opts])
        torch.manual_seed(seed)
        atomic_save(build_backbone(cfg).state_dict(), str(path))
    return str(path)


def seed_files(folder: Path, expected: int) -> list[Path]:
    """The ``seed_<s>/predictions.csv`` of a few-shot run in seed order; raises unless there are ``expected``."""
    files = sorted(folder.glob("seed_*/predictions.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if len(files) != expected:
        raise FileNotFoundError(f"{folder}: {len(files)} seed_<s>/predictions.csv, expected {expected}")
    return files


def fmt_ci(v: Optional[float], ci: Optional[Sequence[float]], signed: bool = False) -> str:
    if v is None:
        return "n/a"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(v)} [{f.format(ci[0])}, {f.format(ci[1])}]" if ci else f.format(v)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder with train.csv, val.csv, test.csv")
    ap.add_argument("--out", required=True, help="output folder (every run in a subfolder; reused when run again)")
    ap.add_argument("--cache-dir", default="", help="preprocessed cache (default OUT/cache)")
    ap.add_argument("--configs", default=str(REPO / "configs" / "study"),
                    help="folder with base/mae/dino/simclr/probe/supervised.yaml")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--shots", nargs="+", type=int, default=[8, 16, 32], help="few-shot K (positives = negatives)")
    ap.add_argument("--seeds", type=int, default=5, help="few-shot draws per K")
    ap.add_argument("--random-inits", type=int, default=5,
                    help="random backbones (torch seeds 0..R-1); gains are over their mean")
    ap.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples")
    ap.add_argument("--tiny", action="store_true", help="one epoch everywhere, 2 seeds, 100 resamples: the plumbing")
    ap.add_argument("--opts", nargs="*", default=[], help="yacs KEY VALUE pairs added to every run")
    args = ap.parse_args(argv)

    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    cfgs = Path(args.configs).resolve()
    for s in ("train", "val", "test"):
        if not (data / f"{s}.csv").is_file():
            raise SystemExit(f"--data {data}: no {s}.csv (tools/medmnist_to_manifest.py writes them)")
    cache = Path(args.cache_dir).resolve() if args.cache_dir else out / "cache"
    seeds, n_boot = (2, 100) if args.tiny else (args.seeds, args.bootstrap)
    n_init = 2 if args.tiny else args.random_inits
    if n_init < 1:
        raise SystemExit(f"--random-inits {n_init}: at least one random backbone is needed")
    common = ["DATA.TRAIN_CSV", str(data / "train.csv"), "DATA.VAL_CSV", str(data / "val.csv"),
              "DATA.TEST_CSV", str(data / "test.csv"), "DATA.CACHE_DIR", str(cache)]
    common += (TINY_OPTS if args.tiny else []) + list(args.opts)
    py = sys.executable
    t_start = time.time()
    times: dict[str, float] = {}

    def entry(script: str, cfg: str, folder: Path, *opts: str) -> list[str]:
        return [py, script, "--cfg", str(cfgs / cfg), "--opts", "OUTPUT", str(folder), *common, *opts]

    print(f"[pretrain_gain] preprocessing -> {cache}", flush=True)
    times["preprocess"] = run([py, "tools/preprocess.py", "--cfg", str(cfgs / "base.yaml"), "--no-progress",
                               "--opts", *common], out / "logs" / "preprocess.log")

    randoms = [f"random_s{i}" for i in range(n_init)]
    backbones: dict[str, str] = {r: random_backbone(cfgs / "probe.yaml", common, i,
                                                    out / "random_init" / f"seed_{i}" / "backbone.pth")
                                 for i, r in enumerate(randoms)}
    for m in args.methods:
        folder = out / f"pretrain_{m}"
        if not (folder / "backbone.pth").is_file():
            print(f"[pretrain_gain] pretraining {m} -> {folder}", flush=True)
            times[f"pretrain_{m}"] = run(entry(f"main_pretrain_{m}.py", f"{m}.yaml", folder),
                                         out / "logs" / f"pretrain_{m}.log")
        backbones[m] = str(folder / "backbone.pth")

    results: dict[str, Any] = {"random_inits": n_init, "linear": {}, "fewshot": {}, "pretrain": {}}
    for m in args.methods:
        rows = [json.loads(line) for line in open(out / f"pretrain_{m}" / "metrics.jsonl")]
        losses = [r["loss"] for r in rows if "epoch_s" in r]  # the epoch-end rows
        results["pretrain"][m] = {"epochs": len(losses), "first_loss": losses[0] if losses else None,
                                  "last_loss": losses[-1] if losses else None,
                                  "seconds": times.get(f"pretrain_{m}")}

    # linear probes with both pools; the pool is chosen on validation (one pool for all random inits)
    probe: dict[str, dict[str, dict[str, Any]]] = {}
    for b, ckpt in backbones.items():
        probe[b] = {}
        for pool in POOLS:
            folder = out / f"linear_{b}_{pool}"
            if not (folder / "metrics.json").is_file():
                print(f"[pretrain_gain] linear probe {b} ({pool}) -> {folder}", flush=True)
                times[f"linear_{b}_{pool}"] = run(entry("main_downstream.py", "probe.yaml", folder,
                                                        "MODEL.PRETRAINED", ckpt,
                                                        "MODEL.POOL", pool), out / "logs" / f"linear_{b}_{pool}.log")
            met = read_metrics(folder)
            val = met["val"][LABEL]["auroc"]
            probe[b][pool] = {"val_auroc": val if val is not None else -1.0, "auroc": met["test"][LABEL]["auroc"],
                              "auroc_ci95": met["test"][LABEL]["auroc_ci95"], "folder": str(folder)}

    def best_pool(names: Sequence[str]) -> str:
        return max(POOLS, key=lambda pool: np.mean([probe[n][pool]["val_auroc"] for n in names]))

    pool_of = {m: best_pool([m]) for m in args.methods}
    random_pool = best_pool(randoms)
    pool_of.update({r: random_pool for r in randoms})
    for m in args.methods:
        results["linear"][m] = {"pool": pool_of[m], **probe[m][pool_of[m]]}
    inits = [{"seed": i, **probe[r][pool_of[r]]} for i, r in enumerate(randoms)]
    test = [d["auroc"] for d in inits]
    results["linear"]["random"] = {"pool": random_pool,
                                   "val_auroc": float(np.mean([d["val_auroc"] for d in inits])),
                                   "auroc": float(np.mean(test)), "auroc_range": [min(test), max(test)],
                                   "auroc_sd": float(np.std(test, ddof=1)) if len(test) > 1 else 0.0,
                                   "inits": inits}

    # collapse monitor: the spectrum of each backbone's training features (the pool the probe kept)
    for b, ckpt in backbones.items():
        folder = out / f"features_{b}"
        if not (folder / "features.npy").is_file():
            print(f"[pretrain_gain] feature spectrum {b} -> {folder}", flush=True)
            times[f"features_{b}"] = run([py, "tools/extract_features.py", "--cfg", str(cfgs / "probe.yaml"), "--opts",
                                          "OUTPUT", str(folder), *common, "DATA.TEST_CSV", str(data / "train.csv"),
                                          "MODEL.PRETRAINED", ckpt, "MODEL.POOL", pool_of[b]],
                                         out / "logs" / f"features_{b}.log")
        spec = feature_spectrum(np.load(folder / "features.npy"))
        if b in randoms:
            inits[randoms.index(b)]["features"] = spec
        else:
            results["linear"][b]["features"] = spec
    ranks = [d["features"]["effective_rank"] for d in inits]
    results["linear"]["random"]["features"] = {"dim": inits[0]["features"]["dim"],
                                               "effective_rank": float(np.mean(ranks)),
                                               "effective_rank_range": [min(ranks), max(ranks)]}

    # the supervised reference: the same architecture fine-tuned with labels from random init
    sup = out / "supervised"
    if not (sup / "metrics.json").is_file():
        print(f"[pretrain_gain] supervised from scratch -> {sup}", flush=True)
        times["supervised"] = run(entry("main_downstream.py", "supervised.yaml", sup), out / "logs" / "supervised.log")
    t = read_metrics(sup)["test"][LABEL]
    results["supervised"] = {"auroc": t["auroc"], "auroc_ci95": t["auroc_ci95"], "folder": str(sup)}

    # paired gains over the random inits (scan level: MedMNIST has no patient column)
    rand_preds = [Path(d["folder"]) / "predictions.csv" for d in inits]
    for b in list(args.methods) + ["supervised"]:
        entry_b = results["supervised"] if b == "supervised" else results["linear"][b]
        pred = Path(entry_b["folder"]) / "predictions.csv"
        _, y, p = stack_predictions([pred, *rand_preds])  # row 0: the backbone, then the inits
        gain = mean_paired_diff(y, np.repeat(p[:1], n_init, axis=0), p[1:], n_boot, seed=0)
        gain["per_init"] = [compare_predictions(str(pred), str(rp), labels=[LABEL], n_bootstrap=n_boot, seed=0,
                                                name_a=b, name_b=f"random init {i}")["scan"][LABEL]
                            for i, rp in enumerate(rand_preds)]
        gain["inits_beaten"] = sum(bool(c["significant"]) and c["diff"] > 0 for c in gain["per_init"])
        entry_b["vs_random"] = gain

    # few-shot: the same draws (seeds) for every backbone; gains pair every draw with every random init
    for k in args.shots:
        per_k: dict[str, Any] = {}
        for b, ckpt in backbones.items():
            folder = out / f"fewshot_{b}_k{k}"
            if not (folder / "metrics.json").is_file():
                print(f"[pretrain_gain] few-shot K={k} {b} -> {folder}", flush=True)
                times[f"fewshot_{b}_k{k}"] = run(entry("main_downstream.py", "probe.yaml", folder,
                                                       "MODEL.PRETRAINED", ckpt,
                                                       "MODEL.POOL", pool_of[b], "DOWNSTREAM.MODE", "fewshot",
                                                       "DOWNSTREAM.FEW_SHOT_K", str(k), "DOWNSTREAM.FEW_SHOT_SEEDS",
                                                       str(seeds)), out / "logs" / f"fewshot_{b}_k{k}.log")
            if b not in randoms:
                summ = read_metrics(folder)["test"][LABEL]
                per_k[b] = {"auroc_mean": summ.get("auroc_mean"), "auroc_std": summ.get("auroc_std"),
                            "folder": str(folder)}
        rand_files = [f for r in randoms for f in seed_files(out / f"fewshot_{r}_k{k}", seeds)]  # init-major
        _, y_r, p_r = stack_predictions(rand_files)  # [R * S, N]
        aucs = [roc_auc_score(y_r, row) for row in p_r]
        per_k["random"] = {"auroc_mean": float(np.mean(aucs)), "auroc_std": float(np.std(aucs, ddof=1)),
                           "auroc_init_means": [float(np.mean(aucs[i * seeds:(i + 1) * seeds])) for i in range(n_init)],
                           "folders": [str(out / f"fewshot_{r}_k{k}") for r in randoms]}
        for b in args.methods:
            _, y, p = stack_predictions(seed_files(out / f"fewshot_{b}_k{k}", seeds) + rand_files)
            p_b, p_r = p[:seeds], p[seeds:]  # the backbone's draws, then every init's
            per_k[b]["vs_random"] = mean_paired_diff(y, np.tile(p_b, (n_init, 1)), p_r, n_boot, seed=0)
        results["fewshot"][str(k)] = per_k

    results["seconds_total"] = time.time() - t_start
    results["seconds"] = times
    report = header(benchmark="pretrain_gain", data=str(data), methods=list(args.methods), shots=list(args.shots),
                    seeds=seeds, bootstrap=n_boot, tiny=bool(args.tiny), opts=list(args.opts), **results)
    write_json(out / "pretrain_gain.json", report)
    md = markdown_table(report)
    (out / "pretrain_gain.md").write_text(md)
    print(md)
    print(f"[pretrain_gain] {results['seconds_total'] / 60:.1f} min; wrote {out / 'pretrain_gain.json'} and .md")
    return report


def markdown_table(r: dict[str, Any]) -> str:
    """The study's table: test AUROC [95% CI] per backbone and mode, paired gain over the random inits."""
    shots = [str(k) for k in r["shots"]]
    n_init = r["random_inits"]
    head = ["backbone", "linear probe AUROC [95% CI]", f"gain over random (mean of {n_init} inits) [paired 95% CI]",
            "gain per init (min, max)", "inits beaten (p < 0.05)", "feature eff. rank"]
    head += [f"{k}-shot AUROC (mean ± sd), gain [95% CI]" for k in shots]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def gain_cells(vs: Optional[dict[str, Any]]) -> list[str]:
        if not vs:
            return ["—", "—", "—"]
        lo, hi = vs["diff_range"]
        return [fmt_ci(vs["diff"], vs["ci95"], signed=True), f"{lo:+.3f}, {hi:+.3f}",
                f"{vs['inits_beaten']} of {len(vs['per_init'])}"]

    for b in ["random"] + list(r["methods"]):
        lin = r["linear"][b]
        feats = lin.get("features")
        if b == "random":
            lo, hi = lin["auroc_range"]
            name = f"random ({n_init} inits, {lin['pool']} pool)"
            auroc = f"{lin['auroc']:.3f} (inits {lo:.3f} to {hi:.3f})"
        else:
            name, auroc = f"{b} ({lin['pool']} pool)", fmt_ci(lin["auroc"], lin["auroc_ci95"])
        row = [name, auroc, *gain_cells(lin.get("vs_random")),
               f"{feats['effective_rank']:.1f} of {feats['dim']}" if feats else "—"]
        for k in shots:
            f = r["fewshot"][k][b]
            cell = f"{f['auroc_mean']:.3f} ± {f['auroc_std']:.3f}" if f["auroc_mean"] is not None else "n/a"
            if "vs_random" in f:
                cell += ", " + fmt_ci(f["vs_random"]["diff"], f["vs_random"]["ci95"], signed=True)
            row.append(cell)
        lines.append("| " + " | ".join(row) + " |")
    s = r["supervised"]
    lines.append("| " + " | ".join(["supervised from scratch (fine-tuned, labels)", fmt_ci(s["auroc"], s["auroc_ci95"]),
                                    *gain_cells(s["vs_random"]), "—"] + ["—"] * len(shots)) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
