"""The remote tier's keys, values and address parsing, without a server: what a value must be
to be served, and that the password never shows."""

import numpy as np
import pytest

from tqstore.blocks import BlockPayload
from tqstore.errors import InvalidArgument
from tqstore.prefix_hash import Namespace
from tqstore.remote.address import parse_remote
from tqstore.remote.redis_tier import identity
from tqstore.remote.value_format import (PART_BYTES, RemoteValueError, block_keys, body_bytes,
                                         decode_block, encode_block, part_count)
from tqstore.ssd.chain import chain_hashes, token_array

from tests.seeding import seeded_rng

# SmolLM2's layout with 256-token blocks: 5.9 MB a block, two parts.
NS = Namespace("sha256:" + "ab" * 32, num_layers=30, num_kv_heads=3, head_dim=64, block_size=256)


def _block(ns: Namespace) -> BlockPayload:
    rng = seeded_rng()
    shape = (ns.num_layers, ns.num_kv_heads, ns.block_size, ns.head_dim)
    return BlockPayload(keys=rng.standard_normal(shape).astype(np.float16),
                        values=rng.standard_normal(shape).astype(np.float16))


@pytest.fixture(scope="module")
def chain():
    tokens = token_array(list(range(1000, 1000 + 3 * NS.block_size)))
    return tokens, chain_hashes(NS, tokens)


# Llama-3-8B's layout with 128-token blocks: K and V exactly 8 MiB each, two parts each.
LARGE = Namespace("sha256:" + "ef" * 32, num_layers=32, num_kv_heads=8, head_dim=128, block_size=128)


@pytest.mark.parametrize("ns,parts", [(NS, 2), (LARGE, 4)])
def test_a_block_round_trips_bit_for_bit_and_encodes_deterministically(ns, parts):
    tokens = token_array(list(range(3 * ns.block_size)))
    hashes = chain_hashes(ns, tokens)
    block = _block(ns)
    who = identity(ns, hashes, tokens, 1)
    encoded = encode_block(ns, who, block)
    assert part_count(ns) == len(encoded) == parts and body_bytes(ns) > PART_BYTES
    assert max(len(p) for p in encoded) <= PART_BYTES + 4096  # part 0 adds the header
    assert encoded == encode_block(ns, who, block)  # same block, same bytes
    back = decode_block(ns, who, encoded)
    assert back.keys.tobytes() == block.keys.tobytes()
    assert back.values.tobytes() == block.values.tobytes()
    flipped = bytearray(encoded[-1])
    flipped[len(flipped) // 3] ^= 1
    with pytest.raises(RemoteValueError):
        decode_block(ns, who, encoded[:-1] + [bytes(flipped)])


def test_keys_are_content_addressed_one_hash_slot_per_block(chain):
    _, hashes = chain
    keys = block_keys(NS, hashes[0])
    assert len(keys) == 2 and keys[0] != keys[1]
    tag = b"{" + hashes[0].hex().encode() + b"}"
    assert all(tag in k for k in keys)  # Redis Cluster hashes only the tag: one slot
    assert block_keys(NS, hashes[1]) != keys
    other = Namespace("sha256:" + "cd" * 32, 30, 3, 64, 256)
    assert block_keys(other, hashes[0]) != keys
    # A client string never reaches a key: only hex digests and numbers.
    hostile = Namespace("model\r\n*1\r\n$8\r\nFLUSHALL{", 30, 3, 64, 256)
    assert all(k.decode().replace(":", "").replace("{", "").replace("}", "").isalnum()
               for k in block_keys(hostile, hashes[0]))


@pytest.mark.parametrize("claim", ["index", "tokens", "parent", "namespace"])
def test_a_value_for_another_block_is_rejected(chain, claim):
    """The reader checks what the value claims to be against what it asked for."""
    tokens, hashes = chain
    asked = identity(NS, hashes, tokens, 1)
    ns = NS
    if claim == "index":
        wrote = asked.__class__(asked.chain_hash, asked.parent, 2, asked.tokens)
    elif claim == "tokens":
        wrote = asked.__class__(asked.chain_hash, asked.parent, 1, b"\0" * len(asked.tokens))
    elif claim == "parent":
        wrote = asked.__class__(asked.chain_hash, hashes[2], 1, asked.tokens)
    else:
        wrote, ns = asked, Namespace("sha256:" + "cd" * 32, 30, 3, 64, 256)
    parts = encode_block(ns, wrote, _block(NS))
    with pytest.raises(RemoteValueError):
        decode_block(NS, asked, parts)


def test_damaged_truncated_or_missing_parts_are_rejected(chain):
    tokens, hashes = chain
    who = identity(NS, hashes, tokens, 0)
    parts = encode_block(NS, who, _block(NS))
    for part in range(len(parts)):
        for offset in (0, 7, 100, len(parts[part]) // 2, len(parts[part]) - 1):
            bad = list(parts)
            flipped = bytearray(bad[part])
            flipped[offset] ^= 0x10
            bad[part] = bytes(flipped)
            with pytest.raises(RemoteValueError):
                decode_block(NS, who, bad)
        cut = list(parts)
        cut[part] = cut[part][:-1]
        with pytest.raises(RemoteValueError):
            decode_block(NS, who, cut)
        gone = list(parts)
        gone[part] = None
        with pytest.raises(RemoteValueError, match="missing"):
            decode_block(NS, who, gone)
    with pytest.raises(RemoteValueError):
        decode_block(NS, who, [b"TQRB", parts[1]])
    with pytest.raises(RemoteValueError):
        decode_block(NS, who, [b"TQRB\x01\x00\xff\xff\xff\x00" + b"\x00" * 64, parts[1]])


def test_remote_addresses_parse_and_never_show_the_password():
    a = parse_remote("redis://:s3cret@10.0.0.5:6380/2")
    assert (a.cluster, a.tls, a.nodes, a.db, a.password) == (False, False, (("10.0.0.5", 6380),), 2, "s3cret")
    assert "s3cret" not in a.redacted and "s3cret" not in repr(a)
    assert a.redacted == "redis://:***@10.0.0.5:6380/2"
    c = parse_remote("rediss-cluster://app:pw@h1:7000,h2:7001,[::1]:7002")
    assert c.cluster and c.tls and c.username == "app" and c.password == "pw"
    assert c.nodes == (("h1", 7000), ("h2", 7001), ("::1", 7002))
    assert "pw" not in c.redacted
    assert parse_remote("redis://localhost").nodes == (("localhost", 6379),)
    for bad in ("localhost:6379", "http://h:1", "redis://h:0", "redis://h:70000", "redis://h:x",
                "redis://a:1,b:2", "redis-cluster://h:1/3", "redis://h:1/db"):
        with pytest.raises(InvalidArgument) as err:
            parse_remote(bad)
        assert "--remote" in str(err.value)
    for leaky in ("redis://:hunter2@h:99999", "redis://h:1/0?password=hunter2",
                  "redis://h:1/hunter2"):
        with pytest.raises(InvalidArgument) as err:
            parse_remote(leaky)
        assert "hunter2" not in str(err.value)
    assert parse_remote("redis://:in-url@h:1", "from-file").password == "from-file"
