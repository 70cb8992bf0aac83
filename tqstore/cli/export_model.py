"""`tqstore export-model [--out DIR] [--dtype float32|float16|bfloat16]`: the bundled SmolLM2
as a standard mlx-lm model directory (the work is tqstore.models.export's).

Idempotent: a directory already holding the current export is left as it is. Prints only the
directory on stdout, so `mlx_lm.server --model "$(tqstore export-model)"` works; what it did
goes to stderr."""

from __future__ import annotations

import argparse
import sys
import time

from tqstore.errors import InvalidArgument

DTYPE_NAMES = ("float32", "float16", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="model directory to write (default $TQSTORE_MODEL_DIR, else "
                             "~/.cache/tqstore/models/SmolLM2-135M-Instruct, the directory "
                             "of the embedded default); rewritten only if it does not hold the "
                             "current export")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                        help="dtype of the dense weights (default float32, the fast one on CPU; "
                             "anything else needs --out)")


def run(args: argparse.Namespace) -> int:
    from tqstore.models.export import DTYPES, default_model_dir, ensure_export

    if args.out is None and args.dtype != "float32":
        raise InvalidArgument(f"--dtype {args.dtype} needs --out DIR: the bundled directory "
                              f"{default_model_dir()} is float32")
    out = default_model_dir() if args.out is None else args.out
    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    root, exported = ensure_export(out, dtype)
    what = f"exported in {time.perf_counter() - t0:.1f} s" if exported else "up to date"
    print(f"SmolLM2-135M-Instruct ({args.dtype}): {what}", file=sys.stderr)
    print(root)
    return 0

