"""Checkpoints: atomic writes, full training state, weights-only loading.

Everything saved here loads with ``torch.load(weights_only=True)``: tensors, numbers, strings,
lists and dicts only (RNG states are converted to tensors and lists).
"""
from __future__ import annotations

import os
import random
from typing import Any, Optional

import numpy as np
import torch

LAST = "checkpoint_last.pth"


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A process killed mid-write leaves the previous file at ``path`` intact.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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


def resume_path(resume: str, output_dir: str) -> Optional[str]:
    """The checkpoint TRAIN.RESUME points at: 'auto' = OUTPUT/checkpoint_last.pth when present,
    '' = none, anything else = that path (which must exist)."""
    if resume == "":
        return None
    if resume == "auto":
        path = os.path.join(output_dir, LAST)
        return path if os.path.isfile(path) else None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"TRAIN.RESUME = {resume!r} does not exist")
    return resume


def load_state_strict(module: torch.nn.Module, state: dict, what: str) -> None:
    """``load_state_dict`` that fails naming missing and unexpected keys (no strict=False and hope)."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{what}: state does not match the model: missing {missing[:10]} "
                           f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)})")
