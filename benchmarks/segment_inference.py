"""Sliding-window segmentation of one whole head volume: seconds and peak memory per backbone family.

    # the figure of the issue: a 1 mm head CT of 200^3 on the CPU, the default window (DATA.ROI 96^3) and batch (1)
    python -m benchmarks.segment_inference --json benchmarks/results/segment_inference_cpu_sw1.json
    # the committed figures: batch 2 for every family, then Swin at 1
    python -m benchmarks.segment_inference --sw-batch 2 --json benchmarks/results/segment_inference_cpu.json
    python -m benchmarks.segment_inference --families swin --json benchmarks/results/segment_inference_cpu_swin_sw1.json
    # smaller, e.g. a smoke run
    python -m benchmarks.segment_inference --size 64 --roi 32 --families segresnet --json /tmp/seg.json

Each family runs in a fresh process (``multiprocessing`` spawn), so its peak resident memory
(``ru_maxrss``, the whole process: Python, torch, the model, the volume and the blended logits) is
its own. The network is what ``DOWNSTREAM.TASK segment`` builds from the config defaults
(``MODEL.NAME`` at ``MODEL.FEATURE_SIZE 0``, ``DATA.WINDOWS`` three channels, three classes) with
random weights; the volume is a windowed random ``[1, 3, size^3]`` tensor. ``downstream.segment.
predict_volume`` runs once to warm up on a small volume, then on the full one (timed): MONAI's
``sliding_window_inference`` with ``DATA.ROI``, ``DOWNSTREAM.SEG_OVERLAP`` and ``DOWNSTREAM.SEG_SW_BATCH``.
The JSON also holds the machine (cores, load average: timings on a busy machine are longer).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from typing import Any, Optional, Sequence

FAMILIES = {"vit": "vit_base", "swin": "swin", "segresnet": "segresnet", "resnet": "resnet50"}


def _one(family: str, size: int, roi: int, overlap: float, sw_batch: int, threads: int, queue) -> None:
    import torch

    from config import get_defaults
    from downstream.segment import predict_volume
    from methods.segment import build_segmentation_method
    from models.zoo import build_backbone

    torch.set_num_threads(threads)
    cfg = get_defaults()
    cfg.MODEL.NAME = FAMILIES[family]
    cfg.DATA.ROI = [roi] * 3
    cfg.DOWNSTREAM.SEG_CLASSES, cfg.DOWNSTREAM.SEG_OVERLAP, cfg.DOWNSTREAM.SEG_SW_BATCH = [1, 2], overlap, sw_batch
    method = build_segmentation_method(cfg, build_backbone(cfg), frozen=False).eval()
    device = torch.device("cpu")
    predict_volume(method, torch.rand(1, 3, roi, roi, roi), cfg, device)  # warm-up
    x = torch.rand(1, 3, size, size, size)
    t0 = time.perf_counter()
    pred = predict_volume(method, x, cfg, device)
    seconds = time.perf_counter() - t0
    queue.put({"family": family, "model": cfg.MODEL.NAME, "seconds": seconds, "shape": list(pred.shape),
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,  # KiB on Linux
               "parameters_m": sum(p.numel() for p in method.parameters()) / 1e6})


def run(families: Sequence[str], size: int, roi: int, overlap: float, sw_batch: int, threads: int) -> list[dict]:
    """One result per family (each in its own process)."""
    ctx = mp.get_context("spawn")
    out = []
    for f in families:
        q = ctx.Queue()
        p = ctx.Process(target=_one, args=(f, size, roi, overlap, sw_batch, threads, q))
        p.start()
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"segment_inference: the {f} case failed (exit code {p.exitcode})")
        out.append(q.get())
        print(f"{f:<10} {out[-1]['seconds']:8.1f} s  peak {out[-1]['peak_rss_gb']:.2f} GB", flush=True)
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    from benchmarks.common import header, write_json
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {list(FAMILIES)}")
    ap.add_argument("--size", type=int, default=200, help="volume edge in voxels (1 mm head CT: about 200)")
    ap.add_argument("--roi", type=int, default=96, help="window edge (DATA.ROI; the default config: 96)")
    ap.add_argument("--overlap", type=float, default=0.5, help="DOWNSTREAM.SEG_OVERLAP")
    ap.add_argument("--sw-batch", type=int, default=1, help="DOWNSTREAM.SEG_SW_BATCH (the config's default: 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per case")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        ap.error(f"unknown families {bad}; expected some of {list(FAMILIES)}")
    results = run(families, args.size, args.roi, args.overlap, args.sw_batch, args.threads)
    doc = {**header(benchmark="segment_inference", size=args.size, roi=args.roi, overlap=args.overlap,
                    sw_batch=args.sw_batch, threads=args.threads), "results": results}
    if args.json:
        write_json(args.json, doc)
    return doc


if __name__ == "__main__":
    main()
    sys.exit(0)
