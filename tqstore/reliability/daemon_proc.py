"""A `tqstore serve` subprocess on loopback, as the harnesses see it from outside.

The daemon listens on 127.0.0.1:0 and its start-up line ("serving PATH on 127.0.0.1:PORT")
names the port the kernel picked, so no port is guessed and raced for. Its log (one line per
RPC) goes to a file, never to a pipe: a pipe nobody drains would block the daemon once full.
Memory and descriptors are read from /proc/PID (Linux), the daemon's own view of itself. The
daemon runs with --no-supervise: PID is the daemon itself (not a supervisor, tqstore/supervisor.py,
that would restart it), so the harnesses' SIGKILL is the crash they inject and their RSS and fd
figures are the daemon's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_SERVING = re.compile(r"serving \S+ on (127\.0\.0\.1:\d+)")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def child_env() -> dict[str, str]:
    """The environment of every process a harness starts: this tqstore first on the path (a
    tool may run from any directory, without an installed package)."""
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=_PACKAGE_ROOT + (os.pathsep + path if path else ""))


class DaemonFailed(RuntimeError):
    """The daemon did not start, or did not stop the way it must."""


class DaemonProcess:
    """One daemon process over the store at `path`; start() blocks until it serves."""

    def __init__(self, path: str | os.PathLike, log_path: str | os.PathLike, max_gib: float = 8.0,
                 workers: int = 32, drain_seconds: float = 5.0) -> None:
        self.path = str(path)
        self.log_path = Path(log_path)
        self.args = ["--max-gib", f"{max_gib:g}", "--workers", str(workers),
                     "--drain-seconds", f"{drain_seconds:g}"]
        self.proc: subprocess.Popen | None = None
        self.address = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None, "daemon not started"
        return self.proc.pid

    def start(self, timeout_s: float = 60.0) -> "DaemonProcess":
        # Append: a restarted daemon over the same store keeps one log of all its lives.
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tqstore.cli", "serve", "--path", self.path,
                 "--listen", "127.0.0.1:0", "--no-supervise", *self.args], stdout=log,
                stderr=subprocess.STDOUT, env=child_env())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                found = _SERVING.search(log.read().decode(errors="replace"))
            if found:
                self.address = found.group(1)
                return self
            if self.proc.poll() is not None:
                raise DaemonFailed(f"daemon exited {self.proc.returncode} at start: "
                                   f"{self.log_tail()}")
            time.sleep(0.05)
        self.kill()
        raise DaemonFailed(f"daemon did not serve within {timeout_s} s: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: the crash the harnesses inject (no drain, no flush, no close)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait: the daemon drains, flushes, closes and must exit 0."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
                raise DaemonFailed(f"daemon did not stop within {timeout_s} s") from None
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kib(self) -> int:
        """Resident memory (VmRSS) in KiB."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise DaemonFailed("no VmRSS in /proc status")

    def fd_count(self) -> int:
        """Open file descriptors (sockets, payload files, LMDB, the log...)."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class RssSampler:
    """Samples the daemon's RSS every `interval_s` on a thread: peak and last, in KiB."""

    daemon: DaemonProcess
    interval_s: float = 0.25
    samples: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        try:
            self.samples.append(self.daemon.rss_kib())
        except (OSError, DaemonFailed):
            pass  # the daemon is gone (killed on purpose, or crashed: its caller sees that)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {}
        mib = [round(x / 1024, 1) for x in self.samples]
        # The level at each quarter of the run: a leak climbs through them, a bounded daemon
        # levels off.
        quarters = [mib[min(len(mib) - 1, len(mib) * q // 4)] for q in (1, 2, 3)]
        return {"rss_start_mib": mib[0], "rss_peak_mib": max(mib), "rss_end_mib": mib[-1],
                "rss_quarters_mib": quarters, "rss_samples": len(mib)}


def run_check(path: str) -> tuple[int, str]:
    """`tqstore check PATH` in its own process: (exit status, its report)."""
    out = subprocess.run([sys.executable, "-m", "tqstore.cli", "check", path],
                         capture_output=True, text=True, timeout=600, env=child_env())
    return out.returncode, (out.stdout + out.stderr).strip()


def wait_for(predicate, timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll predicate() until true or timeout; its last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
