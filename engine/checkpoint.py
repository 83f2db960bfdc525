"""Checkpoints: atomic writes, full training state, weights-only loading, resume under faults.

Everything saved here loads with ``torch.load(weights_only=True)``: tensors, numbers, strings,
lists and dicts only (RNG states are converted to tensors and lists).

Faults: writing ``checkpoint_last.pth`` moves the one before it to ``checkpoint_prev.pth``, so a
torn or corrupt last file always has a full-state fallback; ``TRAIN.RESUME auto`` takes the
newest full-state checkpoint of OUTPUT that loads (:func:`resume_state`); a write that runs out
of disk space raises :class:`DiskFullError` and leaves the file it would have replaced as it was.
"""
from __future__ import annotations

import errno
import os
import random
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

LAST = "checkpoint_last.pth"
PREV = "checkpoint_prev.pth"  # the checkpoint_last.pth before the newest one
EPOCH_RE = re.compile(r"^checkpoint_epoch(\d+)\.pth$")
# what a checkpoint must hold to continue a run (Trainer.state_dict); checkpoint_best.pth holds only the model
STATE_KEYS = ("model", "optimizer", "scaler", "epoch", "step_in_epoch", "iteration", "epoch_sums",
              "best_score", "best_epoch", "rng")
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


class DiskFullError(OSError):
    """A checkpoint did not fit on its filesystem (ENOSPC or EDQUOT); nothing was replaced.

    The message names the file, its folder, the bytes the checkpoint needs (about) and the bytes free.
    """


class CheckpointError(RuntimeError):
    """No checkpoint of a run folder can be resumed from; the message lists each file and why."""


def state_nbytes(obj: Any) -> int:
    """Bytes of the tensor storages in a (nested) state, each storage counted once: about the size
    ``torch.save`` writes (plus a few KB of pickle)."""
    seen: dict[int, int] = {}

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            seen[st.data_ptr() or id(st)] = st.nbytes()
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(obj)
    return sum(seen.values())


def _out_of_space(e: BaseException) -> Optional[OSError]:
    """The ENOSPC/EDQUOT OSError behind ``e`` (torch.save wraps it in a RuntimeError), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str, previous: Optional[str] = None) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A process killed mid-write leaves the previous file at ``path`` intact. With ``previous``, the
    file at ``path`` is moved there once the new one is fully written (the old ``previous`` is
    removed first, so the disk never holds more than two copies besides the temporary file).

    Raises:
        DiskFullError: the filesystem ran out of space (or quota); the temporary file is removed and
            ``path`` (and ``previous`` if ``path`` did not exist) are as they were.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    if previous is not None and os.path.exists(previous) and os.path.exists(path):
        os.remove(previous)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and os.path.exists(path):
            os.replace(path, previous)
        os.replace(tmp, path)
        _fsync_dir(folder)
    except Exception as e:
        full = _out_of_space(e)
        if full is None:
            raise
        if os.path.exists(tmp):
            os.remove(tmp)
        free = shutil.disk_usage(folder).free
        raise DiskFullError(full.errno, (
            f"{os.strerror(full.errno)} writing {path}: the checkpoint needs about {state_nbytes(obj):,} bytes "
            f"and the folder {folder} has {free:,} bytes free; {os.path.basename(path)} was left as it was. "
            "Free space there (or set OUTPUT elsewhere, copying the run folder) and start the same command "
            "again to resume")) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: str, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``; a clear error when it is missing or unreadable."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, whose index is at its end
            raise RuntimeError(f"checkpoint {path!r} is truncated or not a torch.save file: no zip index at its "
                               f"end ({os.path.getsize(path):,} bytes); torch.load says: {e}") from e
        raise RuntimeError(f"checkpoint {path!r} cannot be loaded with weights_only=True: {e}") from e


def rng_state() -> dict:
    """This process's Python, NumPy, torch CPU (and CUDA) RNG states, weights-only serialisable."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "python": [version, list(internal), gauss_next],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def missing_state_keys(state: Any) -> list[str]:
    """The :data:`STATE_KEYS` a loaded checkpoint lacks (all of them when it is not a dict)."""
    if not isinstance(state, dict):
        return list(STATE_KEYS)
    return [k for k in STATE_KEYS if k not in state]


def load_full_state(path: str) -> dict:
    """Load a full training state; an error naming the file when it is unreadable or lacks state keys."""
    state = load(path)
    missing = missing_state_keys(state)
    if missing:
        raise CheckpointError(f"checkpoint {path!r} loads but is not a full training state: it lacks {missing}")
    return state


def full_state_files(output_dir: str) -> list[str]:
    """The files of ``output_dir`` that may hold a full training state: checkpoint_last.pth,
    checkpoint_prev.pth and checkpoint_epochN.pth (not checkpoint_best.pth, which holds the model only)."""
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in os.listdir(output_dir) if n in (LAST, PREV) or EPOCH_RE.match(n)]
    return [os.path.join(output_dir, n) for n in sorted(names)]


@dataclass
class Resumable:
    """The checkpoint a run continues from: its path, its loaded state, and the files refused on the
    way as ``(path, reason)``, newest first."""
    path: str
    state: dict
    refused: list[tuple[str, str]] = field(default_factory=list)


def _progress(path: str) -> tuple[int, int, float]:
    """(iteration, epoch, mtime) saved in a checkpoint, read without loading its tensors (mmap);
    when that fails, a plain load gives the reason (or the numbers, where mmap is not supported)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        state = load(path)
    missing = missing_state_keys(state)
    if missing:
        raise CheckpointError(f"not a full training state: it lacks {missing}")
    return int(state["iteration"]), int(state["epoch"]), os.path.getmtime(path)


def newest_loadable(output_dir: str) -> Optional[Resumable]:
    """The newest full-state checkpoint of ``output_dir`` that loads, by the global iteration it
    saved (then epoch, then modification time).

    Returns None when the folder holds no full-state checkpoint file.

    Raises:
        CheckpointError: there are such files but none loads; the message lists each with its reason.
    """
    refused: list[tuple[str, str]] = []
    ranked = []
    for path in full_state_files(output_dir):
        try:
            ranked.append((_progress(path), path))
        except Exception as e:  # any unreadable file is refused with its reason, never resumed from
            refused.append((path, _reason(e)))
    for _, path in sorted(ranked, reverse=True):
        try:
            return Resumable(path, load_full_state(path), refused)
        except Exception as e:
            refused.append((path, _reason(e)))
    if refused:
        listing = "; ".join(f"{p}: {r}" for p, r in refused)
        raise CheckpointError(f"TRAIN.RESUME auto: {output_dir} holds {len(refused)} checkpoint file(s) and none "
                              f"loads ({listing}). Restore a good copy, or set TRAIN.RESUME '' (or another "
                              "OUTPUT) to start from scratch")
    return None


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def resume_state(resume: str, output_dir: str) -> Optional[Resumable]:
    """The checkpoint TRAIN.RESUME points at, loaded: '' = none; 'auto' = the newest full-state
    checkpoint of OUTPUT that loads (:func:`newest_loadable`); anything else = that file, which must
    exist and hold a full training state."""
    if resume == "":
        return None
    if resume == "auto":
        return newest_loadable(output_dir)
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"TRAIN.RESUME = {resume!r} does not exist")
    return Resumable(resume, load_full_state(resume))


def load_state_strict(module: torch.nn.Module, state: dict, what: str) -> None:
    """``load_state_dict`` that fails naming missing and unexpected keys (no strict=False and hope)."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{what}: state does not match the model: missing {missing[:10]} "
                           f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)})")
