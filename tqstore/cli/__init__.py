"""The `tqstore` command line: every subcommand and every benchmark is listed here.

Each subcommand has one module in this package (tqstore/cli/<name>.py) holding its argument
parsing and its printing; the work itself stays in the module that owns it (tqstore.server,
tqstore.ssd.check, tqstore.calibrate, ...). Each benchmark is one module of tqstore/bench/.
Both kinds expose `add_arguments(parser)` and `run(args) -> int`; this file only wires them."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

import tqstore  # noqa: F401  (loads OpenBLAS before MLX)
from tqstore.errors import TqstoreError
from tqstore import _blas

# (name, module, help). A module is imported only when its command is chosen (build_parser).
COMMANDS: list[tuple[str, str, str]] = [
    ("serve", "tqstore.cli.serve", "run the gRPC prefix-cache daemon"),
    ("generate", "tqstore.cli.generate", "generate text with the paged TurboQuant cache"),
    ("inspect", "tqstore.cli.inspect", "report hit rates, blocks, bytes of a store"),
    ("openai", "tqstore.cli.openai", "OpenAI-compatible endpoint with continuous batching"),
    ("export-model", "tqstore.cli.export_model", "write the bundled SmolLM2 as an mlx-lm model directory"),
    ("demo", "tqstore.cli.demo", "daemon + endpoint + a multi-turn agent conversation"),
    ("check", "tqstore.cli.check", "verify (and optionally repair) a store"),
    ("calibrate", "tqstore.cli.calibrate", "build a KV quality profile for a model"),
]
BENCHES: list[tuple[str, str, str]] = [
    ("codec", "tqstore.bench.codec", "codec MSE, bounds, bytes and throughput"),
    ("ssd", "tqstore.bench.ssd", "SSD tier throughput vs raw file I/O, lookup latency"),
    ("quality", "tqstore.bench.quality", "KL and top-1 of cache configs on SmolLM2"),
    ("attention", "tqstore.bench.attention", "decode attention kernels vs fp16 SDPA"),
    ("decode", "tqstore.bench.decode", "decode tokens/s of the paged cache vs stock mlx-lm"),
    ("hit", "tqstore.bench.hit", "hit TTFT vs cold prefill, concurrent throughput"),
    ("remote", "tqstore.bench.remote", "the Redis tier: reads vs raw GETs, hit TTFT by tier"),
    ("serve", "tqstore.bench.serve", "agent workload: our endpoint vs mlx_lm.server"),
]


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser. With ``argv``, only the chosen subcommand's module is imported (and
    gets its options): `tqstore serve` loads neither mlx-lm nor the paged cache, `tqstore
    --help` none of them. Without it, every module (for tests that walk every option)."""
    chosen = None if argv is None else [a for a in argv if not a.startswith("-")][:2]
    parser = argparse.ArgumentParser(prog="tqstore", description="KV-cache store and TurboQuant paged KV cache for MLX inference")
    parser.add_argument("--version", action="version", version=f"tqstore {tqstore.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_commands(sub, COMMANDS, None if chosen is None else chosen[:1])
    bench = sub.add_parser("bench", help="benchmarks (each prints ratios against a same-run baseline)")
    wanted_bench = None if chosen is None else (chosen[1:] if chosen[:1] == ["bench"] else [])
    _add_commands(bench.add_subparsers(dest="bench", required=True), BENCHES, wanted_bench)
    return parser


def _add_commands(sub: argparse._SubParsersAction, table: list[tuple[str, str, str]],
                  wanted: list[str] | None) -> None:
    for name, module, help_text in table:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if wanted is None or name in wanted:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(run=mod.run)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        code = int(args.run(args) or 0)
    except KeyboardInterrupt:
        code = 130
    except (TqstoreError, OSError) as exc:
        # What the user can fix (a path, an address, an argument; the project raises those as
        # TqstoreError): one line, no traceback. Anything else is a bug and keeps its traceback.
        print(f"tqstore: error: {exc}", file=sys.stderr)
        code = 2
    _blas.exit_status = code  # kept if the exit hook must end the process itself
    return code
