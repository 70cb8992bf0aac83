"""Tolerances for comparing fp32 results that took different paths, by the device they ran on.

On the CPU, MLX multiplies fp32 matrices in fp32 (BLAS). On a GPU, MLX rounds the inputs of fp32
matmuls to TF32 (10 explicit mantissa bits, unit roundoff 2^-11 = 4.9e-4; seen on the H100 with
MLX 0.32.4 CUDA), so each product carries a relative error up to ~1e-3 and a result that goes
through several matmuls and a softmax differs from the fp32 path by 1e-4 to 1e-2 of its scale.
Tests state the CPU bound they always had and the GPU bound below it was measured against; both
are far below what a wrong block, mask, scale or token (errors of the order of the result itself)
produces. Oracles that must be exact fp32 are computed on the CPU stream instead."""

from __future__ import annotations

import mlx.core as mx

# One attention (scores, softmax, weighted sum) with TF32 inputs against float64: measured up to
# 1.5e-3 of the output's scale on the H100 (scores of 64-dimensional dot products); ten TF32 unit
# roundoffs. A wrong token, block or scale moves the output by 1e-1 of its scale or more.
ATTENTION_TF32 = 5e-3
# Logits of a tiny 3-layer model computed along two paths (multi-token vs token-by-token, routed
# vs stock SDPA): measured up to 4.3e-3 of the logits' scale on the H100.
MODEL_TF32 = 2e-2


def on_gpu() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu


def rtol(cpu: float, gpu: float) -> float:
    """The bound for the default device: ``cpu`` where fp32 matmuls are fp32, ``gpu`` (TF32)
    elsewhere, never tighter than ``cpu``."""
    return max(cpu, gpu) if on_gpu() else cpu
