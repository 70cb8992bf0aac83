"""Supervision of `tqstore serve` (issue 17): the daemon runs in a worker process, and a worker
that dies of a signal is started again.

Why: LMDB reads its pages through mmap. When index/data.mdb is truncated under a running daemon
(measured: truncating it to 8192 or 0 bytes), the next Lookup reads past the file's new end and
the kernel sends SIGBUS, which no Python code can catch. The store's open (tqstore/ssd/opening.py)
already walks the index in a child and rebuilds it from the payload files when it is damaged, so
a fresh worker serves the same blocks again: starting one is the whole recovery.

The contract (`tqstore serve` without --no-supervise):
- SIGTERM/SIGINT to the supervisor are forwarded to the worker, which drains as before; the
  supervisor then exits with the worker's status (0 after a drain). It never restarts once told
  to stop.
- A worker that exits 0 or 2 (bad arguments or configuration, address in use), or that dies of
  SIGTERM/SIGINT sent to it directly, is not restarted: the supervisor exits with that status.
  Any other end is one WARNING line and a restart after a backoff (RestartPolicy): a signal the
  supervisor did not forward (SIGBUS, SIGSEGV, SIGABRT, SIGKILL by the OOM killer), another exit
  status (1: an uncaught exception), or EXIT_RESTART, which a worker that finds its store
  damaged while serving may use to ask for a fresh open. A worker that served healthy_after_s
  resets the backoff; max_quick_failures quick ends in a row give up with an ERROR line and
  exit 1.
- Readiness: the worker writes its address on a pipe (report_ready) after it serves, so the
  supervisor's own line ("supervising daemon worker pid N") comes after the worker's "serving
  PATH on ADDRESS" line: the log starts with the worker's lines, as an unsupervised one does.
- Port 0: a restart listens on the port the first worker got, so clients keep their address.
  Only if that port was taken meanwhile (the restart exits 2 before serving) does the worker
  start again on port 0, with a WARNING that clients must re-resolve the address.
- The worker dies with the supervisor (tie_to_supervisor): PR_SET_PDEATHSIG on Linux, a thread
  polling the parent pid elsewhere. Either way it gets SIGTERM and drains, releasing the store's
  writer lock: no orphan keeps serving (or holding the store) after its supervisor is gone.

Index damage under a running worker ends it either way: as a signal (a truncated data.mdb is a
SIGBUS), or as an LMDB error (zeros over its pages give MDB_CORRUPTED), on which the worker
drains and exits EXIT_RESTART (tqstore.server.INDEX_DAMAGE); the restart rebuilds the index.
Not covered: a worker that hangs without dying (the supervisor watches exits, not health).
The supervisor imports neither gRPC, the store nor MLX: it is a process that only waits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

log = logging.getLogger("tqstore.supervisor")
# The worker imports the same tqstore as its supervisor, wherever that one was started from.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXIT_USAGE = 2  # the CLI's status for what the user must fix (tqstore/cli/__init__.py)
EXIT_GAVE_UP = 1
EXIT_RESTART = 75  # EX_TEMPFAIL: "open the store again" (see the module docstring)
_FORWARDED = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class RestartPolicy:
    """Backoff between restarts: first_delay_s doubling up to max_delay_s; a worker that served
    healthy_after_s resets it; max_quick_failures quick ends in a row give up."""

    first_delay_s: float = 0.5
    max_delay_s: float = 30.0
    healthy_after_s: float = 60.0
    max_quick_failures: int = 5

    def delay_s(self, failures: int) -> float:
        return min(self.max_delay_s, self.first_delay_s * 2 ** max(0, failures - 1))


def describe_exit(status: int) -> str:
    """'died of SIGBUS' / 'exited with status 1' from a Popen return code."""
    if status == EXIT_RESTART:
        return f"asked for a restart (status {EXIT_RESTART})"
    if status < 0:
        try:
            return f"died of {signal.Signals(-status).name}"
        except ValueError:
            return f"died of signal {-status}"
    return f"exited with status {status}"


def _is_port_zero(listen: str) -> bool:
    return not listen.startswith("unix:") and listen.rpartition(":")[2] == "0"


class Supervisor:
    """Runs `argv_for(listen)` as the worker, restarting it per the module's contract.

    argv_for(listen) is the worker's command line for that --listen value; the supervisor adds
    --worker-of=PID:FD (see tqstore/cli/serve.py)."""

    def __init__(self, argv_for: Callable[[str], Sequence[str]], listen: str,
                 policy: RestartPolicy = RestartPolicy()) -> None:
        self.argv_for = argv_for
        self.listen = listen
        self.policy = policy
        self._worker: subprocess.Popen | None = None
        self._stop_signal: int | None = None

    def run(self) -> int:
        """Supervise until the worker ends for good; the status to exit with. Main thread only
        (signal handlers; and PR_SET_PDEATHSIG fires when the forking *thread* ends)."""
        for sig in _FORWARDED:
            signal.signal(sig, self._on_signal)
        listen, pinned, failures = self.listen, False, 0
        while True:
            address, status, served_s = self._run_worker(listen)
            if self._stop_signal is not None or -status in _FORWARDED:
                # Told to stop: through this process, or the worker itself was sent SIGTERM or
                # SIGINT (systemd's stop signals every process of the unit; an admin's kill).
                return self._exit_as(status)
            if address is not None and _is_port_zero(self.listen):
                listen, pinned = address, True  # restarts keep the port clients know
            if status == 0:
                return 0
            if status == EXIT_USAGE:
                if pinned and address is None:  # the kept port was taken meanwhile
                    log.warning("port of %s is taken: restarting on a new port (%s); clients "
                                "must re-resolve the address from the new 'serving' line",
                                listen, self.listen)
                    listen, pinned = self.listen, False
                    continue
                return EXIT_USAGE
            failures = 1 if served_s >= self.policy.healthy_after_s else failures + 1
            if failures >= self.policy.max_quick_failures:
                log.error("daemon worker %s; %d quick failures in a row: giving up",
                          describe_exit(status), failures)
                return EXIT_GAVE_UP
            delay = self.policy.delay_s(failures)
            log.warning("daemon worker pid %d %s; restarting it in %.1f s (the store's open "
                        "checks the index and rebuilds it if damaged)",
                        self._worker.pid, describe_exit(status), delay)
            if self._sleep(delay):
                return 0  # told to stop while no worker ran: nothing to drain

    def _run_worker(self, listen: str) -> tuple[str | None, int, float]:
        """Start one worker and wait for its end: (its address if it served, its status,
        seconds it served)."""
        ready_r, ready_w = os.pipe()
        argv = [*self.argv_for(listen), f"--worker-of={os.getpid()}:{ready_w}"]
        try:
            self._worker = subprocess.Popen(argv, pass_fds=(ready_w,), env=_worker_env())
        finally:
            os.close(ready_w)  # only the worker holds it: EOF when the worker dies
        if self._stop_signal is not None:  # a signal came before the worker existed
            self._forward(self._stop_signal)
        with os.fdopen(ready_r, "rb") as ready:
            line = ready.readline().decode(errors="replace").strip()
        address = line or None
        served_from = time.monotonic()
        if address is not None:
            log.info("supervising daemon worker pid %d", self._worker.pid)
        status = self._worker.wait()
        return address, status, (time.monotonic() - served_from if address else 0.0)

    def _on_signal(self, sig: int, _frame: object) -> None:
        if self._stop_signal is None:
            self._stop_signal = sig
        self._forward(sig)

    def _forward(self, sig: int) -> None:
        worker = self._worker
        if worker is not None and worker.returncode is None:
            try:
                os.kill(worker.pid, sig)
            except ProcessLookupError:
                pass  # it ended on its own; wait() collects it

    def _sleep(self, seconds: float) -> bool:
        """Sleep, waking for a stop signal; True if one came."""
        deadline = time.monotonic() + seconds
        while self._stop_signal is None and time.monotonic() < deadline:
            time.sleep(min(0.1, deadline - time.monotonic()))
        return self._stop_signal is not None

    def _exit_as(self, status: int) -> int:
        """The worker's status; a worker killed by the forwarded signal (before its handler was
        installed) ends the supervisor by the same signal, as an unsupervised daemon would."""
        if status < 0:
            signal.signal(-status, signal.SIG_DFL)
            os.kill(os.getpid(), -status)
            return 128 - status  # only if that signal did not end the process
        return status


def _worker_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([_PACKAGE_ROOT] + ([path] if path else [])))


def tie_to_supervisor(supervisor_pid: int) -> None:
    """In the worker, first thing: get SIGTERM (and drain) when the supervisor dies."""
    if sys.platform.startswith("linux") and _set_parent_death_signal(signal.SIGTERM):
        # The supervisor may have died before prctl ran: then this process was already
        # reparented and no signal will come.
        if os.getppid() != supervisor_pid:
            raise SystemExit("tqstore: the supervisor exited before its worker started")
        return
    threading.Thread(target=_watch_parent, args=(supervisor_pid,), name="tqstore-parent-watch",
                     daemon=True).start()


def _set_parent_death_signal(sig: int) -> bool:
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(supervisor_pid: int, interval_s: float = 0.5) -> None:
    while os.getppid() == supervisor_pid:
        time.sleep(interval_s)
    os.kill(os.getpid(), signal.SIGTERM)


def report_ready(fd: int, address: str) -> None:
    """In the worker, once it serves: tell the supervisor its address, then close the pipe."""
    try:
        os.write(fd, address.encode() + b"\n")
    except OSError:
        pass  # the supervisor is gone; tie_to_supervisor ends this worker
    finally:
        os.close(fd)


def keep_fd_private(fd: int) -> None:
    """The ready pipe must reach no grandchild (the index probe): its EOF means the worker died."""
    os.set_inheritable(fd, False)
