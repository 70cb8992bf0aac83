"""Prefix hash chain: the one key function shared by the in-memory pool and the SSD tier.

h_0 = H(namespace), h_i = H(h_{i-1}, token ids of block i). A block's hash therefore names the
whole prefix up to and including it, so a longest-prefix lookup is a walk down the chain.

Invariants (each tested):
- Canonical bytes only: token ids as fixed-width little-endian uint32, the namespace as sorted,
  compact JSON. SHA-256, never Python's ``hash`` (LMCache's zero-hit-across-processes bug).
- Stable across processes, restarts and platforms: no per-process salt.
- Namespaces never mix: any change of model fingerprint, KV layout, block size, dtype, format
  version or extra key (the in-memory pool adds the codec identity) changes every hash.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field, replace
from typing import NewType, Sequence

BlockHash = NewType("BlockHash", bytes)

HASH_BYTES = 32
# Bump when the meaning of stored blocks changes; old blocks then become misses, never wrong hits.
FORMAT_VERSION = 1
_MAX_TOKEN_ID = 2**32 - 1


@dataclass(frozen=True)
class Namespace:
    """Everything that must match for two blocks with the same tokens to be interchangeable."""

    model_fingerprint: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    kv_dtype: str = "float16"
    format_version: int = FORMAT_VERSION
    # Extra identity, e.g. the codec settings for the in-memory pool. The SSD tier keeps fp16,
    # which is codec-neutral, so it leaves this empty.
    extra: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.model_fingerprint:
            raise ValueError("namespace needs a non-empty model_fingerprint")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"namespace {name} must be a positive int, got {value!r}")
        object.__setattr__(self, "extra", tuple(sorted((str(k), str(v)) for k, v in self.extra)))

    def with_extra(self, **items: object) -> "Namespace":
        merged = dict(self.extra)
        merged.update({k: str(v) for k, v in items.items()})
        return replace(self, extra=tuple(merged.items()))

    def canonical_bytes(self) -> bytes:
        record = {
            "model": self.model_fingerprint,
            "layers": self.num_layers,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "block_size": self.block_size,
            "dtype": self.kv_dtype,
            "format": self.format_version,
            "extra": [list(kv) for kv in self.extra],
        }
        return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()

    def root_hash(self) -> BlockHash:
        return BlockHash(hashlib.sha256(b"tqstore/namespace\0" + self.canonical_bytes()).digest())

    def digest_hex(self) -> str:
        """Short printable id of the namespace (for tables and logs)."""
        return self.root_hash().hex()[:16]


def token_bytes(token_ids: Sequence[int]) -> bytes:
    """Canonical encoding of token ids: little-endian uint32 each."""
    ids = [int(t) for t in token_ids]
    for t in ids:
        if t < 0 or t > _MAX_TOKEN_ID:
            raise ValueError(f"token id {t} out of range [0, {_MAX_TOKEN_ID}]")
    return struct.pack(f"<{len(ids)}I", *ids)


def hash_block_tokens(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """h_i = SHA-256(h_{i-1} || n || tokens): the count is included so blocks of different
    sizes can never collide by concatenation."""
    if len(parent) != HASH_BYTES:
        raise ValueError(f"parent hash must be {HASH_BYTES} bytes, got {len(parent)}")
    body = token_bytes(token_ids)
    h = hashlib.sha256()
    h.update(parent)
    h.update(struct.pack("<I", len(token_ids)))
    h.update(body)
    return BlockHash(h.digest())


def hash_prefix_blocks(namespace: Namespace, token_ids: Sequence[int]) -> list[BlockHash]:
    """Hashes of every FULL block of ``token_ids`` (a trailing partial block has no hash)."""
    size = namespace.block_size
    hashes: list[BlockHash] = []
    parent = namespace.root_hash()
    for start in range(0, len(token_ids) - size + 1, size):
        parent = hash_block_tokens(parent, token_ids[start : start + size])
        hashes.append(parent)
    return hashes
