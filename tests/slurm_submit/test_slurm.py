"""slurm_submit/*.sbatch on a real single-node Slurm cluster (fixture in conftest.py).

Jobs are submitted from a folder outside the repository, with CPU resources given on the sbatch
command line (--gpus-per-node=0 overrides the scripts' GPU request), as a user would. MAE
pretraining runs the demo config on a tiny phantom; preemption is exercised both ways a cluster
does it: SIGUSR1 to the batch shell (what ``#SBATCH --signal=B:USR1@T`` sends before the time
limit; the script requeues the job itself) and ``scontrol requeue`` (SIGTERM to every process,
Slurm requeues). Either way the job must come back, resume from checkpoint_last.pth and finish.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "slurm_submit"
CPU_JOB = ["--gpus-per-node=0", f"--cpus-per-task={min(2, os.cpu_count() or 1)}", "--time=15:00"]
# the demo MAE config shrunk to seconds per epoch: 4 training volumes of 32^3, 2 steps per epoch
TINY = ["DATA.ROI", "[32,32,32]", "DATA.SPACING", "[7.5,7.5,7.5]", "DATA.BATCH_SIZE", "2",
        "DATA.VAL_CSV", "", "MAE.VIS_EVERY", "0", "TRAIN.LOG_EVERY", "1", "TRAIN.WARMUP_EPOCHS", "1",
]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    subprocess.run([sys.executable, "-m", "data.phantom", "--out", str(out), "--n", "8", "--size", "32"],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    return out


def _out_file(cluster, job_id: str) -> Path:
    return Path(cluster.job(job_id)["StdOut"])


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} does not exist)"


def _epoch_rows(run: Path) -> list[dict]:
    """The per-epoch rows of metrics.jsonl (step rows carry "step", epoch rows "epoch_s")."""
    f = run / "metrics.jsonl"
    if not f.exists():
        return []
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return [r for r in rows if "epoch_s" in r]


def _submit_mae(cluster, phantom: Path, submit_dir: Path, run: Path, epochs: int, workers: int,
                env: dict | None = None) -> str:
    return cluster.sbatch(SUBMIT / "pretrain_mae.sbatch", "configs/demo/mae.yaml",
                          "OUTPUT", str(run), "DATA.TRAIN_CSV", str(phantom / "train.csv"),
                          "TRAIN.EPOCHS", str(epochs), "DATA.NUM_WORKERS", str(workers), *TINY,
                          options=[*CPU_JOB, "--job-name=headct-test-mae"], cwd=submit_dir, env=env)


def _wait_for(cond, timeout: float, what: str, cluster, job_id: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        state = cluster.job(job_id).get("JobState")
        if state not in ("PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job {job_id} {state} while waiting for {what}:\n{_read(_out_file(cluster, job_id))}")
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}:\n{_read(_out_file(cluster, job_id))}")
        time.sleep(0.2)


def _wait_requeued(cluster, job_id: str, restarts: int, timeout: float = 120) -> None:
    """Wait until Slurm has requeued the job ``restarts`` times (it starts again by itself:
    cred_expire + 1 s later on the test cluster, about 2 minutes on a default one)."""
    end = time.monotonic() + timeout
    while True:
        job = cluster.job(job_id)
        if int(job.get("Restarts", 0)) >= restarts:
            return
        if job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") or time.monotonic() > end:
            pytest.fail(f"job {job_id} was not requeued (state {job.get('JobState')}, restarts "
                        f"{job.get('Restarts')}):\n{_read(_out_file(cluster, job_id))}")
        time.sleep(0.2)


def test_cluster_runs_a_job(slurm_cluster, tmp_path):
    job = slurm_cluster.sbatch("--wrap", "srun hostname", options=["--output=%j.out"], cwd=tmp_path)
    assert slurm_cluster.wait_done(job, 60) == "COMPLETED", slurm_cluster.logs()
    assert (tmp_path / f"{job}.out").read_text().strip() == slurm_cluster.node


def test_dry_run_from_another_folder(slurm_cluster, tmp_path):
    """The job finds the repository from the submitted script's path and builds the srun/torchrun
    line from the allocation: one node, no GPU -> one process, --cpus-per-task passed to srun."""
    job = slurm_cluster.sbatch(SUBMIT / "pretrain_mae.sbatch", "configs/demo/mae.yaml", "OUTPUT", "runs/x",
                               options=CPU_JOB, cwd=tmp_path, env={"HEADCT_DRY_RUN": "1"})
    assert slurm_cluster.wait_done(job, 60) == "COMPLETED", _read(_out_file(slurm_cluster, job))
    out = _read(tmp_path / f"headct-mae-{job}.out")
    assert f"repository {REPO}" in out and "1 node(s) x 1 process(es)" in out, out
    cpus = CPU_JOB[1].split("=")[1]
    assert f"srun --nodes 1 --ntasks 1 --ntasks-per-node 1 --kill-on-bad-exit=1 --cpus-per-task {cpus} bash" in out
    assert "--nproc_per_node 1 --max_restarts 0 --standalone main_pretrain_mae.py --cfg configs/demo/mae.yaml " \
           "--opts TRAIN.RESUME auto OUTPUT runs/x" in out, out


def test_sweep_array(slurm_cluster, tmp_path):
    """downstream_sweep.sbatch: each array task runs its own few-shot K into its own folder."""
    job = slurm_cluster.sbatch(SUBMIT / "downstream_sweep.sbatch", "configs/downstream/rsna_any.yaml",
                               "OUTPUT", "runs/fs", options=[*CPU_JOB, "--array=0-2"], cwd=tmp_path,
                               env={"HEADCT_DRY_RUN": "1", "HEADCT_SWEEP_VALUES": "1 2 4"})
    for task, k in enumerate((1, 2, 4)):
        task_id = f"{job}_{task}"
        out = tmp_path / f"headct-sweep-{job}_{task}.out"
        assert slurm_cluster.wait_done(task_id, 90) == "COMPLETED", _read(out)
        assert f"DOWNSTREAM.FEW_SHOT_K {k} OUTPUT runs/fs/few_shot_k_{k}" in _read(out)


@pytest.fixture(scope="module")
def mae_run(slurm_cluster, phantom, tmp_path_factory) -> dict:
    """One MAE pretraining job of 2 epochs, run to completion; its folder, output and timings."""
    submit = tmp_path_factory.mktemp("submit")
    run = submit / "run"
    t0 = time.monotonic()
    job = _submit_mae(slurm_cluster, phantom, submit, run, epochs=2, workers=0)
    state = slurm_cluster.wait_done(job, 600)
    return {"job": job, "state": state, "run": run, "out": _read(_out_file(slurm_cluster, job)),
            "wall_s": time.monotonic() - t0}


def test_pretrain_mae_job(mae_run):
    run, out = mae_run["run"], mae_run["out"]
    assert mae_run["state"] == "COMPLETED", out
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "checkpoint_last.pth", "backbone.pth"):
        assert (run / name).is_file(), f"{name} missing in {run}:\n{out}"
    assert [r["epoch"] for r in _epoch_rows(run)] == [0, 1]
    assert "on 1 process(es)" in _read(run / "log.txt")
    assert "run exited with status 0" in out and "requeueing" not in out


def _preemption_epochs(mae_run: dict) -> int:
    """Epochs for a preemption test: after the signal (sent once the first epoch's checkpoint is
    written) at least ~6 s of training must remain, however fast this machine is."""
    rows = _epoch_rows(mae_run["run"])
    epoch_s = min(r["epoch_s"] for r in rows) if rows else 1.0
    return 1 + min(40, max(2, math.ceil(6.0 / max(epoch_s, 0.05))))


def _wait_first_checkpoint(cluster, job: str, run: Path) -> None:
    """Wait until epoch 0 is logged and checkpoint_last.pth (holding epoch 1) is written."""
    _wait_for(lambda: bool(_epoch_rows(run)) and (run / "checkpoint_last.pth").exists(), 300,
              "the first epoch and checkpoint_last.pth", cluster, job)


def _check_resumed(run: Path, epochs: int, out: str, signal_name: str) -> None:
    log = _read(run / "log.txt")
    assert f"received {signal_name}: saved checkpoint_last.pth" in log, log
    assert "resumed from" in log and "checkpoint_last.pth" in log, log
    assert f"finished {epochs} epochs" in log, log
    # every epoch logged exactly once: the interrupted one is finished by the resumed job
    assert [r["epoch"] for r in _epoch_rows(run)] == list(range(epochs)), out


def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, phantom, mae_run, tmp_path):
    """SIGUSR1 to the batch shell -> checkpoint at the next step, `scontrol requeue` by the script,
    the job runs again with TRAIN.RESUME auto and finishes the remaining epochs."""
    epochs = _preemption_epochs(mae_run)
    run = tmp_path / "run"
    job = _submit_mae(slurm_cluster, phantom, tmp_path, run, epochs=epochs, workers=1)
    _wait_first_checkpoint(slurm_cluster, job, run)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    _wait_requeued(slurm_cluster, job, restarts=1)
    state = slurm_cluster.wait_done(job, 600)
    out = _read(_out_file(slurm_cluster, job))
    assert state == "COMPLETED", out
    assert slurm_cluster.job(job)["Restarts"] == "1"
    assert "got SIGUSR1" in out and f"requeueing job {job}" in out, out
    assert "restart 1 on" in out, out  # the second start of the batch script, appended to the same file
    _check_resumed(run, epochs, out, "SIGUSR1")


def test_slurm_requeue_resumes(slurm_cluster, phantom, mae_run, tmp_path):
    """`scontrol requeue` (how preemption with PreemptMode=REQUEUE looks to a job): SIGTERM to all
    processes, checkpoint, Slurm requeues; the script must not requeue again, and the job resumes."""
    epochs = _preemption_epochs(mae_run)
    run = tmp_path / "run"
    job = _submit_mae(slurm_cluster, phantom, tmp_path, run, epochs=epochs, workers=0)
    _wait_first_checkpoint(slurm_cluster, job, run)
    slurm_cluster.run("scontrol", "requeue", job)
    _wait_requeued(slurm_cluster, job, restarts=1)
    state = slurm_cluster.wait_done(job, 600)
    out = _read(_out_file(slurm_cluster, job))
    assert state == "COMPLETED", out
    assert slurm_cluster.job(job)["Restarts"] == "1"
    assert "got SIGTERM" in out and "requeueing job" not in out, out
    _check_resumed(run, epochs, out, "SIGTERM")
