"""Chunked prefill in the serve engine: a step's token budget splits prompts into chunks fed beside the
running decodes; the greedy tokens stay those of an unchunked prefill, and every slot comes back."""
from __future__ import annotations

import time

import pytest

import memwise
from memwise.serve.batch import running_batch
import torch

from memwise.serve.scheduled import chunk_plan, staircase
from memwise.serve.engine import Engine
from memwise.serve.metrics import ServeMetrics
from memwise.serve.protocol import Sampling
from memwise.serve.sequence import Sequence
from memwise.tokenizer import decode_stream

PROMPTS = [[5, 6, 7], [100, 3], [9] * 41, [44, 45, 46, 47, 48, 49, 50], [1], [300, 301, 302] * 9]
LENGTHS = [12, 7, 9, 15, 6, 10]


def test_chunk_plan_shares_the_budget_in_arrival_order():
    assert chunk_plan([10, 50, 3], None) == [10, 50, 3]
    assert chunk_plan([10, 50, 3], 30) == [10, 20, 0]
    assert chunk_plan([40], 16) == [16]
    # the decodes took the whole budget: prefill still advances, by 2
    assert chunk_plan([40, 5], -3) == [2, 0]
    # never a lone token, unless the prompt is one token
    assert chunk_plan([17], 16) == [17]
    assert chunk_plan([5], 1) == [2]
    assert chunk_plan([1, 4], 8) == [1, 4]


def test_chunk_plan_leaves_no_small_chunks():
    # 15 decodes of a 128-token budget leave 113: the second prompt would leave 15 behind, so it
    # takes them now (the budget overruns by 15 < 32) and goes through whole
    assert chunk_plan([64, 64], 113, 32) == [64, 64]
    # 26 tokens left: a part-prompt chunk shorter than 32 waits for the next step
    assert chunk_plan([64, 64], 90, 32) == [64, 0]
    assert chunk_plan([64, 64, 64], 114, 32) == [64, 64, 0]
    # the step's first chunk always advances, and takes its prompt's small rest along
    assert chunk_plan([40, 5], -3, 32) == [2, 0]
    assert chunk_plan([20], 10, 32) == [20]
    assert chunk_plan([300], 113, 32) == [113]
    assert chunk_plan([10, 50, 3], None, 32) == [10, 50, 3]


def test_staircase_feeds_chunks_together_without_one_token_forwards():
    # lengths 9, 4, 9, 12: forwards over positions [0, 4) of all four, [4, 9) of three, [9, 12) of one
    assert staircase([9, 4, 9, 12]) == ([3, 0, 2, 1], [4, 9, 12])
    # 5 is one past the bound 4 (a one-token forward): that chunk is fed alone, as is a lone token
    assert staircase([4, 5, 8, 1]) == ([2, 0], [4, 8])
    assert staircase([7]) == ([0], [7])
    assert staircase([]) == ([], [])


def test_newcomers_prefill_together_as_each_alone():
    """Four newcomers of one step: their prompts go through the model in as many forwards as the
    staircase has bounds, and their recurrent states and first tokens are bit for bit those of each
    prompt fed alone."""
    model = memwise.load("preset:tiny-mmfree")
    prompts = [[5] * 9, [6, 7, 8, 9], [300, 301, 302] * 3, list(range(40, 52))]
    together = running_batch(model, 4, None)
    sequences = _sequences(model, prompts, [3] * 4)
    for seq in sequences:
        together.add(seq)
    calls = []
    hook = model.module.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    try:
        together.step()
    finally:
        hook.remove()
    assert calls == [(4, 4), (3, 5), (1, 3)]
    for seq, ids in zip(sequences, prompts):
        alone = running_batch(model, 1, None)
        single = _sequences(model, [ids], [3])[0]
        alone.add(single)
        alone.step()
        assert single.generated == seq.generated
        assert torch.equal(alone.cache.state[:, 0], together.cache.state[:, together.slot_of[id(seq)]])
    _run(together, [])
    assert [len(s.generated) for s in sequences] == [3] * 4
    assert together.free_slots == 4 and not together.running and not together.consumed


def _sequences(model, prompts=PROMPTS, lengths=LENGTHS) -> list[Sequence]:
    return [Sequence(list(ids), Sampling(n, temperature=0.0), lambda event: None, decode_stream(model.tokenizer))
            for ids, n in zip(prompts, lengths)]


def _run(batch, sequences: list[Sequence]) -> list[int]:
    """Admit into free slots and step until all are done, as the engine does; the most prompts that
    were part-way through their prefill at once after a step."""
    waiting, partial = list(sequences), []
    while waiting or batch.running:
        while waiting and batch.free_slots:
            batch.add(waiting.pop(0))
        batch.step()
        partial.append(sum(1 for s in batch.prefilling if 0 < batch.consumed[id(s)]))
    return partial


@pytest.mark.parametrize("preset", ["preset:tiny-mmfree", "preset:tiny-gpt2", "preset:tiny-llama"])
def test_chunked_prefill_gives_the_unchunked_greedy_tokens(preset):
    model = memwise.load(preset)
    alone = [model.generate([ids], n, ignore_eos=True)[0, len(ids):].tolist() for ids, n in zip(PROMPTS, LENGTHS)]
    results = {}
    for budget in (None, 8, 1):
        batch = running_batch(model, 3, budget)
        sequences = _sequences(model)
        partial = _run(batch, sequences)
        results[budget] = [s.generated for s in sequences]
        assert all(s.finish_reason == "length" for s in sequences)
        if budget is not None:
            assert max(partial) >= 1        # some prompt really was fed over several steps
        assert batch.free_slots == 3 and not batch.running and not batch.consumed
    assert results[None] == alone
    assert results[8] == alone
    assert results[1] == alone


def test_a_step_decodes_the_running_and_feeds_one_chunk():
    model = memwise.load("preset:tiny-mmfree")
    batch = running_batch(model, 4, 10)
    short, long_ = _sequences(model, [[5, 6], [9] * 30], [20, 5])
    batch.add(short)
    batch.step()                          # the short prompt fits the budget: its first token
    assert len(short.generated) == 1
    batch.add(long_)
    batch.step()                          # one decode for `short`, 9 prompt tokens of `long_`
    assert len(short.generated) == 2 and batch.consumed[id(long_)] == 9
    batch.step()
    assert len(short.generated) == 3 and batch.consumed[id(long_)] == 18
    batch.step()
    batch.step()                          # 27, then the last 3 tokens and the first new one
    assert len(short.generated) == 5 and long_.generated and id(long_) not in batch.consumed


@pytest.mark.parametrize("preset", ["preset:tiny-mmfree", "preset:tiny-gpt2"])
def test_cancelled_mid_prefill_frees_its_slot(preset):
    model = memwise.load(preset)
    metrics = ServeMetrics(model.device)
    engine = Engine(model, max_batch=2, max_queue=8, metrics=metrics, step_tokens=4)
    sequences = _sequences(model, [[7] * 60, [3, 4, 5], [8] * 30, [9] * 20], [30, 8, 6, 5])
    seen: list[int] = []
    inner = model.module.forward

    def forward(*args, **kwargs):
        # the client of the first request goes away while its prompt is part-way through
        seen.append(engine.batch.consumed.get(id(sequences[0]), -1))
        if len(seen) == 3:
            sequences[0].cancelled = True
        return inner(*args, **kwargs)
    model.module.forward = forward
    for seq in sequences:
        engine.submit(seq)
    engine.start()
    try:
        deadline = time.monotonic() + 60
        while not all(s.done for s in sequences[1:]) or engine.running or engine.queued:
            assert time.monotonic() < deadline, "the engine never drained"
            time.sleep(0.01)
    finally:
        engine.stop()
    assert 0 < seen[2] < 60                        # cancelled mid-prefill
    assert not sequences[0].generated
    assert [len(s.generated) for s in sequences[1:]] == [8, 6, 5]
    assert engine.free_slots == 2 and not engine.batch.consumed and not engine.batch.running
    assert metrics.cancelled._value.get() == 1


@pytest.mark.parametrize("preset", ["preset:tiny-mmfree", "preset:tiny-gpt2"])
def test_no_small_chunks_and_the_tokens_of_each_alone(preset):
    """Budget 40 (chunks of at least 10): a 45-token prompt beside one decode goes through whole
    instead of as 39 + 6; of two 30-token newcomers the second waits a step rather than feed 9."""
    model = memwise.load(preset)
    prompts = [[5, 6], [9] * 45, list(range(100, 130)), list(range(200, 230))]
    lengths = [12, 4, 3, 5]
    alone = [model.generate([ids], n, ignore_eos=True)[0, len(ids):].tolist() for ids, n in zip(prompts, lengths)]
    batch = running_batch(model, 4, 40)
    short, long_, first, second = _sequences(model, prompts, lengths)
    batch.add(short)
    batch.step()
    batch.add(long_)
    batch.step()                          # one decode, 45 prompt tokens (39 in the budget)
    assert long_.generated and id(long_) not in batch.consumed
    batch.add(first)
    batch.add(second)
    batch.step()                          # two decodes: 38 left, 30 for `first`, then 8 < 10
    assert first.generated and batch.consumed[id(second)] == 0
    batch.step()
    assert second.generated
    _run(batch, [])
    assert [s.generated for s in (short, long_, first, second)] == alone
    assert batch.free_slots == 4 and not batch.running and not batch.consumed
