"""Bounds on the work and the time the daemon's callers can take (issue 17), enforced at once:
past a bound a call is refused with RESOURCE_EXHAUSTED, never queued (a queue would hold the
gRPC worker threads that small calls and the health check need).

Threads. gRPC Python runs each call on one of `workers` threads for its whole life, a stream
included. Three bounds keep threads for the small calls:
- the server's maximum_concurrent_rpcs (ServerConfig.max_concurrent_rpcs, default 2 x workers):
  calls past it are answered RESOURCE_EXHAUSTED by gRPC itself, without a thread, so at most
  `workers` calls wait in the executor's queue. It is not set below workers: that would refuse
  a burst of 1 ms Lookups (and the health check with them) that threads free up for at once;
  what starves threads is long calls, and those are streams, capped next;
- StreamGuard: at most `stream_slots(config)` streaming calls (Put, Fetch, health Watch) at once,
  at most workers - RESERVED_THREADS, so Lookup, Locate, Stats and health Check always find a
  thread (they are unary and bounded: heavy ones take heavy slots);
- StreamWatch: a stream that makes no progress for stream_idle_s (a Put whose client stops
  sending, a Fetch whose client stops reading: gRPC flow control then blocks the handler in its
  send) or that lives past max_stream_s is cancelled from a watchdog thread. gRPC offers no
  server-side deadline and its request iterator cannot time out, hence the watchdog;
  max_connection_age would also cut the healthy long-lived channels of every client.
  A cancelled call ends CANCELLED for the client; the daemon logs why.

Memory. A Put holds its blocks until they are stored together, so PutBytes counts, per stream
and daemon-wide (shared by every in-flight Put), the bytes it holds: a block's full fp16 bytes
when its first chunk arrives (BlockAssembler then holds exactly that) plus CHUNK_OVERHEAD_BYTES
per chunk (bookkeeping, and the cost of many tiny chunks).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable, Iterator

import grpc

from tqstore.errors import ResourceExhausted
from tqstore.rpc_log import handler_parts, short_method

log = logging.getLogger("tqstore.server")

RESERVED_THREADS = 4  # worker threads that streams never take (StreamGuard)
CHUNK_OVERHEAD_BYTES = 512  # counted against a Put's byte bounds for every chunk it sends
# Streams not watched for idleness: a health Watch is silent until the status changes.
IDLE_EXEMPT = frozenset({"/grpc.health.v1.Health/Watch"})


def stream_slots(workers: int, max_streams: int) -> int:
    """Streams allowed at once: max_streams, leaving RESERVED_THREADS for unary calls."""
    return max(1, min(max_streams, workers - RESERVED_THREADS))


class Slots:
    """A refuse-at-once semaphore: take() raises ResourceExhausted when all are held."""

    def __init__(self, limit: int, what: str) -> None:
        self._free = threading.BoundedSemaphore(limit)
        self._count = threading.Lock()
        self.limit, self.what = limit, what
        self.in_use = 0  # slots held now (Stats-free introspection for tests and tools)

    def take(self) -> None:
        if not self._free.acquire(blocking=False):
            raise ResourceExhausted(f"{self.limit} {self.what} already running; retry later")
        with self._count:
            self.in_use += 1

    def release(self) -> None:
        with self._count:
            self.in_use -= 1
        self._free.release()

    @contextlib.contextmanager
    def hold(self, needed: bool = True) -> Iterator[None]:
        """Holds a slot for the block when `needed` (a light request passes through)."""
        if not needed:
            yield
            return
        self.take()
        try:
            yield
        finally:
            self.release()


class PutBytes:
    """Bytes held by in-flight Put streams: at most `per_stream` each, `shared` together."""

    def __init__(self, shared: int, per_stream: int) -> None:
        self.shared, self.per_stream = shared, per_stream
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    @contextlib.contextmanager
    def stream(self) -> Iterator[Callable[[int], None]]:
        """One Put stream's account: call the yielded function with each cost before the
        memory is taken; everything is given back when the block exits."""
        held = 0

        def charge(nbytes: int) -> None:
            nonlocal held
            if held + nbytes > self.per_stream:
                raise ResourceExhausted(f"Put stream over {self.per_stream} bytes (blocks plus "
                                        f"{CHUNK_OVERHEAD_BYTES} B a chunk); send fewer blocks "
                                        f"per Put")
            with self._lock:
                if self._used + nbytes > self.shared:
                    raise ResourceExhausted(f"in-flight Puts already hold {self._used} of "
                                            f"{self.shared} bytes; retry later")
                self._used += nbytes
            held += nbytes

        try:
            yield charge
        finally:
            with self._lock:
                self._used -= held


class _Watched:
    """One stream under watch: when it started and last made progress."""

    __slots__ = ("context", "method", "idle", "started", "last")

    def __init__(self, context: grpc.ServicerContext, method: str, idle: bool) -> None:
        self.context, self.method, self.idle = context, method, idle
        self.started = self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()

    def feed(self, requests: Iterator[Any]) -> Iterator[Any]:
        """The request stream, each message counted as progress. Once it has ended the call
        is storing (not waiting on the client): only max_stream_s applies then."""
        for msg in requests:
            self.last = time.monotonic()
            yield msg
        self.idle = False


class StreamWatch:
    """A watchdog thread that cancels streams idle past idle_s or alive past life_s."""

    def __init__(self, idle_s: float, life_s: float) -> None:
        self.idle_s, self.life_s = idle_s, life_s
        self._tick = min(1.0, max(0.05, min(idle_s, life_s) / 4))
        self._watched: set[_Watched] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tqstore-stream-watch",
                                        daemon=True)
        self.cancelled = 0  # streams this watchdog cancelled (tests and logs)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def watching(self) -> int:
        """Streams under watch now (admitted and not ended)."""
        with self._lock:
            return len(self._watched)

    def watch(self, context: grpc.ServicerContext, method: str, idle: bool) -> _Watched:
        watched = _Watched(context, method, idle)
        with self._lock:
            self._watched.add(watched)
        return watched

    def unwatch(self, watched: _Watched) -> None:
        with self._lock:
            self._watched.discard(watched)

    def _run(self) -> None:
        while not self._stop.wait(self._tick):
            now = time.monotonic()
            with self._lock:
                overdue = [(w, why) for w in self._watched
                           if (why := self._overdue(w, now)) is not None]
                for w, _ in overdue:
                    self._watched.discard(w)
            for w, why in overdue:
                self.cancelled += 1
                log.warning("%s %s cancelled: %s", w.method, w.context.peer(), why)
                w.context.cancel()  # wakes a handler blocked on the client; ends CANCELLED

    def _overdue(self, w: _Watched, now: float) -> str | None:
        if w.idle and now - w.last > self.idle_s:
            return f"no progress for {self.idle_s:g} s (client stopped sending or reading)"
        if now - w.started > self.life_s:
            return f"stream open longer than {self.life_s:g} s"
        return None


class StreamGuard(grpc.ServerInterceptor):
    """Every streaming call takes a stream slot (refused at once when none is free) and is
    watched by `watch` until it ends. Install after the token check: a refused call takes
    nothing."""

    def __init__(self, slots: int, watch: StreamWatch) -> None:
        self.slots = Slots(slots, "streaming calls (Put, Fetch, health Watch)")
        self.watch = watch

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        full = handler_call_details.method
        method, idle = short_method(full), full not in IDLE_EXEMPT
        behavior, make = handler_parts(handler)

        def admit(context) -> _Watched:
            try:
                self.slots.take()
            except ResourceExhausted as exc:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            return self.watch.watch(context, method, idle)

        def done(watched: _Watched) -> None:
            self.watch.unwatch(watched)
            self.slots.release()

        if handler.response_streaming:
            def guarded(request, context):
                # Admitted inside the generator: one that never starts holds nothing, and
                # closing it (gRPC drops a cancelled stream) runs the finally.
                watched = admit(context)
                try:
                    if handler.request_streaming:
                        request = watched.feed(request)
                    for msg in behavior(request, context):
                        yield msg
                        watched.touch()  # gRPC asks for the next one: the last one went out
                finally:
                    done(watched)
        else:
            def guarded(request_iterator, context):
                watched = admit(context)
                try:
                    return behavior(watched.feed(request_iterator), context)
                finally:
                    done(watched)

        return make(guarded, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
