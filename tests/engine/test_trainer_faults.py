"""Real toy runs under faults: damaged checkpoints under TRAIN.RESUME auto, a full disk (a small
tmpfs, two ranks), and OUTPUT/run.lock against a second run, after SIGKILL, a Slurm requeue and a
torchrun restart. docs/cluster.md, "Faults: what a run does and what is lost", lists them."""
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt
from engine import lock as run_lock
from engine.trainer import REQUEUE_EXIT_CODE
from tests.engine.test_checkpoint import mount_tmpfs, truncate, unmount
from tests.engine.test_trainer import rows, run_toy


def wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def model_of(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 3-epoch toy run with checkpoint_epoch{1,2,3}.pth, last and prev."""
    out = tmp_path_factory.mktemp("finished")
    r = run_toy(out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ckpt.load(str(out / ckpt.PREV))["iteration"] == 32 and not (out / run_lock.NAME).exists()
    return out


@pytest.mark.parametrize("damage", ["truncated last", "garbage last and prev"])
def test_auto_resume_skips_damaged_checkpoints_and_ends_like_an_uninterrupted_run(tmp_path, finished_run, damage):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "checkpoint_epoch3.pth").unlink()
    if damage == "truncated last":
        (out / "checkpoint_epoch2.pth").unlink()  # the same state as prev
        truncate(out / ckpt.LAST)
        expect = ckpt.PREV
    else:
        (out / ckpt.LAST).write_bytes(os.urandom(20_000))
        (out / ckpt.PREV).write_bytes(os.urandom(20_000))
        expect = "checkpoint_epoch2.pth"
    r = run_toy(out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"refusing checkpoint {out / ckpt.LAST}: RuntimeError" in r.stdout
    assert f"resumed from {out / expect} (the newest that loads" in r.stdout and "iteration 32" in r.stdout
    end = torch.load(out / ckpt.LAST, weights_only=True)
    assert end["iteration"] == 48
    ref = model_of(finished_run / ckpt.LAST)
    assert all(torch.equal(ref[k], end["model"][k]) for k in ref)


def test_auto_resume_stops_when_no_checkpoint_loads(tmp_path, finished_run):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    truncate(out / ckpt.LAST)
    (out / ckpt.PREV).write_bytes(b"")
    for n in (1, 2, 3):
        (out / f"checkpoint_epoch{n}.pth").write_bytes(os.urandom(1000))
    before = {p.name: p.read_bytes() for p in out.glob("checkpoint_*.pth")}
    metrics = (out / "metrics.jsonl").read_text()
    r = run_toy(out)
    assert r.returncode != 0
    assert "CheckpointError" in r.stderr and "none loads" in r.stderr
    for name in before:
        assert str(out / name) in r.stderr, name
    assert {p.name: p.read_bytes() for p in out.glob("checkpoint_*.pth")} == before  # nothing overwritten
    assert (out / "metrics.jsonl").read_text() == metrics  # and no fresh start
    assert not (out / run_lock.NAME).exists()


def test_full_disk_stops_every_rank_naming_folder_and_bytes(tmp_path):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, 1024)
    try:
        out = disk / "run"
        # a 256 kB buffer makes each checkpoint about 290 kB; at epoch 1 the disk is filled up to 64 kB
        env = {"TOY_PAD": str(64 * 1024), "TOY_FILL_AT": "1", "TOY_FILL_LEAVE": str(64 * 1024)}
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", "29533"]
        r = run_toy(out, "TRAIN.SAVE_EVERY", "0", env=env, launcher=launcher)
        text = r.stdout + r.stderr
        assert r.returncode != 0, text
        message = f"No space left on device writing {out / ckpt.LAST}: the checkpoint needs about"
        assert f"[rank0]: engine.checkpoint.DiskFullError: [Errno 28] {message}" in text, text
        assert f"[rank1]: engine.checkpoint.DiskFullError: [Errno 28] rank 0 stopped the run: {message}" in text
        assert f"the folder {out} has" in text and "bytes free" in text
        assert sorted(p.name for p in out.glob("*.pth*")) + sorted(p.name for p in out.glob(".*")) == [
            "backbone.pth", ckpt.LAST]  # no temporary file left, nothing moved aside
        assert ckpt.load_full_state(str(out / ckpt.LAST))["epoch"] == 1  # the epoch before the full disk
        assert not (out / run_lock.NAME).exists()
    finally:
        unmount(disk)


def test_second_run_is_refused_while_the_first_holds_the_folder(tmp_path):
    first = run_toy(tmp_path, env={"TOY_SLEEP": "0.1"}, wait=False)
    try:
        wait_for(lambda: (tmp_path / run_lock.NAME).exists() and (tmp_path / "metrics.jsonl").exists(), "the lock")
        config = (tmp_path / "config.yaml").read_text()
        t0 = time.time()
        second = run_toy(tmp_path, "TRAIN.EPOCHS", "2")
        assert second.returncode != 0 and first.poll() is None, second.stdout + second.stderr
        assert "RunLockedError" in second.stderr and f"{tmp_path} is in use by another run" in second.stderr
        assert f"host {socket.gethostname()}, pid {first.pid}, started " in second.stderr
        assert time.time() - t0 < 60
        assert (tmp_path / "config.yaml").read_text() == config  # the refused run wrote nothing
        first.send_signal(signal.SIGTERM)  # a run that stops on a signal gives the lock back too
        stdout, _ = first.communicate(timeout=120)
        assert first.returncode == REQUEUE_EXIT_CODE, stdout
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert not (tmp_path / run_lock.NAME).exists()


def test_sigkilled_run_leaves_its_lock_and_the_next_start_takes_it_over(tmp_path):
    first = run_toy(tmp_path, env={"TOY_SLEEP": "0.05"}, wait=False)
    try:
        wait_for(lambda: any(r.get("epoch") == 1 for r in rows(tmp_path)) if (tmp_path / "metrics.jsonl").exists()
                 else False, "epoch 1")
    finally:
        first.kill()
        first.wait()
    assert json.loads((tmp_path / run_lock.NAME).read_text())["pid"] == first.pid
    r = run_toy(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"took over the lock {tmp_path / run_lock.NAME}" in r.stdout
    assert f"its process {first.pid} on this host is no longer running" in r.stdout
    assert "resumed from" in r.stdout and not (tmp_path / run_lock.NAME).exists()


def test_requeued_slurm_job_takes_over_its_lock(tmp_path):
    holder = {"host": "node-17", "pid": os.getpid(), "started": "2026-01-02 03:04:05 +0000",
              "slurm_job_id": "4242", "torchelastic_run_id": "", "torchelastic_restart": 0}
    (tmp_path / run_lock.NAME).write_text(json.dumps(holder))
    r = run_toy(tmp_path, "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", env={"SLURM_JOB_ID": "4242"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "took over the lock" in r.stdout and "host node-17" in r.stdout and "this Slurm job (4242)" in r.stdout
    assert not (tmp_path / run_lock.NAME).exists()


def test_torchrun_restart_takes_over_the_lock_and_resumes(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--max-restarts", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:29535", "--rdzv-id", "toyrun"]
    # rank 0 SIGKILLs itself at iteration 20 (epoch 1) of the first attempt; torchrun starts it again
    r = run_toy(tmp_path, env={"TOY_KILL_AT": "20"}, launcher=launcher)
    assert r.returncode == 0, r.stdout + r.stderr
    log = (tmp_path / "log.txt").read_text()
    assert "took over the lock" in log and "this torchrun run (toyrun) before restart 1" in log
    assert "resumed from" in log and "iteration 16" in log
    assert ckpt.load(str(tmp_path / ckpt.LAST))["iteration"] == 48 and not (tmp_path / run_lock.NAME).exists()
