"""The OpenAI-compatible HTTP face of the engine, built on mlx_lm.server's own HTTP layer.

What is reused from mlx_lm.server (0.32.2), unchanged: request parsing and validation of every
sampling field, chat templates (with tools and thinking), stop words, tool-call and reasoning
parsing, SSE streaming with keep-alives during long prompts, the response and usage bodies
(`prompt_tokens_details.cached_tokens` included), logprobs. A client sees the same API as
`mlx_lm.server` on the same model directory.

What is ours, and why mlx_lm.server's generation loop is not used: its BatchGenerator prefills
batches with right padding, deep-copies batch caches and keeps an LRU of whole caches; our
paged caches are per-sequence block tables over one shared pool (a prompt cache is the pool's
prefix hashes plus the daemon), and a daemon hit reproduces a cold run only if every prefill
chunk has the same shape in both runs. So `EngineResponses` stands in for mlx_lm.server's
`ResponseGenerator` (the one object its handler talks to: `generate(request, args, progress)`
-> (context, responses), `cli_args`, `is_healthy`) over tqstore.serving.engine.Engine.

Additions to the handler (`Handler`): errors carry OpenAI's body shape
(`{"error": {"message", "type", "param", "code"}}`) and the right status (400 for a bad
request, unknown model or a prompt longer than the context; 503 with Retry-After when the queue
is full), `GET /v1/stats` (the engine's live figures), `/v1/models` lists the served model, and
usage gains `"tqstore": {"memory_tokens", "daemon_tokens", "computed_tokens", "ttft_s"}` (where
the prompt came from). A client that goes away mid-stream cancels its request: the next write
fails, mlx-lm's handler stops the context, and the engine frees the pages at its next step.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import select
import socket
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

from mlx_lm import server as mlx_server
from mlx_lm.generate import make_stop_sequences, make_text_state_machine

from tqstore.errors import InvalidArgument, ResourceExhausted
from tqstore.serving.engine import Engine
from tqstore.serving.request import Request, TokenEvent
from tqstore.serving.sampling import SamplingParams

log = logging.getLogger("tqstore.serving")
_local = threading.local()  # per handler thread: the error or context of the current request


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None,
                 kind: str = "invalid_request_error", retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.kind, self.retry_after = status, code, kind, retry_after


class _Context(mlx_server.GenerationContext):
    """mlx-lm's per-request context; stop() (the handler's `finally`) cancels our request."""

    request: Request | None = None

    def stop(self) -> None:
        super().stop()
        if self.request is not None:
            self.request.cancel()


class EngineResponses:
    """mlx_lm.server's ResponseGenerator interface over the engine (see the module docstring)."""

    def __init__(self, engine: Engine, model_path: str, cli_args: argparse.Namespace) -> None:
        self.engine = engine
        self.cli_args = cli_args
        self.model_id = Path(model_path).name
        resolved = str(Path(model_path).resolve())
        self.model_names = {"default_model", self.model_id, model_path, resolved}
        # mlx_lm.server's _tokenize reads model_provider.processor and .cli_args.
        self.model_provider = argparse.Namespace(processor=None, cli_args=cli_args)

    @property
    def is_healthy(self) -> bool:
        return self.engine.healthy

    def generate(self, request: Any, args: Any,
                 progress_callback: Callable[[int, int], None] | None = None):
        try:
            return self._generate(request, args, progress_callback)
        except ApiError as exc:
            _local.error = exc
            raise

    def _generate(self, request, args, progress_callback):
        if args.model.model not in self.model_names:
            raise ApiError(400, f"model {args.model.model!r} is not served here; this server "
                           f"serves {self.model_id!r}", code="model_not_found")
        tokenizer = self.engine.loaded.tokenizer
        try:
            prompt, _, _, initial_state, vision = mlx_server.ResponseGenerator._tokenize(
                self, tokenizer, request, args)
        except Exception as exc:  # noqa: BLE001 - a template or content error is the client's
            raise ApiError(400, f"could not build the prompt: {exc}") from exc
        if vision is not None:
            raise ApiError(400, "images are not supported by this server")
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=float(args.sampling.temperature),
            top_p=float(args.sampling.top_p), top_k=int(args.sampling.top_k),
            min_p=float(args.sampling.min_p), seed=args.seed,
            stop_sequences=make_stop_sequences(tokenizer, args.stop_words),
            logits_processors=mlx_server._make_logits_processors(args),
            top_logprobs=max(0, int(args.top_logprobs)))
        try:
            req = self.engine.submit([int(t) for t in prompt], params)
        except InvalidArgument as exc:
            raise ApiError(400, str(exc), code="context_length_exceeded") from exc
        except ResourceExhausted as exc:
            raise ApiError(503, f"server busy: {exc}; retry later", code="overloaded",
                           kind="server_error",
                           retry_after=self.engine.config.retry_after_s) from exc
        ctx = _Context(
            has_tool_calling=tokenizer.has_tool_calling, has_thinking=tokenizer.has_thinking,
            tool_parser=tokenizer.tool_parser,
            text_sm=make_text_state_machine(tokenizer, args.stop_words),
            initial_state=initial_state, prompt=prompt, prompt_cache_count=0)
        ctx.request = req
        _local.ctx = ctx
        return ctx, self._responses(req, ctx, tokenizer, progress_callback, args.stop_words)

    def _responses(self, req: Request, ctx: _Context, tokenizer,
                   progress: Callable[[int, int], None] | None,
                   stop_words: list[str]) -> Iterator[Any]:
        """mlx_lm.server Responses from the engine's token events.

        Stop words: mlx-lm matches them as the token ids of the bare word, so a model that
        writes " Paris" never matches stop=["Paris"] (mlx-lm's text filter then cuts the word
        out of the text while generation runs on to the end). Here they are also matched in
        the decoded text: the token that completes a stop word ends the answer with
        finish_reason "stop", the request is finished at once, and (as for any stop token)
        that token's own text is not emitted."""
        detok = tokenizer.detokenizer
        detok.reset()
        stops = [w for w in stop_words or [] if w]
        keep = max((len(w) for w in stops), default=1) - 1
        recent = ""  # the last `keep` characters emitted: a stop word may span segments
        conn = getattr(_local, "connection", None)
        while True:
            if conn is not None and _peer_closed(conn):
                # A non-streamed request's client is not written to until the end, so a
                # failed write cannot tell us it went away: its socket can.
                raise ConnectionResetError("the client closed the connection")
            try:
                event = req.events.get(timeout=0.5)
            except queue.Empty:
                if not self.engine.healthy:
                    raise RuntimeError("the serving engine stopped") from self.engine.failed
                continue
            if isinstance(event, TokenEvent):
                ctx.prompt_cache_count = req.memory_tokens + req.daemon_tokens
                # As mlx_lm.server does: the stop token's text is not emitted.
                if event.finish_reason != "stop":
                    detok.add_token(event.token)
                if event.finish_reason is not None:
                    detok.finalize()
                top = ()
                if event.top:
                    names = tokenizer.convert_ids_to_tokens([i for i, _ in event.top])
                    top = tuple({"id": i, "token": s, "logprob": g}
                                for (i, g), s in zip(event.top, names))
                segment, reason = detok.last_segment, event.finish_reason
                if stops and reason is None:
                    window = recent + segment
                    if any(w in window for w in stops):
                        req.stop()
                        yield mlx_server.Response("", event.token, event.logprob, "stop", top)
                        return
                    recent = window[len(window) - keep:] if keep else ""
                yield mlx_server.Response(segment, event.token, event.logprob, reason, top)
            elif event[0] == "progress":
                if progress is not None:
                    progress(event[1], event[2])
            elif event[0] == "done":
                return
            else:
                raise RuntimeError(f"generation failed: {event[1]}")


def _peer_closed(conn: socket.socket) -> bool:
    """True once the client has closed its end (readable with nothing to read). A client sends
    nothing after its request (HTTP/1.0, one request per connection), so readable means EOF."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class _ErrorBodies:
    """The handler's output stream: rewrites mlx_lm.server's `{"error": "message"}` bodies of
    error responses into OpenAI's shape; everything else passes through."""

    def __init__(self, raw: Any, handler: "Handler") -> None:
        self._raw, self._handler = raw, handler

    def write(self, data: bytes) -> int:
        status = getattr(self._handler, "_status", 200)
        if status >= 400:
            try:
                body = json.loads(data)
            except ValueError:
                body = None
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                err = getattr(_local, "error", None)
                data = json.dumps({"error": {
                    "message": body["error"],
                    "type": err.kind if err else ("invalid_request_error" if status < 500
                                                  else "server_error"),
                    "param": None, "code": err.code if err else None}}).encode()
        return self._raw.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class Handler(mlx_server.APIHandler):
    response_generator: EngineResponses
    _status = 200

    def setup(self) -> None:
        super().setup()
        self.wfile = _ErrorBodies(self.wfile, self)

    def do_POST(self) -> None:
        _local.error = _local.ctx = None
        _local.connection = self.connection
        try:
            super().do_POST()
        except (BrokenPipeError, ConnectionResetError) as exc:
            # The handler's `finally` stopped the context: the engine frees the pages.
            log.info("client %s went away: %s", self.address_string(), exc)
            self.close_connection = True
        finally:
            _local.connection = None

    def _set_completion_headers(self, status_code: int = 200) -> None:
        err = getattr(_local, "error", None)
        if status_code >= 400 and err is not None:
            status_code = err.status  # mlx-lm answers any generate() failure with 404
        self._status = status_code
        self.send_response(status_code)
        self.send_header("Content-type", "application/json")
        if status_code >= 400 and err is not None and err.retry_after:
            self.send_header("Retry-After", str(err.retry_after))
        self._set_cors_headers()

    def _set_stream_headers(self, status_code: int = 200) -> None:
        self._status = status_code
        super()._set_stream_headers(status_code)

    def _with_tiers(self, response: dict) -> dict:
        ctx = getattr(_local, "ctx", None)
        usage = response.get("usage")
        if usage is not None and ctx is not None and ctx.request is not None:
            r = ctx.request
            usage["tqstore"] = {"memory_tokens": r.memory_tokens,
                                "daemon_tokens": r.daemon_tokens,
                                "computed_tokens": r.computed_tokens,
                                "ttft_s": None if r.ttft_s is None else round(r.ttft_s, 4)}
        return response

    def generate_response(self, *args: Any, **kwargs: Any) -> dict:
        return self._with_tiers(super().generate_response(*args, **kwargs))

    def completion_usage_response(self, *args: Any, **kwargs: Any) -> dict:
        return self._with_tiers(super().completion_usage_response(*args, **kwargs))

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/stats":
            self._json(200, self.response_generator.engine.stats())
        elif self.path.startswith("/v1/models"):
            rg = self.response_generator
            self._json(200, {"object": "list", "data": [
                {"id": rg.model_id, "object": "model", "created": self.created,
                 "owned_by": "tqstore"}]})
        else:
            super().do_GET()

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self._set_completion_headers(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        log.debug("%s %s", self.address_string(), format % args)


def default_cli_args(model_path: str, max_tokens: int = 512) -> argparse.Namespace:
    """The settings mlx_lm.server's handler reads, with mlx_lm.server's defaults."""
    return argparse.Namespace(
        model=model_path, allowed_origins=["*"], num_draft_tokens=3, max_tokens=max_tokens,
        temp=0.0, top_p=1.0, top_k=0, min_p=0.0, chat_template_args={}, draft_model=None,
        adapter_path=None)


def make_server(engine: Engine, model_path: str, host: str, port: int,
                max_tokens: int = 512) -> ThreadingHTTPServer:
    """The HTTP server (not yet serving: call serve_forever)."""
    responses = EngineResponses(engine, model_path, default_cli_args(model_path, max_tokens))
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)

    class Server(ThreadingHTTPServer):
        address_family = infos[0][0]
        daemon_threads = True

    server = Server(
        infos[0][4][:2],
        lambda *a, **kw: Handler(responses, *a,
                                 system_fingerprint=mlx_server.get_system_fingerprint(), **kw))
    return server
