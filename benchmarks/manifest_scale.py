"""Manifest scale: start-up time and per-worker memory of a 400,000-row manifest.

    python -m benchmarks.manifest_scale --rows 400000 --workers 8 --json benchmarks/results/manifest_scale.json

In a temporary folder: a few real (small, synthetic) head volumes, preprocessed into the cache, and
a CSV of ``--rows`` rows pointing at them (ids, patient groups, seven label columns with blanks).
Then times what a run does before its first step: ``Manifest.read``, building the dataset and the
DataLoader (``engine.dist.make_loader``) and receiving the first batch from ``--workers`` fresh
workers. Each worker, on its first item, reads every manifest row once (id, path, labels, seed
point: what it would do over an epoch), so that copy-on-write of the parent's manifest shows up in
its private memory; the unique (USS), proportional (PSS) and resident (RSS) memory of each worker
is then read with ``psutil.Process.memory_full_info``. ``--baseline dicts`` repeats the memory
measurement with the manifest held as a Python list of dicts (what the reference-style loaders
do), for comparison.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from torch.utils.data import Dataset

from benchmarks.common import header, write_json
from engine.cli import run_cli

LABELS = ("ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "Fracture")
MB = 2 ** 20


def write_volumes(folder: Path, n: int, size: int = 48, spacing: float = 4.0) -> list[str]:
    """``n`` small synthetic head NIfTI files; returns their paths."""
    import nibabel as nib

    from benchmarks.train_step import synthetic_head
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"head_{i}.nii.gz"
        nib.save(nib.Nifti1Image(synthetic_head((size,) * 3, seed=i), np.diag([spacing] * 3 + [1.0])), str(p))
        paths.append(str(p))
    return paths


def write_big_csv(path: Path, rows: int, volumes: list[str], seed: int = 0) -> float:
    """A manifest of ``rows`` rows cycling over ``volumes`` (relative paths); returns seconds taken."""
    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    labels = rng.choice(np.array(["0", "1", ""]), p=[0.8, 0.15, 0.05], size=(rows, len(LABELS)))
    rel = [os.path.relpath(v, path.parent) for v in volumes]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["img_path", "id", "patient_id", *LABELS])
        for i in range(rows):
            w.writerow([rel[i % len(rel)], f"scan_{i:07d}", f"P{i // 2:07d}", *labels[i]])
    return time.perf_counter() - t


class TouchingDataset(Dataset):
    """Wraps a dataset; on its first item in a process reads every manifest row once.

    Args:
        inner: the dataset that makes the samples (a ``VolumeDataset``).
        rows: None = touch ``inner.manifest`` (compact arrays); a list of dicts = touch those
            instead (the baseline).
    """

    def __init__(self, inner, rows: Optional[list[dict]] = None):
        self.inner = inner
        self.rows = rows
        self.touched_pid = 0

    def __len__(self) -> int:
        return len(self.inner)

    def touch(self) -> int:
        """Read every row (dicts: each value; compact: every byte of the arrays plus a row in 16)."""
        n = 0
        if self.rows is not None:
            for r in self.rows:
                n += len(r["img_path"]) + len(r["id"]) + (r["ICH"] == "1")
            return n
        m = self.inner.manifest
        for a in (m.paths.buffer, m.paths.offsets, m.ids.buffer, m.ids.offsets, m.groups.buffer, m.labels, m.coords):
            n += int(np.count_nonzero(a))  # reads every page of every array
        for i in range(0, len(m), 16):  # and the per-row access path the dataset uses
            n += len(m.paths[i]) + len(m.ids[i]) + int(m.labels[i, 0] == 1) + int(np.isnan(m.coords[i, 0]))
        return n

    def __getitem__(self, key):
        if self.touched_pid != os.getpid():
            self.touch()
            self.touched_pid = os.getpid()
        return self.inner[key]


def first_batch_s(loader) -> float:
    """Seconds from starting the loader's workers to the first batch (workers stopped after)."""
    t = time.perf_counter()
    it = iter(loader)
    next(it)
    dt = time.perf_counter() - t
    stop_workers(loader)
    return dt


def stop_workers(loader) -> None:
    """Shut down the persistent workers of ``loader`` now (torch's iterator behind it)."""
    workers_it = getattr(loader, "_iterator", None)
    if workers_it is not None and hasattr(workers_it, "_shutdown_workers"):
        workers_it._shutdown_workers()
    loader._iterator = None


def worker_memory(loader, batches: int) -> dict[str, Any]:
    """Draw ``batches`` batches (every worker serves some), then read each worker's memory."""
    import psutil
    it = iter(loader)
    t = time.perf_counter()
    next(it)
    first = time.perf_counter() - t
    for _ in range(batches - 1):
        next(it)
    me = psutil.Process()
    workers = []
    for c in me.children(recursive=False):
        try:
            mi = c.memory_full_info()
            workers.append({"pid": c.pid, "uss_mb": mi.uss / MB, "pss_mb": mi.pss / MB, "rss_mb": mi.rss / MB})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    pm = me.memory_full_info()
    stop_workers(loader)
    uss = [w["uss_mb"] for w in workers]
    return {"first_batch_with_touch_s": first, "workers": workers, "n_workers": len(workers),
            "uss_mb_mean": float(np.mean(uss)) if uss else None, "uss_mb_max": float(np.max(uss)) if uss else None,
            "pss_mb_mean": float(np.mean([w["pss_mb"] for w in workers])) if workers else None,
            "parent_rss_mb": pm.rss / MB, "parent_uss_mb": pm.uss / MB}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--rows", type=int, default=400_000, help="manifest rows (default 400000)")
    p.add_argument("--volumes", type=int, default=3, help="distinct real volumes the rows point at (default 3)")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers (default 8)")
    p.add_argument("--batches", type=int, default=0, help="batches drawn before measuring (default 2 x workers)")
    p.add_argument("--baseline", choices=("", "dicts"), default="dicts",
                   help="also measure a list-of-dicts manifest ('' = no baseline)")
    p.add_argument("--workdir", default="", help="temporary files (default: a new temp folder)")
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    if args.rows < 1 or args.volumes < 1 or args.workers < 1:
        p.error("--rows, --volumes and --workers must be >= 1")
    import torch

    from config import get_defaults
    from data.cache import preprocess_manifests
    from data.datasets import VolumeDataset, collate
    from data.manifest import Manifest
    from data.views import SingleView
    from engine.dist import make_loader

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_manifest_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg = get_defaults()
    cfg.DATA.SPACING = [4.0, 4.0, 4.0]
    cfg.DATA.ROI = [16, 16, 16]
    cfg.DATA.BATCH_SIZE = 4
    cfg.DATA.NUM_WORKERS = args.workers
    cfg.DATA.PREFETCH_FACTOR = 2
    cfg.DATA.CACHE_DIR = str(work / "cache")
    cfg.DATA.TRAIN_CSV = str(work / "manifest.csv")
    volumes = write_volumes(work / "images", args.volumes)
    small = work / "small.csv"
    small.write_text("img_path\n" + "".join(f"{v}\n" for v in volumes))
    preprocess_manifests(cfg, [str(small)], num_workers=0, progress=False, log=lambda s: None)
    csv_s = write_big_csv(Path(cfg.DATA.TRAIN_CSV), args.rows, volumes)

    result: dict[str, Any] = header(rows=args.rows, volumes=args.volumes, num_workers=args.workers,
                                    csv_mb=os.path.getsize(cfg.DATA.TRAIN_CSV) / MB, write_csv_s=csv_s,
                                    torch_threads=torch.get_num_threads())
    t, c = time.perf_counter(), time.process_time()
    manifest = Manifest.read(cfg.DATA.TRAIN_CSV, label_columns=list(LABELS), group_column="patient_id")
    result["manifest_read_s"] = time.perf_counter() - t
    result["manifest_read_cpu_s"] = time.process_time() - c
    result["manifest_mb"] = manifest.nbytes / MB
    t = time.perf_counter()
    dataset = VolumeDataset(manifest, cfg, SingleView(cfg, train=True))
    loader = make_loader(dataset, cfg, train=True, collate_fn=collate)
    result["build_dataset_loader_s"] = time.perf_counter() - t
    result["first_batch_s"] = first_batch_s(loader)
    result["startup_s"] = result["manifest_read_s"] + result["build_dataset_loader_s"] + result["first_batch_s"]
    print(f"{args.rows} rows: Manifest.read {result['manifest_read_s']:.2f} s ({result['manifest_read_cpu_s']:.2f} "
          f"CPU s, {result['manifest_mb']:.1f} MB of arrays), dataset + loader {result['build_dataset_loader_s']:.3f} "
          f"s, first batch from {args.workers} workers {result['first_batch_s']:.2f} s", flush=True)
    batches = args.batches or 2 * args.workers
    mem = worker_memory(make_loader(TouchingDataset(dataset), cfg, train=True, collate_fn=collate), batches)
    result["compact"] = mem
    print(f"compact manifest: per-worker USS {mem['uss_mb_mean']:.1f} MB (max {mem['uss_mb_max']:.1f}), PSS "
          f"{mem['pss_mb_mean']:.1f} MB", flush=True)
    del loader
    if args.baseline == "dicts":
        t = time.perf_counter()
        with open(cfg.DATA.TRAIN_CSV, newline="") as f:
            rows = list(csv.DictReader(f))
        read_s = time.perf_counter() - t
        loader = make_loader(TouchingDataset(dataset, rows), cfg, train=True, collate_fn=collate)
        base = worker_memory(loader, batches)
        base["read_s"] = read_s
        result["baseline_list_of_dicts"] = base
        print(f"list of dicts: read {read_s:.2f} s; per-worker USS {base['uss_mb_mean']:.1f} MB (max "
              f"{base['uss_mb_max']:.1f}), PSS {base['pss_mb_mean']:.1f} MB", flush=True)
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
