"""`tqstore generate [--server ADDR] [--model DIR] --prompt TEXT | --prompt-file F`."""

from __future__ import annotations

import argparse
import sys

from tqstore.cli.connection_args import add_connection_arguments, client_config_from
from tqstore.cli.progress import PrefillProgress
from tqstore.config import DEFAULT_LISTEN, ClientConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the user message")
    prompt.add_argument("--prompt-file", help="read the user message from a file ('-': stdin)")
    parser.add_argument("--server", default=DEFAULT_LISTEN,
                        help=f"daemon address (default {DEFAULT_LISTEN}); 'none' to run without")
    parser.add_argument("--model", help="local mlx-lm model directory: config.json, *.safetensors "
                                        "and tokenizer files (default: the bundled SmolLM2)")
    parser.add_argument("--max-tokens", type=int, default=128,
                        help="most tokens to generate, the first included (default 128)")
    parser.add_argument("--raw", action="store_true", help="no chat template: tokenize the text as is")
    parser.add_argument("--system", help="system message for the chat template")
    parser.add_argument("--store-block", type=int, default=None,
                        help="tokens per daemon block, also the prefill step (default: 256; on "
                             "CUDA up to 2048, where smaller prefill steps slow a cold prompt). "
                             "Clients sharing a store must agree on it")
    add_connection_arguments(parser)


def load_default_or(path: str | None):
    from tqstore.models.loader import load_model
    from tqstore.models.smollm2 import load_smollm2

    return load_model(path) if path else load_smollm2()


def prompt_ids(loaded, text: str, raw: bool, system: str | None = None) -> list[int]:
    from tqstore.models.loader import chat_prompt_ids

    if raw:
        return list(loaded.tokenizer.encode(text))
    return chat_prompt_ids(loaded.tokenizer, text, system=system)


def connect(target: ClientConfig | str | None, log=print):
    """A client if the daemon answers, else None (generation then runs without the cache).
    A daemon that answers but refuses the token raises Unauthenticated: a setting to fix, not
    an outage to run through."""
    from tqstore.client import KvStoreClient

    address = target.address if isinstance(target, ClientConfig) else target
    if not address or address == "none":
        return None
    client = KvStoreClient(target)
    if not client.is_serving(timeout=2.0):
        client.close()
        log(f"tqstore: daemon at {address} unreachable: generating without the prefix cache")
        return None
    from tqstore.errors import Unauthenticated
    from tqstore.errors import TqstoreError

    try:
        client.check_access()
    except Unauthenticated:
        client.close()
        raise
    except TqstoreError as exc:  # it went away after answering the health check
        client.close()
        log(f"tqstore: daemon at {address} unreachable ({exc}): generating without the prefix "
            "cache")
        return None
    return client


def run(args: argparse.Namespace) -> int:
    from tqstore.generator import CachedGenerator

    if args.prompt_file:
        text = sys.stdin.read() if args.prompt_file == "-" else open(args.prompt_file).read()
    else:
        text = args.prompt
    err = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    loaded = load_default_or(args.model)
    ids = prompt_ids(loaded, text, args.raw, args.system)
    client = connect(client_config_from(args, args.server), log=err)
    try:
        generator = CachedGenerator(loaded, client, block_size=args.store_block)
        # Progress goes to stderr: stdout carries only the generated text.
        report = generator.generate(ids, max_tokens=args.max_tokens,
                                    on_text=lambda t: print(t, end="", flush=True),
                                    progress=PrefillProgress())
        print()
        if report.upload is not None:
            stored = report.upload.result()
            err(f"uploaded {stored} new blocks to the daemon")
    finally:
        if client is not None:
            client.close()
    err(f"prompt tokens {report.prompt_tokens}, hit tokens {report.hit_tokens} ({report.cache_status}), "
        f"TTFT {report.ttft_s:.2f} s ("
        + ", ".join(f"{k} {v:.2f}" for k, v in report.phases.items()
                    if not k.startswith("restore_")) + "), "  # the restore's parts: benchmarks
        f"decode {report.decode_tokens_per_s:.1f} tokens/s "
        f"(first step {report.first_step_s:.2f} s: quantizes the prefill once), "
        f"KV {report.kv_bytes / max(report.kv_fp16_bytes, 1):.2f}x of fp16")
    return 0
