"""Loader faults end the run in seconds, non-zero, naming the scan or the worker: an exception in a
worker, a worker killed by SIGKILL, a read that never returns (DATA.TIMEOUT); each with two workers,
in one process and in two ranks under torchrun (Gloo). In-process checks of the names the loader
gives: the batch waited for, the prefetched batches of an abandoned pass, rows without a name."""
import gc
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from config import get_config
from engine import dist

ROOT = Path(__file__).resolve().parents[2]
TOY = str(ROOT / "tests" / "engine" / "toy_train.py")
OPTS = ["DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "2", "DATA.TIMEOUT", "2", "TRAIN.EPOCHS", "2",
        "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.SAVE_EVERY", "0"]
LIMIT_S = 90  # a hang is what is tested: a run still going after this long has hung
PORTS = {"TOY_FAIL_AT": 29541, "TOY_KILL_WORKER_AT": 29542, "TOY_HANG_AT": 29543}


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def run_fault(out, fault: str, ranks: int) -> tuple[int, str, float]:
    """Run the toy training with ``fault`` at scan toy5 in its own process group; returns
    (exit status, output, seconds). Fails the test if it runs past LIMIT_S or leaves processes behind."""
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                     "--master_port", str(PORTS[fault])]
    cmd = launcher + [TOY, "--opts", "OUTPUT", str(out), *OPTS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", fault: "5"}
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        text, _ = p.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        text, _ = p.communicate()
        pytest.fail(f"{fault} with {ranks} rank(s): still running after {LIMIT_S}s\n{text[-4000:]}")
    seconds = time.monotonic() - t0
    deadline = time.monotonic() + 10  # orphans are reaped by init a moment after the launcher exits
    while group_alive(p.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if group_alive(p.pid):
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"{fault}: processes of the run outlived it\n{text[-4000:]}")
    return p.returncode, text, seconds


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("fault", ["TOY_FAIL_AT", "TOY_KILL_WORKER_AT", "TOY_HANG_AT"])
def test_loader_fault_ends_run_nonzero_naming_scan_or_worker(tmp_path, fault, ranks):
    code, text, seconds = run_fault(tmp_path, fault, ranks)
    assert code != 0, text[-4000:]
    if fault == "TOY_FAIL_AT":
        assert "cannot read toy5" in text  # the worker's own error
        assert re.search(r"DataLoader \(rank \d\) waiting for batch \d+ of this pass: scans of epoch 0 [^\n]*toy5",
                         text), text[-4000:]
    elif fault == "TOY_KILL_WORKER_AT":
        # torch's SIGCHLD handler may report the death wherever the main process is: the pid is named
        # always, the scans when the loader sees it (test_killed_worker_names_the_batches_it_was_given)
        assert re.search(r"DataLoader worker \(pid(\(s\))? \d+\) (exited unexpectedly|is killed by signal)", text), \
            text[-4000:]
    else:
        assert re.search(r"LoaderError: DataLoader timed out after 2(\.0)? seconds \(rank \d, DATA.TIMEOUT\) "
                         r"waiting for batch \d+ of this pass: one of its scans of epoch 0 [^\n]*toy5", text), \
            text[-4000:]
    if ranks > 1:
        # the other rank ended on its own (its collective lost the peer), before torchrun's
        # 30 s grace period would have escalated to SIGKILL
        assert "forcefully exiting" not in text, text[-4000:]
        assert "Connection closed by peer" in text or "SIGTERM" in text, text[-4000:]
    print(f"{fault} x {ranks} rank(s): exit {code} after {seconds:.1f}s")


# ------------------------------------------------------------------ in-process: what the errors name
class Rows(Dataset):
    """Rows 0..n-1 (tensors ``[index]``); reading row ``slow_at`` sleeps ``seconds``, row ``fail_at`` raises."""

    def __init__(self, n: int, slow_at: int = -1, seconds: float = 0.0, fail_at: int = -1):
        self.n, self.slow_at, self.seconds, self.fail_at = n, slow_at, seconds, fail_at

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        index, _ = key
        if index == self.fail_at:
            raise ValueError("bad voxels")
        if index == self.slow_at:
            time.sleep(self.seconds)
        return torch.tensor([index])


class Scans(Rows):
    """Rows that loader errors name ``scan<index>``."""

    def describe(self, index: int) -> str:
        return f"scan{index}"


def loader_for(dataset, workers=2, timeout=1):
    cfg = get_config(["--opts", "DATA.BATCH_SIZE", "2", "DATA.NUM_WORKERS", str(workers), "DATA.TIMEOUT",
                      str(timeout), "DATA.PREFETCH_FACTOR", "2", "DATA.PIN_MEMORY", "False"])
    return dist.make_loader(dataset, cfg, train=False)  # no shuffle: batch k holds rows 2k, 2k+1


def close(loader):
    """End the loader's workers as the exit hook does (SIGKILL; torch's graceful shutdown waits 5 s
    for each worker still busy), without torch's SIGCHLD handler reporting their deaths."""
    handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        for w in getattr(loader._iterator, "_workers", []):
            w.kill()
            w.join()
        del loader
        gc.collect()
    finally:
        signal.signal(signal.SIGCHLD, handler)


def test_timeout_names_the_scans_of_the_batch_waited_for():
    loader = loader_for(Scans(12, slow_at=5, seconds=2.5))
    assert isinstance(loader, dist.FailFastLoader) and loader.timeout == 1
    seen = []
    with pytest.raises(dist.LoaderError, match=r"timed out after 1(\.0)? seconds .*batch 2 of this pass: "
                                               r"one of its scans of epoch 0 scan4, scan5 stalls"):
        for batch in loader:
            seen.append(batch.flatten().tolist())
    assert seen == [[0, 1], [2, 3]]
    close(loader)


def test_timeout_while_restarting_names_the_abandoned_pass_prefetches():
    loader = loader_for(Scans(20, slow_at=9, seconds=2.5))
    assert next(iter(loader)).flatten().tolist() == [0, 1]  # abandoned; batches 1-4 are in flight
    with pytest.raises(dist.LoaderError, match=r"prefetched for the previous pass: one of its scans of epoch 0 "
                                               r"scan2, scan3, scan4, scan5, scan6, scan7, scan8, scan9 stalls"):
        iter(loader).__next__()
    close(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_error_keeps_its_type_and_gains_the_batch_scans(workers):
    loader = loader_for(Scans(8, fail_at=3), workers=workers)
    with pytest.raises(ValueError, match="bad voxels") as info:
        list(loader)
    assert info.value.__notes__ == ["DataLoader (rank 0) waiting for batch 1 of this pass: "
                                    "scans of epoch 0 scan2, scan3"]
    close(loader)


class KillsItsWorker(Scans):
    def __getitem__(self, key):
        if key[0] == 5 and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(key)


def test_killed_worker_names_the_batches_it_was_given():
    loader = loader_for(KillsItsWorker(12), timeout=30)
    with pytest.raises((dist.LoaderError, RuntimeError), match=r"DataLoader worker \(pid") as info:
        list(loader)
    if isinstance(info.value, dist.LoaderError):  # else torch's SIGCHLD handler spoke first, elsewhere
        message = str(info.value)
        assert re.search(r"it died reading one of batches [\d, ]*2[\d, ]*: scans of epoch 0 [^.]*scan5", message)
    close(loader)  # the survivor can be stuck on the queue lock the dead one held


def test_rows_without_describe_are_named_by_index_and_long_lists_cut():
    assert dist.describe_rows(Rows(4), [(1, 0), (3, 0)]) == "row 1, row 3"
    assert dist.describe_rows(Scans(100), [(i, 0) for i in range(70)], limit=2) == "scan0, scan1 and 68 more"
    assert loader_for(Scans(4), workers=0).timeout == 0  # torch accepts a timeout only with workers
