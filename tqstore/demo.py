"""`tqstore demo`: the embedded default. Starts a daemon on a temp dir (or --path), runs the
bundled SmolLM2 on a multi-thousand-token prompt twice through the daemon, and prints cold vs
hit TTFT, the hit rate, and whether both outputs are identical."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path", help="store directory (default: a new temp dir)")
    parser.add_argument("--prompt-tokens", type=int, default=2048,
                        help="approximate prompt length in tokens (default 2048)")
    parser.add_argument("--max-tokens", type=int, default=32)


def demo_document() -> str:
    """The long document of the demo: the GPL-3 text shipped in tqstore/data."""
    for candidate in sorted(DATA.glob("*")):
        if "gpl" in candidate.name.lower():
            return candidate.read_text()
    raise FileNotFoundError(f"no GPL text in {DATA}")


def build_prompt(loaded, target_tokens: int) -> list[int]:
    from tqstore.models.loader import chat_prompt_ids

    text = demo_document()
    words = text.split(" ")
    # Tokens per character are stable for one text: size the excerpt by a first measurement.
    sample = " ".join(words[:400])
    per_word = len(loaded.tokenizer.encode(sample)) / 400
    excerpt = " ".join(words[: max(50, int(target_tokens / per_word))])
    return chat_prompt_ids(loaded.tokenizer, excerpt + "\n\nWhat is this document, and who may "
                           "copy it? Answer in two sentences.")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from tqstore.client import KvStoreClient
    from tqstore.config import ServerConfig, StoreConfig
    from tqstore.generator import CachedGenerator
    from tqstore.models.smollm2 import load_smollm2
    from tqstore.server import Daemon

    path = args.path or tempfile.mkdtemp(prefix="tqstore-demo-")
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

            def progress(label):
                last = [0.0]

                def show(done: int, total: int) -> None:
                    now = time.perf_counter()
                    if now - last[0] > 1.0 or done == total:
                        last[0] = now
                        _say(f"      {label}: prefilled {done}/{total} tokens")
                return show

            _say(f"[3/5] cold run: {len(ids)} prompt tokens, nothing cached")
            cold = generator.generate(ids, args.max_tokens, progress=progress("cold"))
            stored = cold.upload.result() if cold.upload else 0
            _say(f"      first token after {cold.ttft_s:.2f} s; uploaded {stored} blocks")
            _say("[4/5] second run: same prompt, prefix fetched from the daemon")
            hit = generator.generate(ids, args.max_tokens, progress=progress("hit"))
            if hit.upload:
                hit.upload.result()
            stats = client.stats()
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
    finally:
        daemon.stop(grace=5)
