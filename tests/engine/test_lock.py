"""OUTPUT/run.lock: created atomically with its holder named, refused while a live holder has it,
taken over (with a message) when it is stale: a dead process of this host, our own Slurm job
requeued, our own torchrun run restarted. Runs of the real trainer: tests/engine/test_trainer.py."""
import json
import socket
import subprocess
import sys

import pytest

from engine import lock as run_lock
from engine.lock import RunLock, RunLockedError


def write_lock(folder, **fields) -> dict:
    holder = {"host": socket.gethostname(), "pid": 1, "proc_start": None, "started": "2026-01-02 03:04:05 +0000",
              "slurm_job_id": "", "torchelastic_run_id": "", "torchelastic_restart": 0, **fields}
    (folder / run_lock.NAME).write_text(json.dumps(holder))
    return holder


@pytest.fixture
def live_pid():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p.pid
    p.kill()
    p.wait()


@pytest.fixture
def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_acquire_writes_the_holder_and_release_removes_it(tmp_path):
    lock = RunLock(str(tmp_path))
    assert lock.acquire() is None
    holder = json.loads((tmp_path / run_lock.NAME).read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] == lock.me["pid"] and holder["started"]
    lock.release()
    assert not (tmp_path / run_lock.NAME).exists()
    lock.release()  # twice is harmless


def test_a_live_holder_refuses_a_second_run_naming_it(tmp_path, live_pid):
    write_lock(tmp_path, pid=live_pid, proc_start=run_lock._proc_start(live_pid), slurm_job_id="11")
    with pytest.raises(RunLockedError) as e:
        RunLock(str(tmp_path)).acquire()
    text = str(e.value)
    assert str(tmp_path) in text and f"pid {live_pid}" in text and socket.gethostname() in text
    assert "started 2026-01-02 03:04:05" in text and "slurm_job_id 11" in text
    assert json.loads((tmp_path / run_lock.NAME).read_text())["pid"] == live_pid  # untouched


@pytest.mark.parametrize("case", ["dead pid", "reused pid", "same slurm job", "torchrun restart"])
def test_a_stale_lock_is_taken_over_with_the_reason(tmp_path, monkeypatch, live_pid, dead_pid, case):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    if case == "dead pid":
        write_lock(tmp_path, pid=dead_pid)
        expect = f"its process {dead_pid} on this host is no longer running"
    elif case == "reused pid":  # a live process with that pid, started after the lock's holder
        write_lock(tmp_path, pid=live_pid, proc_start=run_lock._proc_start(live_pid) - 1)
        expect = "no longer running"
    elif case == "same slurm job":  # requeued: on another node, its old pid cannot be checked
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        write_lock(tmp_path, host="node-17", pid=live_pid, slurm_job_id="4242")
        expect = "this Slurm job (4242)"
    else:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-x")
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        write_lock(tmp_path, host="node-3", pid=live_pid, torchelastic_run_id="run-x", torchelastic_restart=0)
        expect = "this torchrun run (run-x) before restart 1"
    lock = RunLock(str(tmp_path))
    message = lock.acquire()
    assert message is not None and expect in message and str(tmp_path / run_lock.NAME) in message
    assert json.loads((tmp_path / run_lock.NAME).read_text())["pid"] == lock.me["pid"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_lock.NAME]  # nothing left aside
    lock.release()


@pytest.mark.parametrize("case", ["other host", "other slurm job", "default torchrun id", "unreadable"])
def test_holders_that_cannot_be_shown_dead_are_respected(tmp_path, monkeypatch, dead_pid, case):
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default --rdzv-id: shared by unrelated runs
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    if case == "unreadable":
        (tmp_path / run_lock.NAME).write_text("{half")
    else:
        write_lock(tmp_path, host="node-9" if case != "other slurm job" else "node-8", pid=dead_pid,
                   slurm_job_id="2" if case == "other slurm job" else "", torchelastic_run_id="none")
    with pytest.raises(RunLockedError, match=f"delete {tmp_path / run_lock.NAME}"):
        RunLock(str(tmp_path)).acquire()


def test_release_leaves_a_lock_that_another_run_took_over(tmp_path, live_pid):
    first = RunLock(str(tmp_path))
    first.acquire()
    theirs = write_lock(tmp_path, pid=live_pid)
    first.release()
    assert json.loads((tmp_path / run_lock.NAME).read_text()) == theirs


def test_a_second_lock_of_this_process_takes_over_and_outlives_the_first(tmp_path):
    first, second = RunLock(str(tmp_path)), RunLock(str(tmp_path))
    first.acquire()
    assert "this process's own lock" in second.acquire()
    first.release()
    assert (tmp_path / run_lock.NAME).exists()
    second.release()
    assert not (tmp_path / run_lock.NAME).exists()
