"""The KvStore gRPC service over one BlockStore (tqstore/ssd) and its tiers; the running daemon
(bind, health, drain) is tqstore.daemon.

- Lookup: longest present prefix of full blocks. Fetch: streams blocks in ~1 MiB layer chunks,
  as stored fp16 or re-quantized (tqstore.requantize) with the caller's codec settings.
  Put: client-streaming fp16 blocks, acknowledged only after the store made them durable.
- Errors map to gRPC status codes in one place (_STATUS / _status_for); the daemon keeps
  serving after any bad request.
- Fetch semantics on a block that fails verification mid-stream: the stream ends early
  (the caller uses the verified prefix it received); if the first requested block is missing
  the call fails with NOT_FOUND.
- One log line per RPC (tqstore.rpc_log), one start-up line.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from typing import Iterable, Iterator

import grpc

from tqstore.blocks import BlockPayload
from tqstore.config import ServerConfig
from tqstore.errors import Corruption, InvalidArgument, NotFound, ResourceExhausted, TqstoreError, Unavailable
from tqstore.payload_format import FILE_VERSION
from tqstore.remote.tiers import Tiers
from tqstore.requantize import Requantizer
from tqstore.ssd.store import BlockStore
from tqstore.v1 import tqstore_pb2 as pb
from tqstore.v1 import tqstore_pb2_grpc as pb_grpc
from tqstore.wire import (BlockAssembler, codec_from_proto, fp16_chunks_encoded, layers_per_chunk,
                          namespace_from_proto, serialize_chunk, tensor_to_proto)

log = logging.getLogger("tqstore.server")
SERVICE_NAME = "tqstore.v1.KvStore"

_STATUS: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Corruption, grpc.StatusCode.NOT_FOUND),  # a block that fails verification is a miss
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
]


def _status_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    code = _status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal error")
    context.abort(code, str(exc) or type(exc).__name__)


def _full_blocks(ns, token_ids) -> int:
    return len(token_ids) // ns.block_size


class KvStoreService(pb_grpc.KvStoreServicer):
    def __init__(self, store: BlockStore, config: ServerConfig, tiers: Tiers | None = None) -> None:
        self.store = store
        self.tiers = tiers or Tiers(store)
        self.config = config
        self.requantizer = Requantizer()
        self._recent: collections.deque[float] = collections.deque(maxlen=config.recent_requests)
        self._recent_lock = threading.Lock()

    # -- Lookup ----------------------------------------------------------------------------
    def Lookup(self, request: pb.LookupRequest, context) -> pb.LookupResponse:
        try:
            ns = namespace_from_proto(request.namespace)
            tokens = list(request.token_ids)
            hit = self.tiers.lookup(ns, tokens)
            looked = len(tokens)  # hit rate counts every prompt token, as the store and vLLM do
            if looked:
                with self._recent_lock:
                    self._recent.append(hit * ns.block_size / looked)
            return pb.LookupResponse(hit_blocks=hit, hit_tokens=hit * ns.block_size,
                                     lookup_tokens=looked)
        except Exception as exc:  # noqa: BLE001 - mapped to a status, daemon keeps serving
            _abort(context, exc)

    # -- Fetch -----------------------------------------------------------------------------
    def Fetch(self, request: pb.FetchRequest, context) -> Iterator[pb.KvChunk]:
        try:
            ns = namespace_from_proto(request.namespace)
            tokens = list(request.token_ids)
            full = _full_blocks(ns, tokens)
            first = request.first_block
            count = request.num_blocks or max(full - first, 0)
            if first + count > full or count == 0:
                raise InvalidArgument(f"blocks [{first}, {first + count}) outside the {full} full "
                                      f"blocks of {len(tokens)} tokens")
            codec = None
            if request.form == pb.KV_FORM_TURBOQUANT:
                if not request.HasField("codec"):
                    raise InvalidArgument("KV_FORM_TURBOQUANT needs codec settings")
                codec = codec_from_proto(request.codec)
                self.requantizer.codecs(ns, codec)  # validate before streaming
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc)
            return
        blocks = self.tiers.blocks(ns, tokens, first, count)
        while context.is_active():
            try:
                index, payload = next(blocks)
            except StopIteration:
                return  # the verified prefix already sent is the hit
            except Exception as exc:  # noqa: BLE001 - NotFound: the first block is missing
                _abort(context, exc)
                return
            if codec is None:
                yield from fp16_chunks_encoded(ns, index, payload.keys, payload.values)
            else:
                yield from self._turboquant_chunks(ns, codec, index, payload)

    def _turboquant_chunks(self, ns, codec, index: int, payload: BlockPayload) -> Iterator[pb.KvChunk]:
        q = self.requantizer.quantize_block(ns, codec, payload.keys, payload.values)
        per_token = q["key_codes"].shape[-1] + q["value_codes"].shape[-1] + 4
        step = layers_per_chunk(ns, per_token)
        for start in range(0, ns.num_layers, step):
            sl = slice(start, min(start + step, ns.num_layers))
            yield pb.KvChunk(block_index=index, layer_start=start, layer_count=sl.stop - start,
                             **{name: tensor_to_proto(a[sl]) for name, a in q.items()})

    # -- Put -------------------------------------------------------------------------------
    def Put(self, request_iterator: Iterable[pb.PutRequest], context) -> pb.PutResponse:
        try:
            ns = tokens = assembler = None
            first = 0
            blocks: dict[int, BlockPayload] = {}
            received = 0
            for msg in request_iterator:
                if ns is None:
                    if not msg.HasField("namespace"):
                        raise InvalidArgument("the first Put message must carry the namespace")
                    ns = namespace_from_proto(msg.namespace)
                    tokens = list(msg.token_ids)
                    first = msg.first_block
                    assembler = BlockAssembler(ns)
                if not msg.HasField("chunk"):
                    continue
                received += msg.chunk.ByteSize()
                if received > self.config.max_put_bytes:
                    raise ResourceExhausted(f"Put stream over {self.config.max_put_bytes} bytes")
                index = msg.chunk.block_index
                if index < first or index >= _full_blocks(ns, tokens):
                    raise InvalidArgument(f"block {index} outside [{first}, "
                                          f"{_full_blocks(ns, tokens)}) for these token ids")
                done = assembler.add(msg.chunk)
                if done is not None:
                    blocks[done[0]] = BlockPayload(keys=done[1]["keys"], values=done[1]["values"])
            if ns is None:
                raise InvalidArgument("empty Put stream")
            if assembler.incomplete():
                raise InvalidArgument(f"blocks {assembler.incomplete()} arrived incomplete")
            expected = list(range(first, first + len(blocks)))
            if sorted(blocks) != expected:
                raise InvalidArgument(f"Put blocks {sorted(blocks)} are not contiguous from {first}")
            if blocks:
                self.tiers.put_blocks(ns, tokens, first, [blocks[i] for i in expected])
            return pb.PutResponse(stored_blocks=len(blocks))
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc)

    # -- Locate ----------------------------------------------------------------------------
    def Locate(self, request: pb.LocateRequest, context) -> pb.LocateResponse:
        """Where a same-host reader finds the verified prefix's payload files (the proto's
        LocateRequest comment gives the contract)."""
        try:
            ns = namespace_from_proto(request.namespace)
            lease_ms = min(request.lease_ms or self.config.lease_ms, self.config.max_lease_ms)
            found = self.store.locate(ns, list(request.token_ids), request.first_block,
                                      request.num_blocks, lease_ms / 1000)
            return pb.LocateResponse(
                blocks_dir=os.path.abspath(self.store.blocks_dir), store_id=self.store.store_id,
                lease_ms=lease_ms, payload_version=FILE_VERSION,
                more_by_fetch=self.tiers.remote is not None,
                blocks=[pb.BlockLocation(block_index=i, file_size=rec.file_size,
                                         raw_size=rec.raw_size, stored_size=rec.stored_size,
                                         compression=rec.compression,
                                         chunk_lengths=[n for n, _ in rec.chunks],
                                         chunk_checksums=[c for _, c in rec.chunks])
                        for i, rec in found])
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc)

    # -- Stats -----------------------------------------------------------------------------
    def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        try:
            s = self.store.stats()
            with self._recent_lock:
                recent = list(self._recent)
            return pb.StatsResponse(
                blocks=s.blocks, bytes_on_disk=s.bytes_on_disk, logical_bytes=s.logical_bytes,
                max_bytes=s.max_bytes, lookups=s.lookups, lookup_tokens=s.lookup_tokens,
                hit_tokens=s.hit_tokens, evictions=s.evictions,
                verification_failures=s.verification_failures, quarantined=s.quarantined,
                compression=s.compression, payload_bytes=s.payload_bytes, index_bytes=s.index_bytes,
                namespaces=[pb.NamespaceRow(digest=n.digest, model=n.model, num_layers=n.layout[0],
                                            num_kv_heads=n.layout[1], head_dim=n.layout[3],
                                            block_size=n.block_size, blocks=n.blocks, bytes=n.bytes)
                            for n in s.namespaces],
                block_size_histogram=dict(s.block_size_histogram),
                recent_request_hit_rates=recent, attention_backend=_attention_backend(),
                tiers=_tier_stats(self.tiers.stats()))
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc)


def _tier_stats(stats: dict[str, object]) -> pb.TierStats:
    """Tiers.stats() as the proto message: counters keep their names; the local copies are the
    filler's "fills"."""
    renamed = {"fills": "local_copies", "fills_failed": "local_copies_failed",
               "fills_dropped": "local_copies_dropped"}
    fields = {f.name for f in pb.TierStats.DESCRIPTOR.fields}
    out = {}
    for key, value in stats.items():
        name = renamed.get(key, key)
        if name in fields:
            out[name] = value
    return pb.TierStats(**out)


def add_service(servicer: KvStoreService, server: grpc.Server) -> None:
    """pb_grpc.add_KvStoreServicer_to_server, except that Fetch's responses are serialized by
    wire.serialize_chunk, so fp16 chunks go out pre-encoded (one copy of their bytes)."""
    captured: dict[str, grpc.RpcMethodHandler] = {}

    class _Capture:
        def add_generic_rpc_handlers(self, handlers) -> None:
            pass

        def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
            captured.update(handlers)

    pb_grpc.add_KvStoreServicer_to_server(servicer, _Capture())
    captured["Fetch"] = grpc.unary_stream_rpc_method_handler(
        servicer.Fetch, request_deserializer=pb.FetchRequest.FromString,
        response_serializer=serialize_chunk)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, captured),))
    server.add_registered_method_handlers(SERVICE_NAME, captured)


def _attention_backend() -> str:
    try:
        from tqstore.metal.dispatch import active_backend
    except ImportError:
        return "reference"
    return active_backend()
