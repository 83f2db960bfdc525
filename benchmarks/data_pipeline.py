"""Input-pipeline throughput: model-ready batches per second from the preprocessing cache.

    python -m benchmarks.data_pipeline --cfg configs/dino/vit_base.yaml --seconds 60 \\
        --json benchmarks/results/dino.json --opts DATA.TRAIN_CSV train.csv DATA.CACHE_DIR cache DATA.NUM_WORKERS 2
    python -m benchmarks.data_pipeline --cfg configs/dino/vit_base.yaml --baseline reference ...

Builds the very Dataset and DataLoader of the method's entry script (the method's view from
``methods/registry.py``, ``data.datasets`` and ``engine.dist.make_loader``), reads from
``DATA.CACHE_DIR`` when set, warms up, then counts model-ready batches for ``--seconds``: collated,
moved to the device (``engine.trainer.to_device``) and passed through the view's batched on-device
stage when it has one (``view.batch_transform``), with a device synchronisation. Besides samples per
wall second it records the CPU seconds spent by the main process and its DataLoader workers, so
``samples_per_cpu_s`` (throughput per busy core) stays meaningful on a machine shared with other jobs.

``--baseline reference`` also times, on the same volumes, workers and loader settings, the
reference-style DINO input path of :mod:`benchmarks.reference_dino`; the JSON then holds both
figures and their ratios (``ratio``: wall clock, ``ratio_per_cpu_s``: per CPU second). With
``--rounds R`` the two pipelines alternate R times (each ``seconds / R`` per round), so a change
of machine load hits both alike.
"""
from __future__ import annotations

import csv
import os
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Optional

import torch

from benchmarks.common import CPUClock, header, load_avg, method_in_path, summarize, write_json
from config import ConfigError, build_parser, config_from_args
from engine.cli import run_cli
from methods.registry import DOWNSTREAM_VIEW, METHODS as REGISTERED

METHODS = (*REGISTERED, "downstream")  # the registry's pretraining methods and the downstream job


def infer_method(cfg_path: str, method: str = "") -> str:
    """``method`` if given, else the method or ``downstream`` named nearest the end of the config path.

    Raises:
        ValueError: when neither names a method.
    """
    if method:
        if method not in METHODS:
            raise ValueError(f"--method {method!r}; expected one of {list(METHODS)}")
        return method
    return method_in_path(cfg_path, METHODS)


def build_view(cfg, method: str):
    """The training view the entry script builds (methods/registry.py)."""
    builder = DOWNSTREAM_VIEW if method == "downstream" else REGISTERED[method].build_view
    return builder(cfg, True)


def build_loader(cfg, method: str, view):
    """Dataset + DataLoader as the entry script builds its training loader."""
    from data.datasets import build_dataset, collate
    from engine.dist import make_loader

    if method == "downstream":
        from data.datasets import VolumeDataset
        from data.manifest import Manifest
        from engine.samplers import build_train_sampler
        manifest = Manifest.read(cfg.DATA.TRAIN_CSV, root=cfg.DATA.ROOT, label_columns=list(cfg.DOWNSTREAM.LABELS),
                                 group_column=cfg.DOWNSTREAM.GROUP_COLUMN)
        dataset = VolumeDataset(manifest, cfg, view)
        sampler = build_train_sampler(cfg, manifest.labels)
        return dataset, make_loader(dataset, cfg, train=True, collate_fn=collate, sampler=sampler)
    dataset = build_dataset(cfg, cfg.DATA.TRAIN_CSV, view)
    return dataset, make_loader(dataset, cfg, train=True, collate_fn=collate)


def repeat_manifest(csv_path: str, root: str, times: int, out_path: str) -> str:
    """Write ``csv_path`` with every row listed ``times`` times (absolute paths, ids made unique).

    A few volumes then make a long epoch, so the loader is measured in its steady state rather
    than refilling its pipeline at every epoch boundary; repeated rows read the same cache entry.
    """
    from data.manifest import default_id, resolve_path

    base = os.path.abspath(os.path.expanduser(root)) if root else os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    if "id" not in fields:
        fields.append("id")
    with open(out_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for k in range(times):
            for r in rows:
                r2 = dict(r)
                r2["img_path"] = resolve_path(r["img_path"].strip(), base)
                r2["id"] = f"{(r.get('id') or '').strip() or default_id(r['img_path'].strip())}_r{k}"
                w.writerow(r2)
    return out_path


def endless(loader) -> Iterator[Any]:
    """Batches of consecutive epochs (the sampler's ``set_epoch`` as the trainer calls it)."""
    sampler = loader.sampler if hasattr(loader.sampler, "set_epoch") else loader.batch_sampler.sampler
    epoch = 0
    while True:
        sampler.set_epoch(epoch, 0)
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise ValueError(f"the loader gives no batch: {len(loader.dataset)} rows < DATA.BATCH_SIZE "
                             f"{loader.batch_size}; use --repeat or a smaller --opts DATA.BATCH_SIZE")
        epoch += 1


def shutdown(loader) -> None:
    """Stop the loader's persistent workers now (else they finish their prefetched batches while the
    next pipeline is timed)."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None


def model_ready(batch: dict, device: torch.device, transform: Optional[Callable[[dict], dict]],
                stage_cpu: Optional[list] = None) -> dict:
    """What the method's forward receives: batch on the device, batched device stage applied.

    ``stage_cpu`` (a one-element list) accumulates the main thread's CPU seconds spent in the
    device stage: on a CPU-only machine that stage runs here, on a GPU it would not use a core.
    """
    from engine.trainer import to_device

    batch = to_device(batch, device)
    if transform is not None:
        t = time.thread_time()
        batch = transform(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if stage_cpu is not None:
            stage_cpu[0] += time.thread_time() - t
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch


def batch_stats(batch: dict) -> dict[str, Any]:
    """Floating-point voxels and bytes per sample of a model-ready batch, and its tensor shapes."""
    from engine.trainer import batch_size_of

    bs = batch_size_of(batch)
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and v.ndim >= 4}
    return {"voxels_per_sample": sum(v.numel() for v in tensors.values()) // bs,
            "bytes_per_sample": sum(v.numel() * v.element_size() for v in tensors.values()) // bs,
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
            "dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in tensors.items()}}


def measure(loader, seconds: float, warmup_s: float, device: torch.device,
            transform: Optional[Callable[[dict], dict]] = None, log=print, name: str = "") -> dict[str, Any]:
    """Warm up, then count model-ready samples for ``seconds``; stops the loader's workers after.

    Warm-up lasts ``warmup_s`` and at least two batches per worker (worker start-up and the first
    reads of each volume are excluded). Returns samples per wall second and per CPU second (main
    process + workers), per-batch wait times and the load average.
    """
    from engine.trainer import batch_size_of

    clock = CPUClock()
    batches = endless(loader)
    min_warm = 2 * max(1, loader.num_workers)
    t0 = time.perf_counter()
    n_warm, first = 0, None
    try:
        while n_warm < min_warm or time.perf_counter() - t0 < warmup_s:
            b = model_ready(next(batches), device, transform)
            first = first or batch_stats(b)
            n_warm += 1
        la0 = load_avg()
        clock.start()
        start = time.perf_counter()
        samples = n = 0
        waits = []
        stage_cpu = [0.0]
        while time.perf_counter() - start < seconds:
            t = time.perf_counter()
            b = model_ready(next(batches), device, transform, stage_cpu)
            waits.append(time.perf_counter() - t)
            samples += batch_size_of(b)
            n += 1
        elapsed = time.perf_counter() - start
        cpu = clock.stop()
    finally:
        batches.close()
        shutdown(loader)
    res = {"samples": samples, "batches": n, "seconds": elapsed, "samples_per_s": samples / elapsed,
           "cpu_seconds": cpu, "samples_per_cpu_s": samples / cpu if cpu > 0 else None,
           "main_cpu_seconds": clock.per_process.get(os.getpid(), 0.0), "device_stage_cpu_seconds": stage_cpu[0],
           "samples_per_cpu_s_without_device_stage": samples / (cpu - stage_cpu[0]) if cpu > stage_cpu[0] else None,
           "processes": len(clock.per_process), "batch_wait_s": summarize(waits), "warmup_batches": n_warm,
           "load_avg_before": la0, "load_avg_after": load_avg(), **(first or {})}
    log(f"{name or 'pipeline'}: {samples} samples in {elapsed:.1f} s = {res['samples_per_s']:.2f} samples/s; "
        f"{cpu:.1f} CPU s = {res['samples_per_cpu_s'] or 0:.2f} samples per CPU s "
        f"(load {la0[0] if la0 else '?'} -> {res['load_avg_after'][0] if res['load_avg_after'] else '?'})")
    return res


def combine(rounds: list[dict]) -> dict[str, Any]:
    """Totals over rounds: samples / seconds and samples / CPU seconds, plus each round."""
    samples = sum(r["samples"] for r in rounds)
    secs = sum(r["seconds"] for r in rounds)
    cpu = sum(r["cpu_seconds"] for r in rounds)
    stage = sum(r["device_stage_cpu_seconds"] for r in rounds)
    out = {k: v for k, v in rounds[0].items() if k in ("voxels_per_sample", "bytes_per_sample", "shapes", "dtypes")}
    out.update({"samples": samples, "seconds": secs, "samples_per_s": samples / secs, "cpu_seconds": cpu,
                "samples_per_cpu_s": samples / cpu if cpu > 0 else None, "device_stage_cpu_seconds": stage,
                "samples_per_cpu_s_without_device_stage": samples / (cpu - stage) if cpu > stage else None,
                "rounds": rounds})
    return out


def parse_args(argv=None):
    parser = build_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--method", default="", choices=("",) + METHODS,
                        help="pipeline to build (default: from the config path)")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds per pipeline (default 30)")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="warm-up seconds before each measurement (default 5; at least 2 batches per worker)")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--baseline", default="", choices=("", "reference"),
                        help="also time the reference-style DINO input path on the same volumes")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate pipeline and baseline this many times (default 1)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="list each manifest row this many times (a few volumes -> a long epoch)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where model-ready batches go (default: cuda when available)")
    parser.add_argument("--device-stage", choices=("auto", "on", "off", "resize"), default="auto",
                        help="views that can defer work to a batched on-device stage: as the entry script "
                             "builds them (auto: on with a GPU), forced on (workers resize, the device "
                             "augments and windows), off, or resize (DINO: the device also cuts and resizes)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads of the main process, which runs any on-device stage on a "
                             "CPU (0 = torch's default); DataLoader workers always use one")
    parser.add_argument("--workdir", default="", help="temporary files (default: a new temp folder)")
    parser.add_argument("--no-ours", action="store_true", help="time only the baseline")
    return parser, parser.parse_args(argv)


def main(argv=None) -> dict:
    parser, args = parse_args(argv)
    method = infer_method(args.cfg, args.method)
    if args.baseline == "reference" and method != "dino":
        parser.error(f"--baseline reference is a DINO input path; the method here is {method!r}")
    if args.rounds < 1 or args.repeat < 1 or args.seconds <= 0:
        parser.error("--rounds and --repeat must be >= 1 and --seconds > 0")
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="bench_pipeline_"))
    os.makedirs(workdir, exist_ok=True)
    cfg = config_from_args(args)
    if not cfg.DATA.TRAIN_CSV:
        raise ConfigError("DATA.TRAIN_CSV is empty: give the manifest to read (--opts DATA.TRAIN_CSV ...)")
    if args.repeat > 1:
        cfg.defrost()
        cfg.DATA.TRAIN_CSV = repeat_manifest(cfg.DATA.TRAIN_CSV, cfg.DATA.ROOT, args.repeat,
                                             os.path.join(workdir, "train_repeated.csv"))
        cfg.freeze()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    view = build_view(cfg, method)
    if args.device_stage != "auto" and hasattr(view, "device_stage"):
        view.device_stage = args.device_stage in ("on", "resize")
        if hasattr(view, "device_resize"):
            view.device_resize = args.device_stage == "resize"
        elif args.device_stage == "resize":
            parser.error(f"--device-stage resize: the {method} view has no device resize")
    transform = getattr(view, "batch_transform", None)
    result: dict[str, Any] = header(
        method=method, config=args.cfg, opts=list(args.opts or []), num_workers=cfg.DATA.NUM_WORKERS,
        batch_size=cfg.DATA.BATCH_SIZE, device=str(device), main_threads=torch.get_num_threads(),
        cache_dir=cfg.DATA.CACHE_DIR or None,
        view=repr(view), device_stage=bool(getattr(view, "device_stage", False)),
        device_resize=bool(getattr(view, "device_stage", False) and getattr(view, "device_resize", False)),
        repeat=args.repeat,
        rounds=args.rounds, seconds_requested=args.seconds)
    print(f"{method}: {view!r}; {cfg.DATA.NUM_WORKERS} workers, batch {cfg.DATA.BATCH_SIZE}, device {device}, "
          f"{result['cpu_cores']} CPU cores, load {result['load_avg']}")

    ref_ds = None
    if args.baseline == "reference":
        from benchmarks.reference_dino import build_reference_dataset, output_voxels
        from data.windows import window_specs
        dataset, _ = build_loader(cfg, method, view)
        t = time.perf_counter()
        ref_ds = build_reference_dataset(dataset, os.path.join(workdir, "reference"),
                                         window_specs(list(cfg.DATA.WINDOWS)))
        result["reference_preprocess_s"] = time.perf_counter() - t
        result["reference_voxels_per_sample"] = output_voxels(len(cfg.DATA.WINDOWS))

    ours, ref = [], []
    per_round = args.seconds / args.rounds
    for r in range(args.rounds):
        if not args.no_ours:
            _, loader = build_loader(cfg, method, view)
            ours.append(measure(loader, per_round, args.warmup, device, transform, name=f"{method} (round {r + 1})"))
        if ref_ds is not None:
            from data.datasets import collate
            from engine.dist import make_loader
            loader = make_loader(ref_ds, cfg, train=True, collate_fn=collate)
            ref.append(measure(loader, per_round, args.warmup, device, None, name=f"reference (round {r + 1})"))
    if ours:
        result.update(combine(ours))
    if ref:
        result["baseline"] = {"name": args.baseline, **combine(ref)}
        if ours:
            b = result["baseline"]
            result["ratio"] = result["samples_per_s"] / b["samples_per_s"]
            if result["samples_per_cpu_s"] and b["samples_per_cpu_s"]:
                result["ratio_per_cpu_s"] = result["samples_per_cpu_s"] / b["samples_per_cpu_s"]
                if result["device_stage"] and result["samples_per_cpu_s_without_device_stage"]:
                    # what the cores do when the device stage runs on a GPU instead of here
                    result["ratio_per_cpu_s_without_device_stage"] = (
                        result["samples_per_cpu_s_without_device_stage"] / b["samples_per_cpu_s"])
            result["ratio_voxels"] = result["ratio"] * result["voxels_per_sample"] / b["voxels_per_sample"]
            print(f"ratio {result['ratio']:.2f}x (wall), {result.get('ratio_per_cpu_s', float('nan')):.2f}x "
                  f"(per CPU second); output voxels per sample {result['voxels_per_sample']} vs "
                  f"{b['voxels_per_sample']} (reference)")
    result["load_avg_end"] = load_avg()
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
