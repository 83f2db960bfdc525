"""Command line of the phantom.

    python -m data.phantom --out DIR --n N [--size S] [--seed K] [--masks] [--template]
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Optional

from data.phantom.dataset import make_template, write_dataset
from data.phantom.geometry import spacing_for_size
from data.phantom.nifti import save_nifti


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.phantom", description=(
        "Write synthetic head CTs (NIfTI, HU) with ICH subtype and fracture labels and "
        "patient-level train/val/test manifests."))
    ap.add_argument("--out", required=True, help="output folder (images/, train.csv, val.csv, test.csv)")
    ap.add_argument("--n", type=int, required=True, help="number of volumes (series)")
    ap.add_argument("--size", type=int, default=64, help="voxels per edge; spacing = 240/size mm (default 64)")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    ap.add_argument("--masks", action="store_true", help=(
        "also write masks/<id>_<lesion>.nii.gz and one label map per scan, masks/<id>.nii.gz (0 background, IPH 1, "
        "IVH 2, SDH 3, EDH 4, SAH 5, Fracture 6), named by a mask_path column of the manifests"))
    ap.add_argument("--template", action="store_true", help=(
        "also write template.nii.gz: a healthy phantom head in the neutral pose, the common frame of Alice's "
        "cross-scan views (DATA.TEMPLATE)"))
    ap.add_argument("--verbose", action="store_true", help="one line per volume")
    args = ap.parse_args(argv)
    if args.n < 1 or args.size < 16:
        ap.error(f"--n must be >= 1 and --size >= 16 (got --n {args.n} --size {args.size})")
    t0 = time.perf_counter()
    paths = write_dataset(args.out, args.n, args.size, args.seed, args.masks, args.verbose, label_maps=args.masks)
    if args.template:
        hu, affine = make_template(args.size)
        save_nifti(Path(args.out) / "template.nii.gz", hu, affine)
    counts = {}
    for split, p in paths.items():
        with open(p) as f:
            rows = list(csv.DictReader(f))
        counts[split] = (len(rows), sum(int(r["ICH"]) for r in rows))
    summary = ", ".join(f"{s} {n} ({k} ICH+)" for s, (n, k) in counts.items())
    print(f"wrote {args.n} volumes of {args.size}^3 at {spacing_for_size(args.size):.2f} mm to "
          f"{args.out} in {time.perf_counter() - t0:.1f} s: {summary}")
    return 0

