"""Helpers of the endpoint tests (tests/serving/test_endpoint.py): an endpoint process and
its client, OpenAI error bodies, usage tiers, polling."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from tqstore.agents import make_client
from tqstore.demo import demo_document
from tqstore.servers import ServerProcess, http_json, tqstore_argv

STORE_BLOCK = 256  # tokens per daemon block: named to every endpoint (CUDA's default is larger)
FRANCE = "What is the capital of France?"
POEM = "Write a short poem about the sea."
PORT_LINE = re.compile(r"tqstore openai: http://127\.0\.0\.1:(\d+)/v1")
DAEMON_LINE = re.compile(r"serving \S+ on (127\.0\.0\.1:\d+)")


def bound_address(process: ServerProcess, pattern: re.Pattern) -> str:
    """The address a process logged once it bound (port 0: the OS picked a free one)."""
    found: list[str] = []

    def logged() -> bool:
        m = pattern.search(process.log_path.read_text(errors="replace"))
        if m:
            found.append(m.group(1))
        return bool(m)

    process.wait_ready(logged, timeout=180)
    return found[0]


class Endpoint:
    """One `tqstore openai` process. It is launched at once and waited for in `ready()`, so
    two endpoints load their models side by side; `restart()` SIGKILLs it (nothing of its
    memory survives) and starts it again with the same flags."""

    def __init__(self, name: str, log_dir: Path, *flags: str) -> None:
        self.name, self.log_dir, self.flags = name, log_dir, flags
        self.starts = 0
        self.client = None
        self._launch()

    def _launch(self) -> None:
        self.starts += 1
        self.process = ServerProcess(
            self.name, tqstore_argv("openai", "--store-block", str(STORE_BLOCK), *self.flags,
                                    "--port", "0"),
            self.log_dir / f"{self.name}-{self.starts}.log")

    def ready(self) -> "Endpoint":
        if self.client is None:
            self.port = int(bound_address(self.process, PORT_LINE))
            self.base_url = f"http://127.0.0.1:{self.port}"
            self.client = make_client(self.base_url + "/v1", timeout_s=180)
            self.model = self.client.models.list().data[0].id
        return self

    def stop(self, kill: bool = False) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if kill and self.process.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.stop(grace=10)

    def restart(self) -> None:
        self.stop(kill=True)
        self._launch()
        self.ready()

    def stats(self) -> dict[str, Any]:
        return http_json(self.base_url + "/v1/stats")

    def chat(self, content: str | list[dict[str, str]], max_tokens: int = 16, **kw: Any):
        messages = [{"role": "user", "content": content}] if isinstance(content, str) else content
        return self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=max_tokens,
            **({"temperature": 0} | kw))

    def post(self, path: str, body: bytes | dict) -> tuple[int, dict[str, str], bytes]:
        """Raw HTTP: (status, lower-cased headers, body)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=180)
        try:
            conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()


def openai_error(body: bytes, code: str | None, kind: str = "invalid_request_error") -> dict:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["message"] and err["type"] == kind and err["code"] == code, err
    return err


def tiers(usage) -> dict[str, Any]:
    """usage.tqstore (the endpoint's extension), checked against the standard fields."""
    extra = usage.model_extra["tqstore"]
    assert set(extra) == {"memory_tokens", "daemon_tokens", "computed_tokens", "ttft_s"}
    assert usage.prompt_tokens == (extra["computed_tokens"] + extra["memory_tokens"]
                                   + extra["daemon_tokens"])
    assert usage.prompt_tokens_details.cached_tokens == (extra["memory_tokens"]
                                                         + extra["daemon_tokens"])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert extra["ttft_s"] > 0
    return extra


def document_messages(chars: int) -> list[dict[str, str]]:
    """A system message of real text (the GPL-3 shipped for the demo) and a question."""
    return [{"role": "system", "content": demo_document()[:chars]},
            {"role": "user", "content": "What is this document about? Answer in one sentence."}]


def wait_for(check, timeout: float, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)
