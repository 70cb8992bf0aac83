"""What the harnesses' clients store and how any process checks it.

A prompt family is a deterministic run of token ids; families share prefixes the way real
prompts do (a system prompt per group, a first user turn per pair, then their own text). A
block's content is a function of its chain hash alone, so whichever process fetches a block
recomputes what it must hold and compares bitwise: a wrong byte can never pass as a hit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import lru_cache
from typing import Sequence

import numpy as np

from tqstore.blocks import BlockPayload, PrefixKV
from tqstore.errors import TqstoreError
from tqstore.prefix_hash import Namespace, hash_prefix_blocks
from tqstore.reliability.daemon_proc import child_env

# A small model-like layout: 8 layers x 4 KV heads x 64 dims, 32-token blocks (256 KiB each).
LOAD_NAMESPACE = Namespace("reliability-model", num_layers=8, num_kv_heads=4, head_dim=64,
                           block_size=32)
MAX_BLOCKS = 16  # a family's longest chain (512 tokens)
GROUPS = 6  # families of one group share a 2-block system prompt
_VOCAB = 49152


def family_tokens(family: int, ns: Namespace = LOAD_NAMESPACE,
                  blocks: int = MAX_BLOCKS) -> list[int]:
    """Token ids of a family: blocks 0-1 shared by its group (family % GROUPS), block 2 by its
    pair (family // 2), the rest its own."""
    return list(_family_tokens(family, ns.block_size, blocks))


@lru_cache(maxsize=4096)
def _family_tokens(family: int, block_size: int, blocks: int) -> tuple[int, ...]:
    toks = np.random.default_rng([1, family]).integers(0, _VOCAB, blocks * block_size)
    head = min(2, blocks) * block_size
    toks[:head] = np.random.default_rng([2, family % GROUPS]).integers(0, _VOCAB, head)
    if blocks > 2:
        toks[head: head + block_size] = np.random.default_rng([3, family // 2]).integers(
            0, _VOCAB, block_size)
    return tuple(int(t) for t in toks)


def block_hashes(ns: Namespace, tokens: Sequence[int], count: int) -> list[bytes]:
    """Chain hashes of the first `count` blocks of tokens."""
    return hash_prefix_blocks(ns, tokens[: count * ns.block_size])


def expected_payload(ns: Namespace, block_hash: bytes) -> BlockPayload:
    """The content a block must hold: finite fp16 drawn from its hash (integers viewed as fp16
    are cheaper to draw than normals, and bitwise comparison is all that matters)."""
    shape = (ns.num_layers, ns.num_kv_heads, ns.block_size, ns.head_dim)
    rng = np.random.default_rng(int.from_bytes(block_hash[:8], "little"))
    both = rng.integers(0, 0x7C00, (2, *shape), dtype=np.uint16).view(np.float16)
    return BlockPayload(keys=both[0], values=both[1])


def payloads_for(ns: Namespace, tokens: Sequence[int], first: int,
                 count: int) -> list[BlockPayload]:
    """The expected payloads of blocks [first, first + count) of tokens."""
    hashes = block_hashes(ns, tokens, first + count)
    return [expected_payload(ns, hashes[i]) for i in range(first, first + count)]


def same_bytes(got: BlockPayload, want: BlockPayload) -> bool:
    return (got.keys.shape == want.keys.shape and got.values.shape == want.values.shape
            and np.array_equal(got.keys.view(np.uint16), want.keys.view(np.uint16))
            and np.array_equal(got.values.view(np.uint16), want.values.view(np.uint16)))


def wrong_blocks(ns: Namespace, tokens: Sequence[int], first: int, prefix: PrefixKV) -> list[int]:
    """Indices of the fetched blocks [first, first + len(prefix)) whose bytes differ."""
    want = payloads_for(ns, tokens, first, len(prefix))
    return [first + i for i in range(len(prefix)) if not same_bytes(prefix.block(i), want[i])]


def status_name(exc: BaseException) -> str:
    """The gRPC status an error came back with ("UNAVAILABLE"...): the client translates a
    status into a tqstore error whose message starts with the code's name."""
    if isinstance(exc, TqstoreError):
        head = str(exc).split(":", 1)[0]
        if head.isupper():
            return head
    return type(exc).__name__


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    if not seconds:
        return {"n": 0}
    ms = np.asarray(seconds) * 1000
    return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "max_ms": round(float(ms.max()), 2)}


class WorkerProcess:
    """A client process `python -m MODULE worker ARGS...` that prints READY once set up, starts
    on a GO line on its stdin and ends by printing one JSON line (its result)."""

    def __init__(self, module: str, args: Sequence[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", module, "worker", *map(str, args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=child_env())

    def wait_ready(self) -> None:
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            self.proc.kill()
            raise RuntimeError(f"worker did not start: {line!r} {self.proc.stderr.read()[-2000:]}")

    def go(self) -> None:
        self.proc.stdin.write("GO\n")
        self.proc.stdin.flush()

    def result(self, timeout_s: float) -> dict:
        out, err = self.proc.communicate(timeout=timeout_s)
        lines = out.strip().splitlines()
        if self.proc.returncode != 0 or not lines:
            raise RuntimeError(f"worker exited {self.proc.returncode}: {err[-2000:]}")
        return json.loads(lines[-1])


def worker_handshake() -> None:
    """The worker's side of WorkerProcess: READY out, then block until GO."""
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        sys.exit("no GO from the parent")
