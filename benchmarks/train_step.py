"""Training-step speed: step time, samples/s, peak memory and model FLOP utilisation (MFU).

    # the H100 suite: MAE, DINO, SimCLR and fine-tuning with ViT-B at 96^3, bf16, eager and compiled
    python benchmarks/train_step.py --preset h100 --json benchmarks/results/train_step_h100.json
    # a CPU suite with vit_tiny at 48^3 (the demo configs)
    python benchmarks/train_step.py --preset cpu --json benchmarks/results/train_step_cpu.json
    # one case
    python benchmarks/train_step.py --method dino --cfg configs/dino/vit_base.yaml --compile both --amp bf16 \\
        --opts DATA.BATCH_SIZE 32

Each case builds the backbone and method exactly as the entry scripts do (``models.zoo``,
``methods.*``, ``engine.optim``), feeds it a batch made by the method's own view from a synthetic
head volume (so the batch has exactly the keys and shapes of real training, on the device, with any
batched on-device stage of the view left to the method), and times full optimizer steps as
``engine.trainer.Trainer`` runs them: schedule hooks, autocast forward, backward, gradient
clipping, optimizer step, EMA hook. FLOPs of one step (forward + backward) are counted with
``torch.utils.flop_counter.FlopCounterMode`` on the eager model; MFU = FLOPs per step / step time /
peak (``--peak-tflops``, default the H100's dense bf16 989 TFLOPS on CUDA, none on CPU).
"""
from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import H100_BF16_DENSE_TFLOPS, header, summarize, write_json  # noqa: E402
from config import config_from_args  # noqa: E402

METHODS = ("mae", "dino", "simclr", "finetune")
# (method, config, extra opts) of each preset
PRESETS: dict[str, list[tuple[str, str, list[str]]]] = {
    "h100": [("mae", "configs/mae/vit_base.yaml", []),
             ("dino", "configs/dino/vit_base.yaml", []),
             ("simclr", "configs/simclr/vit_base.yaml", []),
             ("finetune", "configs/mae/vit_base.yaml", ["MODEL.DROP_PATH", "0.1"])],
    "cpu": [("mae", "configs/demo/mae.yaml", []),
            ("dino", "configs/demo/dino.yaml", []),
            ("simclr", "configs/demo/simclr.yaml", []),
            ("finetune", "configs/demo/mae.yaml", [])],
}


def synthetic_head(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """An int16 HU volume shaped like a preprocessed head: air, scalp, skull, brain, ventricles, noise.

    Args:
        shape: ``[X, Y, Z]``.
        seed: noise seed.
    """
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1.15, 1.15, n, dtype=np.float32) for n in shape], indexing="ij")
    r = np.sqrt(sum(g ** 2 for g in grid))  # 1 at the scalp
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[r < 1.0] = 20.0  # scalp
    hu[r < 0.95] = 900.0  # skull
    hu[r < 0.88] = 35.0  # brain
    hu[(np.abs(grid[0]) < 0.12) & (r < 0.3)] = 8.0  # ventricles
    hu += rng.normal(0, 6, size=shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def infer_method(cfg_path: str) -> str:
    name = Path(cfg_path).as_posix().lower()
    for key, m in (("dino", "dino"), ("simclr", "simclr"), ("mae", "mae"), ("downstream", "finetune")):
        if key in name:
            return m
    raise ValueError(f"cannot tell the method from {cfg_path!r}; pass --method {'|'.join(METHODS)}")


def build_view(cfg, method: str):
    """The training view the method's entry script uses."""
    from data.views import DINOViews, SimCLRViews, SingleView
    if method == "dino":
        return DINOViews(cfg)
    if method == "simclr":
        return SimCLRViews(cfg, train=True)
    return SingleView(cfg, train=True)


def make_batch(cfg, method: str, batch_size: int, device: torch.device, seed: int = 0) -> dict:
    """A collated batch of the method's view on synthetic heads, on ``device``."""
    from data.datasets import collate
    from engine.trainer import to_device

    view = build_view(cfg, method)
    shape = tuple(max(16, int(round(1.6 * r))) for r in cfg.DATA.ROI)
    hu = synthetic_head(shape, seed)
    meta = {"spacing": (1.0, 1.0, 1.0), "affine": np.eye(4), "coord": None, "path": "synthetic", "id": "s"}
    samples = []
    for i in range(batch_size):
        s = dict(view(hu, meta, np.random.default_rng([seed, i])))
        s.update(index=i, id=f"s{i}", skipped=[])
        if method == "finetune":
            s["label"] = torch.tensor([float(i % 2)] * len(cfg.DOWNSTREAM.LABELS))
        samples.append(s)
    return to_device(collate(samples), device)


def build_method(cfg, method: str) -> torch.nn.Module:
    """Backbone + method as the entry scripts build them."""
    from engine.launch import build_backbone_from_cfg
    backbone = build_backbone_from_cfg(cfg)
    if method == "mae":
        from methods.mae import MAE
        return MAE(cfg, backbone)
    if method == "dino":
        from methods.dino import DINO
        return DINO(cfg, backbone)
    if method == "simclr":
        from methods.simclr import SimCLR
        return SimCLR(cfg, backbone)
    from methods.classify import build_classifier
    labels = np.tile(np.array([[0.0], [1.0]], dtype=np.float32), (4, len(cfg.DOWNSTREAM.LABELS)))
    return build_classifier(cfg, backbone, labels, frozen=False)


class Stepper:
    """One optimizer step as the trainer does it (no accumulation, no DDP)."""

    def __init__(self, cfg, method: torch.nn.Module, model, device: torch.device, amp: str):
        from engine.optim import build_optimizer, param_groups
        self.cfg, self.m, self.model, self.device = cfg, method, model, device
        scales = method.lr_scales() if hasattr(method, "lr_scales") else None
        self.opt = build_optimizer(cfg, param_groups(method, cfg.TRAIN.LAYER_DECAY, scales))
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.it = 0
        # steady state: past DINO's frozen-last-layer epochs
        self.epoch = int(getattr(cfg.DINO, "FREEZE_LAST_LAYER_EPOCHS", 0))

    def __call__(self, batch: dict) -> float:
        m = self.m
        if hasattr(m, "on_step_start"):
            m.on_step_start(self.it, self.epoch, 10 ** 6)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.model(batch)
        loss = out["loss"]
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        if hasattr(m, "on_after_backward"):
            m.on_after_backward(self.epoch)
        if self.cfg.TRAIN.CLIP_GRAD > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]],
                                           self.cfg.TRAIN.CLIP_GRAD)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        if hasattr(m, "on_step_end"):
            m.on_step_end(self.it)
        self.it += 1
        return float(loss.detach())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(step: Stepper, batch: dict) -> Optional[int]:
    """FLOPs of one eager step (forward + backward), or None when counting fails."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        with FlopCounterMode(display=False) as fc:
            step(batch)
        return int(fc.get_total_flops())
    except Exception as e:  # a counter gap must not lose the timing
        print(f"FLOP counting failed: {type(e).__name__}: {e}")
        return None


def run_case(method: str, cfg_path: str, opts: list[str], compile_: bool, amp: str, steps: int, warmup: int,
             device: torch.device, batch_size: Optional[int], peak_tflops: Optional[float]) -> dict[str, Any]:
    """Time one (method, config, compile) case; returns its JSON row."""
    from engine.dist import seed_everything
    args = argparse.Namespace(cfg=cfg_path, opts=list(opts) + (["DATA.BATCH_SIZE", str(batch_size)] if batch_size
                                                                else []))
    cfg = config_from_args(args)
    seed_everything(cfg.SEED)
    method_mod = build_method(cfg, method).to(device)
    method_mod.train()
    model = torch.compile(method_mod) if compile_ else method_mod
    step = Stepper(cfg, method_mod, model, device, amp)
    bs = cfg.DATA.BATCH_SIZE
    batch = make_batch(cfg, method, bs, device, seed=cfg.SEED)
    row: dict[str, Any] = {"method": method, "config": cfg_path, "opts": list(opts), "model": cfg.MODEL.NAME,
                           "roi": list(cfg.DATA.ROI), "patch": list(cfg.MODEL.PATCH_SIZE), "batch_size": bs,
                           "compile": compile_, "amp": amp, "device": str(device),
                           "params_m": sum(p.numel() for p in method_mod.parameters() if p.requires_grad) / 1e6,
                           "input_shapes": {k: list(v.shape) for k, v in batch.items()
                                            if isinstance(v, torch.Tensor) and v.ndim >= 4}}
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(batch)
    sync(device)
    row["warmup_s"] = time.perf_counter() - t0  # includes compilation
    flops = count_flops(step, batch) if not compile_ else None  # eager: the same step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step(batch)
        sync(device)
        times.append(time.perf_counter() - t)
    st = summarize(times)
    row.update(step_s=st, samples_per_s=bs / st["median"], flops_per_step=flops)
    if device.type == "cuda":
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # process lifetime
    if flops:
        row["tflops_per_s"] = flops / st["median"] / 1e12
        row["mfu"] = row["tflops_per_s"] / peak_tflops if peak_tflops else None
    print(f"{method:8s} {cfg.MODEL.NAME} {list(cfg.DATA.ROI)} batch {bs} compile={compile_} {amp}: step "
          f"{st['median'] * 1000:.1f} ms, {row['samples_per_s']:.2f} samples/s"
          + (f", {row['tflops_per_s']:.2f} TFLOP/s" if flops else "")
          + (f", MFU {row['mfu']:.1%}" if row.get("mfu") else ""), flush=True)
    del model, method_mod, step, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def fill_flops(rows: list[dict], peak_tflops: Optional[float]) -> None:
    """Compiled rows take the FLOP count of their eager twin (the model does the same arithmetic)."""
    for r in rows:
        if r.get("flops_per_step") is None:
            twin = next((e for e in rows if e is not r and not e["compile"] and e["method"] == r["method"]
                         and e["config"] == r["config"] and e["batch_size"] == r["batch_size"]
                         and e.get("flops_per_step")), None)
            if twin:
                r["flops_per_step"] = twin["flops_per_step"]
                r["tflops_per_s"] = r["flops_per_step"] / r["step_s"]["median"] / 1e12
                r["mfu"] = r["tflops_per_s"] / peak_tflops if peak_tflops else None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="", help="run a suite of cases")
    p.add_argument("--method", choices=METHODS, default="", help="one case: the method (default: from --cfg)")
    p.add_argument("--cfg", default="", help="one case: the config")
    p.add_argument("--compile", choices=("off", "on", "both"), default="both",
                   help="torch.compile the method: off, on or both (default both)")
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default="",
                   help="autocast dtype (default: bf16 on CUDA, none on CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per case (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--batch-size", type=int, default=0, help="override DATA.BATCH_SIZE (0 = the config's)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help=f"peak of the device for MFU (default {H100_BF16_DENSE_TFLOPS:g} on CUDA, none on CPU)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0 = torch's default; 1 on a CPU shared with other jobs)")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config KEY VALUE pairs for every case")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    peak = args.peak_tflops or (H100_BF16_DENSE_TFLOPS if device.type == "cuda" else None)
    if args.preset:
        cases = PRESETS[args.preset]
    elif args.cfg:
        cases = [(args.method or infer_method(args.cfg), args.cfg, [])]
    else:
        p.error("give --preset or --cfg")
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    result = header(device=str(device), threads=torch.get_num_threads(), amp=amp, peak_tflops=peak,
                    steps=args.steps, warmup=args.warmup,
                    preset=args.preset or None, cases=[])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for method, cfg_path, extra in cases:
        for c in compiles:
            try:
                result["cases"].append(run_case(method, cfg_path, extra + list(args.opts or []), c, amp, args.steps,
                                                args.warmup, device, args.batch_size or None, peak))
            except Exception as e:  # one failing case (e.g. out of memory) must not lose the others
                print(f"{method} compile={c}: FAILED {type(e).__name__}: {e}", flush=True)
                result["cases"].append({"method": method, "config": cfg_path, "compile": c,
                                        "error": f"{type(e).__name__}: {e}"})
    fill_flops([r for r in result["cases"] if "error" not in r], peak)
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    main()
