import errno
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


def full_state(iteration: int, fill: float = 0.0) -> dict:
    """A state with every key a run needs (Trainer.state_dict plus the RNG states)."""
    return {"model": {"w": torch.full((1000,), fill)}, "optimizer": {"state": {}, "param_groups": []},
            "scaler": {}, "epoch": iteration // 10, "step_in_epoch": iteration % 10, "iteration": iteration,
            "epoch_sums": {}, "best_score": 0.0, "best_epoch": -1, "rng": [ckpt.rng_state()]}


def truncate(path: Path) -> None:
    """Cut a file to half its bytes, as a copy cut short leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_atomic_save_keeps_the_previous_file_as_previous(tmp_path):
    last, prev = str(tmp_path / ckpt.LAST), str(tmp_path / ckpt.PREV)
    for it in (1, 2, 3):
        ckpt.atomic_save(full_state(it), last, previous=prev)
    assert ckpt.load(last)["iteration"] == 3 and ckpt.load(prev)["iteration"] == 2
    assert sorted(os.listdir(tmp_path)) == [ckpt.LAST, ckpt.PREV]


def test_resume_state_rules(tmp_path):
    assert ckpt.resume_state("", str(tmp_path)) is None
    assert ckpt.resume_state("auto", str(tmp_path)) is None
    assert ckpt.resume_state("auto", str(tmp_path / "not_yet")) is None
    torch.save({"model": {}, "epoch": 1}, tmp_path / "checkpoint_best.pth")  # a model only: not resumable
    assert ckpt.resume_state("auto", str(tmp_path)) is None
    ckpt.atomic_save(full_state(7), str(tmp_path / ckpt.LAST))
    found = ckpt.resume_state("auto", str(tmp_path))
    assert found.path == str(tmp_path / ckpt.LAST) and found.state["iteration"] == 7 and found.refused == []
    explicit = ckpt.resume_state(str(tmp_path / ckpt.LAST), "/elsewhere")
    assert explicit.state["iteration"] == 7
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ckpt.resume_state(str(tmp_path / "nope.pth"), str(tmp_path))
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint_best.pth.*lacks \['optimizer'"):
        ckpt.resume_state(str(tmp_path / "checkpoint_best.pth"), str(tmp_path))


def test_auto_resume_takes_the_newest_checkpoint_that_loads(tmp_path):
    # epoch files are older than the last two saves; the ranking reads the iteration each file saved
    for it in (10, 20):
        ckpt.atomic_save(full_state(it, it), str(tmp_path / f"checkpoint_epoch{it // 10}.pth"))
    for it in (25, 28):
        ckpt.atomic_save(full_state(it, it), str(tmp_path / ckpt.LAST), previous=str(tmp_path / ckpt.PREV))
    truncate(tmp_path / ckpt.LAST)
    found = ckpt.resume_state("auto", str(tmp_path))
    assert found.path == str(tmp_path / ckpt.PREV) and found.state["iteration"] == 25
    assert torch.equal(found.state["model"]["w"], torch.full((1000,), 25.0))
    assert [os.path.basename(p) for p, _ in found.refused] == [ckpt.LAST]
    assert "truncated or not a torch.save file" in found.refused[0][1]

    (tmp_path / ckpt.PREV).write_bytes(os.urandom(5000))  # garbage bytes
    torch.save({"model": {"w": torch.zeros(3)}, "epoch": 9}, tmp_path / "checkpoint_epoch2.pth")  # no state
    found = ckpt.resume_state("auto", str(tmp_path))
    assert found.path == str(tmp_path / "checkpoint_epoch1.pth") and found.state["iteration"] == 10
    reasons = dict((os.path.basename(p), r) for p, r in found.refused)
    assert sorted(reasons) == sorted([ckpt.LAST, ckpt.PREV, "checkpoint_epoch2.pth"])
    assert "lacks ['optimizer'" in reasons["checkpoint_epoch2.pth"]


def test_auto_resume_never_starts_afresh_over_unloadable_checkpoints(tmp_path):
    ckpt.atomic_save(full_state(5), str(tmp_path / ckpt.LAST))
    truncate(tmp_path / ckpt.LAST)
    (tmp_path / "checkpoint_epoch3.pth").write_bytes(b"\x00" * 100)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.resume_state("auto", str(tmp_path))
    text = str(e.value)
    assert "none loads" in text and str(tmp_path / ckpt.LAST) in text and "checkpoint_epoch3.pth" in text
    assert "TRAIN.RESUME ''" in text


def mount_tmpfs(folder: Path, size_kb: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")


def unmount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], check=True)


def test_full_disk_raises_naming_folder_and_bytes_and_keeps_the_previous_file(tmp_path):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, 256)
    try:
        last, prev = str(disk / ckpt.LAST), str(disk / ckpt.PREV)
        ckpt.atomic_save(full_state(1), last, previous=prev)
        big = full_state(2)
        big["model"]["w"] = torch.zeros(100_000)  # 400 kB: more than the whole filesystem
        with pytest.raises(ckpt.DiskFullError) as e:
            ckpt.atomic_save(big, last, previous=prev)
        text = str(e.value)
        assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
        assert "No space left on device" in text and last in text and f"the folder {disk} has" in text
        assert f"needs about {ckpt.state_nbytes(big):,} bytes" in text and "bytes free" in text
        assert ckpt.state_nbytes(big) >= 400_000
        assert os.listdir(disk) == [ckpt.LAST]  # no temporary file, nothing moved
        assert ckpt.load(last)["iteration"] == 1
    finally:
        unmount(disk)


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
