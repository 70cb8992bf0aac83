"""`tqstore bench codec`: MSE against the paper's bound, cosine, bytes vs fp16, throughput.

Baselines measured in the same run: the paper's upper bound (sqrt(3) pi / 2) 4^-b and the exact
Gaussian Lloyd-Max optimum for MSE; fp16 for bytes; MLX's own affine quantizer (mx.quantize,
group 64, same bits) for quantize throughput on the same vectors.
Also measures the two optional stages (norm correction, QJL residual for keys) on inner
products, which is what attention consumes, to back the defaults in CodecConfig.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import mlx.core as mx

from tqstore.codec import HeadRotations, TurboQuantCodec

GAUSSIAN_OPTIMA = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--vectors", type=int, default=16384, help="unit vectors per measurement")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8],
                        help="code widths to measure (default 2 3 4 5 6 8)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 80, 96, 128, 256],
                        help="head dimensions to measure (default 64 80 96 128 256)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats per throughput figure, best kept (default 3)")


def _time(fn, repeats: int) -> float:
    mx.eval(fn())  # warm up (builds the graph once, codebook caches)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - start)
    return best


def _unit(n: int, d: int, seed: int) -> mx.array:
    x = mx.random.normal((1, n, d), key=mx.random.key(seed))
    return x / mx.linalg.norm(x, axis=-1, keepdims=True)


def measure_row(head_dim: int, bits: int, vectors: int, repeats: int, norm_correction: bool) -> dict:
    rot = HeadRotations.for_layer(0, 0, 1, head_dim, "K")
    codec = TurboQuantCodec(head_dim, bits, rot, norm_correction=norm_correction)
    x = _unit(vectors, head_dim, seed=head_dim * 31 + bits)
    q = codec.quantize(x)
    xr = codec.dequantize(q)
    mse = mx.mean(mx.sum((xr - x) ** 2, axis=-1)).item()
    cos = mx.mean(mx.sum(xr * x, axis=-1) / mx.maximum(mx.linalg.norm(xr, axis=-1), 1e-12)).item()
    seconds = _time(lambda: codec.quantize(x).arrays(), repeats)
    row = {
        "head_dim": head_dim, "bits": bits, "norm_correction": norm_correction,
        "mse": mse, "paper_bound": math.sqrt(3) * math.pi / 2 * 4.0**-bits,
        "gaussian_optimum": GAUSSIAN_OPTIMA.get(bits), "cosine": cos,
        "bytes_per_vector": codec.bytes_per_vector,
        "bytes_vs_fp16": codec.bytes_per_vector / (2 * head_dim),
        "quantize_mvec_per_s": vectors / seconds / 1e6,
    }
    group = 64 if head_dim % 64 == 0 else 32 if head_dim % 32 == 0 else None
    if bits in (2, 3, 4, 8) and not norm_correction and group:
        # Same-run throughput baseline: MLX's affine quantizer on the same vectors.
        flat = x.reshape(-1, head_dim)
        base = _time(lambda: mx.quantize(flat, group_size=group, bits=bits), repeats)
        row["affine_mvec_per_s"] = vectors / base / 1e6
        row["throughput_vs_affine"] = base / seconds
    return row


def measure_inner_products(head_dim: int, vectors: int) -> list[dict]:
    """Relative bias and RMS error of q.k estimates for keys stored with each key variant at
    (about) the same bits: what the optional stages buy for attention scores."""
    rot = HeadRotations.for_layer(0, 0, 1, head_dim, "K")
    qjl = HeadRotations.for_layer(0, 0, 1, head_dim, "QJL")
    variants = [
        ("4-bit MSE", TurboQuantCodec(head_dim, 4, rot, norm_correction=False)),
        ("4-bit MSE + norm correction", TurboQuantCodec(head_dim, 4, rot, norm_correction=True)),
        ("3-bit MSE + 1-bit QJL", TurboQuantCodec(head_dim, 3, rot, norm_correction=False,
                                                  qjl_rotation=qjl)),
        ("3-bit MSE + norm correction", TurboQuantCodec(head_dim, 3, rot, norm_correction=True)),
    ]
    x = _unit(vectors, head_dim, seed=7)
    q = x + mx.random.normal(x.shape, key=mx.random.key(8)) / math.sqrt(head_dim)
    true = mx.sum(q * x, axis=-1)
    rows = []
    for name, codec in variants:
        err = mx.sum(q * codec.dequantize(codec.quantize(x)), axis=-1) - true
        rows.append({
            "variant": name, "head_dim": head_dim, "bytes_per_vector": codec.bytes_per_vector,
            "relative_bias": mx.mean(err).item() / mx.mean(true).item(),
            "relative_rmse": math.sqrt(mx.mean(err * err).item()) / mx.mean(true).item(),
        })
    return rows


def run(args: argparse.Namespace) -> int:
    rows = [measure_row(d, b, args.vectors, args.repeats, nc)
            for d in args.head_dims for b in args.bits for nc in (False, True)]
    inner = measure_inner_products(128, args.vectors)
    report = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "device": str(mx.default_device()), "vectors": args.vectors,
              "rows": rows, "inner_products": inner}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"device {report['device']}, {args.vectors} random unit vectors per row")
    print(f"{'D':>4} {'b':>2} {'nc':>2} {'MSE':>9} {'bound':>9} {'opt':>7} {'MSE/opt':>7} "
          f"{'cos':>7} {'B/vec':>5} {'vs fp16':>7} {'Mvec/s':>7} {'vs affine':>9}")
    for r in rows:
        opt = r["gaussian_optimum"]
        opt_text = f"{opt:>7.4f} {r['mse'] / opt:>7.3f}" if opt else f"{'-':>7} {'-':>7}"
        affine = r.get("throughput_vs_affine")
        print(f"{r['head_dim']:>4} {r['bits']:>2} {int(r['norm_correction']):>2} {r['mse']:>9.2e} "
              f"{r['paper_bound']:>9.2e} {opt_text} {r['cosine']:>7.4f} "
              f"{r['bytes_per_vector']:>5} {r['bytes_vs_fp16']:>7.3f} "
              f"{r['quantize_mvec_per_s']:>7.3f} {f'{affine:.3f}' if affine else '-':>9}")
    print("\ninner products q.k (head_dim 128, q correlated with k):")
    for r in inner:
        print(f"  {r['variant']:<30} {r['bytes_per_vector']:>3} B/vec  bias {r['relative_bias']:+.4f}"
              f"  rmse {r['relative_rmse']:.4f}")
    return 0
