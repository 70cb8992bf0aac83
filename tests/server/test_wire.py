"""The wire helpers the daemon and the client share (tqstore/wire.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tqstore.blocks import PrefixKV
from tqstore.errors import InvalidArgument
from tqstore.prefix_hash import Namespace
from tqstore.v1 import tqstore_pb2 as pb
from tqstore.wire import (PrefixWriter, encode_fp16_chunk, fp16_chunks, fp16_chunks_encoded,
                          parse_fp16_chunk, tensor_to_proto)


def _parsed(chunk: pb.KvChunk):
    """What the client's Fetch deserializer hands PrefixWriter for this message."""
    return parse_fp16_chunk(chunk.SerializeToString())


@pytest.mark.parametrize("block_index", [0, 1, 300, 70000])
def test_pre_encoded_fp16_chunks_are_the_messages_bytes(block_index, rng):
    """The daemon sends fp16 chunks it encoded itself; they must be byte for byte what
    protobuf serializes (zero fields omitted, multi-byte varints, every layer split)."""
    ns = Namespace("m", num_layers=30, num_kv_heads=3, head_dim=64, block_size=256)
    shape = (30, 3, 256, 64)
    keys = rng.standard_normal(shape).astype(np.float16)
    values = rng.standard_normal(shape).astype(np.float16)
    ours = list(fp16_chunks_encoded(ns, block_index, keys, values))
    theirs = list(fp16_chunks(ns, block_index, keys, values))
    assert len(ours) == len(theirs) > 1
    for a, b in zip(ours, theirs):
        assert a.data == b.SerializeToString()
        assert a.block_index == block_index and a.ByteSize() == b.ByteSize()
        assert pb.KvChunk.FromString(a.data) == b


def test_encode_refuses_arrays_it_cannot_send_as_they_are(rng):
    keys = rng.standard_normal((2, 1, 4, 8)).astype(np.float16)
    with pytest.raises(InvalidArgument):
        encode_fp16_chunk(0, 0, keys.astype(np.float32), keys)
    with pytest.raises(InvalidArgument):
        encode_fp16_chunk(0, 0, keys[:, :, ::2], keys[:, :, ::2])


def test_prefix_writer_places_chunks_and_rejects_what_does_not_fit(rng):
    ns = Namespace("m", num_layers=4, num_kv_heads=2, head_dim=8, block_size=4)
    shape = (4, 2, 4, 8)
    blocks = [(rng.standard_normal(shape).astype(np.float16),
               rng.standard_normal(shape).astype(np.float16)) for _ in range(3)]
    out = PrefixKV.empty(shape, 2)
    writer = PrefixWriter(ns, out, first_block=5)
    done = []
    for index in (6, 5):  # out of order, as parallel streams deliver them
        k, v = blocks[index - 5]
        for chunk in fp16_chunks(ns, index, k, v):
            done.append(writer.add(_parsed(chunk)))
    assert [d for d in done if d is not None] == [6, 5]
    for slot in range(2):
        assert np.array_equal(out.block(slot).keys, blocks[slot][0])
        assert np.array_equal(out.block(slot).values, blocks[slot][1])
    k, v = blocks[2]
    with pytest.raises(InvalidArgument, match="outside the requested run"):
        writer.add(_parsed(next(fp16_chunks(ns, 7, k, v))))
    half = pb.KvChunk(block_index=5, layer_start=0, layer_count=2,
                      keys=tensor_to_proto(k[0:2]), values=tensor_to_proto(v[0:2]))
    fresh = PrefixWriter(ns, out, first_block=5)
    assert fresh.add(_parsed(half)) is None
    with pytest.raises(InvalidArgument, match="overlapping"):
        fresh.add(_parsed(half))
    bad = pb.KvChunk()
    bad.CopyFrom(half)
    bad.keys.dtype = "uint8"
    with pytest.raises(InvalidArgument, match="dtype"):
        PrefixWriter(ns, out, 5).add(_parsed(bad))


def test_the_clients_chunk_parser_reads_what_protobuf_writes_and_rejects_damage(rng):
    ns = Namespace("m", num_layers=6, num_kv_heads=2, head_dim=64, block_size=512)
    shape = (6, 2, 512, 64)
    keys = rng.standard_normal(shape).astype(np.float16)
    values = rng.standard_normal(shape).astype(np.float16)
    chunks = list(fp16_chunks(ns, 9, keys, values))
    assert len(chunks) > 1
    out = PrefixKV.empty(shape, 1)
    writer = PrefixWriter(ns, out, first_block=9)
    for chunk in chunks:
        view = parse_fp16_chunk(chunk.SerializeToString())
        assert (view.block_index, view.layer_start, view.layer_count) == \
            (chunk.block_index, chunk.layer_start, chunk.layer_count)
        writer.add(view)
    assert np.array_equal(out.keys, keys) and np.array_equal(out.values, values)
    data = chunks[0].SerializeToString()
    with pytest.raises(InvalidArgument, match="malformed"):
        parse_fp16_chunk(data[:-10])  # the values tensor cut short
    short = pb.KvChunk()
    short.CopyFrom(chunks[0])
    short.keys.data = short.keys.data[:-2]
    with pytest.raises(InvalidArgument, match="expected float16"):
        PrefixWriter(ns, PrefixKV.empty(shape, 1), 9).add(parse_fp16_chunk(short.SerializeToString()))
