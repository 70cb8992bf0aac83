"""Python client of the daemon (the generator side of the wire contract).

Failures come back as tqstore errors (the inverse of the daemon's status mapping), so callers
handle one hierarchy: Unavailable means "run without the cache", never "crash".
Puts can run in the background (put_async) so the first token is never delayed by an upload.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tqstore.blocks import BlockPayload
from tqstore.codec import CodecConfig
from tqstore.config import ClientConfig
from tqstore.errors import InvalidArgument, NotFound, ResourceExhausted, TqstoreError, Unavailable
from tqstore.prefix_hash import Namespace
from tqstore.v1 import tqstore_pb2 as pb
from tqstore.v1 import tqstore_pb2_grpc as pb_grpc
from tqstore.wire import BlockAssembler, codec_to_proto, fp16_chunks, namespace_to_proto

_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}


def _translate(exc: grpc.RpcError) -> TqstoreError:
    cls = _ERRORS.get(exc.code(), TqstoreError)
    return cls(f"{exc.code().name}: {exc.details()}")


@dataclass(frozen=True)
class LookupResult:
    hit_blocks: int
    hit_tokens: int
    lookup_tokens: int


class KvStoreClient:
    def __init__(self, config: ClientConfig | str | None = None) -> None:
        if config is None or isinstance(config, str):
            config = ClientConfig() if config is None else ClientConfig(address=config)
        self.config = config
        options = [("grpc.max_send_message_length", config.max_message_bytes),
                   ("grpc.max_receive_message_length", config.max_message_bytes)]
        self._channel = grpc.insecure_channel(config.address, options=options)
        self._stub = pb_grpc.KvStoreStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tqstore-put")
        self._pending: list[Future] = []
        self._pending_lock = threading.Lock()

    def close(self) -> None:
        self.wait_uploads()
        self._uploads.shutdown(wait=True)
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

    def lookup(self, ns: Namespace, token_ids: Sequence[int]) -> LookupResult:
        try:
            r = self._stub.Lookup(pb.LookupRequest(namespace=namespace_to_proto(ns),
                                                   token_ids=list(token_ids)),
                                  timeout=self.config.rpc_timeout_s)
        except grpc.RpcError as exc:
            raise _translate(exc) from None
        return LookupResult(r.hit_blocks, r.hit_tokens, r.lookup_tokens)

    def _fetch(self, request: pb.FetchRequest, assembler: BlockAssembler) -> list[dict[str, np.ndarray]]:
        blocks: dict[int, dict[str, np.ndarray]] = {}
        try:
            for chunk in self._stub.Fetch(request, timeout=self.config.rpc_timeout_s):
                done = assembler.add(chunk)
                if done is not None:
                    blocks[done[0]] = done[1]
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
        """The verified fp16 blocks [first_block, first_block + num_blocks) (fewer if the
        store lost some on the way: a shorter hit, never a wrong one)."""
        request = pb.FetchRequest(namespace=namespace_to_proto(ns), token_ids=list(token_ids),
                                  first_block=first_block, num_blocks=num_blocks,
                                  form=pb.KV_FORM_FP16)
        return [BlockPayload(keys=b["keys"], values=b["values"])
                for b in self._fetch(request, BlockAssembler(ns))]

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
            payloads: Sequence[BlockPayload]) -> int:
        """Upload fp16 blocks; returns once the daemon made them durable."""
        def messages():
            yield pb.PutRequest(namespace=namespace_to_proto(ns), token_ids=list(token_ids),
                                first_block=first_block)
            for i, p in enumerate(payloads):
                for chunk in fp16_chunks(ns, first_block + i, p.keys, p.values):
                    yield pb.PutRequest(chunk=chunk)
        try:
            return self._stub.Put(messages(), timeout=self.config.rpc_timeout_s).stored_blocks
        except grpc.RpcError as exc:
            raise _translate(exc) from None

    def put_async(self, ns: Namespace, token_ids: Sequence[int], first_block: int,
                  payloads: Sequence[BlockPayload]) -> Future:
        """put() on a background thread; errors land in the returned future."""
        payloads = list(payloads)
        return self.put_async_lazy(ns, token_ids, first_block, lambda: payloads)

    def put_async_lazy(self, ns: Namespace, token_ids: Sequence[int], first_block: int,
                       make_payloads) -> Future:
        """Like put_async, but the payloads are built on the upload thread (make_payloads())."""
        token_ids = list(token_ids)
        future = self._uploads.submit(lambda: self.put(ns, token_ids, first_block, make_payloads()))
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
