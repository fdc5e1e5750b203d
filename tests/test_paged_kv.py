"""The decoder's paged KV cache: the same logits as the contiguous cache, and blocks that come back."""
from __future__ import annotations

import pytest
import torch

import memwise
from memwise.errors import MemwiseError
from memwise.kernels import kv_quant
from memwise.models.decoder.paged import BlockPool, BlockPoolExhausted, PagedView

from tiny_models import VOCAB, one_thread, saved  # noqa: F401 (fixtures)

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 3], [9] * 13, [44, 45, 46, 47, 48]]


def _alone(model, ids: list[int], steps: int) -> list[torch.Tensor]:
    """Logits of the prompt's last token, then of each greedy token after it, on the contiguous cache."""
    module = model.module
    cache = module.new_cache(1, len(ids) + steps)
    out = [module(torch.tensor([ids]), cache, None, last_only=True)[0, -1]]
    for _ in range(steps - 1):
        token = out[-1].argmax().view(1, 1)
        out.append(module(token, cache, None, last_only=True)[0, -1])
    return out


def _paged(model, prompts: list[list[int]], steps: int, block_size: int, joins: list[int]) -> list[list[torch.Tensor]]:
    """The same, for all prompts in one paged batch: prompt i is prefilled before step joins[i] and then
    decoded with whoever is running; rows of different lengths share every decode call."""
    module = model.module
    pool = BlockPool(model.spec, 64, block_size, module.dtype, module.device, module.kv_cache)
    tables, lengths, logits = [[] for _ in prompts], [0] * len(prompts), [[] for _ in prompts]

    def grow(i: int, tokens: int) -> None:
        while len(tables[i]) < pool.blocks_for(lengths[i] + tokens):
            tables[i].append(pool.allocate())
    for step in range(steps + max(joins)):
        for i, ids in enumerate(prompts):
            if joins[i] == step:
                grow(i, len(ids))
                view = PagedView(pool, [tables[i]], [0], len(ids))
                logits[i].append(module(torch.tensor([ids]), view, None, last_only=True)[0, -1])
                lengths[i] = len(ids)
        rows = [i for i in range(len(prompts)) if joins[i] <= step and 0 < len(logits[i]) < steps]
        if not rows:
            continue
        for i in rows:
            grow(i, 1)
        view = PagedView(pool, [tables[i] for i in rows], [lengths[i] for i in rows], 1)
        last = torch.stack([logits[i][-1].argmax() for i in rows]).view(-1, 1)
        out = module(last, view, None, last_only=True)[:, -1]
        for b, i in enumerate(rows):
            logits[i].append(out[b])
            lengths[i] += 1
    for table in tables:
        pool.release(table)
    assert pool.free_blocks == pool.usable_blocks
    return logits


@pytest.mark.parametrize("name,kv_cache", [("gpt2", None), ("opt", None), ("llama", None), ("mistral", None),
                                           ("phi", None), ("llama", "int8"), ("gpt2", "int4")])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_batch_equals_each_sequence_alone(saved, name, kv_cache, block_size):
    model = memwise.load(str(saved(name)), kv_cache=kv_cache)
    steps = 9
    paged = _paged(model, PROMPTS, steps, block_size, joins=[0, 0, 2, 5])
    for ids, got in zip(PROMPTS, paged):
        want = _alone(model, ids, steps)
        assert len(got) == steps
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert [int(t.argmax()) for t in got] == [int(t.argmax()) for t in want]


def test_pool_hands_out_each_block_once_and_refuses_when_empty(saved):
    model = memwise.load(str(saved("gpt2")))
    pool = BlockPool(model.spec, 4, 8, torch.float32, torch.device("cpu"))
    blocks = [pool.allocate() for _ in range(3)]
    assert sorted(blocks) == [1, 2, 3] and pool.free_blocks == 0     # block 0 is the zero block
    with pytest.raises(BlockPoolExhausted, match="exhausted"):
        pool.allocate()
    pool.release(blocks[1:2])
    with pytest.raises(MemwiseError, match="not an allocated block"):
        pool.release(blocks[1:2])
    assert pool.allocate() == blocks[1]
    with pytest.raises(MemwiseError, match="needs 2 blocks"):
        PagedView(pool, [[blocks[0]]], [8], 1)


def test_bytes_per_block(saved):
    spec = memwise.load(str(saved("llama"))).spec
    per_vector = spec.head_dim * 4
    assert BlockPool.bytes_per_block(spec, 16, torch.float32) == 2 * spec.num_layers * 16 * spec.num_kv_heads * per_vector
    int8_vector = spec.head_dim + 4 * (spec.head_dim // kv_quant.group_size(spec.head_dim))
    assert BlockPool.bytes_per_block(spec, 16, torch.float32, "int8") == 2 * spec.num_layers * 16 * spec.num_kv_heads * int8_vector
