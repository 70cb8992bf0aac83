"""One INFO line per RPC the daemon answers, written in one place: a server interceptor.

    KvStore/Lookup ipv4:127.0.0.1:50412 OK 0.8 ms blocks=3 in=1.2 KiB out=8 B

Fields: method (service/method without the package), peer, status code, duration, blocks (hit
blocks of a Lookup, blocks streamed by a Fetch, blocks stored by a Put, blocks located) and message bytes in and
out. The status is the code the handler set or aborted with (tqstore.server maps errors to codes
in one place), UNKNOWN for an exception that escaped it, CANCELLED when the client went away.

The daemon installs RpcLog outermost, so calls refused before their handler (the token check
of tqstore.access, the stream slots of tqstore.request_limits) are logged and counted too; a
refused call's request is unparsed bytes, sized by len().

The same figures go, as one RpcRecord per call, to the observers registered on the RpcLog
(tqstore.metrics counts them for Prometheus). An observer runs on the RPC's thread when the
call ends, so it must be cheap; one that raises is logged and the call is unaffected.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import grpc

from tqstore.units import human_bytes

log = logging.getLogger("tqstore.rpc")

# Blocks a unary response reports, per method; a Fetch's blocks are counted as they stream.
_RESPONSE_BLOCKS: dict[str, Callable[[Any], int]] = {
    "KvStore/Lookup": lambda r: r.hit_blocks,
    "KvStore/Put": lambda r: r.stored_blocks,
    "KvStore/Locate": lambda r: len(r.blocks),
}
_STREAMED_BLOCKS: dict[str, Callable[[Any], int]] = {
    "KvStore/Fetch": lambda chunk: chunk.block_index,
}


def short_method(full: str) -> str:
    """"/tqstore.v1.KvStore/Lookup" -> "KvStore/Lookup" (the name logs and metrics use)."""
    service, _, name = full.lstrip("/").rpartition("/")
    return f"{service.rsplit('.', 1)[-1]}/{name}"


def handler_parts(handler: grpc.RpcMethodHandler) -> tuple[Callable, Callable]:
    """(the handler's behaviour, the grpc.*_rpc_method_handler that makes one of its kind):
    what an interceptor needs to wrap a handler whatever its streaming kind."""
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream, grpc.stream_stream_rpc_method_handler
    if handler.request_streaming:
        return handler.stream_unary, grpc.stream_unary_rpc_method_handler
    if handler.response_streaming:
        return handler.unary_stream, grpc.unary_stream_rpc_method_handler
    return handler.unary_unary, grpc.unary_unary_rpc_method_handler


def _size(msg: Any) -> int:
    return len(msg) if isinstance(msg, (bytes, bytearray)) else msg.ByteSize()


@dataclass(frozen=True, slots=True)
class RpcRecord:
    """One finished RPC, as logged."""

    method: str  # "KvStore/Lookup": from the server's registered handlers (a bounded set)
    code: grpc.StatusCode
    seconds: float
    bytes_in: int  # serialized request messages
    bytes_out: int  # serialized response messages
    blocks: int | None  # see the module docstring; None where the method reports none


RpcObserver = Callable[[RpcRecord], None]


class _Call:
    """What one RPC did, logged (and observed) once when it ends."""

    def __init__(self, method: str, context: grpc.ServicerContext,
                 observers: list[RpcObserver]) -> None:
        self.method = method
        self.context = context
        self.observers = observers
        self.start = time.perf_counter()
        self.bytes_in = self.bytes_out = 0
        self.blocks: int | None = None
        self._streamed: set[int] = set()
        self._done = False

    def requests(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for msg in iterator:
            self.bytes_in += _size(msg)
            yield msg

    def response(self, msg: Any) -> None:
        if msg is None:
            return
        self.bytes_out += _size(msg)
        if self.method in _RESPONSE_BLOCKS:
            self.blocks = _RESPONSE_BLOCKS[self.method](msg)
        elif self.method in _STREAMED_BLOCKS:
            self._streamed.add(_STREAMED_BLOCKS[self.method](msg))
            self.blocks = len(self._streamed)

    def responses(self, iterator: Iterator[Any]) -> Iterator[Any]:
        failed = True
        try:
            for msg in iterator:
                self.response(msg)
                yield msg
            failed = False
        finally:
            # Also reached when gRPC drops the stream of a cancelled call (GeneratorExit).
            self.end(failed)

    def end(self, failed: bool) -> None:
        if self._done:
            return
        self._done = True
        code = self.context.code()
        if code is None:
            if not self.context.is_active():
                code = grpc.StatusCode.CANCELLED
            else:
                code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
        seconds = time.perf_counter() - self.start
        blocks = "" if self.blocks is None else f" blocks={self.blocks}"
        log.info("%s %s %s %.1f ms%s in=%s out=%s", self.method, self.context.peer(), code.name,
                 seconds * 1e3, blocks, human_bytes(self.bytes_in), human_bytes(self.bytes_out))
        if not self.observers:
            return
        record = RpcRecord(self.method, code, seconds, self.bytes_in, self.bytes_out, self.blocks)
        for observer in self.observers:
            try:
                observer(record)
            except Exception:  # noqa: BLE001 - metrics must never fail the call they count
                log.exception("RPC observer %r failed", observer)


class RpcLog(grpc.ServerInterceptor):
    """Wraps every method handler of the server so each call ends in one log line and one
    RpcRecord to each of `observers` (append before the server starts; read per call)."""

    def __init__(self, observers: list[RpcObserver] | None = None) -> None:
        self.observers: list[RpcObserver] = list(observers or [])

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = short_method(handler_call_details.method)
        behavior, make = handler_parts(handler)

        def logged(request, context):
            call = _Call(method, context, self.observers)
            if handler.request_streaming:
                request = call.requests(request)
            elif request is not None:
                call.bytes_in = _size(request)
            try:
                result = behavior(request, context)
            except BaseException:
                call.end(failed=True)
                raise
            if handler.response_streaming:
                return call.responses(result)
            call.response(result)
            call.end(failed=False)
            return result

        return make(logged, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
