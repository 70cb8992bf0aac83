"""Server processes the agent workload talks to (the demo's, `tqstore bench serve`'s and the
endpoint tests'): start them in their own process group, wait until they answer, read their
memory, stop them; small HTTP probes. tqstore.agents holds the workload and its client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tqstore.agents import make_client

# Stock mlx_lm.server with OpenBLAS loaded first, as every tqstore process does: MLX's CPU wheel
# multiplies ~20x slower without it, and a baseline slowed by its BLAS would flatter us.
MLX_SERVER_BOOT = ("import tqstore, sys; from mlx_lm.server import main; "
                   "sys.argv[0] = 'mlx_lm.server'; main()")


def free_port() -> int:
    """A loopback port free now (the OS picks it; a race with another process is possible but
    the server then fails to bind and says so in its log)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tqstore_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tqstore.cli", *args]


def mlx_server_argv(model_dir: str, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-c", MLX_SERVER_BOOT, "--model", model_dir, "--host", "127.0.0.1",
            "--port", str(port), *extra]


def _child_env() -> dict[str, str]:
    # Children import this very tqstore (the checkout it runs from), installed or not.
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    return env


class ServerProcess:
    """One server in its own process group (its children die with it), its output in a log
    file. `stop` sends SIGTERM to the group, then SIGKILL after ``grace`` seconds."""

    def __init__(self, name: str, argv: list[str], log_path: str | os.PathLike) -> None:
        self.name = name
        self.argv = argv
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=_child_env(),
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def memory(self) -> dict[str, int]:
        """VmHWM (peak) and VmRSS of the server process, bytes, from /proc (Linux); {} where
        there is no /proc."""
        out = {}
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(value.split()[0]) * 1024
        except OSError:
            pass
        return out

    def stop(self, grace: float = 30.0) -> int | None:
        """Stop the group; returns the exit status (None if it had to be killed)."""
        try:
            if self.alive():
                try:
                    os.killpg(self.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    return self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
            else:
                return self.proc.returncode
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
            return None
        finally:
            self._log.close()

    def wait_ready(self, check: Callable[[], bool], timeout: float) -> float:
        """Poll ``check`` until true; seconds waited. Raises with the log's tail if the process
        exits or the time runs out."""
        start = time.perf_counter()
        while True:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} "
                                   f"before it was ready; its log ({self.log_path}):\n"
                                   f"{self.log_tail()}")
            try:
                if check():
                    return time.perf_counter() - start
            except OSError:
                pass
            if time.perf_counter() - start > timeout:
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; its log "
                                   f"({self.log_path}):\n{self.log_tail()}")
            time.sleep(0.25)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def http_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def served_model(base_url: str) -> str:
    """The first model id of GET /v1/models (our endpoint's name for its model)."""
    return http_json(base_url.rstrip("/") + "/models")["data"][0]["id"]


def warm_up(base_url: str, model: str) -> float:
    """One tiny request (its own system prompt, so it shares no prefix with the workload): the
    model loads and MLX compiles before anything is timed. Returns its wall seconds."""
    start = time.perf_counter()
    with make_client(base_url) as client:
        client.chat.completions.create(model=model, max_tokens=2, temperature=0.0, messages=[
            {"role": "system", "content": "Warm-up."}, {"role": "user", "content": "Hi"}])
    return time.perf_counter() - start
