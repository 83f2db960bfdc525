"""Compare two models on the same test cases: AUROC difference, paired bootstrap CI, DeLong p.

    python -m tools.compare outputs/probe_mae/predictions.csv outputs/probe_random/predictions.csv
    python -m tools.compare A.csv B.csv --names MAE random --labels ICH --json compare.json
    python -m tools.compare outputs/seg_mae/per_case.csv outputs/seg_random/per_case.csv   # segmentation

Both files are ``predictions.csv`` of ``main_downstream.py`` runs on the same split; rows are
matched by ``id``. Differences are first minus second (A - B), per label, at scan level and, when
both files have a ``group`` column, at group level. Prints a table and one sentence per row saying
whether the difference is significant (paired bootstrap CI excludes 0 and DeLong p < 0.05).
Two ``per_case.csv`` of segmentation runs are compared on Dice per class and macro (paired bootstrap
CI over cases and Wilcoxon signed-rank p; evaluation/compare_segmentation.py), over all cases and again
over the cases whose reference holds the class (the ``present`` entries of ``--json``).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from engine.cli import run_cli
from evaluation.compare import compare_predictions, format_comparison
from evaluation.metrics import write_metrics_json


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="predictions.csv (or a segmentation run's per_case.csv) of model A")
    ap.add_argument("b", help="the same file of model B (same cases)")
    ap.add_argument("--labels", nargs="+", default=None, help="labels to compare (default: all of A's)")
    ap.add_argument("--names", nargs=2, default=("A", "B"), metavar=("NAME_A", "NAME_B"),
                    help="how the sentences name the two models")
    ap.add_argument("--n-bootstrap", type=int, default=2000, help="paired bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = ap.parse_args(argv)
    for path in (args.a, args.b):
        if not os.path.isfile(path):
            ap.error(f"{path}: no such file")
    segment = os.path.basename(args.a) == "per_case.csv"
    try:
        if segment:
            from evaluation.compare_segmentation import compare_per_case
            result = compare_per_case(args.a, args.b, args.n_bootstrap, args.seed, *args.names)
        else:
            result = compare_predictions(args.a, args.b, args.labels, args.n_bootstrap, args.seed, *args.names)
    except ValueError as e:
        ap.exit(2, f"compare.py: error: {e}\n")
    print(f"A = {args.a}\nB = {args.b}\n")
    if segment:
        from evaluation.compare_segmentation import format_comparison as format_segmentation
        print(format_segmentation(result))
    else:
        print(format_comparison(result))
    if args.json:
        write_metrics_json(args.json, result)
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
