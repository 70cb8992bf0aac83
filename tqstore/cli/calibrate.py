"""`tqstore calibrate [--text F] [--prefill N] [--out F]`: the bundled SmolLM2's KV quality
profile (key means, per-layer bits). The algorithm is tqstore.calibrate's."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqstore.calibrate import CALIBRATION_TEXT, DATA_DIR, calibrate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", default=CALIBRATION_TEXT,
                        help="calibration text: a file in tqstore/data or a path")
    parser.add_argument("--prefill", type=int, default=1024,
                        help="fp16 tokens for the means (default 1024)")
    parser.add_argument("--positions", type=int, default=256,
                        help="teacher-forced positions per sensitivity probe")
    parser.add_argument("--budget", type=float, default=0.30, help="bytes vs fp16 KV")
    parser.add_argument("--amortize", type=int, default=2048,
                        help="tokens the profile's means are amortized over in the budget")
    parser.add_argument("--no-tail", action="store_true",
                        help="calibrate for a cache without the fp16 tail (newest block fp16)")
    parser.add_argument("--uniform", action="store_true",
                        help="means only, no per-layer bits (no sensitivity probes)")
    parser.add_argument("--out", default=None, help="profile path (default tqstore/data/profiles)")


def run(args: argparse.Namespace) -> int:
    from tqstore.models import load_smollm2
    from tqstore.paged.policy import default_profile_path

    lm = load_smollm2()
    path = Path(args.text) if Path(args.text).exists() else DATA_DIR / args.text
    t0 = time.perf_counter()
    profile = calibrate(lm, path.read_text(), path.name, args.prefill, args.positions,
                        budget=args.budget, amortize_tokens=args.amortize,
                        uniform=(0, 0) if args.uniform else None, fp16_tail=not args.no_tail)
    out = Path(args.out) if args.out else default_profile_path(lm.fingerprint)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(profile.to_bytes())
    print(f"profile {out} ({len(profile.to_bytes())} bytes, digest {profile.digest[:16]}) "
          f"in {time.perf_counter() - t0:.0f} s")
    if profile.key_bits:
        print(f"key bits   {list(profile.key_bits)}\nvalue bits {list(profile.value_bits)}")
    return 0
