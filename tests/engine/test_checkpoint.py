import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]


def test_atomic_save_round_trip_weights_only(tmp_path):
    obj = {"w": torch.arange(5.0), "epoch": 3, "names": ["a"], "rng": ckpt.rng_state()}
    ckpt.atomic_save(obj, str(tmp_path / "c.pth"))
    back = ckpt.load(str(tmp_path / "c.pth"))
    assert torch.equal(back["w"], obj["w"]) and back["epoch"] == 3
    assert os.listdir(tmp_path) == ["c.pth"]


def test_rng_state_restores_every_generator():
    state = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_kill_during_write_leaves_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "checkpoint_last.pth"
    ckpt.atomic_save({"w": torch.ones(3), "epoch": 1}, str(path))
    code = (f"import sys, torch; sys.path.insert(0, {str(ROOT)!r}); from engine.checkpoint import atomic_save; "
            f"print('start', flush=True); atomic_save({{'w': torch.zeros(150_000_000), 'epoch': 2}}, {str(path)!r})")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "start"
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".checkpoint_last.pth.tmp*")):
        time.sleep(0.01)
    time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    back = ckpt.load(str(path))
    assert back["epoch"] == 1 and torch.equal(back["w"], torch.ones(3))


def test_resume_path_rules(tmp_path):
    assert ckpt.resume_path("", str(tmp_path)) is None
    assert ckpt.resume_path("auto", str(tmp_path)) is None
    (tmp_path / ckpt.LAST).write_bytes(b"x")
    assert ckpt.resume_path("auto", str(tmp_path)) == str(tmp_path / ckpt.LAST)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ckpt.resume_path(str(tmp_path / "nope.pth"), str(tmp_path))


def test_load_names_file_on_failure(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="bad.pth"):
        ckpt.load(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ckpt.load(str(tmp_path / "missing.pth"))


def test_strict_state_loading_names_keys():
    m = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="missing"):
        ckpt.load_state_strict(m, {"weight": torch.zeros(2, 2)}, "test")
