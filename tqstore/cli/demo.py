"""`tqstore demo [--path DIR] [--prompt-tokens N]`: the embedded default. Starts a daemon on a
temp dir (or --path), runs the bundled SmolLM2 on a long prompt (tqstore.demo) twice through
it, and prints cold vs hit TTFT, the hit rate, and whether both outputs are identical."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time

from tqstore.cli.progress import PrefillProgress

DEFAULT_PROMPT_TOKENS = 2400


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path", help="store directory, kept afterwards (default: a temp dir, "
                                       "removed when the demo ends)")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS,
                        help="prompt length in tokens, chat template included: the excerpt is "
                             "cut at a word, so it may come out a few tokens short "
                             f"(default {DEFAULT_PROMPT_TOKENS})")
    parser.add_argument("--max-tokens", type=int, default=32,
                        help="tokens to generate in each of the two runs (default 32)")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    # A temp store is ~50 MB after one demo: it goes when the demo ends, however it ends.
    path = args.path or tempfile.mkdtemp(prefix="tqstore-demo-")
    try:
        return _run(args, path)
    finally:
        if not args.path:
            shutil.rmtree(path, ignore_errors=True)


def _run(args: argparse.Namespace, path: str) -> int:
    from tqstore.client import KvStoreClient
    from tqstore.config import ServerConfig, StoreConfig
    from tqstore.demo import build_prompt
    from tqstore.generator import CachedGenerator
    from tqstore.models.smollm2 import load_smollm2
    from tqstore.server import Daemon

    _say(f"[1/5] starting the daemon on {path}")
    daemon = Daemon(ServerConfig(path=path, listen="127.0.0.1:0",
                                 store=StoreConfig(max_bytes=4 << 30, map_size=1 << 30))).start()
    try:
        _say("[2/5] loading SmolLM2-135M-Instruct (bundled GGUF, dequantized to fp32 for the CPU)")
        t = time.perf_counter()
        loaded = load_smollm2()
        _say(f"      loaded in {time.perf_counter() - t:.1f} s")
        ids = build_prompt(loaded, args.prompt_tokens)
        with KvStoreClient(daemon.address) as client:
            generator = CachedGenerator(loaded, client)
            _say(f"[3/5] cold run: {len(ids)} prompt tokens, nothing cached")
            cold = generator.generate(ids, args.max_tokens, progress=PrefillProgress("      cold"))
            stored = cold.upload.result() if cold.upload else 0
            _say(f"      first token after {cold.ttft_s:.2f} s; uploaded {stored} blocks")
            _say("[4/5] second run: same prompt, prefix fetched from the daemon")
            hit = generator.generate(ids, args.max_tokens, progress=PrefillProgress("      hit"))
            if hit.upload:
                hit.upload.result()
            stats = client.stats()
    finally:
        daemon.stop(grace=5)
    _say("[5/5] results")
    same = cold.token_ids == hit.token_ids
    print(f"prompt tokens      {len(ids)}")
    print(f"cold TTFT          {cold.ttft_s:.2f} s")
    print(f"hit TTFT           {hit.ttft_s:.2f} s  ({hit.ttft_s / cold.ttft_s:.2f} of cold, "
          f"{cold.ttft_s / max(hit.ttft_s, 1e-9):.1f}x faster)")
    print(f"first decode step  {hit.first_step_s:.2f} s (quantizes the prefill once, after the "
          f"first token; then {hit.decode_tokens_per_s:.1f} tokens/s)")
    print(f"hit rate           {hit.hit_tokens}/{len(ids)} prompt tokens "
          f"({hit.hit_tokens / len(ids):.1%}); store: {stats.blocks} blocks, "
          f"{stats.bytes_on_disk / 2**20:.1f} MiB on disk")
    print(f"live KV            {cold.kv_bytes / 2**20:.1f} MiB TurboQuant vs "
          f"{cold.kv_fp16_bytes / 2**20:.1f} MiB fp16 ({cold.kv_bytes / cold.kv_fp16_bytes:.2f}x)")
    print(f"outputs identical  {'yes' if same else 'NO'}")
    print(f"answer             {hit.text.strip()!r}")
    return 0 if same else 1
