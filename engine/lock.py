"""One run per OUTPUT folder: ``OUTPUT/run.lock``, taken by rank 0 before anything is written there.

The lock file is created atomically (``O_CREAT | O_EXCL``) and holds JSON naming its holder: host,
pid, start time, Slurm job id and torchrun run id / restart count when there are any. A second run
into the same folder is refused with :class:`RunLockedError` naming that holder. A lock is stale,
and taken over with a message, when

- its holder is this very process (a second Trainer on the same folder);
- its holder ran on this host and that process is gone (a crashed or SIGKILLed run);
- it names our ``SLURM_JOB_ID`` (Slurm requeued this job; it restarts on any node);
- it names our torchrun run id (``--rdzv-id``, not the default ``none``) with a lower restart
  count (``torchrun --max-restarts`` started the workers again, on any node).

A holder on another host that fits none of these cannot be checked from here: the run is refused,
and the message says to delete the lock file if that run is known to be dead.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import time
from typing import Optional

NAME = "run.lock"


class RunLockedError(RuntimeError):
    """Another run holds the OUTPUT folder."""


def _proc_start(pid: int) -> Optional[int]:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: fields after the last ')'
    return int(stat.rsplit(")", 1)[1].split()[19])


def holder_info() -> dict:
    """Who this process is, as a lock file records it."""
    env = os.environ
    return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "slurm_job_id": env.get("SLURM_JOB_ID", ""),
            "torchelastic_run_id": env.get("TORCHELASTIC_RUN_ID", ""),
            "torchelastic_restart": int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
            "token": os.urandom(8).hex()}  # tells this lock from a later one of the same process


def _alive(pid: int, proc_start: Optional[int]) -> bool:
    """Whether process ``pid`` of this host is still the one that wrote the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    now = _proc_start(pid)
    return proc_start is None or now is None or now == proc_start


def describe(h: dict) -> str:
    """The holder in words: host, pid, start time and job ids."""
    extra = "".join(f", {k} {h[k]}" for k in ("slurm_job_id", "torchelastic_run_id") if h.get(k))
    return f"host {h.get('host', '?')}, pid {h.get('pid', '?')}, started {h.get('started', '?')}{extra}"


def stale_reason(holder: dict, me: dict) -> Optional[str]:
    """Why the lock of ``holder`` may be taken over by ``me``, or None when it must be respected."""
    same_host = holder.get("host") == me["host"]
    if same_host and holder.get("pid") == me["pid"] and holder.get("proc_start") == me["proc_start"]:
        return "it is this process's own lock"
    alive = same_host and isinstance(holder.get("pid"), int) and _alive(holder["pid"], holder.get("proc_start"))
    if alive:  # a live process on this host holds it, whatever job it belongs to (two runs in one allocation)
        return None
    if me["slurm_job_id"] and holder.get("slurm_job_id") == me["slurm_job_id"]:
        return f"it names this Slurm job ({me['slurm_job_id']}): a requeued or restarted job"
    run_id = me["torchelastic_run_id"]
    if run_id and run_id != "none" and holder.get("torchelastic_run_id") == run_id \
            and int(holder.get("torchelastic_restart", 0)) < me["torchelastic_restart"]:
        return f"it names this torchrun run ({run_id}) before restart {me['torchelastic_restart']}"
    if same_host and isinstance(holder.get("pid"), int):  # not alive (above)
        return f"its process {holder['pid']} on this host is no longer running"
    return None


class RunLock:
    """The lock of one run folder, held by this process (rank 0).

    Args:
        folder: the run folder (OUTPUT).
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, NAME)
        self.me = holder_info()
        self.held = False

    def _read(self, path: str) -> Optional[dict]:
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable or half-written: a holder we cannot identify

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:  # a full disk: leave no empty lock that would refuse every later start
            os.unlink(self.path)
            raise
        return True

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a message when a stale lock was taken over (None otherwise).

        Raises:
            RunLockedError: a live run holds the folder (or its holder cannot be identified).
        """
        os.makedirs(self.folder, exist_ok=True)
        for _ in range(5):
            if self._create():
                self._hold()
                return None
            holder = self._read(self.path)
            if holder is None:
                continue  # released between our two calls: try again
            reason = stale_reason(holder, self.me) if holder else None
            if reason is None:
                what = describe(holder) if holder else "a holder that cannot be read"
                raise RunLockedError(
                    f"{self.folder} is in use by another run ({what}; lock file {self.path}). Wait for it to "
                    f"finish, use another OUTPUT, or delete {self.path} if that run is known to be dead")
            # move the stale file aside and check it is the one judged stale (another starter may
            # have replaced it meanwhile); only then create ours
            aside = f"{self.path}.stale{os.getpid()}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            if self._read(aside) != holder:
                try:
                    os.link(aside, self.path)  # put the newer lock back unless yet another exists
                except FileExistsError:
                    pass
                os.remove(aside)
                continue
            os.remove(aside)
            if self._create():
                self._hold()
                return f"took over the lock {self.path} of {describe(holder)}: {reason}"
        raise RunLockedError(f"{self.folder}: could not take the lock {self.path} (other runs keep changing it)")

    def _hold(self) -> None:
        self.held = True
        atexit.register(self.release)

    def release(self) -> None:
        """Remove the lock file if it is still ours (a run that took it over keeps its own)."""
        if not self.held:
            return
        self.held = False
        atexit.unregister(self.release)
        holder = self._read(self.path)
        if holder and holder.get("token") == self.me["token"]:
            os.remove(self.path)
