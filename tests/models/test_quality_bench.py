"""The quality benchmark's measurement on a short slice of the real text (the full run is
`tqstore bench quality`, recorded in docs/fragments/paged.md)."""

import argparse

from tqstore.bench import quality
from tqstore.codec import CodecConfig
from tqstore.paged import CachePolicy


def test_measure_short_slice(smollm2):
    text = (quality.DATA_DIR / quality.TEXTS["gpl-3"]).read_text()
    policies = [CachePolicy(codec=CodecConfig(8, 8)), CachePolicy(codec=CodecConfig(3, 3))]
    result = quality.measure(smollm2, policies, text, prefill=64, positions=48, chunk=16,
                             block_size=16, log=lambda *_: None)
    base, k8, k3 = result["rows"]
    assert base["top1"] == 100.0 and base["mean_kl"] == 0.0 and base["bytes_vs_fp16"] == 1.0
    # Per (token, head) K+V: fp16 256 bytes; K8V8 2 x (64 + 2); K3V3 2 x (24 + 2).
    assert k8["bytes_vs_fp16"] == 132 / 256
    assert k3["bytes_vs_fp16"] == 52 / 256
    assert k8["top1"] >= 95.0 and k8["mean_kl"] < 0.01
    assert k3["mean_kl"] > k8["mean_kl"] > 0.0


def test_cli_arguments_parse():
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    args = parser.parse_args(["--bits", "8,4/3", "--json"])
    assert quality._bits(args.bits) == [(8, 8), (4, 3)] and args.json
    assert len(quality.config_grid(quality._bits(args.bits), boundary=True)) == 4
