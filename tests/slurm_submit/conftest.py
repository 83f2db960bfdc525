"""A real single-node Slurm cluster (Debian's slurm-wlm + munge) for the tests of slurm_submit/.

The session fixture :func:`slurm_cluster` installs the packages when they are missing (as root,
with apt-get), writes its own ``slurm.conf`` and munge key in a temporary folder, starts munged,
slurmctld and slurmd in the foreground on free ports, and stops every daemon it started by pid
(SIGTERM, wait, SIGKILL) at the end. Nothing outside the temporary folder is configured: every
Slurm command gets ``SLURM_CONF`` pointing at it. Tests skip (with the reason) only where Slurm
cannot be installed or started: not root, no apt-get, apt-get failing.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import psutil
import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REPO = Path(__file__).resolve().parents[2]


def _which(name: str) -> Optional[str]:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


def _tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def ensure_slurm_installed() -> Optional[str]:
    """Install slurm-wlm's daemons and munge when missing; None when ready, else why not."""
    missing = [b for b in BINARIES if _which(b) is None]
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"Slurm is not installed ({', '.join(missing)} missing) and installing it needs root"
    if _which("apt-get") is None:
        return f"Slurm is not installed ({', '.join(missing)} missing) and there is no apt-get to install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    # Keep the packages' own services (a system munged, slurmctld, slurmd) from starting during the
    # install: the tests start their own daemons and stop them. policy-rc.d is Debian's switch for
    # that; it is written only when absent and removed again.
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text("#!/bin/sh\n# written by tests/slurm_submit/conftest.py during apt-get install\nexit 101\n")
        policy.chmod(0o755)
    try:
        for cmd, limit in ((["apt-get", *lock, "update"], 600),
                           (["apt-get", *lock, "install", "-y", "--no-install-recommends", *PACKAGES], 900)):
            try:
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
            except subprocess.TimeoutExpired:
                return f"`{' '.join(cmd)}` took more than {limit} s"
            if r.returncode != 0:
                return f"`{' '.join(cmd)}` failed ({r.returncode}):\n{_tail(r.stdout + r.stderr)}"
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)
    missing = [b for b in BINARIES if _which(b) is None]
    return f"still missing after apt-get install: {', '.join(missing)}" if missing else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_pid(proc: psutil.Process | subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM one process we started, wait up to ``grace`` seconds, then SIGKILL it."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, psutil.NoSuchProcess):
        return
    except (subprocess.TimeoutExpired, psutil.TimeoutExpired):
        proc.kill()
        proc.wait(timeout=grace)


class SlurmCluster:
    """munged + slurmctld + slurmd for this host, configured under ``root``.

    Args:
        root: an empty folder (world-executable: munged checks the socket's folder).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.socket = root / "munge" / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf),
                        PATH=os.environ.get("PATH", "") + ":" + SBIN_PATH)
        for key in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "HEADCT_"))]:
            if key != "SLURM_CONF":
                del self.env[key]  # a test run inside a Slurm job must not leak its job's settings
        self.procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ set-up
    def write_config(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(mode=0o755, exist_ok=True)
        key = r / "munge" / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        cpus = os.cpu_count() or 1
        mem_mb = min(2048, psutil.virtual_memory().total // 2**20 // 2)
        self.conf.write_text(f"""\
# single-node test cluster written by tests/slurm_submit/conftest.py
ClusterName=headct-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again cred_expire+1 s later (default 120; 5 is the minimum)
AuthInfo=socket={self.socket},cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
# no cgroups: runs in containers and on hosts without a delegated cgroup tree
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
ReturnToService=2
JobRequeue=1
KillWait=120
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=60
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def _start(self, name: str, cmd: Sequence[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(list(cmd), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        log.close()

    def start(self, timeout: float = 60.0) -> None:
        r = self.root
        self._start("munged", [_which("munged"), "--foreground", f"--socket={self.socket}",
                               f"--key-file={r}/munge/munge.key", f"--log-file={r}/log/munged.log",
                               f"--pid-file={r}/munge/munged.pid", f"--seed-file={r}/munge/munged.seed"])
        self._wait(lambda: self.socket.exists(), timeout, "munged to create its socket")
        self._start("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        self._wait(lambda: self.run("sinfo", "-h", check=False).returncode == 0, timeout, "slurmctld to answer")
        self._start("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle",
                   timeout, "the node to become idle")

    def _wait(self, ready, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not ready():
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}:\n"
                                       f"{self.logs()}")
            if time.monotonic() > end:
                raise RuntimeError(f"timed out after {timeout} s waiting for {what}:\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, n: int = 20) -> str:
        """The last lines of every daemon log (for failure messages)."""
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {f.name}\n{_tail(f.read_text(errors='replace'), n)}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ tear-down
    def stop(self) -> None:
        """Cancel every job, then stop each daemon started here (and leftover job steps) by pid."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
            if jobs:
                self.run("scancel", *sorted(set(jobs)), check=False)
                end = time.monotonic() + 40
                while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < end:
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld"):
            if name in self.procs:
                stop_pid(self.procs[name])
        for p in psutil.process_iter(["name"]):  # job steps of this cluster (they run in its log folder)
            try:
                if p.info["name"] == "slurmstepd" and p.cwd().startswith(str(self.root)):
                    stop_pid(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        if "munged" in self.procs:
            stop_pid(self.procs["munged"])

    # ------------------------------------------------------------------ commands
    def run(self, *cmd: str, check: bool = True, timeout: float = 60, cwd: Optional[Path] = None,
            env: Optional[dict] = None) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        r = subprocess.run(list(cmd), env={**self.env, **(env or {})}, capture_output=True, text=True,
                           timeout=timeout, cwd=cwd)
        if check and r.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({r.returncode}):\n{r.stdout}{r.stderr}")
        return r

    def sbatch(self, script: Path | str, *args: str, options: Sequence[str] = (), cwd: Optional[Path] = None,
               env: Optional[dict] = None) -> str:
        """Submit a batch script; returns the job id."""
        out = self.run("sbatch", "--parsable", *options, str(script), *args, cwd=cwd, env=env).stdout
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        fields = {}
        for item in out.split():
            if "=" in item:
                k, v = item.split("=", 1)
                fields[k] = v
        return fields

    def wait_state(self, job_id: str, states: Sequence[str], timeout: float) -> str:
        """Wait until the job's state is one of ``states``; returns it."""
        end = time.monotonic() + timeout
        state = ""
        while time.monotonic() < end:
            state = self.job(job_id).get("JobState", "")
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {state} after {timeout} s (waiting for {list(states)})\n"
                           f"{self.logs()}")

    def wait_done(self, job_id: str, timeout: float) -> str:
        """Wait until the job has ended; returns its final state (COMPLETED, FAILED, ...)."""
        return self.wait_state(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                        "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"), timeout)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node Slurm cluster (see :class:`SlurmCluster`); skips where none can run."""
    reason = ensure_slurm_installed()
    if reason:
        pytest.skip(f"no Slurm cluster for the tests: {reason}")
    if os.geteuid() != 0:
        pytest.skip("no Slurm cluster for the tests: slurmd must run as root")
    root = Path(tempfile.mkdtemp(prefix="headct-slurm-", dir="/tmp"))
    root.chmod(0o755)  # munged requires its socket's folders to be executable by all
    cluster = SlurmCluster(root)
    try:
        cluster.write_config()
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
