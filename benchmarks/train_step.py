"""Training-step speed: step time, samples/s, peak memory and model FLOP utilisation (MFU).

    # the H100 suite: MAE, DINO, SimCLR and fine-tuning with ViT-B at 96^3, bf16, eager and compiled
    python -m benchmarks.train_step --preset h100 --json benchmarks/results/train_step_h100.json
    # a CPU suite with vit_tiny at 48^3 (the demo configs)
    python -m benchmarks.train_step --preset cpu --json benchmarks/results/train_step_cpu.json
    # one case
    python -m benchmarks.train_step --method dino --cfg configs/dino/vit_base.yaml --compile both --amp bf16 \\
        --opts DATA.BATCH_SIZE 32

Each case builds the backbone and method exactly as the entry scripts do (``methods/registry.py``,
``models.zoo``, ``engine.optim``), feeds it a batch made by the method's own view from a synthetic
head volume (the keys and shapes of real training, on the device; any device stage of the view runs
in the workers, so the step times the model alone), and times full optimizer steps as
``engine.trainer.Trainer`` runs them: schedule hooks, autocast forward, backward, then
``engine.optim.optimizer_step`` (unscale, the method's after-backward hook, gradient clipping,
optimizer step), EMA hook. FLOPs of one step (forward + backward) are counted with
``torch.utils.flop_counter.FlopCounterMode`` on the eager model; MFU = FLOPs per step / step time /
peak (``--peak-tflops``, default the card's datasheet dense bf16 peak from
``benchmarks.common.BF16_PEAK_TFLOPS`` on CUDA, none on CPU); ``--measure-peak`` also times a large
bf16 matrix product and reports ``mfu_of_matmul`` against it. ``--sdpa flash,efficient`` restricts
``scaled_dot_product_attention`` to those kernels (a case fails rather than fall back to the slow
math path); the kernels the eager step ran are listed in ``sdpa_kernels``.

Two more modes, for the GPU check (``benchmarks/gpu_check.py``):

    # DDP steps through torchrun (NCCL on CUDA, Gloo on CPU), the trainer's own DDP wrap
    python -m torch.distributed.run --standalone --nproc_per_node 1 -m benchmarks.train_step --ddp \
        --cfg configs/dino/vit_base.yaml --compile off --steps 3
    # the loss of the first steps in bf16 against fp32 (TF32 off), same seed, same batch
    python -m benchmarks.train_step --compare-amp --preset h100 --methods mae,dino --steps 4

The JSON is rewritten after every case, so a run stopped early keeps the cases it finished.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import resource
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch

from benchmarks.common import bf16_peak_tflops, header, matmul_tflops, method_in_path, summarize, write_json
from config import config_from_args
from engine.cli import run_cli
from engine.amp import autocast
from engine.optim import optimizer_step
from methods.registry import DOWNSTREAM_VIEW, METHODS as REGISTERED

METHODS = (*REGISTERED, "finetune")  # the registry's pretraining methods and downstream fine-tuning
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
    """The method named nearest the end of the config path (``downstream`` -> finetune).

    Raises:
        ValueError: when the path names none.
    """
    name = method_in_path(cfg_path, (*REGISTERED, "downstream"))
    return "finetune" if name == "downstream" else name


def build_view(cfg, method: str):
    """The training view of the method (methods/registry.py) with any device stage done in the
    workers: the batch holds finished crops, so the timed step is the model's alone."""
    view = (DOWNSTREAM_VIEW if method == "finetune" else REGISTERED[method].build_view)(cfg, True)
    if getattr(view, "device_stage", False):
        view.device_stage = False
        if hasattr(view, "device_resize"):
            view.device_resize = False
    return view


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
    if method in REGISTERED:
        return REGISTERED[method].cls(cfg, backbone)
    from methods.classify import build_classifier
    labels = np.tile(np.array([[0.0], [1.0]], dtype=np.float32), (4, len(cfg.DOWNSTREAM.LABELS)))
    return build_classifier(cfg, backbone, labels, frozen=False)


class Stepper:
    """One optimizer step as the trainer does it (no accumulation; DDP when ``model`` is wrapped)."""

    def __init__(self, cfg, method: torch.nn.Module, model, device: torch.device, amp: str):
        from engine.optim import build_optimizer, param_groups
        self.cfg, self.m, self.model, self.device = cfg, method, model, device
        scales = method.lr_scales() if hasattr(method, "lr_scales") else None
        self.opt = build_optimizer(cfg, param_groups(method, cfg.TRAIN.LAYER_DECAY, scales))
        self.amp = amp
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.it = 0
        # steady state: past DINO's frozen-last-layer epochs
        self.epoch = int(getattr(cfg.DINO, "FREEZE_LAST_LAYER_EPOCHS", 0))

    def __call__(self, batch: dict) -> float:
        m = self.m
        if hasattr(m, "on_step_start"):
            m.on_step_start(self.it, self.epoch, 10 ** 6)
        with autocast(self.device.type, self.amp):
            out = self.model(batch)
        loss = out["loss"]
        self.scaler.scale(loss).backward()
        hook = (lambda: m.on_after_backward(self.epoch)) if hasattr(m, "on_after_backward") else None
        optimizer_step(self.opt, self.scaler, self.cfg.TRAIN.CLIP_GRAD, before_clip=hook)
        if hasattr(m, "on_step_end"):
            m.on_step_end(self.it)
        self.it += 1
        return float(loss.detach())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}


def sdpa_backends(spec: str) -> list | None:
    """``"auto"`` (or empty) -> None (torch picks); ``"flash,efficient"`` -> those ``SDPBackend`` members.

    Raises:
        ValueError: naming an unknown kernel.
    """
    names = [n.strip().lower() for n in spec.split(",") if n.strip()]
    if not names or names == ["auto"]:
        return None
    from torch.nn.attention import SDPBackend
    bad = [n for n in names if n not in SDPA_BACKENDS]
    if bad:
        raise ValueError(f"--sdpa {spec!r}: unknown kernel(s) {bad}; expected 'auto' or a comma list of "
                         f"{sorted(SDPA_BACKENDS)}")
    return [getattr(SDPBackend, SDPA_BACKENDS[n]) for n in names]


def sdpa_context(backends: list | None):
    """``torch.nn.attention.sdpa_kernel(backends)``, or nothing for torch's own choice."""
    if not backends:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel
    return sdpa_kernel(backends)


def _attention_recorder():
    """A dispatch mode that collects the names of the attention kernels that run under it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class AttentionKernels(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if name.startswith(("_scaled_dot_product", "_efficient_attention", "_flash_attention")):
                self.names.add(name)
            return func(*args, **(kwargs or {}))

    return AttentionKernels()


def count_flops(step: Stepper, batch: dict) -> tuple[int | None, list[str] | None]:
    """FLOPs of one eager step (forward + backward) and the attention kernels it ran.

    Kernels: the ``aten._scaled_dot_product_*`` ops (an empty list when attention took the math
    path, matrix products only). ``(None, None)`` when counting fails.
    """
    from torch.utils.flop_counter import FlopCounterMode
    try:
        with FlopCounterMode(display=False) as fc, _attention_recorder() as rec:
            step(batch)
        return int(fc.get_total_flops()), sorted(rec.names)
    except Exception as e:  # a counter gap must not lose the timing
        print(f"FLOP counting failed: {type(e).__name__}: {e}")
        return None, None


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 matrix products and convolutions on or off inside the block (CUDA), restored after."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def ddp_setup():
    """The process group of a ``--ddp`` run under torchrun (NCCL on CUDA, Gloo on CPU).

    ``engine.dist.init_distributed`` as the entry scripts call it; with one process it makes no
    group, so a group of one is made here: DDP then runs for real (start-up broadcast, gradient
    all-reduce) on a single GPU.
    """
    import torch.distributed as tdist

    from engine.dist import init_distributed
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("--ddp runs under torchrun: python -m torch.distributed.run --standalone "
                         "--nproc_per_node N -m benchmarks.train_step --ddp ...")
    info = init_distributed()
    if not tdist.is_initialized():
        cuda = info.device.type == "cuda"
        tdist.init_process_group(backend="nccl" if cuda else "gloo", **({"device_id": info.device} if cuda else {}))
    return info


def rank_maxdiff(module: torch.nn.Module) -> float:
    """Largest difference between ranks of any parameter's float64 sum (0 when the ranks agree)."""
    from engine import dist
    sums = [float(p.detach().double().sum()) for p in module.parameters()]
    gathered = dist.all_gather_object(sums)
    return max((abs(a - b) for other in gathered for a, b in zip(other, gathered[0])), default=0.0)


def load_cfg(cfg_path: str, opts: list[str], batch_size: int | None):
    args = argparse.Namespace(cfg=cfg_path, opts=list(opts) + (["DATA.BATCH_SIZE", str(batch_size)] if batch_size
                                                                else []))
    return config_from_args(args)


def run_case(method: str, cfg_path: str, opts: list[str], compile_: bool, amp: str, steps: int, warmup: int,
             device: torch.device, batch_size: int | None, peak_tflops: float | None,
             sdpa: str = "auto", ddp: bool = False) -> dict[str, Any]:
    """Time one (method, config, compile) case; returns its JSON row.

    Args:
        sdpa: attention kernels allowed (:func:`sdpa_backends`).
        ddp: wrap the method as the trainer does under torchrun (:func:`engine.trainer.wrap_ddp`;
            the process group from :func:`ddp_setup`); each rank steps on its own batch, and the
            row holds the backend, world size, the warnings DDP raised on any rank and
            ``rank_param_maxdiff`` (0 when every rank ends with the same weights, teacher included).
    """
    from engine import dist
    from engine.dist import seed_everything
    cfg = load_cfg(cfg_path, opts, batch_size)
    rank = dist.get_rank()
    seed_everything(cfg.SEED)
    method_mod = build_method(cfg, method).to(device)
    method_mod.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        return _time_case(cfg, method, cfg_path, opts, compile_, amp, steps, warmup, device, peak_tflops, sdpa, ddp,
                          method_mod, rank, caught)


def _time_case(cfg, method, cfg_path, opts, compile_, amp, steps, warmup, device, peak_tflops, sdpa, ddp,
               method_mod, rank, caught) -> dict[str, Any]:
    model = method_mod
    if ddp:
        from engine.trainer import wrap_ddp
        model = wrap_ddp(method_mod, device)
    model = torch.compile(model) if compile_ else model
    step = Stepper(cfg, method_mod, model, device, amp)
    bs = cfg.DATA.BATCH_SIZE
    batch = make_batch(cfg, method, bs, device, seed=cfg.SEED + 1000 * rank)
    row: dict[str, Any] = {"method": method, "config": cfg_path, "opts": list(opts), "model": cfg.MODEL.NAME,
                           "roi": list(cfg.DATA.ROI), "patch": list(cfg.MODEL.PATCH_SIZE), "batch_size": bs,
                           "compile": compile_, "amp": amp, "device": str(device), "sdpa": sdpa, "ddp": ddp,
                           "params_m": sum(p.numel() for p in method_mod.parameters() if p.requires_grad) / 1e6,
                           "input_shapes": {k: list(v.shape) for k, v in batch.items()
                                            if isinstance(v, torch.Tensor) and v.ndim >= 4}}
    backends = sdpa_backends(sdpa)
    with sdpa_context(backends):
        t0 = time.perf_counter()
        for _ in range(warmup):
            step(batch)
        sync(device)
        row["warmup_s"] = time.perf_counter() - t0  # includes compilation
        flops = kernels = None
        if not compile_ and not ddp:  # eager: the same step
            flops, kernels = count_flops(step, batch)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, losses = [], []
        for _ in range(steps):
            t = time.perf_counter()
            losses.append(step(batch))
            sync(device)
            times.append(time.perf_counter() - t)
    st = summarize(times)
    row.update(step_s=st, samples_per_s=bs / st["median"], flops_per_step=flops, sdpa_kernels=kernels,
               losses=losses, losses_finite=all(math.isfinite(x) for x in losses))
    if ddp:
        import torch.distributed as tdist

        from engine import dist
        row.update(backend=str(tdist.get_backend()), world_size=dist.get_world_size(),
                   rank_param_maxdiff=rank_maxdiff(method_mod))
        mine = [f"{w.category.__name__}: {w.message}" for w in caught]
        row["warnings"] = sorted({f"rank {r}: {m}" for r, ws in enumerate(dist.all_gather_object(mine)) for m in ws})
        row["future_warnings"] = sum("FutureWarning" in w for w in row["warnings"])
    if device.type == "cuda":
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # process lifetime
    if flops:
        row["tflops_per_s"] = flops / st["median"] / 1e12
        row["mfu"] = row["tflops_per_s"] / peak_tflops if peak_tflops else None
    if rank == 0:
        print(f"{method:8s} {cfg.MODEL.NAME} {list(cfg.DATA.ROI)} batch {bs} compile={compile_} {amp}"
              + (f" DDP {row['backend']} x{row['world_size']}" if ddp else "") + ": step "
              f"{st['median'] * 1000:.1f} ms, {row['samples_per_s']:.2f} samples/s"
              + (f", {row['tflops_per_s']:.2f} TFLOP/s" if flops else "")
              + (f", MFU {row['mfu']:.1%}" if row.get("mfu") else "")
              + (f", attention {','.join(kernels) or 'math'}" if kernels is not None else ""), flush=True)
    del model, method_mod, step, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def fill_flops(rows: list[dict], peak_tflops: float | None, matmul: float | None = None) -> None:
    """Compiled rows take the FLOP count of their eager twin (the model does the same arithmetic);
    with a measured matrix-product rate ``matmul`` (TFLOP/s) every row also gets ``mfu_of_matmul``."""
    for r in rows:
        if r.get("flops_per_step") is None:
            twin = next((e for e in rows if e is not r and not e["compile"] and e["method"] == r["method"]
                         and e["config"] == r["config"] and e["batch_size"] == r["batch_size"]
                         and e.get("flops_per_step")), None)
            if twin:
                r["flops_per_step"] = twin["flops_per_step"]
                r["tflops_per_s"] = r["flops_per_step"] / r["step_s"]["median"] / 1e12
                r["mfu"] = r["tflops_per_s"] / peak_tflops if peak_tflops else None
        if matmul and r.get("tflops_per_s"):
            r["mfu_of_matmul"] = r["tflops_per_s"] / matmul


def compare_amp(method: str, cfg_path: str, opts: list[str], steps: int, device: torch.device,
                batch_size: int | None, rtol: float, rtol_first: float, sdpa: str = "auto") -> dict[str, Any]:
    """The loss of the first ``steps`` optimizer steps in fp32 (TF32 off) and in bf16 autocast.

    Both runs start from the same seed (same weights, same batch, same masks) and run the same
    steps at the trainer's peak learning rate (``BASE_LR x batch / 256``). The first loss comes from
    the same weights, so it measures the precision of one bf16 forward pass (``rtol_first``); the
    later ones also carry the drift of the bf16 updates (AdamW's first steps move every weight by about
    the learning rate whatever its gradient's size, so rounding of a small gradient can flip a step):
    ``rtol``. ``ok`` when every loss is finite and ``|bf16 - fp32| / |fp32|`` is within both.
    """
    from engine.dist import seed_everything
    from engine.optim import scaled_lr
    losses: dict[str, list[float]] = {}
    for amp in ("none", "bf16"):
        cfg = load_cfg(cfg_path, opts, batch_size)
        seed_everything(cfg.SEED)
        m = build_method(cfg, method).to(device)
        m.train()
        step = Stepper(cfg, m, m, device, amp)
        for g in step.opt.param_groups:  # the trainer's peak rate (after warm-up), not the unscaled BASE_LR
            g["lr"] = scaled_lr(cfg, 1) * g["lr_scale"]
        batch = make_batch(cfg, method, cfg.DATA.BATCH_SIZE, device, seed=cfg.SEED)
        seed_everything(cfg.SEED)  # the same draws (masks, dropout) in both runs
        with tf32(amp != "none"), sdpa_context(sdpa_backends(sdpa)):
            losses[amp] = [step(batch) for _ in range(steps)]
        del m, step, batch
        gc.collect()
    ref, low = losses["none"], losses["bf16"]
    rel = [abs(b - a) / max(abs(a), 1e-12) for a, b in zip(ref, low)]
    finite = all(math.isfinite(x) for x in ref + low)
    row = {"method": method, "config": cfg_path, "opts": list(opts), "steps": steps, "device": str(device),
           "sdpa": sdpa, "loss_fp32": ref, "loss_bf16": low, "rel_diff": rel,
           "max_rel_diff": max(rel) if finite else None, "rtol": rtol, "rtol_first": rtol_first,
           "ok": finite and rel[0] <= rtol_first and max(rel) <= rtol}
    print(f"{method:8s} bf16 vs fp32 over {steps} steps: losses {[round(x, 5) for x in low]} vs "
          f"{[round(x, 5) for x in ref]}: relative difference {rel[0]:.2e} at the first step (tolerance "
          f"{rtol_first:g}), {max(rel):.2e} at most (tolerance {rtol:g}): {'ok' if row['ok'] else 'FAILED'}",
          flush=True)
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="", help="run a suite of cases")
    p.add_argument("--methods", default="", help="with --preset: only these methods (comma list, e.g. mae,dino)")
    p.add_argument("--method", choices=METHODS, default="", help="one case: the method (default: from --cfg)")
    p.add_argument("--cfg", default="", help="one case: the config")
    p.add_argument("--compile", choices=("off", "on", "both"), default="both",
                   help="torch.compile the method: off, on or both (default both; every eager case runs first)")
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default="",
                   help="autocast dtype (default: bf16 on CUDA, none on CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per case (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--batch-size", type=int, default=0, help="override DATA.BATCH_SIZE (0 = the config's)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="peak of the device for MFU (default: the card's datasheet dense bf16 peak on CUDA, "
                        "benchmarks.common.BF16_PEAK_TFLOPS; none on CPU)")
    p.add_argument("--measure-peak", action="store_true",
                   help="also time a large bf16 matrix product (8192^3 on CUDA) and report mfu_of_matmul")
    p.add_argument("--sdpa", default="auto",
                   help="attention kernels allowed: auto (torch's choice) or a comma list of flash, efficient, "
                        "cudnn, math (e.g. flash,efficient: fail rather than fall back to math)")
    p.add_argument("--ddp", action="store_true",
                   help="wrap in DDP as the trainer does; run under torchrun (any --nproc_per_node)")
    p.add_argument("--compare-amp", action="store_true",
                   help="instead of timing: the loss of --steps steps in bf16 against fp32, same seed")
    p.add_argument("--rtol", type=float, default=0.1,
                   help="--compare-amp: largest relative loss difference accepted at any step (default 0.1)")
    p.add_argument("--rtol-first", type=float, default=0.02,
                   help="--compare-amp: the same at the first step, from the same weights (default 0.02; "
                        "DINO's sharp teacher, temperature 0.04, magnifies the rounding of its logits)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0 = torch's default; 1 on a CPU shared with other jobs)")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config KEY VALUE pairs for every case")
    args = p.parse_args(argv)
    info = ddp_setup() if args.ddp else None
    if info is not None:
        device = info.device
    else:
        device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                              else "cpu")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = args.peak_tflops or bf16_peak_tflops(gpu)
    if gpu and not peak:
        print(f"no datasheet bf16 peak known for {gpu!r}: MFU not computed (pass --peak-tflops)")
    if args.preset:
        cases = PRESETS[args.preset]
        if args.methods:
            wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
            bad = [m for m in wanted if m not in {c[0] for c in cases}]
            if bad:
                p.error(f"--methods {args.methods!r}: {bad} not in preset {args.preset!r} "
                        f"({[c[0] for c in cases]})")
            cases = [c for c in cases if c[0] in wanted]
    elif args.cfg:
        cases = [(args.method or infer_method(args.cfg), args.cfg, [])]
    else:
        p.error("give --preset or --cfg")
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    try:
        sdpa_backends(args.sdpa)
    except ValueError as e:
        p.error(str(e))
    main_rank = info is None or info.rank == 0
    mode = "compare_amp" if args.compare_amp else ("ddp" if args.ddp else "time")
    result = header(device=str(device), threads=torch.get_num_threads(), amp=amp, peak_tflops=peak,
                    steps=args.steps, warmup=args.warmup, sdpa=args.sdpa, mode=mode,
                    preset=args.preset or None, cases=[])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.measure_peak and main_rank:
        n = 8192 if device.type == "cuda" else 256
        result["matmul_tflops"] = matmul_tflops(device, n, torch.bfloat16)
        result["matmul_n"] = n
        print(f"bf16 {n}^3 matrix product: {result['matmul_tflops']:.1f} TFLOP/s"
              + (f" ({result['matmul_tflops'] / peak:.0%} of the datasheet {peak:g})" if peak else ""), flush=True)

    def save() -> None:
        fill_flops([r for r in result["cases"] if "error" not in r and "step_s" in r], peak,
                   result.get("matmul_tflops"))
        if args.json and main_rank:
            write_json(args.json, result)

    if args.compare_amp:
        for method, cfg_path, extra in cases:
            try:
                result["cases"].append(compare_amp(method, cfg_path, extra + list(args.opts or []), args.steps,
                                                   device, args.batch_size or None, args.rtol, args.rtol_first,
                                                   args.sdpa))
            except Exception as e:  # noqa: BLE001  (one failing case must not lose the others)
                print(f"{method} bf16 vs fp32: FAILED {type(e).__name__}: {e}", flush=True)
                result["cases"].append({"method": method, "config": cfg_path, "ok": False,
                                        "error": f"{type(e).__name__}: {e}"})
            save()
        result["ok"] = all(c.get("ok") for c in result["cases"])
    else:
        for c in compiles:  # every eager case first: a run cut short still has them
            for method, cfg_path, extra in cases:
                try:
                    result["cases"].append(run_case(method, cfg_path, extra + list(args.opts or []), c, amp,
                                                    args.steps, args.warmup, device, args.batch_size or None, peak,
                                                    args.sdpa, args.ddp))
                except Exception as e:  # one failing case (e.g. out of memory) must not lose the others
                    if args.ddp:
                        raise  # the other ranks wait in a collective: a rank must not carry on alone
                    print(f"{method} compile={c}: FAILED {type(e).__name__}: {e}", flush=True)
                    result["cases"].append({"method": method, "config": cfg_path, "compile": c,
                                            "error": f"{type(e).__name__}: {e}"})
                save()
    save()
    if args.json and main_rank:
        print(f"wrote {args.json}")
    if info is not None:
        from engine.dist import cleanup
        cleanup()
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
