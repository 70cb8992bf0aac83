"""The shared-tail batched step (tqstore.paged.shared_tail), the one a GPU takes: every row's
fp16 tail in one buffer per layer, one attention launch and one epilogue launch per layer for
the whole batch. Driven on the CPU here (the C step, which serves the CPU, is switched off:
the epilogue is then its pure-MLX reference and attention the C kernel over all rows), so its
plumbing (per-row tail lengths, blocks committed as they fill, the buffer passed on from step to
step, rows joining, leaving and reordering) is checked on every machine. The kernel itself is
checked against the same reference on the emulator (tests/metal/test_epilogue.py) and on GPUs
(its self-check; tests/metal/test_selfcheck.py)."""

import numpy as np
import pytest

import tqstore  # noqa: F401  (BLAS preload before mlx)
import mlx.core as mx
import tqstore.paged.batch as batch_module
import tqstore.paged.shared_tail as shared_module
from tqstore.paged import install
from tqstore.paged.batch import BatchedLayerCache, batch_caches

from tests.paged.test_batch import BS, PROMPTS, TAIL, forced, prefilled, step_in_order
from tests.paged.test_integration import rel, tiny_model
from tests.tolerance import MODEL_TF32, rtol

STEPS = 2 * BS + 3  # every row crosses at least two block boundaries, each at its own step


@pytest.fixture
def shared_path(monkeypatch):
    """The shared-tail step wherever the test runs; records each layer step's row count (one
    epilogue launch for the batch, whichever path launches it: tqstore.metal.step_launch on a
    GPU, dispatch elsewhere) and whether its old tails were the previous step's buffer passed
    on as it was."""
    launches = []
    real_attend, real_old = shared_module.shared_tail_attend, shared_module.old_tails

    def attend(caches, queries, *args, **kwargs):
        launches.append(queries.shape[0])
        return real_attend(caches, queries, *args, **kwargs)

    def old_tails(caches, lengths):
        keys, values, arrivals, after = real_old(caches, lengths)
        refs = [c.shared_tail_ref() for c in caches]
        passed_on.append(any(r is not None and r[0].keys is keys for r in refs))
        return keys, values, arrivals, after

    passed_on = []
    # Each row's twin stepping alone composes its own step: an independent path to compare.
    import tqstore.paged.cache as cache_module
    monkeypatch.setattr(cache_module, "SHARED_STEP_ALONE", False)
    monkeypatch.setattr(batch_module, "fused_decode_step_possible", lambda: False)
    monkeypatch.setattr(shared_module, "shared_tail_attend", attend)
    monkeypatch.setattr(shared_module, "old_tails", old_tails)
    return launches, passed_on


def decode_alone(model, caches, tokens, row):
    """Row ``row`` of the teacher-forced ``tokens`` decoded by one sequence alone: its logits."""
    logits = []
    for step in tokens:
        caches[0].sequence.append_token_ids([step[row]])
        logits.append(np.array(model(mx.array([[step[row]]]), cache=caches)[0, -1],
                               dtype=np.float64))
    return logits


def decode_batched_against(model, sequences, tokens, alone) -> None:
    """Every step of ``tokens`` with the sequences as one batch, each row's logits against its
    twin's decoding alone (``alone[row][step]``). Same bound and reason as test_batch's
    one-launch test: K/V from matmuls of 3 rows stored in fp16. A wrong tail length, a token
    appended to the wrong row or a block committed late moves logits by 1e-1 and more."""
    for i, step in enumerate(tokens):
        for caches, token in zip(sequences, step):
            caches[0].sequence.append_token_ids([token])
        out = model(mx.array([[t] for t in step]), cache=batch_caches(sequences))
        mx.eval(out, [c.state for caches in sequences for c in caches])
        for row in range(len(sequences)):
            assert rel(np.array(out[row, -1], dtype=np.float64), alone[row][i]) < rtol(
                2e-3, MODEL_TF32), (row, i)


def test_each_row_gets_its_own_step_from_one_epilogue_launch_per_layer(rng, shared_path):
    launches, passed_on = shared_path
    model = tiny_model("llama")
    install(model)
    prompts = [[int(t) for t in rng.integers(3, 97, n)] for n in PROMPTS]
    tokens = forced(rng.integers(3, 97, (STEPS, len(PROMPTS))))
    twins = [prefilled(model, TAIL, [p])[0] for p in prompts]
    alone = [decode_alone(model, caches, tokens, row) for row, caches in enumerate(twins)]
    assert not launches  # the twins composed their own steps (SHARED_STEP_ALONE off here)

    sequences = prefilled(model, TAIL, prompts)
    decode_batched_against(model, sequences, tokens, alone)
    layers = len(model.layers)
    # The first step finishes each row's prefill (the general path); every later step and
    # layer: one epilogue launch for all three rows.
    assert launches == [len(prompts)] * ((STEPS - 1) * layers)
    # The first shared step gathers the rows' own tails; every later one passes the previous
    # step's buffer on (the same rows in the same order; they open blocks at different steps).
    assert passed_on[:layers] == [False] * layers and all(passed_on[layers:])
    for caches, solo, n in zip(sequences, twins, PROMPTS):
        assert caches[0].offset == solo[0].offset == n + STEPS
        for mine, theirs in zip(caches, solo):
            assert (mine.committed, mine.nbytes) == (theirs.committed, theirs.nbytes)


@pytest.mark.parametrize("lengths", [PROMPTS, (21, 29, 37), (21, 34, 29)],
                         ids=["apart", "in-step", "pair"])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32], ids=["bf16", "fp32"])
def test_tails_and_pages_hold_the_bytes_of_each_row_alone(rng, shared_path, dtype, lengths,
                                                          monkeypatch):
    """The same K/V and queries through the batch and through each row's own caches, for
    enough steps that every row commits blocks: every row's tail (read alone from the shared
    buffer) and every committed page hold the same bytes, exact by construction (conversions,
    copies and per-vector codes); the output is in the queries' dtype. Rows at the same
    position in their blocks commit together, in one write for all of them: all three
    ("in-step"), or rows 0 and 2 while row 1 commits on its own ("pair"); a row alone, from
    its row of the shared buffer too ("apart")."""
    from tqstore.paged.arenas import TurboQuantArena
    writes = []  # (layer, the rows) of each batched block write
    real = TurboQuantArena.write_blocks
    monkeypatch.setattr(TurboQuantArena, "write_blocks", lambda self, ids, k, v, rows: (
        writes.append((self.layer, np.array(rows).tolist())), real(self, ids, k, v, rows))[1])
    model = tiny_model("llama")
    install(model)  # the rows' attention is routed (else every step takes the general path)
    prompts = [[int(t) for t in rng.integers(3, 97, n)] for n in lengths]
    batched, solo = prefilled(model, TAIL, prompts), prefilled(model, TAIL, prompts)
    attn = model.layers[0].self_attn
    hq, hkv = attn.n_heads, attn.n_kv_heads
    d = model.args.hidden_size // hq
    B = len(prompts)
    for _ in range(BS + 2):
        k, v = (mx.array(rng.standard_normal((B, hkv, 1, d)).astype(np.float32)).astype(dtype)
                for _ in range(2))
        q = mx.array(rng.standard_normal((B, hq, 1, d)).astype(np.float32)).astype(dtype)
        offsets = mx.array([s[0].offset for s in batched])
        for layer in range(len(model.layers)):
            joined = BatchedLayerCache([s[layer] for s in batched], offsets)
            joined.update_and_fetch(k, v)
            got = joined.attend(q, d ** -0.5)
            assert got.dtype == dtype and got.shape == (B, hq, 1, d)
            for b, seqs in enumerate(solo):
                cache = seqs[layer]
                cache.update_and_fetch(k[b:b + 1], v[b:b + 1])
                want = cache.attend(q[b:b + 1], d ** -0.5)
                assert rel(np.array(got[b].astype(mx.float32), dtype=np.float64),
                           np.array(want[0].astype(mx.float32), dtype=np.float64)) < 2e-2
    for b, (mine_seq, their_seq) in enumerate(zip(batched, solo)):
        for mine, theirs in zip(mine_seq, their_seq):
            assert mine.shared_tail_ref() is not None  # still in the batch's buffer
            assert (mine.offset, mine.committed) == (theirs.offset, theirs.committed)
            for name in ("_tail_keys", "_tail_values"):
                a, w = getattr(mine, name), getattr(theirs, name)
                assert a.shape == w.shape and np.array(a).tobytes() == np.array(w).tobytes()
            ids_a, ids_w = mine.sequence.block_ids, theirs.sequence.block_ids
            for name in ("key_codes", "key_scales", "value_codes", "value_scales"):
                arr = getattr(mine.arena, name)
                assert np.array(arr[mx.array(ids_a)]).tobytes() == np.array(
                    getattr(theirs.arena, name)[mx.array(ids_w)]).tobytes(), (b, name)
    # The one block opening of each row in these steps, every layer: rows in step at once.
    groups = [[b for b, m in enumerate(lengths) if m % BS == r] for r in sorted(
        {n % BS for n in lengths})]
    assert sorted(writes) == sorted((layer, g) for layer in range(len(model.layers))
                                    for g in groups)


class _CountingLaunch:
    """Stands in for a GPU step-form launch (step_launch.BatchStepLaunch whose kernel counts
    on the arrivals) with the general path's arithmetic, and records the ``after`` each call
    is given."""

    counts_arrivals = True

    def __init__(self) -> None:
        self.afters = []

    def __call__(self, queries, scale, arena, tables, lens, tail_keys, tail_values, new_keys,
                 new_values, info, arrivals, after):
        from tqstore.metal.dispatch import (batched_decode_epilogue, paged_decode_attention,
                                            rotate_queries)
        self.afters.append(after)
        kc, vc = arena.key_codec, arena.value_codec
        pages_out, lse = paged_decode_attention(
            rotate_queries(queries, arena.query_rotation, scale), arena.key_codes,
            arena.key_scales, arena.value_codes, arena.value_scales, tables, lens, kc.codebook,
            vc.codebook, kc.bits, vc.bits, return_lse=True, packed=True)
        return batched_decode_epilogue(pages_out, lse, queries, scale, tail_keys, tail_values,
                                       new_keys, new_values, info, arena.key_center,
                                       arena.output_rotation, arena.key_codes.shape[2])


@pytest.mark.parametrize("step_form", [True, False], ids=["step-form", "no-kernel"])
@pytest.mark.parametrize("lengths", [PROMPTS, (21, 29, 37)], ids=["apart", "in-step"])
def test_a_batch_makes_its_arrival_counters_once_per_layer(rng, shared_path, lengths,
                                                           step_form, monkeypatch):
    """The step kernel's arrival counters (zero again after every launch) are made once per
    layer for a batch and reused by each later step of the same rows, also a step where every
    row opens a block ("in-step"). Each step's kernel gets, as its unread ``after`` input, an
    array computed after the previous launch on them: the previous step's tail keys (its
    epilogue's output) where that step ran the step kernel; where no kernel counted ("no
    kernel": the general path), the edge carries over unchanged. A host array per layer and
    step cost 81-110 us of an H100 host's time."""
    seen = []  # per shared step: (layer, tail lengths, counters, after, previous SharedTail)
    wrapped = shared_module.old_tails  # shared_path's recorder around the real one

    def old_tails(caches, lens):
        previous = caches[0].last_shared_step()
        keys, values, arrivals, after = wrapped(caches, lens)
        seen.append((caches[0].layer, list(lens), arrivals, after,
                     None if previous is None else previous[0]))
        return keys, values, arrivals, after

    monkeypatch.setattr(shared_module, "old_tails", old_tails)
    launch = _CountingLaunch()
    if step_form:
        monkeypatch.setattr(shared_module, "batch_step_launch", lambda *a: launch)
    model = tiny_model("llama")
    install(model)
    sequences = prefilled(model, TAIL, [[int(t) for t in rng.integers(3, 97, n)]
                                        for n in lengths])
    for step in forced(rng.integers(3, 97, (STEPS, len(lengths)))):
        for caches, token in zip(sequences, step):
            caches[0].sequence.append_token_ids([token])
        mx.eval(model(mx.array([[t] for t in step]), cache=batch_caches(sequences)))
    layers = len(model.layers)
    assert len(launch.afters) == (len(seen) if step_form else 0)
    if step_form:  # the launch was given what old_tails answered
        assert all(a is s[3] for a, s in zip(launch.afters, seen))
    for layer in range(layers):
        steps = [s for s in seen if s[0] == layer]
        assert len(steps) == STEPS - 1  # the first step finishes the prefill (general path)
        assert all(s[2] is steps[0][2] for s in steps)  # one counters array throughout
        assert steps[0][4] is None
        for _, _, _, after, previous in steps[1:]:
            # The previous epilogue's output where its kernel counted, else the first edge.
            assert after is (previous.keys if step_form else steps[0][3])
        all_open = [s for s in steps[1:] if not any(s[1])]
        assert bool(all_open) == (lengths != PROMPTS)  # in step: all rows open blocks at once


@pytest.mark.parametrize("lengths", [(21, 29, 37), (21,)], ids=["batch", "alone"])
def test_a_block_opening_step_writes_each_layers_full_tails_at_once(rng, shared_path, lengths,
                                                                     monkeypatch):
    """Rows at the same position in their blocks commit their full tails together in every
    layer of the step that opens their next blocks: one write_blocks per layer straight from
    the shared tail buffers (no per-row write), every layer given the same block-id and row
    arrays (shared_tail.index_array: made once per step, not host arrays per layer, which
    cost 51 us each on an H100's host), holding each row's block; the next opening, new
    blocks and a new array. A sequence alone (a batch of one) commits the same way."""
    from tqstore.paged.arenas import TurboQuantArena
    writes = []  # (layer, block-id array, its values, rows array, its values) per write_blocks
    real_blocks, real_write = TurboQuantArena.write_blocks, TurboQuantArena.write
    per_row = []

    def write_blocks(self, block_ids, keys, values, rows):
        writes.append((self.layer, block_ids, np.array(block_ids).tolist(), rows,
                       np.array(rows).tolist()))
        return real_blocks(self, block_ids, keys, values, rows)

    def write(self, block_ids, slots, keys, values):
        per_row.append(self.layer)
        return real_write(self, block_ids, slots, keys, values)

    monkeypatch.setattr(TurboQuantArena, "write_blocks", write_blocks)
    monkeypatch.setattr(TurboQuantArena, "write", write)
    if len(lengths) == 1:  # the step a GPU takes alone (the CPU's is the C step)
        import tqstore.paged.cache as cache_module
        monkeypatch.setattr(cache_module, "SHARED_STEP_ALONE", True)
        monkeypatch.setattr(cache_module, "fused_decode_step_possible", lambda: False)
    model = tiny_model("llama")
    install(model)
    # 5 tokens into their blocks of 8 each: they open blocks together
    sequences = prefilled(model, TAIL, [[int(t) for t in rng.integers(3, 97, n)]
                                        for n in lengths])
    writes.clear()  # the prefills' own
    per_row.clear()
    for step in forced(rng.integers(3, 97, (2 * BS, len(lengths)))):
        for caches, token in zip(sequences, step):
            caches[0].sequence.append_token_ids([token])
        cache = batch_caches(sequences) if len(lengths) > 1 else sequences[0]
        mx.eval(model(mx.array([[t] for t in step]), cache=cache))
    layers = len(model.layers)
    assert per_row == []
    assert [w[0] for w in writes] == 2 * list(range(layers))  # two openings, one write each
    for opening in (writes[:layers], writes[layers:]):
        assert all(w[1] is opening[0][1] and w[3] is opening[0][3] for w in opening)
        assert opening[0][4] == list(range(len(lengths)))  # every row, in the batch's order
    # The blocks each row filled: positions [k * BS, k * BS + BS), k = n // BS then the next.
    for k, opening in enumerate((writes[0], writes[layers])):
        assert opening[2] == [s[0].sequence.block_ids[n // BS + k]
                              for s, n in zip(sequences, lengths)]
    assert writes[0][1] is not writes[layers][1]
    # Counted as written in every layer, and the two blocks published (their hashes).
    for caches, n in zip(sequences, lengths):
        committed = caches[0].committed
        assert committed == (n // BS + 2) * BS and all(c.committed == committed for c in caches)
        assert caches[0].sequence.written == [committed] * layers
        assert len(caches[0].sequence.block_hashes) == committed // BS


def test_rows_that_join_leave_or_reorder_keep_their_own_tails(rng, shared_path, monkeypatch):
    """The engine rebuilds the batch every step: rows reorder, one decodes alone in between,
    one is trimmed. Each row must still read its own tail: the buffer is passed on only when
    every row is its own row in it, else gathered anew. A batch whose rows are not the
    previous step's rows in order gets new arrival counters (two batches of one step never
    share theirs: nothing would order their kernels)."""
    launches, passed_on = shared_path
    counters = []  # per shared step and layer: (layer, the rows' caches, counters)
    wrapped = shared_module.old_tails

    def old_tails(caches, lens):
        answer = wrapped(caches, lens)
        counters.append((caches[0].layer, list(caches), answer[2]))
        return answer

    monkeypatch.setattr(shared_module, "old_tails", old_tails)
    model = tiny_model("llama")
    install(model)
    prompts = [[int(t) for t in rng.integers(3, 97, n)] for n in PROMPTS]
    sequences, reference = prefilled(model, TAIL, prompts), prefilled(model, TAIL, prompts)
    schedule = [[0, 1, 2], [0, 1, 2], [0, 1, 2], [2, 0, 1], [2, 0, 1], [1], [0, 1],
                [0, 1, 2], "trim 2", [0, 1, 2], [1, 2, 0], [1, 2, 0]]
    for order in schedule:
        if order == "trim 2":
            for seqs in (sequences, reference):
                for cache in seqs[2]:
                    cache.trim(3)
            continue
        step_in_order(model, sequences, reference, order, rng)
    assert launches  # the shared path ran
    # Passed on when the same rows come in the same order; gathered after a change.
    assert True in passed_on and False in passed_on
    last = {}  # layer -> (rows, counters) of its previous shared step
    for layer, rows, arrivals in counters:
        if layer in last and (len(rows) != len(last[layer][0])
                              or any(a is not b for a, b in zip(rows, last[layer][0]))):
            assert arrivals is not last[layer][1]  # other rows or another order: new ones
        last[layer] = (rows, arrivals)


def test_steps_on_the_general_path_in_between_are_not_lost(rng, shared_path):
    """A row trimmed into its pages sends the batch down the general per-row path (its codes
    end mid-block) until it fills that block: those steps append to each row's own tail,
    not to the shared buffer. When the shared step resumes with the same rows in the same
    order, the tails are gathered anew: the old buffer lacks those steps' tokens."""
    launches, passed_on = shared_path
    model = tiny_model("llama")
    install(model)
    prompts = [[int(t) for t in rng.integers(3, 97, n)] for n in PROMPTS]
    sequences, reference = prefilled(model, TAIL, prompts), prefilled(model, TAIL, prompts)
    for _ in range(3):
        step_in_order(model, sequences, reference, [0, 1, 2], rng)
    shared_steps = len(launches)
    row = sequences[2][0]
    into_pages = row.offset - row.committed + 3  # the whole tail and 3 tokens of codes
    for seqs in (sequences, reference):
        for cache in seqs[2]:
            cache.trim(into_pages)
    for _ in range(BS + 2):
        step_in_order(model, sequences, reference, [0, 1, 2], rng)
    layers = len(model.layers)
    # Some steps took the general path, and the shared step came back afterwards.
    assert shared_steps < len(launches) < shared_steps + (BS + 2) * layers


def test_a_sequence_alone_steps_as_a_batch_of_one(rng, monkeypatch):
    """Off the C path (a GPU) a sequence decoding alone takes the shared-tail step with one row;
    against its own composition (SHARED_STEP_ALONE off) over blocks opening and filling: the
    same tails and pages, byte for byte, and logits within float32 rounding."""
    import tqstore.paged.cache as cache_module
    monkeypatch.setattr(cache_module, "fused_decode_step_possible", lambda: False)
    calls = []
    real = shared_module.shared_tail_attend
    monkeypatch.setattr(shared_module, "shared_tail_attend",
                        lambda caches, *a: (calls.append(len(caches)), real(caches, *a))[1])
    model = tiny_model("llama")
    install(model)
    prompt = [int(t) for t in rng.integers(3, 97, 21)]
    tokens = [int(t) for t in rng.integers(3, 97, STEPS)]
    runs = []
    for alone in (True, False):
        monkeypatch.setattr(cache_module, "SHARED_STEP_ALONE", alone)
        (caches,) = prefilled(model, TAIL, [prompt])
        logits = []
        for t in tokens:
            caches[0].sequence.append_token_ids([t])
            logits.append(np.array(model(mx.array([[t]]), cache=caches)[0, -1], dtype=np.float64))
        runs.append((caches, logits))
    layers = len(model.layers)
    assert calls == [1] * (STEPS * layers)  # the step that finishes the prefill included
    (mine, got), (theirs, want) = runs
    for g, w in zip(got, want):
        # The same function, sums in another order; on a GPU the composed step rotates the
        # queries by a TF32 matmul, the batch of one by an fp32 kernel (tests/tolerance.py).
        assert rel(g, w) < rtol(1e-4, MODEL_TF32)
    for a, b in zip(mine, theirs):
        assert (a.offset, a.committed) == (b.offset, b.committed)
        for name in ("_tail_keys", "_tail_values"):
            assert np.array(getattr(a, name)).tobytes() == np.array(getattr(b, name)).tobytes()
        for name in ("key_codes", "key_scales", "value_codes", "value_scales"):
            ids_a, ids_b = mx.array(a.sequence.block_ids), mx.array(b.sequence.block_ids)
            assert np.array(getattr(a.arena, name)[ids_a]).tobytes() == np.array(
                getattr(b.arena, name)[ids_b]).tobytes()


def test_rows_of_equal_lengths_swapped_read_their_own_pages(rng, shared_path):
    """The batch's block tables are kept from step to step (tqstore.paged.batch): two rows at
    the same length give the same lengths key whatever their order, so only the tables'
    identity tells a swapped batch from the last one; without that check rows read each
    other's pages (relative logit error ~1 against 3e-7)."""
    model = tiny_model("llama")
    install(model)
    prompts = [[int(t) for t in rng.integers(3, 97, 21)] for _ in range(2)]
    sequences, reference = prefilled(model, TAIL, prompts), prefilled(model, TAIL, prompts)
    for order in ([0, 1], [0, 1], [1, 0], [1, 0], [0, 1]):
        step_in_order(model, sequences, reference, order, rng)


def llama3_heads():
    """Two layers with Llama-3-8B's attention heads (32 query / 8 kv heads of 128 dims) and
    tiny projections: shapes the GPU serves through resolved launches and the tensor-core
    kernel's step form (tqstore.metal.step_launch). The tiny models' 16-dim heads take the
    general path there (the per-row epilogue kernel needs 32-multiple head dims)."""
    from mlx_lm.models import llama

    mx.random.seed(11)
    model = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=256, num_hidden_layers=2, intermediate_size=256,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        vocab_size=97, rope_theta=10000.0, tie_word_embeddings=True))
    mx.eval(model.parameters())
    return model


def test_rows_of_full_size_heads_each_get_their_own_step(rng, shared_path, monkeypatch):
    """The shared step on full-size heads and 16-token blocks, three rows against each row's
    twin composing its own step: on a GPU every layer step goes through a resolved launch
    (the step form where the tensor-core kernel fits), elsewhere through dispatch."""
    from tqstore.metal import step_launch
    from tqstore.metal.attention_kernel import gpu_backend
    from tqstore.codec import CodecConfig
    from tqstore.paged import CachePolicy, make_prompt_cache, pool_for_model

    launches, _ = shared_path
    resolved = []
    real = step_launch.BatchStepLaunch.__call__
    monkeypatch.setattr(step_launch.BatchStepLaunch, "__call__",
                        lambda self, *args: (resolved.append(self.rotate is None),
                                             real(self, *args))[1])
    model = llama3_heads()
    install(model)
    policy, block_size = CachePolicy(codec=CodecConfig(4, 4), fp16_tail=True), 16
    steps = 2 * block_size + 3
    prompts = [[int(t) for t in rng.integers(3, 97, n)] for n in PROMPTS]
    tokens = forced(rng.integers(3, 97, (steps, len(prompts))))

    def prefill(prompt, pool):
        caches = make_prompt_cache(pool, prompt)
        mx.eval(model(mx.array(prompt)[None], cache=caches))
        return caches

    pools = [pool_for_model(model, policy=policy, budget_bytes=8 << 20, block_size=block_size)
             for _ in range(2)]  # the twins', and the batch's (a batch shares one pool)
    alone = [decode_alone(model, prefill(p, pools[0]), tokens, row)
             for row, p in enumerate(prompts)]
    decode_batched_against(model, [prefill(p, pools[1]) for p in prompts], tokens, alone)
    layers = len(model.layers)
    assert launches == [len(prompts)] * ((steps - 1) * layers)
    # A GPU takes every layer step through a resolved launch: in the step form on CUDA (the
    # tensor-core kernel fits these heads), in three launches on Metal; the CPU never does.
    expected = {None: [], "cuda": [True] * len(launches), "metal": [False] * len(launches)}
    assert resolved == expected[gpu_backend()]
