"""The engine's time sharing between prefill and decode (tqstore.serving.schedule), with
given durations: decode keeps its share while others prefill, prefill runs freely when nothing
decodes, and idle decode time is not saved up for a burst of prefill."""

import pytest

from tqstore.serving.schedule import PrefillBudget


def _run(budget: PrefillBudget, chunk_s: float, step_s: float, seconds: float) -> tuple[float, float]:
    """Simulate an engine with a prompt always prefilling and a stream always decoding, as
    Engine._run does (a prefill slice of at most one chunk while decoding, then a step)."""
    prefill = decode = 0.0
    while prefill + decode < seconds:
        if budget.may_prefill(decoding=True):
            budget.spent_prefill(chunk_s, decoding=True)
            prefill += chunk_s
        budget.spent_decode(step_s)
        decode += step_s
    return prefill, decode


@pytest.mark.parametrize("share", [0.25, 0.5, 0.8])
@pytest.mark.parametrize("chunk_s,step_s", [(1.8, 0.24), (0.03, 0.02), (0.5, 0.5)])
def test_decode_gets_its_share_while_others_prefill(share, chunk_s, step_s):
    prefill, decode = _run(PrefillBudget(share), chunk_s, step_s, 600.0)
    # At least the share, give or take the one chunk that may start the run.
    assert decode / (prefill + decode) >= share - chunk_s / 600.0
    # And no more than needed: prefill is not starved (within one decode step per chunk).
    assert decode / (prefill + decode) <= share + step_s / (chunk_s + step_s)


def test_share_zero_prefills_before_every_step():
    prefill, decode = _run(PrefillBudget(0.0), 1.8, 0.24, 100.0)
    assert prefill / decode == pytest.approx(1.8 / 0.24)


def test_nothing_decoding_prefills_freely_and_idle_decode_is_not_saved_up():
    budget = PrefillBudget(0.5)
    budget.spent_prefill(5.0, decoding=True)
    assert not budget.may_prefill(decoding=True)
    assert budget.may_prefill(decoding=False)  # the streams ended: prefill may run at once
    for _ in range(100):  # a long stretch of decode alone
        budget.spent_decode(1.0)
    budget.spent_prefill(1.0, decoding=True)
    assert not budget.may_prefill(decoding=True)  # one chunk, then decode must earn again


def test_a_share_of_one_or_more_is_refused():
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError):
            PrefillBudget(bad)
