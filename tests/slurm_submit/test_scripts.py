"""slurm_submit/*.sbatch and common.sh without a Slurm cluster: the launch command each builds
(HEADCT_DRY_RUN=1, with Slurm's variables and a stand-in `scontrol`), how the repository and the
environment are found, argument errors, and the SIGUSR1 -> checkpoint -> exit path of a real
torchrun with a stand-in training script. The same scripts on a real cluster: test_slurm.py."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "slurm_submit"
SCRIPTS = ("pretrain_mae", "pretrain_dino", "pretrain_simclr", "pretrain_alice", "downstream", "downstream_sweep")
ENTRIES = {"pretrain_mae": "main_pretrain_mae.py", "pretrain_dino": "main_pretrain_dino.py",
           "pretrain_simclr": "main_pretrain_simclr.py", "pretrain_alice": "main_pretrain_alice.py",
           "downstream": "main_downstream.py",
           "downstream_sweep": "main_downstream.py"}
SLURM_VARS = [k for k in os.environ if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SLURM_VARS and not k.startswith("HEADCT_")}
    env.update(extra)
    return env


def _fake_scontrol(bin_dir: Path, command: str = "") -> None:
    """A stand-in `scontrol`: hostnames of a two-node list, the submitted script's path, requeue."""
    bin_dir.mkdir(exist_ok=True)
    f = bin_dir / "scontrol"
    f.write_text(f"""#!/bin/bash
case "$1 $2" in
  "show hostnames") echo gpu-node07; echo gpu-node08 ;;
  "show job") for task in 0 1; do echo "   Command={command} configs/x.yaml"; done ;;  # an array: 2 records
  *) echo "scontrol $*" >> "{bin_dir}/scontrol.log" ;;
esac
""")
    f.chmod(0o755)


def _fake_repo(root: Path, entry_body: str) -> Path:
    """A repository with the real slurm_submit/ files and a stand-in main_pretrain_mae.py."""
    repo = root / "repo"
    (repo / "slurm_submit").mkdir(parents=True)
    for name in ("common.sh", "pretrain_mae.sbatch"):
        shutil.copy(SUBMIT / name, repo / "slurm_submit" / name)
    (repo / "configs").mkdir()
    (repo / "configs" / "x.yaml").write_text("OUTPUT: out\n")
    (repo / "main_pretrain_mae.py").write_text(entry_body)
    return repo


def _dry_run(script: str, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUBMIT / f"{script}.sbatch"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env=_env(HEADCT_DRY_RUN="1", **env))


def _command(out: str) -> str:
    lines = [ln for ln in out.splitlines() if "command:" in ln]
    assert lines, out
    return lines[-1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_sbatch_header(script):
    text = (SUBMIT / f"{script}.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(SUBMIT / f"{script}.sbatch")]).returncode == 0
    sbatch = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    for needed in ("--requeue", "--open-mode=append", "--signal=B:USR1@", "--ntasks-per-node=1",
                   "--gpus-per-node=", "--cpus-per-task=", "--time="):
        assert any(needed in ln for ln in sbatch), (script, needed)
    assert not any(k in ln for ln in sbatch for k in ("--partition", "--account", "--qos")), \
        "no site-specific partition/account/qos in the shipped scripts"
    assert "source \"$HEADCT_REPO/slurm_submit/common.sh\"" in text
    assert ENTRIES[script] in text


@pytest.mark.parametrize("script, cfg", [("pretrain_dino", "configs/dino/vit_base.yaml"),
                                         ("pretrain_simclr", "configs/simclr/segresnet.yaml"),
                                         ("downstream", "configs/downstream/rsna_any.yaml")])
def test_dry_run_every_entry(tmp_path, script, cfg):
    r = _dry_run(script, cfg, "OUTPUT", "runs/y", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"--standalone {ENTRIES[script]} --cfg {cfg} --opts TRAIN.RESUME auto OUTPUT runs/y" in _command(r.stdout)


def test_dry_run_outside_slurm(tmp_path):
    r = _dry_run("pretrain_mae", "configs/demo/mae.yaml", "OUTPUT", "runs/x", "TRAIN.EPOCHS", "2",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cmd = _command(r.stdout)
    assert "srun" not in cmd
    assert "-m torch.distributed.run --nnodes 1 --nproc_per_node 1 --max_restarts 0 --standalone " \
           "main_pretrain_mae.py --cfg configs/demo/mae.yaml --opts TRAIN.RESUME auto OUTPUT runs/x " \
           "TRAIN.EPOCHS 2" in cmd
    assert f"repository {REPO}" in r.stdout


def test_dry_run_multi_node(tmp_path):
    """Two nodes x 4 GPUs: srun starts one torchrun per node; c10d rendezvous on the first node."""
    _fake_scontrol(tmp_path / "bin", command=str(SUBMIT / "pretrain_mae.sbatch"))
    r = _dry_run("pretrain_mae", "configs/mae/vit_base.yaml", "DATA.BATCH_SIZE", "16", cwd=tmp_path,
                 PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NNODES="2",
                 SLURM_JOB_NODELIST="gpu-node[07-08]", SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="32",
                 SLURM_SUBMIT_DIR=str(tmp_path))
    assert r.returncode == 0, r.stderr
    cmd = _command(r.stdout)
    assert cmd.split("command: ")[1].startswith(
        "srun --nodes 2 --ntasks 2 --ntasks-per-node 1 --kill-on-bad-exit=1 --cpus-per-task 32 bash -c ")
    assert "--nnodes 2 --nproc_per_node 4 --max_restarts 0 --rdzv_backend c10d " \
           "--rdzv_endpoint gpu-node07:24242 --rdzv_id 4242 main_pretrain_mae.py" in cmd
    assert "2 node(s) x 4 process(es)" in r.stdout


@pytest.mark.parametrize("env, nproc", [({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 3),
                                        ({"SLURM_GPUS_ON_NODE": "2", "HEADCT_NPROC": "5"}, 5),
                                        ({"CUDA_VISIBLE_DEVICES": ""}, 1),
                                        ({"SLURM_GPUS_ON_NODE": "0"}, 1)])
def test_processes_per_node(tmp_path, env, nproc):
    r = _dry_run("pretrain_mae", "configs/demo/mae.yaml", cwd=tmp_path, **env)
    assert r.returncode == 0, r.stderr
    assert f"--nproc_per_node {nproc} " in _command(r.stdout)


def test_repository_found_from_the_submitted_script(tmp_path):
    """sbatch runs a spooled copy: the repository comes from `scontrol show job`'s Command=."""
    spool = tmp_path / "spool" / "job00042"
    spool.mkdir(parents=True)
    shutil.copy(SUBMIT / "pretrain_mae.sbatch", spool / "slurm_script")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _fake_scontrol(tmp_path / "bin", command=str(SUBMIT / "pretrain_mae.sbatch"))
    r = subprocess.run(["bash", str(spool / "slurm_script"), "configs/demo/mae.yaml"], cwd=elsewhere,
                       capture_output=True, text=True, timeout=60,
                       env=_env(HEADCT_DRY_RUN="1", PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
                                SLURM_JOB_ID="42", SLURM_SUBMIT_DIR=str(elsewhere)))
    assert r.returncode == 0, r.stderr
    assert f"repository {REPO}" in r.stdout


def test_repository_not_found(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(SUBMIT / "pretrain_mae.sbatch", spool / "slurm_script")
    r = subprocess.run(["bash", str(spool / "slurm_script"), "configs/demo/mae.yaml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60,
                       env=_env(HEADCT_REPO=str(tmp_path), SLURM_SUBMIT_DIR=str(tmp_path)))
    assert r.returncode == 2
    assert "repository not found" in r.stderr and "HEADCT_REPO=/path/to/repo" in r.stderr


@pytest.mark.parametrize("args, message", [((), "usage: sbatch"),
                                           (("configs/nope.yaml",), "config file 'configs/nope.yaml' not found"),
                                           (("configs/demo/mae.yaml", "OUTPUT"), "KEY VALUE pairs")])
def test_argument_errors(tmp_path, args, message):
    r = _dry_run("pretrain_mae", *args, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr


def test_config_relative_to_submit_folder(tmp_path):
    (tmp_path / "mine.yaml").write_text("OUTPUT: runs/mine\n")
    r = _dry_run("pretrain_mae", "mine.yaml", cwd=tmp_path, SLURM_SUBMIT_DIR=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert f"--cfg {tmp_path / 'mine.yaml'} --opts" in _command(r.stdout)


def test_env_activate_command(tmp_path):
    """HEADCT_ENV_ACTIVATE is run in the job's shell before anything else needs Python."""
    env_bin = tmp_path / "env" / "bin"
    env_bin.mkdir(parents=True)
    (env_bin / "python").symlink_to(sys.executable)
    (tmp_path / "activate").write_text(f'export PATH="{env_bin}:$PATH"\nexport HEADCT_MARK=yes\n')
    r = _dry_run("pretrain_mae", "configs/demo/mae.yaml", cwd=tmp_path,
                 HEADCT_ENV_ACTIVATE=f"source {tmp_path / 'activate'}")
    assert r.returncode == 0, r.stderr
    assert f"python {env_bin / 'python'}" in r.stdout
    r = _dry_run("pretrain_mae", "configs/demo/mae.yaml", cwd=tmp_path, HEADCT_ENV_ACTIVATE="false")
    assert r.returncode == 2 and "HEADCT_ENV_ACTIVATE failed" in r.stderr


def test_sweep_dry_run(tmp_path):
    r = _dry_run("downstream_sweep", "configs/downstream/rsna_any.yaml", "OUTPUT", "runs/fs", cwd=tmp_path,
                 SLURM_ARRAY_TASK_ID="2", HEADCT_SWEEP_VALUES="1 2 4 8")
    if not (REPO / "main_downstream.py").exists():
        assert r.returncode == 2 and "main_downstream.py does not exist" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    assert "--opts TRAIN.RESUME auto OUTPUT runs/fs DOWNSTREAM.FEW_SHOT_K 4 OUTPUT runs/fs/few_shot_k_4" \
        in _command(r.stdout)
    r = _dry_run("downstream_sweep", "configs/downstream/rsna_any.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "submit with sbatch --array" in r.stderr


STAND_IN = """\
import os, signal, sys, time
from pathlib import Path
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
Path(os.environ["MARK"]).write_text(" ".join(sys.argv[1:]))
if os.environ.get("WAIT_FOR_SIGNAL"):
    while not got:
        time.sleep(0.05)
    Path(os.environ["MARK"] + ".signalled").write_text("USR1")
    sys.exit(3)
"""


def test_runs_torchrun_and_passes_arguments(tmp_path):
    repo = _fake_repo(tmp_path, STAND_IN)
    r = subprocess.run(["bash", str(repo / "slurm_submit" / "pretrain_mae.sbatch"), "configs/x.yaml",
                        "OUTPUT", "o", "SEED", "3"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=_env(HEADCT_PYTHON=sys.executable, MARK=str(tmp_path / "mark")))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "mark").read_text() == "--cfg configs/x.yaml --opts TRAIN.RESUME auto OUTPUT o SEED 3"
    assert "run exited with status 0" in r.stdout


def test_usr1_reaches_the_training_process(tmp_path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@T sends) reaches the training process under
    torchrun, which survives it; the script reports the stop and exits with 3 (outside Slurm)."""
    repo = _fake_repo(tmp_path, STAND_IN)
    mark = tmp_path / "mark"
    p = subprocess.Popen(["bash", str(repo / "slurm_submit" / "pretrain_mae.sbatch"), "configs/x.yaml"],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=_env(HEADCT_PYTHON=sys.executable, MARK=str(mark), WAIT_FOR_SIGNAL="1"))
    try:
        end = time.monotonic() + 60
        while not mark.exists() and time.monotonic() < end and p.poll() is None:
            time.sleep(0.1)
        assert mark.exists(), p.communicate(timeout=5)[0] if p.poll() is not None else "no start"
        p.send_signal(signal.SIGUSR1)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert (tmp_path / "mark.signalled").exists(), out
    assert p.returncode == 3, out
    assert "got SIGUSR1" in out and "run the same command again to resume" in out
