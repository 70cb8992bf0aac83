"""A batched decode step (tqstore.paged.batch) computes, per row, what that sequence's step
alone computes: on the CPU's C step (bit for bit: test_cpu_kernels) and on the one-launch path
a GPU takes (every row's pages in one attention call, then each row's epilogue), which these
tests also drive on the CPU's kernels so that its plumbing (padded block tables, per-row
lengths and tails, the rows' order) is checked on every machine."""

import numpy as np
import pytest

import tqstore  # noqa: F401  (BLAS preload before mlx)
import mlx.core as mx
import tqstore.paged.batch as batch_module
import tqstore.paged.cache as cache_module
from tqstore.codec import CodecConfig
from tqstore.paged import CachePolicy, install, make_prompt_cache, pool_for_model
from tqstore.paged.batch import BatchedLayerCache, StepTables, batch_caches

from tests.paged.test_integration import rel, tiny_model
from tests.tolerance import MODEL_TF32, rtol

BS = 8
TAIL = CachePolicy(codec=CodecConfig(4, 4), fp16_tail=True)
PLAIN = CachePolicy(codec=CodecConfig(4, 4))
# Rows of different lengths: tails of different fill, and blocks that open at different steps.
PROMPTS = (21, 36, 50)
STEPS = 12


def prefilled(model, policy, prompts):
    """Each prompt prefilled alone into its own sequence of one shared pool."""
    pool = pool_for_model(model, policy=policy, budget_bytes=4 << 20, block_size=BS)
    sequences = []
    for prompt in prompts:
        caches = make_prompt_cache(pool, prompt)
        mx.eval(model(mx.array(prompt)[None], cache=caches))
        sequences.append(caches)
    return sequences


def forced(steps):
    """The same teacher-forced token per row and step: rows never depend on each other."""
    return [[int(t) for t in row] for row in steps]


@pytest.fixture
def one_launch(monkeypatch):
    """Drive the pages' one-launch batch path (gpu_batch_step) wherever the test runs (on the CPU its attention
    call is the C kernel over all rows), and record the batch size of every launch."""
    launches = []
    real = batch_module.paged_decode_attention

    def recording(queries, *args, **kwargs):
        launches.append(queries.shape[0])
        return real(queries, *args, **kwargs)

    monkeypatch.setattr(batch_module, "BATCH_MODE", "pages")  # not the shared tails (own tests)
    # As on a GPU: no C step for a sequence alone either (it would step as a batch of one).
    monkeypatch.setattr(cache_module, "fused_decode_step_possible", lambda: False)
    monkeypatch.setattr(batch_module, "fused_batch_step", lambda *a, **k: None)
    monkeypatch.setattr(batch_module, "gpu_kernels_possible", lambda: True)
    monkeypatch.setattr(batch_module, "paged_decode_attention", recording)
    return launches


@pytest.mark.parametrize("policy", [TAIL, PLAIN], ids=["fp16-tail", "pages-only"])
def test_one_launch_for_all_rows_gives_each_row_its_own_step(rng, policy, one_launch):
    model = tiny_model("llama")
    install(model)
    prompts = [[int(t) for t in rng.integers(3, 97, n)] for n in PROMPTS]
    tokens = forced(rng.integers(3, 97, (STEPS, len(PROMPTS))))
    alone = []
    for row, prompt in enumerate(prompts):
        (caches,) = prefilled(model, policy, [prompt])
        logits = []
        for step in tokens:
            caches[0].sequence.append_token_ids([step[row]])
            logits.append(np.array(model(mx.array([[step[row]]]), cache=caches)[0, -1],
                                   dtype=np.float64))
        alone.append(logits)
    assert not one_launch  # one row: the single-sequence path

    sequences = prefilled(model, policy, prompts)
    for i, step in enumerate(tokens):
        for caches, token in zip(sequences, step):
            caches[0].sequence.append_token_ids([token])
        out = model(mx.array([[t] for t in step]), cache=batch_caches(sequences))
        for row in range(len(prompts)):
            got = np.array(out[row, -1], dtype=np.float64)
            # The rows' K/V come from matmuls of 3 rows, not 1, and are stored in fp16: a float32
            # difference of one rounding can flip an element's fp16 rounding (unit roundoff
            # 2^-11 = 4.9e-4), and later steps attend it. Measured on the CPU over 400 seeds:
            # mostly under 2e-5, up to 5.7e-4 (the bound of test_integration's fp16 K/V
            # storage, 2e-3, covers it); TF32 matmuls on a GPU. A wrong table, length, query or
            # pending token moves logits by 1e-1 and more; a precision bug in the batch's fp16
            # conversion is caught bit for bit by the tail test below.
            assert rel(got, alone[row][i]) < rtol(2e-3, MODEL_TF32), (row, i)
    # Every layer of every step: one launch holding all three rows.
    assert one_launch == [len(prompts)] * (STEPS * len(model.layers))
    for caches, n in zip(sequences, PROMPTS):
        assert caches[0].offset == n + STEPS


def step_in_order(model, sequences, reference, order, rng) -> None:
    """One decode step of the sequences ``order`` names, batched in that order (one alone: its
    own step), each row checked against the same sequence's twin in ``reference`` stepping
    alone. Bound: fp16 storage of K/V from matmuls of another row count (see the test above)."""
    step = {b: int(t) for b, t in zip(order, rng.integers(3, 97, len(order)))}
    for b in order:
        for seqs in (sequences, reference):
            seqs[b][0].sequence.append_token_ids([step[b]])
    caches = (sequences[order[0]] if len(order) == 1
              else batch_caches([sequences[b] for b in order]))
    got = model(mx.array([[step[b]] for b in order]), cache=caches)
    for pos, b in enumerate(order):
        want = model(mx.array([[step[b]]]), cache=reference[b])
        assert rel(np.array(got[pos, -1], dtype=np.float64),
                   np.array(want[0, -1], dtype=np.float64)) < rtol(2e-3, MODEL_TF32), (order, b)


def test_a_row_reads_its_own_table_and_length(rng, one_launch):
    """Rows swapped between steps (the engine rebuilds the batch each step, in any order)
    still read their own pages: swapping only the tables would mix two sequences' context."""
    model = tiny_model("llama")
    install(model)
    prompts = [[int(t) for t in rng.integers(3, 97, n)] for n in PROMPTS[:2]]
    sequences = prefilled(model, TAIL, prompts)
    reference = prefilled(model, TAIL, prompts)
    for order in ([0, 1], [1, 0], [0, 1], [1, 0]):
        step_in_order(model, sequences, reference, order, rng)


def test_step_tables_are_built_once_per_step_and_follow_a_new_block(rng):
    model = tiny_model("llama")
    prompts = [[int(t) for t in rng.integers(3, 97, n)] for n in (BS - 1, 2 * BS + 3)]
    sequences = prefilled(model, PLAIN, prompts)
    for caches in sequences:  # the first step: every token in the pages (no fp16 tail)
        mx.eval(model(mx.array([[5]]), cache=caches))
    layer0 = [caches[0] for caches in sequences]
    tables = StepTables()
    first = tables.get(layer0)
    assert tables.get([caches[1] for caches in sequences])[0] is first[0]  # shared by layers
    table, lens = (np.array(a) for a in first)
    assert table.shape == (2, 3) and lens.tolist() == [BS, 2 * BS + 4]
    assert table[0, 0] == sequences[0][0].sequence.block_ids[0]
    assert table[1].tolist() == sequences[1][0].sequence.block_ids
    # One more token opens row 0's second block: the next get() sees the new table and length.
    for caches in sequences:
        mx.eval(model(mx.array([[5]]), cache=caches))
    table, lens = (np.array(a) for a in tables.get(layer0))
    assert lens.tolist() == [BS + 1, 2 * BS + 5]
    assert table[0, :2].tolist() == sequences[0][0].sequence.block_ids
    # A block copied on write (same lengths, same width, one id changed) is seen too; an
    # unchanged batch gets the same arrays; get() makes no table array per sequence.
    for caches in sequences:
        caches[0].sequence._table_array = None
    again = tables.get(layer0)
    assert tables.get(layer0)[0] is again[0]
    seq = sequences[1][0].sequence
    old_id = seq.block_ids[1]
    seq._copy_on_write(1)
    table = np.array(tables.get(layer0)[0])
    assert table[1].tolist() == seq.block_ids and seq.block_ids[1] != old_id
    assert all(caches[0].sequence._table_array is None for caches in sequences)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("second_row", ["decoding", "prefilling"])
def test_the_batch_gives_each_row_its_own_tail_bytes_and_the_queries_dtype(rng, one_launch,
                                                                           second_row, dtype):
    """K/V and queries of the model's dtype (bf16, fp32) through the batch's caches and through
    each row's own, with the same inputs: every row's fp16 tail (or, for a row still in a
    prefill step because its prompt is not all in, its fp16 prefill copy) holds the same bytes,
    exact by construction (only conversions and copies), and the batch answers in the queries'
    dtype; a row in a prefill step keeps the model's dtype for its stock attention (an fp16
    view of it had made a bf16 batch's output float32)."""
    model = tiny_model("llama")
    prompts = [[int(t) for t in rng.integers(3, 97, n)] for n in PROMPTS[:2]]
    batched, solo = prefilled(model, TAIL, prompts), prefilled(model, TAIL, prompts)
    if second_row == "prefilling":
        for seqs in (batched, solo):
            seqs[1][0].sequence.prompt_length = len(prompts[1]) + 2
    attn = model.layers[0].self_attn
    hq, hkv = attn.n_heads, attn.n_kv_heads
    d = model.args.hidden_size // hq
    for _ in range(2):
        k, v = (mx.array(rng.standard_normal((2, hkv, 1, d)).astype(np.float32)).astype(dtype)
                for _ in range(2))
        q = mx.array(rng.standard_normal((2, hq, 1, d)).astype(np.float32)).astype(dtype)
        offsets = mx.array([s[0].offset for s in batched])
        for layer in range(len(model.layers)):
            joined = BatchedLayerCache([s[layer] for s in batched], offsets)
            joined.update_and_fetch(k, v)
            got = joined.attend(q, d ** -0.5)
            assert got.dtype == dtype
            for b, seqs in enumerate(solo):
                cache = seqs[layer]
                kk, vv = cache.update_and_fetch(k[b:b + 1], v[b:b + 1])
                want = (cache.attend(q[b:b + 1], d ** -0.5) if cache.decode_pending else
                        mx.fast.scaled_dot_product_attention(q[b:b + 1], kk, vv, scale=d ** -0.5))
                # Same K/V: only the attention's sums differ (one call over 2 rows); bf16 outputs
                # then differ by a bf16 ulp (2^-8) at most where the float32 results round apart.
                assert rel(np.array(got[b].astype(mx.float32), dtype=np.float64),
                           np.array(want[0].astype(mx.float32), dtype=np.float64)) < 2e-2
                mine = batched[b][layer]
                for name in ("_tail_keys", "_tail_values", "_keys", "_values"):
                    a, w = getattr(mine, name), getattr(cache, name)
                    assert (a is None) == (w is None), name
                    if a is not None:
                        assert np.array(a).tobytes() == np.array(w).tobytes(), (b, layer, name)
    assert solo[1][0].in_prefill == (second_row == "prefilling")
