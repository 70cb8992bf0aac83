"""The trailing partial block over the wire (proto: `trailing_partial`): a real daemon on
loopback. A client stores the tokens after a chain's last full block as one more link, looks it
up, and fetches it bit for bit; every malformed use is INVALID_ARGUMENT and stores nothing."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from tqstore.blocks import BlockPayload
from tqstore.client import KvStoreClient
from tqstore.codec import CodecConfig
from tqstore.config import ClientConfig
from tqstore.errors import InvalidArgument, NotFound
from tqstore.v1 import tqstore_pb2 as pb
from tqstore.v1 import tqstore_pb2_grpc as pb_grpc
from tqstore.wire import codec_to_proto, fp16_chunks, namespace_to_proto

from tests.server.conftest import random_blocks

TAIL = 11  # tokens of the partial block (block_size 16)


def _partial(ns, tokens: int, rng) -> BlockPayload:
    shape = (ns.num_layers, ns.num_kv_heads, tokens, ns.head_dim)
    return BlockPayload(keys=rng.standard_normal(shape).astype(np.float16),
                        values=rng.standard_normal(shape).astype(np.float16))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(params=["direct", "grpc"])
def reader(request, daemon):
    """A client reading full blocks from the daemon's files (direct) or over gRPC."""
    mode = "on" if request.param == "direct" else "off"
    with KvStoreClient(ClientConfig(daemon.address, direct_reads=mode)) as c:
        yield c


def test_a_chain_with_its_partial_block_is_a_whole_hit(namespace, reader, rng):
    bs = namespace.block_size
    tokens = rng.integers(0, 50000, 3 * bs + TAIL).tolist()
    full, tail = random_blocks(namespace, 3, rng), _partial(namespace, TAIL, rng)
    assert reader.put(namespace, tokens, 0, full, partial=tail) == 4

    before = reader.stats()
    found = reader.lookup(namespace, tokens, trailing_partial=True)
    assert (found.hit_blocks, found.partial_tokens) == (3, TAIL)
    after = reader.stats()  # inspect's hit rate counts the partial block's tokens too
    assert after.hit_tokens - before.hit_tokens == 3 * bs + TAIL
    assert after.tiers.local_hit_tokens - before.tiers.local_hit_tokens == 3 * bs + TAIL
    assert reader.lookup(namespace, tokens).partial_tokens == 0  # only when asked for
    got = reader.fetch_fp16_prefix(namespace, tokens, trailing_partial=True)
    assert got.tokens == 3 * bs + TAIL and len(got) == 3
    # Same host: the partial block is read from its file like the full ones (a Locate of it).
    assert got.source == ("direct" if reader.direct_reads else "grpc")
    want_k = np.concatenate([b.keys for b in full] + [tail.keys], axis=2)
    want_v = np.concatenate([b.values for b in full] + [tail.values], axis=2)
    assert _same(got.keys, want_k) and _same(got.values, want_v)
    # Without the flag the same fetch stops at the last full block.
    assert reader.fetch_fp16_prefix(namespace, tokens).tokens == 3 * bs


def test_another_tail_is_a_miss_of_the_partial_only(namespace, client, rng):
    bs = namespace.block_size
    tokens = rng.integers(0, 50000, 2 * bs + TAIL).tolist()
    client.put(namespace, tokens, 0, random_blocks(namespace, 2, rng),
               partial=_partial(namespace, TAIL, rng))
    changed = tokens[:-1] + [tokens[-1] + 1]  # one token of the tail differs
    longer = tokens + [7]  # same tokens, one more: another partial block
    for other in (changed, longer):
        found = client.lookup(namespace, other, trailing_partial=True)
        assert (found.hit_blocks, found.partial_tokens) == (2, 0)
        assert client.fetch_fp16_prefix(namespace, other, trailing_partial=True).tokens == 2 * bs


def test_a_prompt_shorter_than_a_block_is_its_partial_block(namespace, client, rng):
    tokens = rng.integers(0, 50000, TAIL).tolist()
    tail = _partial(namespace, TAIL, rng)
    assert client.put(namespace, tokens, 0, [], partial=tail) == 1
    found = client.lookup(namespace, tokens, trailing_partial=True)
    assert (found.hit_blocks, found.partial_tokens) == (0, TAIL)
    got = client.fetch_fp16_prefix(namespace, tokens, trailing_partial=True)
    assert got and got.tokens == TAIL and _same(got.keys, tail.keys)


def test_a_partial_block_without_its_chain_is_refused(namespace, client, rng):
    tokens = rng.integers(0, 50000, 2 * namespace.block_size + TAIL).tolist()
    with pytest.raises(NotFound):
        client.put(namespace, tokens, 2, [], partial=_partial(namespace, TAIL, rng))
    assert client.lookup(namespace, tokens, trailing_partial=True).partial_tokens == 0
    with pytest.raises(InvalidArgument):  # token ids that end on a block boundary have none
        client.put(namespace, tokens[:-TAIL], 0, random_blocks(namespace, 2, rng),
                   partial=_partial(namespace, TAIL, rng))


def _put(stub, ns, tokens, first, blocks, *, flag=True, later_flag=False):
    def messages():
        yield pb.PutRequest(namespace=namespace_to_proto(ns), token_ids=tokens,
                            first_block=first, trailing_partial=flag)
        for index, block in blocks:
            for n, chunk in enumerate(fp16_chunks(ns, index, block.keys, block.values)):
                yield pb.PutRequest(chunk=chunk, trailing_partial=later_flag and n == 0)
    return stub.Put(messages(), timeout=10)


def test_malformed_partial_puts_are_invalid_and_store_nothing(namespace, daemon, client, rng):
    bs = namespace.block_size
    tokens = rng.integers(0, 50000, bs + TAIL).tolist()
    client.put(namespace, tokens, 0, random_blocks(namespace, 1, rng))
    stub = pb_grpc.KvStoreStub(grpc.insecure_channel(daemon.address))
    right, wrong = _partial(namespace, TAIL, rng), _partial(namespace, TAIL - 1, rng)
    cases = {
        "wrong token count": (tokens, [(1, wrong)], {}),
        "the flag on token ids ending on a block boundary": (tokens[:bs], [], {}),
        "the flag without the partial block": (tokens, [], {}),
        "a partial block past the flag's block": (tokens, [(2, right)], {}),
        "a full-size block where the partial goes": (tokens, [(1, random_blocks(namespace, 1, rng)[0])], {}),
        "the partial block without the flag": (tokens, [(1, right)], {"flag": False}),
        "the flag on a later message": (tokens, [(1, right)], {"later_flag": True}),
    }
    for name, (ids, blocks, kw) in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            _put(stub, namespace, ids, 1, blocks, **kw)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, name
        assert client.lookup(namespace, tokens, trailing_partial=True).partial_tokens == 0, name
    assert _put(stub, namespace, tokens, 1, [(1, right)]).stored_blocks == 1
    assert client.lookup(namespace, tokens, trailing_partial=True).partial_tokens == TAIL


def test_the_partial_block_is_fp16_only(namespace, daemon, client, rng):
    tokens = rng.integers(0, 50000, namespace.block_size + TAIL).tolist()
    client.put(namespace, tokens, 0, random_blocks(namespace, 1, rng),
               partial=_partial(namespace, TAIL, rng))
    stub = pb_grpc.KvStoreStub(grpc.insecure_channel(daemon.address))
    codec = CodecConfig(key_bits=4, value_bits=3, seed=5)
    request = pb.FetchRequest(namespace=namespace_to_proto(namespace), token_ids=tokens,
                              form=pb.KV_FORM_TURBOQUANT, codec=codec_to_proto(codec),
                              trailing_partial=True)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Fetch(request, timeout=10))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "fp16" in err.value.details()


def test_a_partial_block_is_located_leased_and_checked_like_a_full_one(namespace, daemon,
                                                                       client, rng):
    """Locate with trailing_partial names the partial block's file (its index is the number
    of full blocks); a partial that is absent, or asked for with another index, is not
    located; a damaged file is refused by the reader and gRPC serves the partial instead."""
    bs = namespace.block_size
    tokens = rng.integers(0, 50000, 2 * bs + TAIL).tolist()
    tail = _partial(namespace, TAIL, rng)
    client.put(namespace, tokens, 0, random_blocks(namespace, 2, rng), partial=tail)
    stub = pb_grpc.KvStoreStub(grpc.insecure_channel(daemon.address))

    def locate(ids, first, partial=True):
        return stub.Locate(pb.LocateRequest(namespace=namespace_to_proto(namespace),
                                            token_ids=ids, first_block=first,
                                            trailing_partial=partial))

    found = locate(tokens, 2)
    assert [b.block_index for b in found.blocks] == [2]
    assert found.blocks[0].raw_size == tail.keys.nbytes + tail.values.nbytes
    assert list(locate(tokens[:-1], 2).blocks) == []  # another tail: not stored
    for first in (1, 3):
        with pytest.raises(grpc.RpcError) as wrong:
            locate(tokens, first)
        assert wrong.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as no_tail:
        locate(tokens[:2 * bs], 2)
    assert no_tail.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    import os
    from tqstore.payload_format import file_name
    from tqstore.prefix_hash import hash_block_tokens, hash_prefix_blocks
    key = hash_block_tokens(hash_prefix_blocks(namespace, tokens)[-1], tokens[2 * bs:])
    path = os.path.join(found.blocks_dir, file_name(key))
    with open(path, "r+b") as f:  # one byte of the body flipped: the checksum fails here
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    with KvStoreClient(ClientConfig(daemon.address, direct_reads="on")) as direct:
        got = direct.fetch_fp16_prefix(namespace, tokens, trailing_partial=True)
    # The daemon verifies its file too: the damaged partial is gone, a shorter hit.
    assert got.tokens == 2 * bs and got.source == "direct"
