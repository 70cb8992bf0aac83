"""`tqstore openai [--model DIR] [--store ADDR|none] [--host 127.0.0.1] [--port 8080]`: the
OpenAI-compatible endpoint (tqstore.serving) with continuous batching over the paged TurboQuant
cache and the daemon. Without --model it serves the bundled SmolLM2, written out once as a
standard mlx-lm model directory (tqstore.models.export), so `mlx_lm.server --model` on that
directory loads the same weights."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from tqstore.cli.connection_args import add_connection_arguments, client_config_from
from tqstore.config import DEFAULT_LISTEN, WIDE_PREFILL_CHUNK, MiB, ServingConfig
from tqstore.errors import InvalidArgument

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local mlx-lm model directory (default: the bundled "
                                        "SmolLM2-135M-Instruct, exported once to the user cache)")
    parser.add_argument("--store", default=DEFAULT_LISTEN,
                        help=f"prefix-cache daemon address (default {DEFAULT_LISTEN}); 'none' "
                             "to serve without it")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                                                            "127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument("--pool-mib", type=int, default=ServingConfig.pool_bytes // MiB,
                        help="byte budget of the paged KV pool in MiB: live sequences plus "
                             "pages kept for prefix sharing (default "
                             f"{ServingConfig.pool_bytes // MiB})")
    parser.add_argument("--max-batch", type=int, default=ServingConfig.max_batch,
                        help="sequences decoded together (default "
                             f"{ServingConfig.max_batch})")
    parser.add_argument("--queue", type=int, default=ServingConfig.queue_size,
                        help="requests that may wait for a slot; beyond it HTTP 503 with "
                             f"Retry-After (default {ServingConfig.queue_size})")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="prompt tokens per prefill step; with a daemon it divides the "
                             "store block (default: the store block with a daemon, "
                             f"{WIDE_PREFILL_CHUNK} without)")
    parser.add_argument("--prefill-slice", type=float, default=ServingConfig.prefill_slice_s,
                        help="seconds of prefill chunks between two decode steps of the "
                             f"running sequences (default {ServingConfig.prefill_slice_s:g})")
    parser.add_argument("--decode-share", type=float, default=ServingConfig.decode_share,
                        help="while some sequences decode and others prefill, the least share "
                             "of time decode steps get, in [0, 1) (default "
                             f"{ServingConfig.decode_share:g}; 0: one decode step per slice)")
    parser.add_argument("--mixed-steps", action="store_true",
                        help="a prefill chunk of 16+ tokens carries the decoding sequences' "
                             "step in its forward pass (default: off; every chunk alone)")
    parser.add_argument("--store-block", type=int, default=ServingConfig.store_block,
                        help="tokens per daemon block: smaller blocks leave fewer tokens to "
                             "recompute after a daemon hit (at most one block's worth), at more "
                             "records per token (default: 256; on CUDA up to 2048, where "
                             "smaller prefill steps slow a cold prompt)")
    parser.add_argument("--exact-hits", action="store_true",
                        help="take prefixes only from the daemon's fp16 blocks (a hit then "
                             "equals a cold run bit for bit), never from pages shared in memory")
    parser.add_argument("--max-tokens", type=int, default=512,
                        help="completion length when a request gives none (default 512)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a --host other than loopback (no authentication: put it "
                             "behind your own proxy)")
    add_connection_arguments(parser)  # to the daemon (--store), not this endpoint's clients


def _stop_like_ctrl_c(signum: int, frame: object) -> None:
    """SIGTERM's handler: KeyboardInterrupt in the main thread (serve_forever ends as on
    Ctrl-C), once; the next SIGTERMs are ignored while the shutdown runs."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from tqstore.cli.generate import connect
    from tqstore.models.loader import load_model
    from tqstore.paged import install
    from tqstore.serving.engine import Engine
    from tqstore.serving.http import make_server

    if args.host not in _LOOPBACK and not args.allow_remote:
        raise InvalidArgument(f"--host {args.host} is not loopback; the endpoint has no "
                              "authentication: pass --allow-remote to listen there anyway")
    # Our lines at INFO; mlx_lm.server's handler logs every prefill step at INFO on the root
    # logger, which would drown them: others from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("tqstore").setLevel(logging.INFO)
    log = logging.getLogger("tqstore.serving")
    config = ServingConfig(pool_bytes=args.pool_mib * MiB, max_batch=args.max_batch,
                           queue_size=args.queue,
                           prefill_chunk=args.prefill_chunk,
                           prefill_slice_s=args.prefill_slice,
                           decode_share=args.decode_share,
                           store_block=args.store_block,
                           exact_hits=args.exact_hits,
                           mixed_steps=args.mixed_steps)
    if args.model:
        model_dir = args.model
    else:
        from tqstore.models.export import bundled_model_dir

        model_dir = str(bundled_model_dir())
    log.info("loading %s", model_dir)
    loaded = load_model(model_dir)
    install(loaded.model)
    client = connect(client_config_from(args, args.store), log=log.warning)
    engine = Engine(loaded, client, config)
    server = make_server(engine, model_dir, args.host, args.port, args.max_tokens)
    host, port = server.server_address[:2]
    log.info("serving %s at http://%s:%d/v1 (daemon: %s, pool %d MiB, batch %d)",
             model_dir, host, port, "none" if client is None else args.store, args.pool_mib,
             args.max_batch)
    print(f"tqstore openai: http://{host}:{port}/v1", file=sys.stderr, flush=True)
    # SIGTERM (systemd, docker, kill) stops like Ctrl-C: the engine ends and queued uploads
    # reach the daemon before the process exits. The handler takes no lock: it runs in the
    # main thread between two bytecodes, possibly while that thread holds one (starting a
    # request's thread does), and a handler that started a thread itself could deadlock
    # there. Later SIGTERMs are ignored, so they cannot cut the uploads' wait short.
    try:
        signal.signal(signal.SIGTERM, _stop_like_ctrl_c)  # inside: its interrupt cleans up
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        # Whatever stopped it (SIGTERM or Ctrl-C): a SIGTERM now must not cut the uploads'
        # wait short (a second Ctrl-C still can).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.server_close()
        engine.close()
        if client is not None:
            client.wait_uploads(timeout=30)
            client.close()
    # Everything is done: requests ended, uploads acknowledged. Skip interpreter teardown: on
    # MLX's CUDA backend, destroying the engine thread's stream at exit aborted the process
    # (SIGABRT, "terminate called without an active exception", seen on the H200).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
