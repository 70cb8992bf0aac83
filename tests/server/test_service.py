"""The daemon over a real gRPC server on loopback and a real LMDB store in a temp dir."""

import numpy as np
import pytest
import grpc
import mlx.core as mx

from tqstore.client import KvStoreClient
from tqstore.codec import CodecConfig, layer_codecs
from tqstore.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from tqstore.v1 import tqstore_pb2 as pb
from tqstore.v1 import tqstore_pb2_grpc as pb_grpc
from tqstore.wire import namespace_to_proto

from tests.server.conftest import random_blocks
from tests.seeding import seeded_rng


def _tokens(n, rng=None):
    rng = rng or seeded_rng()
    return rng.integers(0, 49152, size=n).tolist()


def test_put_lookup_fetch_fp16_round_trip_is_bitwise(client, namespace):
    tokens = _tokens(namespace.block_size * 3 + 5)
    blocks = random_blocks(namespace, 3)
    assert client.lookup(namespace, tokens).hit_blocks == 0
    assert client.put(namespace, tokens, 0, blocks) == 3
    hit = client.lookup(namespace, tokens)
    assert (hit.hit_blocks, hit.hit_tokens, hit.lookup_tokens) == (3, 48, 53)
    got = client.fetch_fp16(namespace, tokens)
    assert len(got) == 3
    for a, b in zip(got, blocks):
        assert a.keys.tobytes() == b.keys.tobytes() and a.values.tobytes() == b.values.tobytes()
    # A prompt that diverges inside block 1 hits block 0 only.
    other = tokens[:20] + [t + 1 for t in tokens[20:]]
    assert client.lookup(namespace, other).hit_blocks == 1
    # A later block appended to the chain after a partial hit.
    assert client.put(namespace, other, 1, random_blocks(namespace, 2)) == 2
    assert client.lookup(namespace, other).hit_blocks == 3


def test_turboquant_fetch_equals_generator_quantizer(client, namespace):
    tokens = _tokens(namespace.block_size * 2)
    blocks = random_blocks(namespace, 2)
    client.put(namespace, tokens, 0, blocks)
    config = CodecConfig(key_bits=4, value_bits=3, seed=5)
    fetched = client.fetch_turboquant(namespace, tokens, config)
    assert len(fetched) == 2
    for block, codes in zip(blocks, fetched):
        for layer in range(namespace.num_layers):
            kc, vc = layer_codecs(config, layer, namespace.num_kv_heads, namespace.head_dim)
            qk = kc.quantize(mx.array(block.keys[layer][None]))
            qv = vc.quantize(mx.array(block.values[layer][None]))
            assert np.array(qk.codes)[0].tobytes() == codes["key_codes"][layer].tobytes()
            assert np.array(qk.scales)[0].tobytes() == codes["key_scales"][layer].tobytes()
            assert np.array(qv.codes)[0].tobytes() == codes["value_codes"][layer].tobytes()
            assert np.array(qv.scales)[0].tobytes() == codes["value_scales"][layer].tobytes()


def test_namespaces_never_mix(client, namespace):
    tokens = _tokens(32)
    client.put(namespace, tokens, 0, random_blocks(namespace, 2))
    other_model = type(namespace)("other-model", 4, 2, 64, 16)
    assert client.lookup(other_model, tokens).hit_blocks == 0
    with pytest.raises(NotFound):
        client.fetch_fp16(other_model, tokens)


def test_bad_requests_get_clear_statuses_and_daemon_keeps_serving(client, daemon, namespace):
    tokens = _tokens(32)
    stub = pb_grpc.KvStoreStub(grpc.insecure_channel(daemon.address))
    bad_ns = namespace_to_proto(namespace)
    bad_ns.block_size = 0
    with pytest.raises(grpc.RpcError) as err:
        stub.Lookup(pb.LookupRequest(namespace=bad_ns, token_ids=tokens))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "block_size" in err.value.details()
    with pytest.raises(NotFound):  # nothing stored yet
        client.fetch_fp16(namespace, tokens)
    with pytest.raises(InvalidArgument, match="outside"):
        client.fetch_fp16(namespace, tokens, first_block=1, num_blocks=5)
    with pytest.raises(grpc.RpcError) as err:
        stub.Fetch(pb.FetchRequest(namespace=namespace_to_proto(namespace), token_ids=tokens,
                                   form=pb.KV_FORM_TURBOQUANT)).next()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "codec" in err.value.details()
    # A chunk of the wrong shape.
    wrong = random_blocks(type(namespace)("test-model", 4, 2, 32, 16), 1)
    with pytest.raises(InvalidArgument, match="shape"):
        client.put(namespace, tokens, 0, wrong)
    # An orphan: block 1 without block 0.
    with pytest.raises(NotFound):
        client.put(namespace, tokens, 1, random_blocks(namespace, 1))
    # Over the per-Put byte limit (8 MiB in the fixture): 4 layers * 2 heads * 16 * 64 * 2 B * K,V
    # = 32 KiB per block, so 300 blocks.
    many = _tokens(16 * 300)
    with pytest.raises(ResourceExhausted):
        client.put(namespace, many, 0, random_blocks(namespace, 300))
    # Still serving, nothing partial stored.
    assert client.lookup(namespace, many).hit_blocks == 0
    assert client.put(namespace, tokens, 0, random_blocks(namespace, 2)) == 2
    assert client.is_serving()


def test_stats_count_lookups_hits_and_blocks(client, namespace):
    tokens = _tokens(64)
    client.put(namespace, tokens, 0, random_blocks(namespace, 2))
    client.lookup(namespace, tokens)          # 2 of 4 blocks hit
    client.lookup(namespace, _tokens(64))     # miss
    s = client.stats()
    assert s.blocks == 2 and s.lookups >= 2
    assert s.lookup_tokens == 128 and s.hit_tokens == 32
    assert list(s.recent_request_hit_rates) == [0.5, 0.0]
    assert s.namespaces[0].model == "test-model" and s.namespaces[0].blocks == 2
    assert dict(s.block_size_histogram) == {16: 2}
    assert s.logical_bytes == 2 * 2 * 4 * 2 * 16 * 64 * 2


def test_unreachable_daemon_is_unavailable_not_a_crash(namespace):
    with KvStoreClient("127.0.0.1:1") as c:
        assert not c.is_serving(timeout=0.5)
        with pytest.raises(Unavailable):
            c.lookup(namespace, [1] * 16)
