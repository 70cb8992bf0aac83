"""Python client of the daemon (the generator side of the wire contract).

Failures come back as tqstore errors (the inverse of the daemon's status mapping), so callers
handle one hierarchy: Unavailable means "run without the cache", never "crash".
Puts can run in the background (put_async) so the first token is never delayed by an upload;
a long upload goes in several Put calls of at most put_piece_bytes each.
fp16 fetches (fetch_fp16_prefix) land straight in a PrefixKV: on the daemon's host by reading its
payload files (tqstore/direct_read.py), else on fetch_streams parallel gRPC streams.
Every channel (the main one and each fetch stream's) is made by tqstore.access.open_channel:
TLS when configured, and the bearer token on every call when the config has one.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tqstore.access import client_token, open_channel
from tqstore.blocks import BlockPayload, PrefixKV
from tqstore.codec import CodecConfig
from tqstore.config import ClientConfig
from tqstore.errors import (InvalidArgument, NotFound, ResourceExhausted, TqstoreError, Unauthenticated,
                            Unavailable)
from tqstore.prefix_hash import Namespace, hash_block_tokens, hash_prefix_blocks
from tqstore.v1 import tqstore_pb2 as pb
from tqstore.v1 import tqstore_pb2_grpc as pb_grpc
from tqstore.wire import (BlockAssembler, PrefixWriter, codec_to_proto, fp16_chunks, namespace_to_proto,
                          parse_fp16_chunk)

log = logging.getLogger("tqstore.client")

_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def _translate(exc: grpc.RpcError) -> TqstoreError:
    cls = _ERRORS.get(exc.code(), TqstoreError)
    return cls(f"{exc.code().name}: {exc.details()}")


T = TypeVar("T")
# Refusals for load alone, before any work: the daemon's slots (request_limits) and gRPC's own
# cap on concurrent calls (ServerConfig.max_concurrent_rpcs).
BUSY_DETAILS = ("retry later", "Concurrent RPC limit exceeded")


def _is_busy(exc: grpc.RpcError) -> bool:
    """A refusal for load alone (slots taken), which the same call may retry."""
    details = exc.details() or ""
    return (exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and any(words in details for words in BUSY_DETAILS))


def retry_when_busy(call: Callable[[], T], patience_s: float) -> T:
    """call(), again after a doubling, jittered pause (50 ms up to 1 s) while the daemon refuses
    it for load, for up to patience_s; any other outcome is returned or raised at once. Only for
    calls the daemon refuses before any data moved (streams take their slot first)."""
    deadline = time.monotonic() + patience_s
    pause = 0.05
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            if not _is_busy(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause * (0.5 + random.random()))
        pause = min(pause * 2, 1.0)


@dataclass(frozen=True)
class LookupResult:
    hit_blocks: int
    hit_tokens: int
    lookup_tokens: int
    partial_tokens: int = 0  # the trailing partial block's tokens, when asked for and stored


class KvStoreClient:
    def __init__(self, config: ClientConfig | str | None = None) -> None:
        if config is None or isinstance(config, str):
            config = ClientConfig() if config is None else ClientConfig(address=config)
        self.config = config
        options = [("grpc.max_send_message_length", config.max_message_bytes),
                   ("grpc.max_receive_message_length", config.max_message_bytes)]
        self._token = client_token(config)  # read once; None: the daemon needs none
        self._channel = open_channel(config, options, self._token)
        self._stub = pb_grpc.KvStoreStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tqstore-put")
        self._pending: list[Future] = []
        self._pending_lock = threading.Lock()
        self._options = options
        self._stream_stubs: list[tuple[grpc.Channel, grpc.UnaryStreamMultiCallable]] = []
        self._streams = ThreadPoolExecutor(max_workers=config.fetch_streams,
                                           thread_name_prefix="tqstore-fetch")
        self._reader = None  # DirectReader, made at the first same-host fetch
        self._lazy = threading.Lock()  # the reader and the stream channels: made once, on use
        self.direct_reads = config.direct_reads == "on" or (config.direct_reads == "auto"
                                                            and config.is_local)

    def close(self) -> None:
        self.wait_uploads()
        self._uploads.shutdown(wait=True)
        self._streams.shutdown(wait=True)
        if self._reader is not None:
            self._reader.close()
        for channel, _ in self._stream_stubs:
            channel.close()
        self._channel.close()

    def __enter__(self) -> "KvStoreClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_serving(self, timeout: float | None = None) -> bool:
        """True when the daemon answers its health check within the timeout."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=""),
                                       timeout=timeout or self.config.connect_timeout_s,
                                       wait_for_ready=True)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def check_access(self) -> None:
        """Raises Unauthenticated when the daemon refuses this client's token (or its lack of
        one): is_serving cannot tell, the health check is open to all. One Stats call."""
        self.stats()

    def lookup(self, ns: Namespace, token_ids: Sequence[int],
               trailing_partial: bool = False) -> LookupResult:
        """Full blocks present, and with trailing_partial the tokens of token_ids' stored
        trailing partial block (0 unless every full block before it hit)."""
        request = pb.LookupRequest(namespace=namespace_to_proto(ns), token_ids=list(token_ids),
                                   trailing_partial=trailing_partial)
        try:
            r = retry_when_busy(lambda: self._stub.Lookup(request, timeout=self.config.rpc_timeout_s),
                                self.config.busy_retry_s)
        except grpc.RpcError as exc:
            raise _translate(exc) from None
        return LookupResult(r.hit_blocks, r.hit_tokens, r.lookup_tokens, r.partial_tokens)

    def _fetch(self, request: pb.FetchRequest, assembler: BlockAssembler) -> list[dict[str, np.ndarray]]:
        blocks: dict[int, dict[str, np.ndarray]] = {}

        def stream() -> None:
            for chunk in self._stub.Fetch(request, timeout=self.config.rpc_timeout_s):
                done = assembler.add(chunk)
                if done is not None:
                    blocks[done[0]] = done[1]
        try:
            retry_when_busy(stream, self.config.busy_retry_s)
        except grpc.RpcError as exc:
            raise _translate(exc) from None
        # Keep only the contiguous verified prefix starting at first_block.
        out = []
        index = request.first_block
        while index in blocks:
            out.append(blocks[index])
            index += 1
        return out

    def fetch_fp16(self, ns: Namespace, token_ids: Sequence[int], first_block: int = 0,
                   num_blocks: int = 0) -> list[BlockPayload]:
        """fetch_fp16_prefix as a list of blocks (views into one PrefixKV)."""
        prefix = self.fetch_fp16_prefix(ns, token_ids, first_block, num_blocks)
        return [prefix.block(i) for i in range(len(prefix))]

    def fetch_fp16_prefix(self, ns: Namespace, token_ids: Sequence[int], first_block: int = 0,
                          num_blocks: int = 0, trailing_partial: bool = False,
                          staged: bool = False) -> PrefixKV:
        """The verified fp16 blocks [first_block, first_block + num_blocks) (0: to the last full
        block of token_ids), or fewer if the store lost some on the way: a shorter hit, never a
        wrong one. NotFound if the first one is missing. Same host: read from the daemon's files;
        whatever that could not verify, and every other case: gRPC Fetch on fetch_streams
        streams. `source` on the result says which. trailing_partial: when the full blocks reach
        the last one, token_ids' trailing partial block follows them (`tokens` on the result
        says whether it came: a partial block that is gone is a shorter hit too). staged: read
        where a restore takes the bytes from (device_memory.staging_empty): on CUDA the
        process's pinned staging buffer (ClientConfig.staging_bytes), on unified memory arrays
        MLX owns; off by default, so processes that only move bytes pin nothing and make no
        MLX arrays."""
        token_ids = list(token_ids)
        bs = ns.block_size
        full = len(token_ids) // bs
        count = num_blocks or full - first_block
        tail = len(token_ids) - full * bs if trailing_partial and first_block + count == full else 0
        if first_block < 0 or count < 0 or (count == 0 and not tail) or first_block + count > full:
            raise InvalidArgument(f"blocks [{first_block}, {first_block + count}) outside the "
                                  f"{full} full blocks of {len(token_ids)} tokens")
        out = PrefixKV.empty((ns.num_layers, ns.num_kv_heads, bs, ns.head_dim), count, tail,
                             allocate=self._staging_allocate if staged else None)
        done = self._fetch_full_blocks(ns, token_ids, first_block, count, out) if count else 0
        got, sources = 0, {out.source} if done else set()
        if tail and done == count:
            via = self._fetch_partial(ns, token_ids, out, first_block)
            if via is not None:
                got = tail
                sources.add(via)
        if done == 0 and got == 0:
            raise NotFound("block not stored")
        result = out.head(done, got)
        parts = {p for s in sources for p in s.split("+")}
        result.source = "+".join(p for p in ("direct", "grpc") if p in parts)
        return result

    def _staging_allocate(self, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
        """K and V for a fetch: pinned staging memory on CUDA, MLX's arrays on unified memory
        (device_memory.staging_empty)."""
        from tqstore.device_memory import staging_empty  # MLX only where a prefix lands

        return staging_empty(shapes, np.float16, self.config.staging_cap)

    def _fetch_partial(self, ns: Namespace, token_ids: list[int], out: PrefixKV,
                       out_first: int) -> str | None:
        """token_ids' trailing partial block into out (after its full blocks): read from the
        daemon's file on the same host (a Locate of it), else over one gRPC Fetch; which one
        ("direct" or "grpc"), or None if the daemon does not have it (or it failed
        verification there or here). It can be nearly a
        whole block (CUDA's 2048-token blocks: 268 MB of an 8B shape), so it takes the same
        path as full blocks."""
        k = len(token_ids) // ns.block_size
        located = None
        if self.direct_reads:
            try:
                located = self._locate(ns, token_ids, k, 1, trailing_partial=True)
            except TqstoreError as exc:  # an older daemon refuses a partial Locate: gRPC then
                log.info("the trailing partial block is not located: %s", exc)
        if located is not None and located.blocks:
            full = hash_prefix_blocks(ns, token_ids[:k * ns.block_size])
            last = hash_block_tokens(full[-1] if k else ns.root_hash(),
                                     token_ids[k * ns.block_size:])
            if self._reader.read(located, full + [last], out, k, out_first) == 1:
                return "direct"
        writer = PrefixWriter(ns, out, out_first)
        request = pb.FetchRequest(namespace=namespace_to_proto(ns), token_ids=token_ids,
                                  first_block=len(token_ids) // ns.block_size, num_blocks=1,
                                  form=pb.KV_FORM_FP16, trailing_partial=True)
        with self._lazy:
            fetch = self._stream_stub(0)
        complete = []

        def stream() -> None:
            for chunk in fetch(request, timeout=self.config.rpc_timeout_s):
                if writer.add(chunk) is not None:
                    complete.append(True)
        try:
            retry_when_busy(stream, self.config.busy_retry_s)
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.NOT_FOUND:
                log.info("the trailing partial block was not fetched: %s", _translate(exc))
            return None
        except InvalidArgument as exc:  # a malformed answer: no partial, never wrong bytes
            log.warning("the trailing partial block was refused: %s", exc)
            return None
        return "grpc" if complete else None

    def _fetch_full_blocks(self, ns: Namespace, token_ids: list[int], first_block: int,
                           count: int, out: PrefixKV) -> int:
        """Blocks [first_block, first_block + count) into out: how many leading ones arrived
        (NotFound when none); sets out.source."""
        bs = ns.block_size
        done, source = 0, "grpc"
        located = self._locate(ns, token_ids, first_block, count) if self.direct_reads else None
        if located is not None and located.blocks:
            hashes = hash_prefix_blocks(ns, token_ids[: (first_block + count) * bs])
            done = self._reader.read(located, hashes, out, first_block)
            source = "direct"
        if located is not None and not located.more_by_fetch:
            # The daemon's only tier is the index it answered from: it holds no more of the chain.
            if not located.blocks:
                raise NotFound("block not stored")
            if done == len(located.blocks) < count:
                count = done
        if done < count:
            direct = done  # blocks the same-host reader verified
            try:
                done += self._fetch_streams(ns, token_ids, first_block + done, count - done, out,
                                            first_block)
            except NotFound:
                if not done:
                    raise
            source = "direct+grpc" if direct else "grpc"
        out.source = source
        return done

    def _locate(self, ns: Namespace, token_ids: list[int], first_block: int, count: int,
                trailing_partial: bool = False) -> pb.LocateResponse | None:
        """The daemon's Locate answer when this process shares its files, else None (and direct
        reads stay off for this client: another container or host, or an older daemon)."""
        try:
            answer = self._stub.Locate(pb.LocateRequest(
                namespace=namespace_to_proto(ns), token_ids=token_ids, first_block=first_block,
                num_blocks=count, lease_ms=self.config.lease_ms,
                trailing_partial=trailing_partial), timeout=self.config.rpc_timeout_s)
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                self.direct_reads = False
                log.info("the daemon at %s has no Locate: fetching over gRPC", self.config.address)
                return None
            raise _translate(exc) from None
        from tqstore.direct_read import DirectReader

        if not DirectReader.shares_files(answer):
            self.direct_reads = False
            log.info("the daemon's store %s is not visible here: fetching over gRPC",
                     answer.blocks_dir)
            return None
        with self._lazy:  # fetches may run on several threads (the engine's fetchers)
            if self._reader is None:
                self._reader = DirectReader(self.config.read_threads)
        return answer

    def _stream_stub(self, i: int):
        """Stub i of the parallel fetch: each on its own channel and connection (a local
        subchannel pool), so streams do not queue behind each other on one HTTP/2 connection."""
        while len(self._stream_stubs) <= i:
            channel = open_channel(self.config, self._options + [
                ("grpc.use_local_subchannel_pool", 1)], self._token)
            # fp16 chunks are parsed into views of the received bytes (wire.parse_fp16_chunk).
            fetch = channel.unary_stream("/tqstore.v1.KvStore/Fetch",
                                         request_serializer=pb.FetchRequest.SerializeToString,
                                         response_deserializer=parse_fp16_chunk)
            self._stream_stubs.append((channel, fetch))
        return self._stream_stubs[i][1]

    def _fetch_streams(self, ns: Namespace, token_ids: list[int], first: int, count: int,
                       out: PrefixKV, out_first: int) -> int:
        """Fetch blocks [first, first + count) into out (whose block 0 is out_first) on up to
        fetch_streams concurrent streams of contiguous ranges; returns how many leading blocks
        arrived. NotFound when the first is missing; a later stream's failure only shortens."""
        block_bytes = 4 * ns.num_layers * ns.num_kv_heads * ns.block_size * ns.head_dim
        streams = max(1, min(self.config.fetch_streams, count,
                             count * block_bytes // self.config.min_stream_bytes))
        per = -(-count // streams)
        ranges = [(a, min(per, first + count - a)) for a in range(first, first + count, per)]
        with self._lazy:
            stubs = [self._stream_stub(i) for i in range(len(ranges))]

        def one(i: int) -> set[int]:
            a, n = ranges[i]
            writer = PrefixWriter(ns, out, out_first)
            request = pb.FetchRequest(namespace=namespace_to_proto(ns), token_ids=token_ids,
                                      first_block=a, num_blocks=n, form=pb.KV_FORM_FP16)
            complete: set[int] = set()

            def stream() -> None:
                for chunk in stubs[i](request, timeout=self.config.rpc_timeout_s):
                    index = writer.add(chunk)
                    if index is not None:
                        complete.add(index)
            try:
                retry_when_busy(stream, self.config.busy_retry_s)
            except grpc.RpcError as exc:
                if i == 0 and not complete:
                    raise _translate(exc) from None
            except InvalidArgument:
                if i == 0 and not complete:
                    raise
            return complete

        futures = [self._streams.submit(one, i) for i in range(len(ranges))]
        complete: set[int] = set()
        error = None
        for f in futures:  # wait for all: none may write into out after we return
            try:
                complete |= f.result()
            except TqstoreError as exc:
                error = exc
        done = 0
        while first + done in complete:
            done += 1
        if error is not None and done == 0:
            raise error
        return done

    def fetch_turboquant(self, ns: Namespace, token_ids: Sequence[int], codec: CodecConfig,
                         first_block: int = 0, num_blocks: int = 0) -> list[dict[str, np.ndarray]]:
        """Blocks re-quantized by the daemon: dicts of key_codes, key_scales, value_codes,
        value_scales shaped (layers, kv_heads, block_size[, bytes])."""
        request = pb.FetchRequest(namespace=namespace_to_proto(ns), token_ids=list(token_ids),
                                  first_block=first_block, num_blocks=num_blocks,
                                  form=pb.KV_FORM_TURBOQUANT, codec=codec_to_proto(codec))
        code_bytes = (ns.head_dim * codec.key_bits // 8, ns.head_dim * codec.value_bits // 8)
        return self._fetch(request, BlockAssembler(ns, "turboquant", code_bytes))

    def put(self, ns: Namespace, token_ids: Sequence[int], first_block: int,
            payloads: Sequence[BlockPayload], partial: BlockPayload | None = None) -> int:
        """Upload fp16 blocks; returns once the daemon made them durable. Split into Put calls
        of at most put_piece_bytes, in chain order: each piece is durable before the next is
        sent (the daemon stores a block only after its parent), so a failure leaves a stored
        prefix of the chain and raises. `partial`: token_ids' trailing partial block (the
        tokens after block first_block + len(payloads) - 1), sent last, in its own Put."""
        token_ids = list(token_ids)
        full = first_block + len(payloads)
        if partial is not None and not 0 < len(token_ids) - full * ns.block_size < ns.block_size:
            raise InvalidArgument(f"a trailing partial block needs token ids ending inside "
                                  f"block {full}; got {len(token_ids)} tokens")
        stored = start = 0
        while start < len(payloads):
            end, size = start, 0
            while end < len(payloads) and (end == start or size + _nbytes(payloads[end])
                                           <= self.config.put_piece_bytes):
                size += _nbytes(payloads[end])
                end += 1
            stored += self._put_piece(ns, token_ids[: (first_block + end) * ns.block_size],
                                      first_block + start, payloads[start:end])
            start = end
        if partial is not None:
            stored += self._put_piece(ns, token_ids, full, [partial], trailing_partial=True)
        return stored

    def _put_piece(self, ns: Namespace, token_ids: list[int], first_block: int,
                   payloads: Sequence[BlockPayload], trailing_partial: bool = False) -> int:
        def messages():
            yield pb.PutRequest(namespace=namespace_to_proto(ns), token_ids=token_ids,
                                first_block=first_block, trailing_partial=trailing_partial,
                                num_blocks=len(payloads))
            for i, p in enumerate(payloads):
                for chunk in fp16_chunks(ns, first_block + i, p.keys, p.values):
                    yield pb.PutRequest(chunk=chunk)
        try:
            return retry_when_busy(
                lambda: self._stub.Put(messages(), timeout=self.config.rpc_timeout_s).stored_blocks,
                self.config.busy_retry_s)
        except grpc.RpcError as exc:
            raise _translate(exc) from None

    def put_async(self, ns: Namespace, token_ids: Sequence[int], first_block: int,
                  payloads: Sequence[BlockPayload]) -> Future:
        """put() on a background thread; errors land in the returned future."""
        payloads = list(payloads)
        return self.put_async_lazy(ns, token_ids, first_block, lambda: payloads)

    def put_async_lazy(self, ns: Namespace, token_ids: Sequence[int], first_block: int,
                       make_payloads) -> Future:
        """Like put_async, but the payloads are built on the upload thread: make_payloads()
        returns the full blocks, or (full blocks, trailing partial block) for put(partial=)."""
        token_ids = list(token_ids)

        def upload() -> int:
            made = make_payloads()
            full, partial = made if isinstance(made, tuple) else (made, None)
            return self.put(ns, token_ids, first_block, full, partial)
        future = self._uploads.submit(upload)
        with self._pending_lock:
            self._pending = [f for f in self._pending if not f.done()] + [future]
        return future

    def wait_uploads(self, timeout: float | None = None) -> None:
        with self._pending_lock:
            pending = list(self._pending)
        for f in pending:
            f.exception(timeout=timeout)

    def stats(self) -> pb.StatsResponse:
        try:
            return self._stub.Stats(pb.StatsRequest(), timeout=self.config.rpc_timeout_s)
        except grpc.RpcError as exc:
            raise _translate(exc) from None


def _nbytes(p: BlockPayload) -> int:
    return p.keys.nbytes + p.values.nbytes
