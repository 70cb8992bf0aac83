"""The agent workload (tqstore.agents): deterministic texts sized with the model's tokenizer, and
the aggregate figures the benchmark derives from per-turn records. No server needed."""

from __future__ import annotations

import pytest

from tqstore.agents import (TurnRecord, WorkloadConfig, aggregate_decode_tokens_per_s,
                            build_workload, content_tokens, percentile, prompt_tokens)
from tqstore.errors import InvalidArgument
from tqstore.models import load_smollm2


@pytest.fixture(scope="module")
def tokenizer():
    return load_smollm2().tokenizer


def _within(n: int, target: int) -> bool:
    # Cut at a whole word (split at spaces, so a word may span lines): never over, and at most
    # one word short; the longest in tqstore/data is a 40-token URL.
    return target - 40 <= n <= target


def test_same_seed_same_workload_other_seed_other_texts(tokenizer, rng):
    config = WorkloadConfig(agents=3, turns=3, system_tokens=300, task_tokens=120,
                            tool_tokens=60, seed=int(rng.integers(1 << 30)))
    a, b = build_workload(tokenizer, config), build_workload(tokenizer, config)
    assert a == b
    c = build_workload(tokenizer, WorkloadConfig(**{**config.__dict__, "seed": config.seed + 1}))
    assert c.system == a.system  # the shared prompt does not depend on the seed
    assert c.tasks != a.tasks and c.tool_results != a.tool_results


def test_token_counts_are_measured_and_near_the_targets(tokenizer, rng):
    config = WorkloadConfig(agents=4, turns=4, system_tokens=int(rng.choice([400, 1500])),
                            task_tokens=int(rng.integers(100, 501)),
                            tool_tokens=int(rng.integers(50, 201)),
                            seed=int(rng.integers(1 << 16)))
    w = build_workload(tokenizer, config)
    assert w.token_counts["system"] == content_tokens(tokenizer, w.system)
    assert _within(w.token_counts["system"], config.system_tokens)
    assert len(w.tasks) == 4 and len(w.tool_results) == 4
    counts = []
    for agent in range(4):
        assert w.token_counts["tasks"][agent] == content_tokens(tokenizer, w.tasks[agent])
        assert _within(w.token_counts["tasks"][agent], config.task_tokens)
        assert len(w.tool_results[agent]) == config.turns - 1
        for text, n in zip(w.tool_results[agent], w.token_counts["tool_results"][agent]):
            assert n == content_tokens(tokenizer, text)
            assert _within(n, config.tool_tokens)
            counts.append(config.tool_tokens - n)
    assert sum(counts) / len(counts) <= 10  # most cuts lose a few tokens, not a long word


def test_agents_share_the_system_prompt_and_nothing_else(tokenizer):
    w = build_workload(tokenizer, WorkloadConfig(agents=3, turns=2, system_tokens=200,
                                                 task_tokens=80, tool_tokens=40))
    firsts = [w.first_messages(a) for a in range(3)]
    assert all(m[0] == {"role": "system", "content": w.system} for m in firsts)
    assert [m[1]["role"] for m in firsts] == ["user"] * 3
    # Token prompts: common prefix = template + system prompt, then they differ at once.
    ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True)
           for m in firsts]
    ids = [list(x["input_ids"]) if hasattr(x, "keys") else list(x) for x in ids]
    system_only = tokenizer.apply_chat_template(firsts[0][:1], tokenize=True)
    system_only = list(system_only["input_ids"]) if hasattr(system_only, "keys") else system_only
    for other in ids[1:]:
        shared = next(i for i, (x, y) in enumerate(zip(ids[0], other)) if x != y)
        assert len(system_only) <= shared <= len(system_only) + 6  # "<|im_start|>user\nAgent "
    assert prompt_tokens(tokenizer, firsts[0]) == len(ids[0])
    assert len(ids[0]) == pytest.approx(w.token_counts["system"] + w.token_counts["tasks"][0],
                                        abs=16)  # the template's few tokens per message


def test_config_refuses_sizes_that_cannot_run():
    with pytest.raises(InvalidArgument):
        WorkloadConfig(agents=0)
    with pytest.raises(InvalidArgument):
        WorkloadConfig(system_tokens=5)


def _record(first: float, end: float, tokens: int) -> TurnRecord:
    return TurnRecord(agent=0, turn=1, prompt_tokens=10, cached_tokens=0, memory_tokens=None,
                      daemon_tokens=None, computed_tokens=None, ttft_s=first,
                      completion_tokens=tokens, decode_tokens_per_s=None, wall_s=end,
                      start_s=0.0, first_token_s=first, end_s=end)


def test_aggregate_decode_rate_counts_busy_time_once():
    # Two overlapping decodes [1, 3] and [2, 5], one apart [10, 11]: busy 4 + 1 = 5 s;
    # tokens after each first: 10 + 20 + 5 = 35.
    records = [_record(1, 3, 11), _record(2, 5, 21), _record(10, 11, 6), _record(4, 4, 1)]
    assert aggregate_decode_tokens_per_s(records) == pytest.approx(35 / 5)
    assert aggregate_decode_tokens_per_s([_record(1, 1, 1)]) is None


def test_percentile_interpolates_like_numpy():
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


def test_bench_serve_computes_mlx_kv_bytes_from_the_model_dir(tmp_path):
    # tqstore bench serve's figure for mlx_lm.server (which reports none): from config.json and
    # the weights' dtype. SmolLM2's shape: 30 layers x 3 KV heads x 64 dims, K and V.
    import json

    import mlx.core as mx

    from tqstore.bench.serve import kv_shape, mlx_kv_bytes_per_token

    (tmp_path / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
         "hidden_size": 576}))
    for dtype, size in ((mx.float16, 2), (mx.float32, 4)):
        mx.save_safetensors(str(tmp_path / "model.safetensors"),
                            {"w": mx.zeros((2, 2), dtype=dtype)})
        shape = kv_shape(tmp_path)
        assert shape == {"layers": 30, "kv_heads": 3, "head_dim": 64, "activation_bytes": size}
        elements = 2 * 30 * 3 * 64
        assert mlx_kv_bytes_per_token(shape, None) == {"fp16": elements * 2,
                                                       "stored": elements * size}
        # 4-bit codes plus one scale and one bias (activation dtype) per group of 64.
        assert mlx_kv_bytes_per_token(shape, 4)["stored"] == elements * (0.5 + 2 * size / 64)


def test_bench_serve_ratios_put_aggregate_throughput_beside_the_decode_window():
    # Aggregate tokens/s = completion tokens / wall (vLLM's "output token throughput"); the
    # decode-window rate is its own ratio. Both against mlx_lm.server of the same run.
    from tqstore.bench.serve import ratios

    def result(wall_tok_s: float, window_tok_s: float, rss: int) -> dict:
        return {"ttft": {"later_p50": 1.0, "turn1_p50": 2.0}, "restart": {"ttft_p50": 3.0},
                "throughput_tokens_per_s": wall_tok_s, "decode_tokens_per_s": window_tok_s,
                "kv": {"bytes": 27, "fp16_bytes": 100}, "memory": {"p": {"VmHWM": rss}}}

    out = ratios({"mlx": result(8.0, 20.0, 400), "tqstore": result(18.0, 19.0, 200)})
    assert set(out) == {"tqstore"}
    q = out["tqstore"]
    assert q["throughput_tokens_per_s"] == pytest.approx(2.25)
    assert q["decode_tokens_per_s"] == pytest.approx(0.95)
    assert q["kv_bytes_vs_fp16"] == pytest.approx(0.27)
    assert q["peak_rss"] == pytest.approx(0.5)
