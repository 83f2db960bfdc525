"""Rank-0 logging: console + OUTPUT/log.txt, OUTPUT/metrics.jsonl, TensorBoard in OUTPUT/tb/."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Optional

import torch


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def setup_console(output_dir: str, is_main: bool, name: str = "headct") -> logging.Logger:
    """A logger printing to stdout and appending to ``output_dir/log.txt`` on rank 0 only."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    if is_main:
        fmt = logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S")
        for h in (logging.StreamHandler(sys.stdout),
                  logging.FileHandler(os.path.join(output_dir, "log.txt"), mode="a")):
            h.setFormatter(fmt)
            logger.addHandler(h)
    return logger


class RunLogger:
    """What a run reports: console/log.txt lines, metrics.jsonl rows and TensorBoard scalars.

    Everything is a no-op on ranks other than 0 (the console still shows their warnings).

    Args:
        output_dir: the run folder.
        is_main: whether this process is rank 0.
    """

    def __init__(self, output_dir: str, is_main: bool):
        self.output_dir = output_dir
        self.is_main = is_main
        self.console = setup_console(output_dir, is_main)
        self._tb = None
        self._jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a") if is_main else None

    @property
    def tb(self):
        if self._tb is None and self.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(self.output_dir, "tb"))
        return self._tb

    def info(self, msg: str) -> None:
        self.console.info(msg)

    def warning(self, msg: str) -> None:
        self.console.warning(msg)

    def metrics(self, row: dict, tb_step: Optional[int] = None, tb_prefix: str = "train") -> None:
        """Append one JSON row to metrics.jsonl and its numbers to TensorBoard."""
        if not self.is_main:
            return
        row = {k: _plain(v) for k, v in row.items()}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if tb_step is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step", "it"):
                    self.tb.add_scalar(f"{tb_prefix}/{k}", v, tb_step)

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        """A [C, H, W] image in [0, 1] to TensorBoard."""
        if self.is_main:
            self.tb.add_image(tag, img.detach().float().clamp(0, 1).cpu(), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        for h in list(self.console.handlers):
            h.close()
            self.console.removeHandler(h)


def memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated (MB) on GPU, resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return float("nan")


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Timer:
    """Wall-clock stopwatch: ``lap()`` returns seconds since the previous lap."""

    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt
