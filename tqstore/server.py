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

Hostile input (issue 17). Invariants:
- No input yields INTERNAL or UNKNOWN: bytes that do not decode reach the handler as an
  _Undecodable marker (grpc answers INTERNAL when a request deserializer raises) and become
  INVALID_ARGUMENT; every validation failure is a tqstore error; environment failures map to
  RESOURCE_EXHAUSTED (disk full, memory) or UNAVAILABLE (index damage, I/O); a client that
  went away (or a stream the idle watchdog cancelled) ends quietly as CANCELLED. INTERNAL is
  left for genuine bugs, logged with their traceback.
- The work one request causes is bounded before it is done: token ids are counted
  (len() of the repeated field is free) before they are copied, blocks per Fetch/Locate are
  capped, and a heavy request needs a heavy slot or is refused at once (RESOURCE_EXHAUSTED),
  so small requests never wait behind heavy ones. Heavy: over heavy_request_tokens token ids,
  or a Fetch/Put naming over heavy_request_bytes of blocks, or a TurboQuant Fetch whose
  per-block work is over heavy_turboquant_work. A Put's held bytes are bounded per stream
  (max_put_bytes) and daemon-wide (put_budget_bytes); threads and stream life are bounded by
  tqstore.request_limits (installed by tqstore.daemon).
- Stats fits the message limit whatever the store holds (tqstore.stats_reply).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import logging
import os
import threading
from typing import Any, Callable, Iterable, Iterator

import grpc
import lmdb
import numpy as np

from tqstore.blocks import BlockPayload
from tqstore.config import ServerConfig
from tqstore.errors import (Corruption, InvalidArgument, NotFound, ResourceExhausted, TqstoreError,
                            Unauthenticated, Unavailable)
from tqstore.payload_format import FILE_VERSION
from tqstore.remote.tiers import Tiers
from tqstore.request_limits import CHUNK_OVERHEAD_BYTES, PutBytes, Slots
from tqstore.requantize import Requantizer
from tqstore.ssd.opening import mark_index_suspect
from tqstore.ssd.store import BlockStore
from tqstore.stats_reply import stats_response
from tqstore.v1 import tqstore_pb2 as pb
from tqstore.v1 import tqstore_pb2_grpc as pb_grpc
from tqstore.wire import (BlockAssembler, codec_from_proto, fp16_chunks_encoded, layers_per_chunk,
                          namespace_from_proto, serialize_chunk, tensor_to_proto)

log = logging.getLogger("tqstore.server")
SERVICE_NAME = "tqstore.v1.KvStore"
_MAX_DETAILS = 1000  # characters of an error's text sent back (gRPC trailers are size-limited)

_STATUS: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Corruption, grpc.StatusCode.NOT_FOUND),  # a block that fails verification is a miss
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (MemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (lmdb.MapFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # A damaged index or one LMDB cannot read: not the request's fault, and the store rebuilds
    # damaged indexes (tqstore/ssd), so "try again later" is the truthful answer.
    (lmdb.Error, grpc.StatusCode.UNAVAILABLE),
]
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def _status_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    if isinstance(exc, OSError):  # the disk, not the request: full is a budget, the rest a fault
        return (grpc.StatusCode.RESOURCE_EXHAUSTED if exc.errno in _DISK_FULL
                else grpc.StatusCode.UNAVAILABLE)
    return grpc.StatusCode.INTERNAL


def _details(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, lmdb.Error):
        text = f"store index unavailable ({type(exc).__name__}: {text}); retry later"
    elif isinstance(exc, OSError) and not isinstance(exc, TqstoreError):
        text = f"{'disk full' if exc.errno in _DISK_FULL else 'store I/O error'}: {text}"
    return text if len(text) <= _MAX_DETAILS else text[:_MAX_DETAILS] + "..."


# LMDB errors that mean the index file itself is damaged under the running daemon (measured:
# zeros over data.mdb's pages give MDB_CORRUPTED or MDB_BAD_TXN on every read from then on).
# Only a fresh open can repair that (probe, then rebuild from the payloads): the daemon asks
# for one (KvStoreService.index_damaged; tqstore.daemon restarts through the supervisor).
INDEX_DAMAGE = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PanicError, lmdb.BadTxnError,
                lmdb.InvalidError, lmdb.VersionMismatchError)


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, grpc.RpcError) or not context.is_active():
        # The client went away (the request iterator raises RpcError then) or the stream
        # watchdog cancelled the call: nobody to answer. abort() ends it quietly (gRPC logs
        # any other exception) and leaves CANCELLED for the RPC log and metrics.
        context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled")
    code = _status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal error")
    context.abort(code, _details(exc))


class _Undecodable:
    """Stands in for a request whose bytes do not parse as its message (see _lenient)."""

    __slots__ = ("message", "nbytes")

    def __init__(self, message: str, nbytes: int) -> None:
        self.message, self.nbytes = message, nbytes

    def ByteSize(self) -> int:  # noqa: N802 - the RPC log sizes requests with it
        return self.nbytes


def _lenient(message_cls: Any) -> Callable[[bytes], Any]:
    """A request deserializer that never raises (gRPC turns a raising one into INTERNAL)."""
    name = message_cls.DESCRIPTOR.name

    def parse(data: bytes) -> Any:
        try:
            return message_cls.FromString(data)
        except Exception:  # noqa: BLE001 - DecodeError, nesting too deep: all the client's fault
            return _Undecodable(name, len(data))
    return parse


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(f"request does not decode as {request.message}")
    return request


def _full_blocks(ns, token_ids) -> int:
    return len(token_ids) // ns.block_size


def _has_tail(ns, token_ids) -> bool:
    """Whether token_ids end inside a block (they have a trailing partial block)."""
    return len(token_ids) % ns.block_size > 0


def _block_bytes(ns) -> int:
    """fp16 K+V bytes of one block of the namespace's layout."""
    return 2 * 2 * ns.num_layers * ns.num_kv_heads * ns.block_size * ns.head_dim


def _turboquant_work(ns) -> int:
    """Per-block work of re-quantizing (rotations per layer and head, codes per token)."""
    return ns.num_layers * ns.num_kv_heads * ns.head_dim * (ns.block_size + ns.head_dim)


def _token_array(token_ids: Any) -> np.ndarray:
    """The repeated field as uint32 (4 bytes a token; a list would hold a Python int each)."""
    return np.array(token_ids, dtype=np.uint32)


class KvStoreService(pb_grpc.KvStoreServicer):
    def __init__(self, store: BlockStore, config: ServerConfig, tiers: Tiers | None = None) -> None:
        self.store = store
        self.tiers = tiers or Tiers(store)
        self.config = config
        self.requantizer = Requantizer()
        self._recent: collections.deque[float] = collections.deque(maxlen=config.recent_requests)
        self._recent_lock = threading.Lock()
        self._heavy = Slots(config.max_heavy_requests,
                            f"heavy requests (over {config.heavy_request_tokens} token ids, "
                            f"{config.heavy_request_bytes} bytes of blocks or a large "
                            f"TurboQuant layout)")
        self.put_bytes = PutBytes(config.put_budget_bytes, config.max_put_bytes)
        self.index_damaged = threading.Event()  # set on the first INDEX_DAMAGE error

    def _abort(self, context: grpc.ServicerContext, exc: BaseException) -> None:
        if isinstance(exc, INDEX_DAMAGE) and not self.index_damaged.is_set():
            log.error("the store's index is damaged under the running daemon (%s: %s): asking "
                      "for a restart, which rebuilds it from the payload files",
                      type(exc).__name__, exc)
            # The next writer open must rebuild even if its probe finds nothing (damage LMDB
            # only meets on some paths, e.g. the free list): leave the marker first.
            mark_index_suspect(self.store.path, f"{type(exc).__name__}: {exc}")
            self.index_damaged.set()
        _abort(context, exc)

    # -- request bounds ----------------------------------------------------------------------
    def _namespace(self, msg: pb.Namespace):
        return namespace_from_proto(msg, max_string_bytes=self.config.max_string_bytes,
                                    min_block_size=self.config.min_block_size)

    def _count_tokens(self, token_ids: Any) -> int:
        n = len(token_ids)
        if n > self.config.max_request_tokens:
            raise InvalidArgument(f"{n} token ids over the limit of {self.config.max_request_tokens}")
        return n

    def _is_heavy(self, tokens: int, ns=None, blocks: int = 0, codec=None) -> bool:
        """Whether a request needs a heavy slot (see the module docstring)."""
        config = self.config
        if tokens > config.heavy_request_tokens:
            return True
        if ns is None:
            return False
        return (blocks * _block_bytes(ns) > config.heavy_request_bytes
                or (codec is not None and _turboquant_work(ns) > config.heavy_turboquant_work))

    def _block_count(self, first: int, num_blocks: int, full: int) -> int:
        """Blocks a Fetch/Locate names: num_blocks, or 0 for "to the last full block" (capped
        at max_request_blocks: the answer may be a shorter prefix anyway)."""
        limit = self.config.max_request_blocks
        if num_blocks > limit:
            raise InvalidArgument(f"num_blocks {num_blocks} over the limit of {limit}")
        count = num_blocks or min(max(full - first, 0), limit)
        if first + count > full or count == 0:
            raise InvalidArgument(f"blocks [{first}, {first + count}) outside the {full} full "
                                  f"blocks of the token ids")
        return count

    # -- Lookup ----------------------------------------------------------------------------
    def Lookup(self, request: pb.LookupRequest, context) -> pb.LookupResponse:
        try:
            request = _decoded(request)
            ns = self._namespace(request.namespace)
            with self._heavy.hold(self._is_heavy(self._count_tokens(request.token_ids))):
                tokens = _token_array(request.token_ids)
                hit = self.tiers.lookup(ns, tokens)
                partial = 0
                if (request.trailing_partial and _has_tail(ns, tokens)
                        and hit == _full_blocks(ns, tokens)):
                    partial = self.tiers.lookup_partial(ns, tokens)
            looked = len(tokens)  # hit rate counts every prompt token, as the store and vLLM do
            if looked:
                with self._recent_lock:
                    self._recent.append((hit * ns.block_size + partial) / looked)
            return pb.LookupResponse(hit_blocks=hit, hit_tokens=hit * ns.block_size,
                                     lookup_tokens=looked, partial_tokens=partial)
        except Exception as exc:  # noqa: BLE001 - mapped to a status, daemon keeps serving
            self._abort(context, exc)

    # -- Fetch -----------------------------------------------------------------------------
    def Fetch(self, request: pb.FetchRequest, context) -> Iterator[pb.KvChunk]:
        with contextlib.ExitStack() as held:  # the heavy slot, for the whole stream
            try:
                request = _decoded(request)
                ns = self._namespace(request.namespace)
                n_tokens = self._count_tokens(request.token_ids)
                if request.form not in (pb.KV_FORM_FP16, pb.KV_FORM_TURBOQUANT):
                    raise InvalidArgument(f"unknown KvForm {request.form}")
                first = request.first_block
                full = _full_blocks(ns, request.token_ids)
                # The trailing partial block, when asked for, is block index `full`.
                tail = request.trailing_partial and _has_tail(ns, request.token_ids)
                count = self._block_count(first, request.num_blocks, full + tail)
                full_count, partial = max(0, min(first + count, full) - first), first + count > full
                codec = None
                if request.form == pb.KV_FORM_TURBOQUANT:
                    if request.trailing_partial:
                        raise InvalidArgument("trailing_partial is served in the fp16 form only")
                    if not request.HasField("codec"):
                        raise InvalidArgument("KV_FORM_TURBOQUANT needs codec settings")
                    codec = codec_from_proto(request.codec)
                    _check_requantizable(ns, codec)
                held.enter_context(self._heavy.hold(self._is_heavy(n_tokens, ns, count, codec)))
                tokens = _token_array(request.token_ids)
            except Exception as exc:  # noqa: BLE001
                self._abort(context, exc)
                return
            yield from self._stream(context, ns, codec,
                                    self.tiers.blocks(ns, tokens, first, full_count, partial))

    def _stream(self, context, ns, codec, blocks: Iterator[tuple[int, BlockPayload]]) -> Iterator[Any]:
        while context.is_active():
            try:
                index, payload = next(blocks)
                if codec is not None:
                    # Built at the first block served, not before: building a codec costs
                    # rotations per (layer, head), which a namespace with no stored block
                    # must not be able to make the daemon compute.
                    chunks = list(self._turboquant_chunks(ns, codec, index, payload))
            except StopIteration:
                return  # the verified prefix already sent is the hit
            except Exception as exc:  # noqa: BLE001 - NotFound: the first block is missing
                self._abort(context, exc)
                return
            if codec is None:
                yield from fp16_chunks_encoded(ns, index, payload.keys, payload.values)
            else:
                yield from chunks

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
            messages = iter(request_iterator)
            head = next(messages, None)
            if head is None:
                raise InvalidArgument("empty Put stream")
            head = _decoded(head)
            if not head.HasField("namespace"):
                raise InvalidArgument("the first Put message must carry the namespace")
            ns = self._namespace(head.namespace)
            n_tokens = self._count_tokens(head.token_ids)
            claimed = max(_full_blocks(ns, head.token_ids) - head.first_block, 0)
            if head.trailing_partial and not _has_tail(ns, head.token_ids):
                raise InvalidArgument("trailing_partial: the token ids end on a block boundary, "
                                      "so they have no partial block")
            with self._heavy.hold(self._is_heavy(n_tokens, ns, claimed)), \
                    self.put_bytes.stream() as charge:
                tokens = _token_array(head.token_ids)
                stored = self._put_stream(ns, tokens, head.first_block, head.trailing_partial,
                                          itertools.chain([head], messages), charge, context,
                                          head.num_blocks)
            return pb.PutResponse(stored_blocks=stored)
        except Exception as exc:  # noqa: BLE001
            self._abort(context, exc)

    def _put_stream(self, ns, tokens: np.ndarray, first: int, partial: bool,
                    messages: Iterator[Any], charge: Callable[[int], None], context,
                    declared: int = 0) -> int:
        """Assemble and store one Put stream's blocks; nothing is stored unless every message
        is valid (the blocks are written together at the end). `charge` is told each chunk's
        cost before its memory is taken: a block's bytes with its first chunk (BlockAssembler
        allocates the whole block then), CHUNK_OVERHEAD_BYTES for every chunk. `partial`: the
        last block is the trailing partial block (index `full`), and it must be sent.
        `declared`: the blocks the stream says it carries (PutRequest.num_blocks; 0: not
        said); nothing is stored unless exactly that many arrived whole."""
        full = _full_blocks(ns, tokens)
        assembler = BlockAssembler(ns, partial=(full, len(tokens) - full * ns.block_size)
                                   if partial else None)
        end = full + partial
        if declared > end - first:
            raise InvalidArgument(f"num_blocks {declared}: these token ids name blocks "
                                  f"[{first}, {end}) only")
        block_bytes = _block_bytes(ns)
        blocks: dict[int, BlockPayload] = {}
        for n, msg in enumerate(messages):
            msg = _decoded(msg)
            if n and (msg.HasField("namespace") or len(msg.token_ids) or msg.first_block
                      or msg.trailing_partial or msg.num_blocks):
                raise InvalidArgument(f"Put message {n} carries namespace, token_ids, "
                                      f"first_block, trailing_partial or num_blocks: only the "
                                      f"first may")
            if not msg.HasField("chunk"):
                charge(CHUNK_OVERHEAD_BYTES)  # empty messages are not free either
                continue
            index = msg.chunk.block_index
            if index < first or index >= end:
                raise InvalidArgument(f"block {index} outside [{first}, {end}) for these token ids")
            charge(CHUNK_OVERHEAD_BYTES + (0 if assembler.pending(index) else block_bytes))
            done = assembler.add(msg.chunk)
            if done is not None:
                blocks[done[0]] = BlockPayload(keys=done[1]["keys"], values=done[1]["values"])
        if assembler.incomplete():
            raise InvalidArgument(f"blocks {assembler.incomplete()[:20]} arrived incomplete")
        expected = list(range(first, first + len(blocks)))
        if sorted(blocks) != expected:
            raise InvalidArgument(f"Put blocks {sorted(blocks)[:20]} are not contiguous from {first}")
        if partial and full not in blocks:
            raise InvalidArgument(f"trailing_partial: the partial block {full} was not sent")
        if declared and len(blocks) != declared:
            # Also a cancelled call whose request stream gRPC ended as if normally: the
            # client is gone, so this answer reaches no one, and nothing is stored.
            raise InvalidArgument(f"the Put declared {declared} blocks; {len(blocks)} arrived")
        if not context.is_active():
            # gRPC may end the request stream of a call the client cancelled as if it had
            # ended normally (the cancel is seen a moment later): store nothing then. The race
            # is narrowed, not closed; whatever is stored is whole blocks, acknowledged or not.
            raise grpc.RpcError("the client cancelled the Put")
        if blocks:
            self.tiers.put_blocks(ns, tokens, first, [blocks[i] for i in expected], partial)
        return len(blocks)

    # -- Locate ----------------------------------------------------------------------------
    def Locate(self, request: pb.LocateRequest, context) -> pb.LocateResponse:
        """Where a same-host reader finds the verified prefix's payload files (the proto's
        LocateRequest comment gives the contract)."""
        try:
            request = _decoded(request)
            ns = self._namespace(request.namespace)
            lease_ms = min(request.lease_ms or self.config.lease_ms, self.config.max_lease_ms)
            with self._heavy.hold(self._is_heavy(self._count_tokens(request.token_ids))):
                first, count = request.first_block, request.num_blocks
                if not request.trailing_partial:
                    count = self._block_count(first, count, _full_blocks(ns, request.token_ids))
                found = self.store.locate(ns, _token_array(request.token_ids), first, count,
                                          lease_ms / 1000, partial=request.trailing_partial)
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
            self._abort(context, exc)

    # -- Stats -----------------------------------------------------------------------------
    def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        try:
            _decoded(request)
            with self._recent_lock:
                recent = list(self._recent)
            return stats_response(self.store.stats(), recent, self.tiers.stats(), self.config)
        except Exception as exc:  # noqa: BLE001
            self._abort(context, exc)


def _check_requantizable(ns, codec) -> None:
    """What Requantizer.groups checks before it builds anything (here so that a Fetch fails
    before streaming, without building codecs for a namespace that may hold no block)."""
    if codec.key_qjl:
        raise InvalidArgument("QJL key codes are not served by the daemon")
    if ns.head_dim % 8:
        raise InvalidArgument(f"unsupported head_dim {ns.head_dim} for TurboQuant: must be a "
                              f"multiple of 8")
    if codec.profile is not None:
        try:
            codec.profile.check_layout(ns.num_layers, ns.num_kv_heads, ns.head_dim)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc


def add_service(servicer: KvStoreService, server: grpc.Server) -> None:
    """The KvStore methods with request deserializers that never raise (_lenient: gRPC would
    answer INTERNAL for bytes that do not decode), and Fetch's responses serialized by
    wire.serialize_chunk, so fp16 chunks go out pre-encoded (one copy of their bytes)."""
    response = lambda cls: cls.SerializeToString  # noqa: E731
    handlers = {
        "Lookup": grpc.unary_unary_rpc_method_handler(
            servicer.Lookup, request_deserializer=_lenient(pb.LookupRequest),
            response_serializer=response(pb.LookupResponse)),
        "Fetch": grpc.unary_stream_rpc_method_handler(
            servicer.Fetch, request_deserializer=_lenient(pb.FetchRequest),
            response_serializer=serialize_chunk),
        "Put": grpc.stream_unary_rpc_method_handler(
            servicer.Put, request_deserializer=_lenient(pb.PutRequest),
            response_serializer=response(pb.PutResponse)),
        "Locate": grpc.unary_unary_rpc_method_handler(
            servicer.Locate, request_deserializer=_lenient(pb.LocateRequest),
            response_serializer=response(pb.LocateResponse)),
        "Stats": grpc.unary_unary_rpc_method_handler(
            servicer.Stats, request_deserializer=_lenient(pb.StatsRequest),
            response_serializer=response(pb.StatsResponse)),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)

