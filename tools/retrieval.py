"""Retrieve similar scans by cosine similarity of extracted features; mAP@k and precision@k per label.

    python -m tools.retrieval --features runs/feats --labels ICH,SDH --out runs/feats/retrieval.json
    python -m tools.retrieval --features runs/feats --labels ICH --k 10 --group-column patient_id \
        --index runs/feats/neighbours.csv [--center]

Reads ``DIR/features.npy`` and ``DIR/features.csv`` (written by ``tools/extract_features.py``).
Every scan positive for a label is a query; its neighbours are all other scans with a known value
of that label, except scans of its own group when ``--group-column`` is given. Definitions of
mAP@k, precision@k and their chance levels: ``evaluation/retrieval.py`` and the README.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from engine.cli import run_cli
from evaluation.retrieval import retrieval_metrics, write_neighbor_index

_TRUE = ("1", "1.0")
_FALSE = ("0", "0.0")


def read_feature_table(features_dir: str, label_names: Sequence[str], group_column: str = ""
                       ) -> tuple[np.ndarray, list[str], np.ndarray, Optional[list[str]]]:
    """Load ``features.npy`` and the aligned ``features.csv``.

    Args:
        features_dir: folder written by ``tools/extract_features.py``.
        label_names: label columns to read (0 / 1 / blank).
        group_column: group column ('' = none).

    Returns:
        ``(features [N, D] float32, ids [N], labels [N, L] float (NaN = blank), groups [N] or None)``.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: naming the file, line and column of a bad value, or rows that do not align.
    """
    npy = os.path.join(features_dir, "features.npy")
    table = os.path.join(features_dir, "features.csv")
    for p in (npy, table):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} does not exist; run tools/extract_features.py with OUTPUT {features_dir}")
    feats = np.load(npy, mmap_mode="r")
    with open(table, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        col = {h: i for i, h in enumerate(header)}
        for name in ["id", *label_names, *([group_column] if group_column else [])]:
            if name not in col:
                raise ValueError(f"{table}, line 1: column {name!r} missing (columns: {header})")
        ids: list[str] = []
        groups: list[str] = []
        labels: list[list[float]] = []
        for row in reader:
            where = f"{table}, line {reader.line_num}"
            if len(row) != len(header):
                raise ValueError(f"{where}: {len(row)} fields, header has {len(header)}")
            ids.append(row[col["id"]])
            if group_column:
                groups.append(row[col[group_column]])
            vals = []
            for name in label_names:
                v = row[col[name]].strip()
                if v in _TRUE:
                    vals.append(1.0)
                elif v in _FALSE:
                    vals.append(0.0)
                elif v == "":
                    vals.append(np.nan)
                else:
                    raise ValueError(f"{where}, column {name!r}: {v!r} is not 0, 1 or blank")
            labels.append(vals)
    if feats.ndim != 2 or len(feats) != len(ids):
        raise ValueError(f"{npy} has shape {feats.shape} but {table} has {len(ids)} rows; they must align")
    lab = np.asarray(labels, dtype=np.float64).reshape(len(ids), len(label_names))
    return np.asarray(feats, dtype=np.float32), ids, lab, (groups if group_column else None)


def format_table(result: dict) -> str:
    """A console table of the retrieval metrics, then why each label without a query has none."""
    k = result["k"]
    head = f"{'label':10s} {'queries':>7s} {'prev':>6s} {f'mAP@{k}':>8s} {'chance':>7s} {f'P@{k}':>7s} {'chance':>7s}"
    lines = [head, "-" * len(head)]

    def num(v) -> str:
        return "   -" if v is None else f"{v:.3f}"

    rows = list(result["labels"].items()) + [("macro", dict(result["macro"], n_queries="", prevalence=None))]
    for name, e in rows:
        lines.append(f"{name:10s} {e['n_queries']!s:>7s} {num(e.get('prevalence')):>6s} {num(e['map_at_k']):>8s} "
                     f"{num(e['map_chance']):>7s} {num(e['precision_at_k']):>7s} {num(e['precision_chance']):>7s}")
    lines += [f"{name}: no query: {e['reason']}" for name, e in result["labels"].items() if e.get("reason")]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--features", required=True, help="folder with features.npy and features.csv")
    ap.add_argument("--labels", required=True, help="comma-separated label columns of features.csv, e.g. ICH,SDH")
    ap.add_argument("--out", required=True, help="JSON file of the metrics")
    ap.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    ap.add_argument("--group-column", default="", help="column of features.csv whose groups (patients) are "
                    "never retrieved for a query of the same group (default: only the query itself is left out)")
    ap.add_argument("--index", default="", help="also write every scan's k neighbours to this CSV "
                    "(query_id, rank, neighbor_id, similarity)")
    ap.add_argument("--center", action="store_true", help="subtract the mean feature (over all scans) before "
                    "the cosine: removes a direction every scan shares (large in CLS features of weakly trained "
                    "models), which otherwise compresses all similarities towards 1")
    ap.add_argument("--chunk-size", type=int, default=None, help="queries per matrix product "
                    "(default: about 32M similarities per chunk)")
    args = ap.parse_args(argv)
    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    if not labels:
        ap.error("--labels is empty; give label columns such as ICH,SDH")
    if args.k < 1:
        ap.error(f"--k must be >= 1 (got {args.k})")
    t0 = time.perf_counter()
    feats, ids, lab, groups = read_feature_table(args.features, labels, args.group_column)
    if args.center:
        feats = feats - feats.mean(axis=0, keepdims=True)
    result = retrieval_metrics(feats, lab, labels, k=args.k, groups=groups, chunk_size=args.chunk_size)
    result["features"] = os.path.abspath(args.features)
    result["group_column"] = args.group_column
    result["centered"] = bool(args.center)
    if args.index:
        result["index"] = os.path.abspath(args.index)
        result["index_lines"] = write_neighbor_index(args.index, feats, ids, args.k, groups, args.chunk_size)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = f"{args.out}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.out)
    print(f"{len(ids)} scans, k = {args.k}" + (f", groups from {args.group_column!r}" if args.group_column else ""))
    print(format_table(result))
    print(f"wrote {args.out}" + (f" and {args.index}" if args.index else ""))
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
