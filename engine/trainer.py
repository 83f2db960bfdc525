"""The one training loop, method-agnostic.

A method is an ``nn.Module`` whose ``forward(batch)`` returns ``{"loss": tensor, **scalars}``.
Optional hooks on the (unwrapped) method: ``on_step_start(it, epoch, total_iters)``,
``on_after_backward(epoch)``, ``on_step_end(it)``, ``exported_backbone()`` (the module ``backbone.pth``
holds when it is not ``method.backbone``), ``lr_scales()``,
``visualize(batch) -> {tag: image [C, H, W]}`` with attribute ``vis_every`` (epochs).

Preemption: SIGTERM or SIGUSR1 makes every rank finish the current optimizer step, write
``checkpoint_last.pth`` and exit with :data:`REQUEUE_EXIT_CODE`; the same command started again
(``TRAIN.RESUME auto``) continues from that exact step, with the same samples and RNG states.

Faults: rank 0 holds ``OUTPUT/run.lock`` (:mod:`engine.lock`) from construction to the end of
:meth:`Trainer.fit`; a damaged ``checkpoint_last.pth`` falls back to the newest checkpoint that
loads, and a full disk stops every rank (:mod:`engine.checkpoint`).
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import signal
import time
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from config import save_config
from engine import checkpoint as ckpt
from engine import dist
from engine.amp import autocast
from engine.lock import RunLock, RunLockedError
from engine.logging import RunLogger, Timer, format_eta, memory_mb
from engine.monitor import CollapseMonitor, exported_backbone
from engine.optim import build_optimizer, optimizer_step, param_groups, scaled_lr
from engine.schedules import cosine

REQUEUE_EXIT_CODE = 3  # exit status after a signal-triggered checkpoint: "requeue me"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; nothing was saved from the step that produced it."""


class TooManyBadInputsError(RuntimeError):
    """More than DATA.MAX_BAD_FRACTION of the inputs were skipped as unreadable."""


def to_device(batch, device: torch.device):
    """Move every tensor of a (nested) batch to ``device``; other values stay as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_size_of(batch: dict) -> int:
    if "index" in batch:
        return len(batch["index"])
    for v in batch.values():
        if isinstance(v, torch.Tensor):
            return v.shape[0]
    raise ValueError("cannot tell the batch size: the batch has no 'index' and no tensor")


def _skipped_rows(batch: dict) -> list[tuple[str, str]]:
    rows = []
    for item in batch.get("skipped", []) or []:
        if isinstance(item, (list, tuple)) and item and isinstance(item[0], (list, tuple)):
            rows.extend(tuple(r) for r in item)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            rows.append(tuple(item))
    return rows


def wrap_ddp(method: nn.Module, device: torch.device) -> DDP:
    """``method`` in DistributedDataParallel as the trainer runs it (process group already set up).

    Only parameters that require a gradient are averaged (DINO's EMA teacher is not); buffers are
    copied from rank 0 once, when DDP is built, and never synchronised at a forward
    (``forward_sync_buffers=False``, ``broadcast_buffers=False`` before torch 2.13); BatchNorm
    statistics stay rank-local until ``methods.classify.average_buffers``. Why, and how the teacher
    stays identical on every rank: docs/design-notes.md, "DINO's teacher under DDP".

    Args:
        method: the method module, already on ``device``.
        device: this rank's device (a CUDA device becomes DDP's ``device_ids``).
    """
    ids = [device] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return DDP(method, device_ids=ids, forward_sync_buffers=False)
    return DDP(method, device_ids=ids, broadcast_buffers=False)


class Trainer:
    """Runs ``TRAIN.EPOCHS`` epochs of a method with AMP, clipping, accumulation, schedules,
    logging, checkpoints, resume and signal handling.

    Args:
        cfg: the frozen config.
        method: the method module (on any device; moved to this rank's device).
        train_loader: from :func:`engine.dist.make_loader` (its sampler has ``set_epoch(epoch, start)``).
        val_loader: optional; its mean loss is logged every ``TRAIN.EVAL_EVERY`` epochs.
        evaluator: optional ``fn(method, epoch) -> dict`` run on every rank after each validation;
            its numbers are logged, and a ``"score"`` entry (higher is better) selects
            ``checkpoint_best.pth``.
        num_train_samples: size of the training set for the bad-input fraction (default: the
            train loader's dataset length).
        monitor: optional collapse monitor (:class:`engine.monitor.CollapseMonitor`), run on every
            rank before the first step and after every epoch; its numbers join the epoch's row.
    """

    def __init__(self, cfg, method: nn.Module, train_loader, val_loader=None,
                 evaluator: Optional[Callable[[nn.Module, int], dict]] = None,
                 num_train_samples: Optional[int] = None, monitor: Optional[CollapseMonitor] = None):
        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        os.makedirs(cfg.OUTPUT, exist_ok=True)
        self.run_lock, took_over = self._lock_output()
        if self.is_main:
            save_config(cfg, cfg.OUTPUT)
        self.log = RunLogger(cfg.OUTPUT, self.is_main)
        if took_over:
            self.log.warning(took_over)
        self.method = method.to(self.device)
        self.train_loader, self.val_loader, self.evaluator = train_loader, val_loader, evaluator
        self.monitor = monitor
        self.num_train_samples = num_train_samples or len(train_loader.dataset)

        lr_scales = method.lr_scales() if hasattr(method, "lr_scales") else None
        self.optimizer = build_optimizer(cfg, param_groups(method, cfg.TRAIN.LAYER_DECAY, lr_scales))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.TRAIN.AMP == "fp16")
        model: nn.Module = wrap_ddp(method, self.device) if self.world > 1 else method
        self.model = torch.compile(model) if cfg.TRAIN.COMPILE else model

        self.accum = cfg.TRAIN.ACCUM_STEPS
        self.sampler = train_loader.sampler if hasattr(train_loader.sampler, "set_epoch") \
            else train_loader.batch_sampler.sampler
        self.sampler.set_epoch(0, 0)
        self.iters_per_epoch = len(train_loader) // self.accum
        if self.iters_per_epoch == 0:
            raise ValueError(f"an epoch has no optimizer step: {len(train_loader.dataset)} training samples, "
                             f"DATA.BATCH_SIZE {cfg.DATA.BATCH_SIZE} x {self.world} ranks x "
                             f"TRAIN.ACCUM_STEPS {self.accum}; lower the batch size or add data")
        self.total_iters = cfg.TRAIN.EPOCHS * self.iters_per_epoch
        self.warmup_iters = cfg.TRAIN.WARMUP_EPOCHS * self.iters_per_epoch
        self.lr = scaled_lr(cfg, self.world)
        wd_end = cfg.TRAIN.WEIGHT_DECAY_END
        self.wd_end = cfg.TRAIN.WEIGHT_DECAY if wd_end < 0 else wd_end

        self.epoch = 0  # epoch in progress
        self.step_in_epoch = 0  # optimizer steps done in this epoch
        self.iteration = 0  # optimizer steps done in total (global iteration)
        self.epoch_sums: dict[str, float] = {}
        self.best_score = -math.inf
        self.best_epoch = -1
        self.skipped: dict[str, str] = {}
        self.nonfinite_streak = 0  # consecutive steps skipped for a non-finite loss (kept in checkpoints)
        self.skipped_steps = 0  # steps skipped in this epoch
        self._stop_signal: Optional[int] = None
        self._last_save = time.monotonic()
        self._last_loadable = True  # checkpoint_last.pth may become checkpoint_prev.pth (not when refused)
        # every rank its own stream of randomness (masks, dropout) after the shared model init
        dist.seed_everything(cfg.SEED + 1000 * self.rank)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "iteration": self.iteration,
            "epoch_sums": dict(self.epoch_sums),
            "best_score": self.best_score, "best_epoch": self.best_epoch,
            "world_size": self.world,
            "config": self.cfg.dump(),
            "monitor": self.monitor.state_dict() if self.monitor is not None else {},
            "nonfinite_streak": self.nonfinite_streak,
        }

    def _lock_output(self) -> tuple[Optional[RunLock], Optional[str]]:
        """Rank 0 takes OUTPUT/run.lock (:mod:`engine.lock`); every rank learns the outcome and raises
        :class:`RunLockedError` when another run holds the folder. Returns (the lock on rank 0,
        a take-over message or None)."""
        lock, outcome, error = None, (None, None), None  # outcome: (refusal, take-over message)
        if self.is_main:
            lock = RunLock(self.cfg.OUTPUT)
            try:
                outcome = (None, lock.acquire())
            except Exception as e:  # shared below: no rank may wait for a rank 0 that stopped here
                outcome, error = (e if isinstance(e, RunLockedError) else f"{type(e).__name__}: {e}", None), e
        refusal, took_over = dist.all_gather_object(
            (str(outcome[0]) if outcome[0] is not None else None, outcome[1]))[0]
        if error is not None:
            raise error
        if refusal is not None:
            raise RunLockedError(refusal)
        return lock, took_over

    def release_lock(self) -> None:
        """Give OUTPUT/run.lock back (rank 0; also done at interpreter exit)."""
        if self.run_lock is not None:
            self.run_lock.release()

    def _write_on_main(self, write: Callable[[], None]) -> None:
        """Run ``write`` on rank 0; when it fails (a full disk: ckpt.DiskFullError, or any other error)
        every rank raises, so none waits at a later collective for a rank 0 that stopped."""
        error: Optional[BaseException] = None
        if self.is_main:
            try:
                write()
            except Exception as e:
                error = e
        if self.world > 1:
            full = isinstance(error, ckpt.DiskFullError)
            shared = None if error is None else \
                (full, getattr(error, "errno", None), error.strerror if full else f"{type(error).__name__}: {error}")
            shared = dist.all_gather_object(shared)[0]
            if shared is not None and error is None:
                full, code, text = shared
                error = ckpt.DiskFullError(code, f"rank 0 stopped the run: {text}") if full else \
                    RuntimeError(f"rank 0 stopped the run: {text}")
        if error is not None:
            raise error

    def save(self, names: list[str]) -> None:
        """Write the full state to each of ``names`` in OUTPUT (rank 0); every rank gives its RNG state.

        Writing checkpoint_last.pth moves the previous one to checkpoint_prev.pth. A full disk stops
        the run on every rank with ckpt.DiskFullError (the previous files stay loadable).
        """
        rngs = dist.all_gather_object(ckpt.rng_state())

        def write() -> None:
            state = self.state_dict()
            state["rng"] = rngs
            for name in names:
                keep = os.path.join(self.cfg.OUTPUT, ckpt.PREV) if name == ckpt.LAST and self._last_loadable else None
                ckpt.atomic_save(state, os.path.join(self.cfg.OUTPUT, name), previous=keep)
                if name == ckpt.LAST:
                    self._last_loadable = True

        self._write_on_main(write)
        self._last_save = time.monotonic()

    def save_backbone(self) -> None:
        self._write_on_main(lambda: ckpt.atomic_save(exported_backbone(self.method).state_dict(),
                                                     os.path.join(self.cfg.OUTPUT, "backbone.pth")))

    def _find_resumable(self) -> Optional[ckpt.Resumable]:
        """Rank 0 picks the checkpoint (ckpt.resume_state); the others load the same file."""
        found, error = None, None
        if self.is_main:
            try:
                found = ckpt.resume_state(self.cfg.TRAIN.RESUME, self.cfg.OUTPUT)
            except Exception as e:  # shared below, so that no rank waits for rank 0
                error = e
        path, text = dist.all_gather_object((found.path if found else None,
                                             f"{type(error).__name__}: {error}" if error else None))[0]
        if error is not None:
            raise error
        if text is not None:
            raise ckpt.CheckpointError(f"rank 0 could not resume: {text}")
        if path is None or self.is_main:
            return found
        return ckpt.Resumable(path, ckpt.load_full_state(path))

    def resume(self) -> bool:
        """Load the state TRAIN.RESUME names ('auto': the newest full-state checkpoint of OUTPUT that
        loads, with a warning for each refused file); False when there is none."""
        found = self._find_resumable()
        if found is None:
            best = os.path.join(self.cfg.OUTPUT, "checkpoint_best.pth")
            if self.is_main and self.cfg.TRAIN.RESUME == "auto" and os.path.isfile(best):
                self.log.warning(f"{best} holds only a model, no training state: starting from scratch")
            return False
        for path, reason in found.refused:
            self.log.warning(f"refusing checkpoint {path}: {reason}")
            if os.path.basename(path) == ckpt.LAST:
                self._last_loadable = False
        path, state = found.path, found.state
        ckpt.load_state_strict(self.method, state["model"], f"resume from {path}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.iteration = state["iteration"]
        self.epoch_sums = dict(state["epoch_sums"])
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        if self.monitor is not None:
            self.monitor.load_state_dict(state.get("monitor", {}))
        rngs = state["rng"]
        if len(rngs) == self.world:
            ckpt.set_rng_state(rngs[self.rank])
        else:
            self.log.warning(f"resuming with {self.world} ranks from a checkpoint of {len(rngs)}: "
                             "RNG streams restart, so the run will not match an uninterrupted one")
        newest = f" (the newest that loads; {len(found.refused)} refused)" if found.refused else ""
        self.log.info(f"resumed from {path}{newest} at epoch {self.epoch} step {self.step_in_epoch} "
                      f"(iteration {self.iteration})")
        return True

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    @contextlib.contextmanager
    def _signals(self):
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # ------------------------------------------------------------------ loop
    def _set_schedules(self) -> tuple[float, float]:
        it, t = self.iteration, self.cfg.TRAIN
        lr = cosine(it, self.lr, t.MIN_LR, self.total_iters, self.warmup_iters)
        wd = cosine(it, t.WEIGHT_DECAY, self.wd_end, self.total_iters)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
            g["weight_decay"] = wd * g["wd_scale"]
        return lr, wd

    def _flags(self, loss: torch.Tensor) -> tuple[bool, bool, bool]:
        """(any rank non-finite, any rank signalled, time to save) agreed by every rank."""
        save_due = self.cfg.TRAIN.SAVE_MINUTES > 0 and self.is_main and \
            time.monotonic() - self._last_save > 60 * self.cfg.TRAIN.SAVE_MINUTES
        flags = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0,
                              1.0 if self._stop_signal is not None else 0.0,
                              1.0 if save_due else 0.0, float(len(self.skipped))])
        if self.world > 1:
            flags = flags.to(self.device)
            dist.all_reduce_sum(flags)
            flags = flags.cpu()
        total_bad = flags[3].item()
        if total_bad > self.cfg.DATA.MAX_BAD_FRACTION * self.num_train_samples:
            self._write_skipped()
            raise TooManyBadInputsError(
                f"{int(total_bad)} of {self.num_train_samples} training inputs were unreadable (more than "
                f"DATA.MAX_BAD_FRACTION = {self.cfg.DATA.MAX_BAD_FRACTION}); see "
                f"{os.path.join(self.cfg.OUTPUT, 'skipped.csv')}")
        return flags[0].item() > 0, flags[1].item() > 0, flags[2].item() > 0

    def _write_skipped(self) -> None:
        gathered = dist.all_gather_object(self.skipped) if self.world > 1 else [self.skipped]
        if not self.is_main:
            return
        rows: dict[str, str] = {}
        for d in gathered:
            rows.update(d)
        if rows:
            from data.datasets import write_skipped
            write_skipped(os.path.join(self.cfg.OUTPUT, "skipped.csv"), sorted(rows.items()))

    def train_one_epoch(self) -> dict:
        cfg, m = self.cfg, self.method
        bs = cfg.DATA.BATCH_SIZE
        self.sampler.set_epoch(self.epoch, self.step_in_epoch * self.accum * bs)
        self.model.train()
        window: dict[str, float] = {}
        n_window = 0
        data_s = step_s = 0.0
        timer, epoch_start = Timer(), time.perf_counter()
        micro = 0
        skip_step = False  # this optimizer step met a non-finite loss (TRAIN.ON_NONFINITE skip)
        lr = wd = 0.0
        for batch in self.train_loader:
            data_s += timer.lap()
            for path, reason in _skipped_rows(batch):
                if path not in self.skipped:
                    self.log.warning(f"skipped {path}: {reason}")
                    self.skipped[path] = reason
            if micro == 0:
                lr, wd = self._set_schedules()
                if hasattr(m, "on_step_start"):
                    m.on_step_start(self.iteration, self.epoch, self.total_iters)
            last_micro = micro == self.accum - 1
            batch = to_device(batch, self.device)
            sync = contextlib.nullcontext() if (last_micro or self.world == 1) else self.model.no_sync()
            with sync:
                with autocast(self.device.type, self.cfg.TRAIN.AMP):
                    out = self.model(batch)
                loss = out["loss"]
                nonfinite, stop, save_due = self._flags(loss)
                if nonfinite and not skip_step:  # the same decision on every rank: the flags are summed
                    skip_step = True
                    self._on_nonfinite(loss, batch)
                if not skip_step:
                    self.scaler.scale(loss / self.accum).backward()
                    for k, v in out.items():
                        window[k] = window.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v)
                    n_window += 1
            micro += 1
            if not last_micro:
                continue
            micro = 0
            if skip_step:  # no update: gradients of earlier micro-batches dropped, scaler and EMA untouched
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped_steps += 1
            else:
                self.nonfinite_streak = 0
                hook = (lambda: m.on_after_backward(self.epoch)) if hasattr(m, "on_after_backward") else None
                gn = optimizer_step(self.optimizer, self.scaler, cfg.TRAIN.CLIP_GRAD, before_clip=hook)
                if gn is not None:
                    window["grad_norm"] = window.get("grad_norm", 0.0) + float(gn) * self.accum
                if hasattr(m, "on_step_end"):
                    m.on_step_end(self.iteration)
                for k, v in out.items():
                    if isinstance(v, (torch.Tensor, float, int)):
                        v = v.detach() if isinstance(v, torch.Tensor) else v
                        self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + float(v)
                self.epoch_sums["_n"] = self.epoch_sums.get("_n", 0.0) + 1
            skip_step = False
            self.iteration += 1
            self.step_in_epoch += 1
            step_s += timer.lap()
            if (self.step_in_epoch % cfg.TRAIN.LOG_EVERY == 0 or self.step_in_epoch == self.iters_per_epoch) \
                    and n_window:
                self._log_step(window, n_window, lr, wd, data_s, step_s, epoch_start)
                window, n_window, data_s, step_s = {}, 0, 0.0, 0.0
            if stop:
                self.save([ckpt.LAST])
                dist.barrier()  # no rank leaves (and gets its launcher to kill the others) mid-write
                name = signal.Signals(self._stop_signal).name if self._stop_signal else "a signal on another rank"
                self.log.info(f"received {name}: saved checkpoint_last.pth at epoch {self.epoch} step "
                              f"{self.step_in_epoch}; exiting with code {REQUEUE_EXIT_CODE} (requeue to resume)")
                self.log.close()
                raise SystemExit(REQUEUE_EXIT_CODE)
            if save_due:
                self.save([ckpt.LAST])
            if self.step_in_epoch >= self.iters_per_epoch:
                break
            timer.lap()
        n = max(1.0, self.epoch_sums.pop("_n", 1.0))
        means = {k: v / n for k, v in self.epoch_sums.items()}
        if self.skipped_steps:
            means["skipped_steps"] = float(self.skipped_steps)
        self.epoch_sums = {}
        self.skipped_steps = 0
        return means

    def _on_nonfinite(self, loss: torch.Tensor, batch: dict) -> None:
        """A non-finite loss on some rank (every rank calls this in the same step): stop the run under
        TRAIN.ON_NONFINITE stop, or under skip log every rank's scan ids and stop after
        TRAIN.MAX_SKIPPED_STEPS skipped steps in a row."""
        t = self.cfg.TRAIN
        ids = batch.get("id", batch.get("index"))
        ids = [str(i.item() if isinstance(i, torch.Tensor) else i) for i in ids] if ids is not None else ["?"]
        gathered = dist.all_gather_object((self.rank, float(loss.detach()), ids))
        where = "; ".join(f"rank {r}: loss {v} ids {', '.join(i)}" for r, v, i in gathered if not math.isfinite(v))
        at = f"epoch {self.epoch} iteration {self.iteration}"
        if t.ON_NONFINITE == "stop":
            raise NonFiniteLossError(
                f"non-finite loss at {at} ({where}); nothing was saved from this step. Lower TRAIN.BASE_LR, "
                "set TRAIN.CLIP_GRAD, use TRAIN.AMP bf16 instead of fp16, or TRAIN.ON_NONFINITE skip")
        self.nonfinite_streak += 1
        self.log.warning(f"non-finite loss at {at}: step skipped (no update), {self.nonfinite_streak} in a row; "
                         f"{where}")
        if self.nonfinite_streak >= t.MAX_SKIPPED_STEPS:
            raise NonFiniteLossError(
                f"{self.nonfinite_streak} steps in a row had a non-finite loss (TRAIN.MAX_SKIPPED_STEPS = "
                f"{t.MAX_SKIPPED_STEPS}), the last at {at} ({where}); the run cannot recover by skipping. "
                "Lower TRAIN.BASE_LR, set TRAIN.CLIP_GRAD, or resume from an earlier checkpoint")

    def _log_step(self, window, n, lr, wd, data_s, step_s, epoch_start) -> None:
        cfg = self.cfg
        steps = n / self.accum
        samples = n * cfg.DATA.BATCH_SIZE * self.world
        row = {"epoch": self.epoch, "step": self.step_in_epoch, "it": self.iteration, "lr": lr, "wd": wd}
        row.update({k: v / n for k, v in window.items()})
        if "grad_norm" in row:
            row["grad_norm"] = window["grad_norm"] / n
        row.update({"data_s": data_s / steps, "step_s": step_s / steps,
                    "samples_per_s": samples / max(1e-9, data_s + step_s),
                    "mem_mb": memory_mb(self.device)})
        self.log.metrics(row, tb_step=self.iteration)
        per_it = (time.perf_counter() - epoch_start) / max(1, self.step_in_epoch)
        eta = per_it * (self.total_iters - self.iteration)
        extras = " ".join(f"{k} {row[k]:.4g}" for k in window if k != "loss")
        self.log.info(f"epoch {self.epoch} [{self.step_in_epoch}/{self.iters_per_epoch}] loss {row['loss']:.4f} "
                      f"{extras} lr {lr:.3g} data {row['data_s']:.3f}s step {row['step_s']:.3f}s "
                      f"{row['samples_per_s']:.1f} samples/s mem {row['mem_mb']:.0f}MB eta {format_eta(eta)}")

    @torch.no_grad()
    def validate(self) -> dict:
        """Mean loss (and method scalars) over the validation loader, all ranks together."""
        self.method.eval()
        sums: dict[str, float] = {}
        count = 0
        for batch in self.val_loader:
            batch = to_device(batch, self.device)
            bs = batch_size_of(batch)
            with autocast(self.device.type, self.cfg.TRAIN.AMP):
                out = self.method(batch)
            for k, v in out.items():
                if isinstance(v, (torch.Tensor, float, int)):
                    sums[k] = sums.get(k, 0.0) + float(v) * bs
            count += bs
        keys = sorted(sums)
        t = dist.all_reduce_sum(torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64,
                                             device=self.device if self.world > 1 else "cpu"))
        self.method.train()
        return {f"val_{k}": (t[i] / max(1.0, t[-1])).item() for i, k in enumerate(keys)}

    def fit(self, keep_lock: bool = False) -> dict:
        """Train from scratch or from the checkpoint TRAIN.RESUME names; returns the last epoch's row.

        OUTPUT/run.lock is given back however training ends, except with ``keep_lock`` after a run that
        did not fail: a caller that still writes to OUTPUT (evaluation, predictions) keeps the folder and
        calls :meth:`release_lock` when done (at the latest, the process's exit releases it)."""
        try:
            row = self._fit()
        except BaseException:
            self.release_lock()
            raise
        if not keep_lock:
            self.release_lock()
        return row

    def _fit(self) -> dict:
        cfg = self.cfg
        self.resume()
        if self.epoch >= cfg.TRAIN.EPOCHS:
            self.log.info(f"nothing to do: {cfg.OUTPUT} already holds {self.epoch} finished epochs")
            self.save_backbone()
            return {}
        n_params = sum(p.numel() for p in self.method.parameters() if p.requires_grad)
        self.log.info(f"training {type(self.method).__name__} for {cfg.TRAIN.EPOCHS} epochs x "
                      f"{self.iters_per_epoch} iterations on {self.world} process(es), {self.device}; "
                      f"{n_params / 1e6:.2f}M trainable parameters; lr {self.lr:.3g} (global batch "
                      f"{cfg.DATA.BATCH_SIZE * self.world * self.accum})")
        start_weights, start_iteration = self._fingerprint(), self.iteration
        row: dict = {}
        first_row: dict = {}  # the untrained backbone's monitor numbers, logged with the first epoch
        if self.monitor is not None and not self.monitor.initial and self.iteration == 0:
            init = self.monitor(self.method)
            first_row = {"feature_rank_init": init["feature_rank"], "feature_std_init": init["feature_std"]}
            self.log.info(f"collapse monitor: {len(self.monitor)} scans of {self.monitor.source}; untrained "
                          f"backbone feature_rank {init['feature_rank']:.2f} feature_std {init['feature_std']:.4f} "
                          f"({init['monitor_s']:.1f}s)")
        with self._signals():
            while self.epoch < cfg.TRAIN.EPOCHS:
                t0 = time.perf_counter()
                means = self.train_one_epoch()
                row = {"epoch": self.epoch, "it": self.iteration, **means,
                       "epoch_s": time.perf_counter() - t0}
                if (self.epoch + 1) % cfg.TRAIN.EVAL_EVERY == 0 or self.epoch + 1 == cfg.TRAIN.EPOCHS:
                    if self.val_loader is not None:
                        row.update(self.validate())
                    if self.evaluator is not None:
                        row.update(self.evaluator(self.method, self.epoch))
                if self.monitor is not None:
                    row.update(self.monitor(self.method, self.log))
                    row.update(first_row)
                    first_row = {}
                self._visualize()
                self._write_skipped()
                if "score" in row and row["score"] is not None and row["score"] > self.best_score:
                    self.best_score, self.best_epoch = row["score"], self.epoch
                    best = {"model": self.method.state_dict(), "epoch": self.epoch, "score": row["score"]}
                    self._write_on_main(lambda: ckpt.atomic_save(best, os.path.join(cfg.OUTPUT, "checkpoint_best.pth")))
                self.log.metrics(row, tb_step=self.epoch, tb_prefix="epoch")
                summary = " ".join(f"{k} {v:.4g}" for k, v in row.items()
                                   if isinstance(v, float) and k != "epoch_s")
                self.log.info(f"epoch {self.epoch} done in {row['epoch_s']:.1f}s: {summary}")
                self.epoch += 1
                self.step_in_epoch = 0
                names = [ckpt.LAST]
                if cfg.TRAIN.SAVE_EVERY and (self.epoch % cfg.TRAIN.SAVE_EVERY == 0
                                             or self.epoch == cfg.TRAIN.EPOCHS):
                    names.append(f"checkpoint_epoch{self.epoch}.pth")
                self.save(names)
                self.save_backbone()
        if self.iteration > start_iteration and torch.equal(start_weights, self._fingerprint()):
            self.log.warning(f"the trainable weights did not change in this run ({self.iteration} optimizer steps "
                             "in all): every step was skipped or had lr 0, or the gradients were all zero; "
                             f"{cfg.OUTPUT} holds the weights it started from")
        self.log.info(f"finished {cfg.TRAIN.EPOCHS} epochs; run folder {cfg.OUTPUT}")
        self.log.close()
        return row

    @torch.no_grad()
    def _fingerprint(self) -> torch.Tensor:
        """Sum and sum of squares of every trainable tensor (float64, a few numbers per tensor, no copy of the
        weights): equal before and after a run only when no trainable weight moved."""
        sums = [torch.stack([p.double().sum(), p.double().square().sum()])
                for p in self.method.parameters() if p.requires_grad]
        return torch.stack(sums).cpu() if sums else torch.zeros(0, dtype=torch.float64)

    def _visualize(self) -> None:
        m = self.method
        every = getattr(m, "vis_every", 0)
        if not (self.is_main and every and hasattr(m, "visualize") and (self.epoch + 1) % every == 0):
            return
        loader = self.val_loader or self.train_loader
        batch = to_device(next(iter(loader)), self.device)
        m.eval()
        with torch.no_grad():
            images = m.visualize(batch)
        m.train()
        for tag, img in images.items():
            self.log.image(tag, img, self.epoch)
