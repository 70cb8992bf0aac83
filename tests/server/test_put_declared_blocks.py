"""PutRequest.num_blocks over the wire: a real daemon on loopback. A Put that declares how many
blocks it carries stores all of them or nothing. So a call the client cancelled, whose request
stream gRPC may end as if it had ended normally, leaves no prefix of its blocks behind (the
vanishing-clients run, tests/server/test_reliability_small.py, once found 4 of 6 blocks of an
unacknowledged Put stored)."""

from __future__ import annotations

import grpc
import pytest

from tqstore.client import KvStoreClient
from tqstore.config import ClientConfig
from tqstore.server import KvStoreService
from tqstore.v1 import tqstore_pb2 as pb
from tqstore.v1 import tqstore_pb2_grpc as pb_grpc
from tqstore.wire import fp16_chunks, namespace_to_proto

from tests.server.conftest import random_blocks


def _put(stub, ns, tokens, blocks, declared: int):
    def messages():
        yield pb.PutRequest(namespace=namespace_to_proto(ns), token_ids=tokens, first_block=0,
                            num_blocks=declared)
        for index, block in enumerate(blocks):
            for chunk in fp16_chunks(ns, index, block.keys, block.values):
                yield pb.PutRequest(chunk=chunk)
    return stub.Put(messages(), timeout=10)


def test_a_put_stores_its_declared_blocks_or_nothing(namespace, daemon, client, rng):
    tokens = rng.integers(0, 50000, 3 * namespace.block_size).tolist()
    blocks = random_blocks(namespace, 3, rng)
    stub = pb_grpc.KvStoreStub(grpc.insecure_channel(daemon.address))
    refusals = {
        "ends after 2 of 3 declared whole blocks": (blocks[:2], 3, "declared 3 blocks; 2 arrived"),
        "declares more blocks than the token ids name": (blocks, 4, "num_blocks 4"),
    }
    for name, (sent, declared, why) in refusals.items():
        with pytest.raises(grpc.RpcError) as err:
            _put(stub, namespace, tokens, sent, declared)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, name
        assert why in err.value.details(), (name, err.value.details())
        assert client.lookup(namespace, tokens).hit_blocks == 0, name
    # The count belongs to the first message only, like the other header fields.
    def late_count():
        yield pb.PutRequest(namespace=namespace_to_proto(namespace), token_ids=tokens,
                            first_block=0)
        for chunk in fp16_chunks(namespace, 0, blocks[0].keys, blocks[0].values):
            yield pb.PutRequest(chunk=chunk, num_blocks=1)
    with pytest.raises(grpc.RpcError) as err:
        stub.Put(late_count(), timeout=10)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "num_blocks: only the first may" in err.value.details()
    assert client.lookup(namespace, tokens).hit_blocks == 0
    # Not declared (0, an older client): the whole blocks that arrived are stored, as before.
    assert _put(stub, namespace, tokens, blocks[:1], 0).stored_blocks == 1
    assert client.lookup(namespace, tokens).hit_blocks == 1
    assert _put(stub, namespace, tokens, blocks, 3).stored_blocks == 3
    assert client.lookup(namespace, tokens).hit_blocks == 3


def test_the_client_declares_every_piece_of_an_upload(namespace, daemon, rng, monkeypatch):
    """client.put splits an upload into Put calls of put_piece_bytes; each declares its own
    block count, and the whole chain is stored."""
    seen = []
    real = KvStoreService._put_stream

    def recording(self, ns, tokens, first, partial, messages, charge, context, declared=0):
        seen.append((first, declared))
        return real(self, ns, tokens, first, partial, messages, charge, context, declared)

    monkeypatch.setattr(KvStoreService, "_put_stream", recording)
    blocks = random_blocks(namespace, 5, rng)
    piece = 2 * blocks[0].keys.nbytes * 2  # two blocks' keys and values
    tokens = rng.integers(0, 50000, 5 * namespace.block_size).tolist()
    with KvStoreClient(ClientConfig(daemon.address, put_piece_bytes=piece)) as c:
        assert c.put(namespace, tokens, 0, blocks) == 5
        assert c.lookup(namespace, tokens).hit_blocks == 5
    assert seen == [(0, 2), (2, 2), (4, 1)]
