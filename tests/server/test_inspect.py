"""`tqstore inspect` on a store the daemon is writing (read-only open) and via the daemon."""

import json
import subprocess
import sys
import time

import numpy as np

from tests.server.conftest import random_blocks


def _inspect(*args):
    out = subprocess.run([sys.executable, "-m", "tqstore.cli", "inspect", *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_inspect_reads_while_daemon_runs_and_via_daemon(rng, daemon, client, namespace):
    tokens = rng.integers(0, 5000, 16 * 4 + 8).tolist()
    client.put(namespace, tokens, 0, random_blocks(namespace, 3))
    client.lookup(namespace, tokens)              # 48 of 72 tokens
    client.lookup(namespace, tokens[:48])         # 48 of 48
    # The daemon publishes batched counters within access_flush_interval_s (1 s).
    deadline = time.monotonic() + 10
    while True:
        direct = json.loads(_inspect("--path", daemon.config.path, "--json"))
        if direct["lookups"] == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert direct["blocks"] == 3 and direct["lookups"] == 2
    assert (direct["hit_tokens"], direct["lookup_tokens"]) == (96, 120)
    assert abs(direct["hit_rate"] - 0.8) < 1e-9
    assert direct["logical_bytes"] == 3 * 2 * 4 * 2 * 16 * 64 * 2
    assert direct["block_size_table"] == [{"tokens": 16, "blocks": 3, "bytes": direct["payload_bytes"]}]
    assert direct["namespaces"][0]["model"] == "test-model"
    via = json.loads(_inspect("--addr", daemon.address, "--json"))
    assert via["blocks"] == 3 and via["per_request_hit_rate"]["requests"] == 2
    assert via["per_request_hit_rate"]["full_hits"] == 1
    assert via["attention_backend"]
    table = _inspect("--path", daemon.config.path)
    assert "hit rate (tokens)      80.0%" in table and "test-model" in table
