"""Alice against plain DINO on the phantom's ICH label: the same ViT-tiny, the same steps, a linear probe, paired.

    python -m benchmarks.alice_vs_dino --out outputs/alice_vs_dino --json benchmarks/results/alice_vs_dino.json
    python -m benchmarks.alice_vs_dino --out /tmp/avd --n 24 --epochs 1 --seeds 1     # minutes: plumbing only

Each step is a real run of an entry script or tool into a folder of ``--out`` (a finished folder is reused):

1. the phantom (``--n`` heads of 64^3, 3.75 mm) with its template head (``--template``);
2. ``tools/preprocess.py`` twice: with ``configs/demo/alice.yaml`` (every head registered to the template) and
   with ``configs/demo/dino.yaml`` (the same arrays, no registration);
3. for every pretraining seed, DINO (``configs/demo/dino.yaml``: 2 global 48^3 + 4 local 24^3 crops) and
   Alice (``configs/demo/alice.yaml``: a query and an anchor crop of 32^3 in two registered heads, block-masked
   student) for ``--epochs`` epochs at the same batch size, so the same number of optimizer steps;
4. a linear probe of ICH on cached features (``configs/demo/downstream.yaml``, scikit-learn logistic
   regression, C chosen on validation) of every backbone and of a random init, with the CLS and the mean
   token; the pool is chosen per backbone on VALIDATION AUROC;
5. Alice - DINO and each - random init on the test split, paired (the same bootstrap resamples of the same
   test scans score both: :func:`evaluation.compare.compare_predictions`).

Writes the JSON (``--json``) with every run's validation and test AUROC (run folders relative to ``--out``), the
paired differences per seed and their mean, the registration summary and the machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from sklearn.metrics import roc_auc_score

from benchmarks.common import REPO, header, write_json
from evaluation.compare import compare_predictions
from evaluation.metrics import read_predictions_csv

POOLS = ("cls", "mean")
METHODS = ("dino", "alice")


def run(cmd: Sequence[str], log_path: Path) -> str:
    """Run a command from the repository root, output to ``log_path``; raises naming the log on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.call(list(cmd), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    text = log_path.read_text()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[1:4])} failed (exit {rc}); log {log_path}:\n" +
                           "".join(text.splitlines(keepends=True)[-15:]))
    return text


def val_auroc(folder: Path, label: str = "ICH") -> float:
    _, _, names, prob, true = read_predictions_csv(str(folder / "predictions_val.csv"))
    j = names.index(label)
    return float(roc_auc_score(true[:, j], prob[:, j]))


def test_auroc(folder: Path, label: str = "ICH") -> float:
    return float(json.loads((folder / "metrics.json").read_text())["test"][label]["auroc"])


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (every run in a subfolder; reused when run again)")
    ap.add_argument("--n", type=int, default=96, help="phantom heads")
    ap.add_argument("--epochs", type=int, default=6, help="pretraining epochs of both methods")
    ap.add_argument("--seeds", type=int, default=2, help="pretraining seeds (SEED 0, 1, ...)")
    ap.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    py = sys.executable
    t0 = time.time()
    phantom = out / "phantom"
    data = ["DATA.TRAIN_CSV", str(phantom / "train.csv"), "DATA.VAL_CSV", str(phantom / "val.csv"),
            "DATA.TEST_CSV", str(phantom / "test.csv"), "DATA.CACHE_DIR", str(out / "cache")]
    alice_data = [*data, "DATA.TEMPLATE", str(phantom / "template.nii.gz")]
    if not (phantom / "template.nii.gz").exists():
        run([py, "-m", "data.phantom", "--out", str(phantom), "--n", str(args.n), "--template"],
            out / "logs/phantom.log")
    reg_log = run([py, "-m", "tools.preprocess", "--cfg", "configs/demo/alice.yaml", "--opts", *alice_data],
                  out / "logs/preprocess_alice.log")
    run([py, "-m", "tools.preprocess", "--cfg", "configs/demo/dino.yaml", "--opts", *data],
        out / "logs/preprocess_dino.log")
    registration = next((line.rsplit(": ", 1)[1].split(" (see")[0] for line in reg_log.splitlines()
                         if "registered to " in line), "")  # "n accepted, m refused"
    warmup = "1" if args.epochs > 1 else "0"
    epochs = ["TRAIN.EPOCHS", str(args.epochs), "TRAIN.WARMUP_EPOCHS", warmup, "DINO.KNN_EVERY", "0"]

    backbones: dict[str, str] = {"random": ""}
    for seed in range(args.seeds):
        for m in METHODS:
            folder = out / f"{m}_s{seed}"
            if not (folder / "backbone.pth").exists() or "finished" not in (folder / "log.txt").read_text():
                opts = alice_data if m == "alice" else data
                run([py, f"main_pretrain_{m}.py", "--cfg", f"configs/demo/{m}.yaml", "--opts", "OUTPUT", str(folder),
                     "SEED", str(seed), *opts, *epochs], out / f"logs/pretrain_{m}_s{seed}.log")
            backbones[f"{m}_s{seed}"] = str(folder / "backbone.pth")

    probes: dict[str, dict] = {}
    for name, weights in backbones.items():
        res = {}
        for pool in POOLS:
            folder = out / f"probe_{name}_{pool}"
            if not (folder / "metrics.json").exists():
                run([py, "main_downstream.py", "--cfg", "configs/demo/downstream.yaml", "--opts", "OUTPUT", str(folder),
                     *data, "DATA.CACHE_DIR", "", "MODEL.PRETRAINED", weights, "MODEL.POOL", pool],
                    out / f"logs/probe_{name}_{pool}.log")
            res[pool] = {"val_auroc": val_auroc(folder), "test_auroc": test_auroc(folder), "folder": folder.name}
        best = max(POOLS, key=lambda p: res[p]["val_auroc"])
        probes[name] = {**res[best], "pool": best, "pools": res}
        print(f"{name:10s} pool {best:4s} val {res[best]['val_auroc']:.3f} test {res[best]['test_auroc']:.3f}",
              flush=True)

    def paired(a: str, b: str) -> dict:
        c = compare_predictions(str(out / probes[a]["folder"] / "predictions.csv"),
                                str(out / probes[b]["folder"] / "predictions.csv"), labels=["ICH"],
                                n_bootstrap=args.bootstrap, seed=0, name_a=a, name_b=b)["scan"]["ICH"]
        return {k: c[k] for k in ("diff", "ci95", "p_value", "significant", "sentence") if k in c}

    comparisons = {}
    for seed in range(args.seeds):
        comparisons[f"alice_s{seed} - dino_s{seed}"] = paired(f"alice_s{seed}", f"dino_s{seed}")
        for m in METHODS:
            comparisons[f"{m}_s{seed} - random"] = paired(f"{m}_s{seed}", "random")
    for k, v in comparisons.items():
        print(f"{k:24s} {v['diff']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] p = {v['p_value']:.2g}")
    diffs = [comparisons[f"alice_s{s} - dino_s{s}"]["diff"] for s in range(args.seeds)]
    doc = {**header(benchmark="alice_vs_dino", n=args.n, epochs=args.epochs, seeds=args.seeds,
                    bootstrap=args.bootstrap),
           "registration": registration, "probes": probes, "comparisons": comparisons,
           "alice_minus_dino_mean": sum(diffs) / len(diffs), "seconds": time.time() - t0}
    print(f"Alice - DINO, mean over {args.seeds} seed(s): {doc['alice_minus_dino_mean']:+.3f}")
    if args.json:
        write_json(args.json, doc)
    return doc


if __name__ == "__main__":
    main()
    sys.exit(0)
