"""What every benchmark shares: machine description, CPU-time accounting, JSON output.

Benchmarks run as modules from the repository root: ``python -m benchmarks.<name> ...``.

Every benchmark writes one JSON object with at least ``machine`` (:func:`machine_info`), ``date``
and ``cpu_cores``; numbers taken on a shared machine are noisy, so the load average before and
after each measurement goes into the JSON too (``load_avg``).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

REPO = Path(__file__).resolve().parents[1]

H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM, dense bf16 tensor-core peak
# datasheet dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name();
# the first match wins, so the specific names come before the generic ones
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),  # "NVIDIA H100 80GB HBM3" is the SXM card
    ("H200 NVL", 835.0), ("H200", 989.0),
    ("A100", 312.0),
)


def bf16_peak_tflops(device_name: str | None) -> float | None:
    """Datasheet dense bf16 peak (TFLOP/s) of a GPU named like ``torch.cuda.get_device_name()``.

    None for a device not in :data:`BF16_PEAK_TFLOPS` (pass the peak by hand then).
    """
    for key, tflops in BF16_PEAK_TFLOPS:
        if device_name and key.lower() in device_name.lower():
            return tflops
    return None


def matmul_tflops(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16, repeats: int = 10
                  ) -> float:
    """Measured rate of an ``n x n x n`` matrix product (median of ``repeats`` after 3 warm-ups).

    The ceiling a training step can reach on this device and library; random inputs (zeros run
    faster than real data on some GPUs).
    """
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    times = []
    for i in range(3 + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return 2 * n ** 3 / summarize(times)["median"] / 1e12


def cpu_cores() -> int:
    """CPU cores this process may run on (affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_avg() -> Optional[list[float]]:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """Host, CPU, memory, GPU and library versions, for the JSON of every benchmark."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_cores": cpu_cores(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import psutil
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def today() -> str:
    """ISO date of now (UTC)."""
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def header(**extra: Any) -> dict[str, Any]:
    """The common keys: ``machine``, ``date``, ``cpu_cores``, ``load_avg`` plus ``extra``."""
    return {"machine": machine_info(), "date": today(), "cpu_cores": cpu_cores(), "load_avg": load_avg(), **extra}


def write_json(path: Union[str, os.PathLike], obj: Any) -> str:
    """Write ``obj`` as indented JSON (folders created, written atomically); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_plain) + "\n")
    os.replace(tmp, path)
    return str(path)


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if hasattr(v, "tolist"):  # numpy scalars and arrays
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


class CPUClock:
    """CPU seconds (user + system) spent by this process and its child processes.

    Children are sampled by pid at :meth:`start` and :meth:`stop` (DataLoader workers live for the
    whole measurement, so their CPU time between the two samples is exact); children that start or
    end in between are not counted. Needs psutil.
    """

    def __init__(self) -> None:
        import psutil
        self._psutil = psutil
        self.proc = psutil.Process()
        self._start: dict[int, float] = {}
        self.seconds = 0.0
        self.per_process: dict[int, float] = {}

    def _sample(self) -> dict[int, float]:
        out = {}
        for p in [self.proc] + self.proc.children(recursive=True):
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                pass
        return out

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> float:
        """CPU seconds since :meth:`start` over the processes alive at both samples."""
        end = self._sample()
        self.per_process = {pid: end[pid] - t0 for pid, t0 in self._start.items() if pid in end}
        self.seconds = float(sum(self.per_process.values()))
        return self.seconds


def summarize(values: Iterable[float]) -> dict[str, float]:
    """mean / median / p90 / max of a list of numbers (empty dict when empty)."""
    v = sorted(float(x) for x in values)
    if not v:
        return {}
    return {"mean": sum(v) / len(v), "median": v[len(v) // 2], "p90": v[min(len(v) - 1, int(0.9 * len(v)))],
            "max": v[-1], "n": len(v)}


def wait_for_quiet(max_load: float, timeout_s: float, log=print) -> Optional[float]:
    """Wait up to ``timeout_s`` until the 1-minute load average is below ``max_load``.

    Returns the load average when it returns (None where the OS has none).
    """
    t0 = time.monotonic()
    while True:
        la = load_avg()
        if la is None or la[0] <= max_load or time.monotonic() - t0 >= timeout_s:
            return la[0] if la else None
        log(f"load average {la[0]:.2f} > {max_load}; waiting")
        time.sleep(min(15.0, max(1.0, timeout_s - (time.monotonic() - t0))))


def method_in_path(cfg_path: str, names: Iterable[str]) -> str:
    """The one of ``names`` that ends nearest the end of ``cfg_path`` (``configs/demo/dino.yaml`` -> dino).

    Raises:
        ValueError: when the path names none of them.
    """
    names, path = list(names), Path(cfg_path).as_posix().lower()
    hits = [(path.rfind(n), n) for n in names if n in path]
    if not hits:
        raise ValueError(f"cannot tell the method from the config path {cfg_path!r}; pass --method "
                         f"{'|'.join(names)}")
    return max(hits)[1]
