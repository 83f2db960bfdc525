"""The training loop on a toy method: contract files, exact resume after SIGTERM, two real
processes under torchrun (Gloo), non-finite loss."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.trainer import REQUEUE_EXIT_CODE

ROOT = Path(__file__).resolve().parents[2]
TOY = str(ROOT / "tests" / "engine" / "toy_train.py")
BASE_OPTS = ["DATA.BATCH_SIZE", "4", "TRAIN.EPOCHS", "3", "TRAIN.WARMUP_EPOCHS", "1", "TRAIN.BASE_LR", "0.05",
             "TRAIN.LOG_EVERY", "2", "TRAIN.SAVE_EVERY", "1", "DATA.NUM_WORKERS", "0"]


def run_toy(out, *opts, env=None, launcher=None, wait=True):
    cmd = (launcher or [sys.executable]) + [TOY, "--opts", "OUTPUT", str(out), *BASE_OPTS, *opts]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(out):
    return torch.load(Path(out) / "backbone.pth", weights_only=True)


def test_run_writes_contract_files_and_loss_falls(tmp_path):
    r = run_toy(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "checkpoint_last.pth", "checkpoint_epoch1.pth",
                 "checkpoint_epoch3.pth", "backbone.pth"):
        assert (tmp_path / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    epochs = [r for r in rows(tmp_path) if "epoch_s" in r]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    assert "val_loss" in epochs[-1]
    steps = [r for r in rows(tmp_path) if "step" in r]
    for key in ("epoch", "step", "loss", "lr", "wd", "data_s", "step_s", "samples_per_s", "pred_mean"):
        assert key in steps[0], key
    state = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    assert state["epoch"] == 3 and state["iteration"] == 3 * 16
    assert not list(tmp_path.glob(".*tmp*"))
    # a second start of a finished run does no work and changes nothing
    before = weights(tmp_path)
    r = run_toy(tmp_path)
    assert r.returncode == 0 and "nothing to do" in r.stdout
    assert all(torch.equal(before[k], v) for k, v in weights(tmp_path).items())


@pytest.mark.parametrize("workers", [2])
def test_sigterm_then_resume_equals_uninterrupted(tmp_path, workers):
    opts = ["DATA.NUM_WORKERS", str(workers), "TRAIN.LOG_EVERY", "1"]
    ref = tmp_path / "ref"
    r = run_toy(ref, *opts)
    assert r.returncode == 0, r.stdout + r.stderr

    cut = tmp_path / "cut"
    p = run_toy(cut, *opts, env={"TOY_SLEEP": "0.02"}, wait=False)
    deadline = time.time() + 120
    # wait until the run is inside epoch 1 (mid-run, after a finished epoch)
    while time.time() < deadline:
        if (cut / "metrics.jsonl").exists() and any(r.get("epoch") == 1 and "step" in r for r in rows(cut)):
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    stdout, _ = p.communicate(timeout=120)
    assert p.returncode == REQUEUE_EXIT_CODE, stdout
    assert "received SIGTERM" in stdout
    state = torch.load(cut / "checkpoint_last.pth", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) != (3, 0)  # it really stopped early
    r = run_toy(cut, *opts)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout
    a, b = weights(ref), weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.load(cut / "checkpoint_last.pth", weights_only=True)["iteration"] == 48


def test_two_processes_gloo_one_log_one_checkpoint(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
    r = run_toy(tmp_path, "TRAIN.EPOCHS", "2", launcher=launcher)
    assert r.returncode == 0, r.stdout + r.stderr
    log = (tmp_path / "log.txt").read_text()
    assert "on 2 process(es)" in log
    assert log.count("epoch 1 done") == 1  # rank 1 writes nothing
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pth")) == [
        "checkpoint_epoch1.pth", "checkpoint_epoch2.pth", "checkpoint_last.pth"]
    state = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["iteration"] == 2 * 8  # 64 samples / (2 ranks x 4)


def test_non_finite_loss_stops_naming_batch_and_saves_nothing_bad(tmp_path):
    r = run_toy(tmp_path, "TRAIN.SAVE_EVERY", "0", env={"TOY_NAN_AT": "20"})
    assert r.returncode != 0
    assert "non-finite loss" in r.stderr and "toy" in r.stderr
    state = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    assert state["epoch"] == 1 and state["iteration"] == 16  # the last good epoch, not the NaN step
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
