"""Mixed precision: ``TRAIN.AMP`` ('bf16' | 'fp16' | 'none') as a torch dtype and an autocast context."""
from __future__ import annotations

from typing import Optional

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``TRAIN.AMP`` (None for 'none': full precision)."""
    return AMP_DTYPES.get(amp)


def autocast(device_type: str, amp: str) -> torch.autocast:
    """``torch.autocast`` for ``TRAIN.AMP`` on a device type ('cuda', 'cpu'); disabled for 'none'."""
    dtype = amp_dtype(amp)
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)
