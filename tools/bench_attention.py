#!/usr/bin/env python3
"""Decode attention over TurboQuant pages on the GPU: correctness against the pure-MLX oracle
on fresh random pages, then per-layer time against fp16 SDPA and bandwidth against a copy, all
in one run. Same as `tqstore bench attention`; results in docs/fragments/kernels.md.

    PYTHONUNBUFFERED=1 python tools/bench_attention.py --json $OUT/bench_attention.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqstore.bench.attention import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
