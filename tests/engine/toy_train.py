"""A tiny method and dataset for engine tests; runnable under python or torchrun.

    python tests/engine/toy_train.py --opts OUTPUT DIR TRAIN.EPOCHS 3 ...
Environment:
- TOY_SLEEP: seconds per sample, to leave time for signals; TOY_N: training samples.
- TOY_NAN_AT: iteration, or inclusive range ``A-B`` of iterations, at which the loss becomes NaN;
  TOY_NAN_RANK: only on this rank.
- TOY_RANK_WEIGHTS: each rank saves its final model to ``OUTPUT/rank<r>.pth``.
- TOY_KILL_AT: iteration at which rank 0 SIGKILLs itself, in the first torchrun attempt only.
- TOY_PAD: floats of an extra buffer that makes checkpoints bigger.
- TOY_FILL_AT + TOY_FILL_LEAVE: at the first step of that epoch rank 0 fills OUTPUT's filesystem with
  OUTPUT/fill.bin until TOY_FILL_LEAVE bytes are free.
- Loader faults at a sample index: TOY_FAIL_AT (reading it raises, naming the scan),
  TOY_KILL_WORKER_AT (the DataLoader worker reading it SIGKILLs itself), TOY_HANG_AT (reading it
  never returns).
"""
import os
import shutil
import signal
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from config import get_config  # noqa: E402
from engine import dist  # noqa: E402
from engine.trainer import Trainer  # noqa: E402


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.w = np.random.default_rng(123).normal(size=16).astype(np.float32)

    def __len__(self):
        return self.n

    def describe(self, index):
        return f"toy{index}"

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        if index == int(os.environ.get("TOY_FAIL_AT", "-1")):
            raise RuntimeError(f"cannot read toy{index}")
        if index == int(os.environ.get("TOY_KILL_WORKER_AT", "-1")) and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        if index == int(os.environ.get("TOY_HANG_AT", "-1")):
            while True:
                time.sleep(60)
        rng = np.random.default_rng([self.seed, epoch, index])
        x = np.random.default_rng(index).normal(size=16).astype(np.float32)
        x = x + 0.1 * rng.normal(size=16).astype(np.float32)  # "augmentation"
        time.sleep(float(os.environ.get("TOY_SLEEP", "0")))
        return {"x": torch.from_numpy(x), "y": torch.tensor(float(x @ self.w)), "index": index,
                "id": f"toy{index}"}


def collate(samples):
    out = torch.utils.data.default_collate([{k: v for k, v in s.items() if k != "id"} for s in samples])
    out["id"] = [s["id"] for s in samples]
    return out


class ToyMethod(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32))
        self.head = nn.Linear(32, 1)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        if int(os.environ.get("TOY_PAD", "0")):
            self.register_buffer("pad", torch.zeros(int(os.environ["TOY_PAD"])))
        first, _, last = os.environ.get("TOY_NAN_AT", "").partition("-")
        self.nan_at = range(int(first), int(last or first) + 1) if first else range(0)
        if os.environ.get("TOY_NAN_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
            self.nan_at = range(0)
        self.kill_at = int(os.environ.get("TOY_KILL_AT", "-1"))
        self.fill_at = int(os.environ.get("TOY_FILL_AT", "-1"))
        self.fill_dir = ""  # set to OUTPUT by main()
        self.it = 0

    def on_step_start(self, it, epoch, total_iters):
        self.it = it
        rank0 = dist.get_rank() == 0
        if it == self.kill_at and rank0 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        if epoch == self.fill_at and rank0 and self.fill_dir:
            self.fill_at = -1
            leave = int(os.environ.get("TOY_FILL_LEAVE", "0"))
            with open(os.path.join(self.fill_dir, "fill.bin"), "wb") as f:
                f.write(b"\0" * max(0, shutil.disk_usage(self.fill_dir).free - leave))

    def on_step_end(self, it):
        self.steps_seen += 1

    def forward(self, batch):
        h = self.backbone(batch["x"])
        h = h * (torch.rand_like(h) > 0.1)  # uses the global torch RNG, as MAE masking does
        pred = self.head(h).squeeze(-1)
        loss = ((pred - batch["y"]) ** 2).mean()
        if self.it in self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "pred_mean": pred.mean().detach()}


def main(argv=None):
    cfg = get_config(argv)
    dist.init_distributed()
    dist.seed_everything(cfg.SEED)
    data = ToyData(int(os.environ.get("TOY_N", "64")), cfg.SEED)
    loader = dist.make_loader(data, cfg, train=True, collate_fn=collate)
    val = dist.make_loader(ToyData(10, cfg.SEED), cfg, train=False, collate_fn=collate)
    method = ToyMethod()
    method.fill_dir = cfg.OUTPUT
    try:
        Trainer(cfg, method, loader, val).fit()
        if os.environ.get("TOY_RANK_WEIGHTS"):
            torch.save(method.state_dict(), os.path.join(cfg.OUTPUT, f"rank{dist.get_rank()}.pth"))
    finally:
        dist.cleanup()


if __name__ == "__main__":
    main()
