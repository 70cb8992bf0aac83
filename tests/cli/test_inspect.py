"""`tqstore inspect` names models readably and never prints a client's control characters."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from tqstore.cli.inspect import KNOWN_MODELS
from tqstore.client import KvStoreClient
from tqstore.models import smollm2_gguf_path
from tqstore.models.loader import file_fingerprint
from tqstore.prefix_hash import Namespace
from tqstore.ssd.store import BlockPayload

HOSTILE = "ev\x1b[2J\x07\nm\\x\u200bé"  # clear screen, bell, newline, backslash, zero width


def _inspect(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "tqstore.cli", "inspect", *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _put(client: KvStoreClient, model: str, rng: np.random.Generator) -> None:
    ns = Namespace(model, num_layers=2, num_kv_heads=1, head_dim=32, block_size=16)
    shape = (ns.num_layers, ns.num_kv_heads, ns.block_size, ns.head_dim)
    block = BlockPayload(keys=rng.standard_normal(shape).astype(np.float16),
                         values=rng.standard_normal(shape).astype(np.float16))
    client.put(ns, rng.integers(0, 5000, 16).tolist(), 0, [block])


def test_bundled_model_name_is_pinned_to_the_installed_weights():
    assert KNOWN_MODELS[file_fingerprint(smollm2_gguf_path())].startswith("SmolLM2-135M-Instruct")


def test_names_and_escaping_via_the_daemon_and_the_store(daemon, rng):
    bundled = next(iter(KNOWN_MODELS))
    unknown = "sha256:" + rng.bytes(32).hex()
    with KvStoreClient(daemon.address) as client:
        for model in (HOSTILE, bundled, unknown):
            _put(client, model, rng)
        for source in (("--addr", daemon.address), ("--path", daemon.config.path)):
            table = _inspect(*source)
            assert "\x1b" not in table and "\x07" not in table and "\u200b" not in table
            # Escaped as Python would, the backslash the client sent doubled; printable é kept.
            assert "  ev\\x1b[2J\\x07\\nm\\\\x\\u200bé  " in table
            assert "SmolLM2-135M-Instruct (bundled)" in table
            assert f"  unnamed {unknown[:19]}  " in table and unknown not in table
            rows = {ns["model"]: ns for ns in json.loads(_inspect(*source, "--json"))["namespaces"]}
            assert set(rows) == {HOSTILE, bundled, unknown}  # --json keeps the full strings
            assert rows[bundled]["model_name"] == "SmolLM2-135M-Instruct (bundled)"
            assert rows[HOSTILE]["model_name"] == "ev\\x1b[2J\\x07\\nm\\\\x\\u200bé"


def _store_with_blocks(path, rng, blocks: int = 3) -> None:
    from tqstore.ssd.store import BlockStore

    ns = Namespace("rebuild-model", num_layers=2, num_kv_heads=1, head_dim=32, block_size=16)
    shape = (ns.num_layers, ns.num_kv_heads, ns.block_size, ns.head_dim)
    payloads = [BlockPayload(keys=rng.standard_normal(shape).astype(np.float16),
                             values=rng.standard_normal(shape).astype(np.float16))
                for _ in range(blocks)]
    with BlockStore(path) as store:
        store.put_blocks(ns, rng.integers(0, 5000, 16 * blocks).tolist(), 0, payloads)


def test_shows_an_index_rebuilt_from_the_payloads(tmp_path, rng):
    import shutil

    from tqstore.ssd.store import BlockStore

    path = tmp_path / "kv"
    _store_with_blocks(path, rng)
    shutil.rmtree(path / "index")  # the index is derived: the writer rebuilds it at open
    BlockStore(path).close()
    table = _inspect("--path", str(path))
    assert "index rebuilds" in table and "1: 3 blocks recovered, 0 lost" in table, table
    view = json.loads(_inspect("--path", str(path), "--json"))
    assert (view["index_rebuilds"], view["rebuild_recovered_blocks"], view["blocks"]) == (1, 3, 3)


def test_a_damaged_index_is_a_clear_error_not_a_crash(tmp_path, rng):
    path = tmp_path / "kv"
    _store_with_blocks(path, rng)
    data = path / "index" / "data.mdb"
    data.write_bytes(data.read_bytes()[:4096 + 100])  # truncated inside the second meta page
    out = subprocess.run([sys.executable, "-m", "tqstore.cli", "inspect", "--path", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.startswith("cannot inspect: "), out
    assert "Traceback" not in out.stderr and out.stdout == ""
