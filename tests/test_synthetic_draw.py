"""Synthetic weights drawn in row blocks equal the whole-matrix draw, so a quantizing loader can draw
the embedding a few MiB at a time and still hold the very weights every other path (float32 load,
offload file, GGUF export) holds."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from memwise.models.decoder import build
from memwise.models.decoder.build import draw_row_blocks, synthetic_row_blocks, synthetic_tensors
from memwise.source import resolve_model


@pytest.mark.parametrize("rows, cols, draw_weights", [
    (1000, 77, 500), (1000, 77, 16), (50, 3, 40), (33, 64, 64 * 4), (17, 5, 80), (7, 2, 1 << 20), (300, 1, 30),
])
def test_row_blocks_draw_the_whole_matrix(monkeypatch, rows, cols, draw_weights):
    monkeypatch.setattr(build, "DRAW_WEIGHTS", draw_weights)
    blocks = draw_row_blocks(rows, cols)
    assert blocks[0][0] == 0 and blocks[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert all((end - start) * cols % 16 == 0 for start, end in blocks[:-1])
    whole = torch.empty(rows, cols).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    parts = [torch.empty(end - start, cols).normal_(0.0, 0.02, generator=generator) for start, end in blocks]
    assert torch.equal(torch.cat(parts), whole)
    # and the generator is left where the whole draw leaves it
    after = torch.Generator().manual_seed(3)
    torch.empty(rows, cols).normal_(0.0, 0.02, generator=after)
    assert torch.equal(torch.randn(20, generator=generator), torch.randn(20, generator=after))


def test_synthetic_row_blocks_equal_synthetic_tensors(monkeypatch):
    monkeypatch.setattr(build, "DRAW_WEIGHTS", 1000)
    spec = resolve_model("preset:tiny-gpt2").spec
    whole = dict(synthetic_tensors(spec, seed=5))
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, start, tensor in synthetic_row_blocks(spec, seed=5, by_rows=lambda name: True):
        pieces.setdefault(name, []).append((start, tensor))
    assert pieces.keys() == whole.keys()
    assert any(len(blocks) > 1 for blocks in pieces.values())
    for name, blocks in pieces.items():
        assert [start for start, _ in blocks] == sorted(start for start, _ in blocks)
        assert torch.equal(torch.cat([t for _, t in blocks]), whole[name]), name


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_synthetic_model_equals_quantizing_the_whole_draw(monkeypatch, scheme):
    monkeypatch.setattr(build, "DRAW_WEIGHTS", 700)
    spec = resolve_model("preset:tiny-gpt2").spec
    blocked = build.synthetic(spec, quantize=scheme)
    reference = build.synthetic(dataclasses.replace(spec), quantize=None)
    # quantizing the whole float32 matrices, as before row blocks, gives the same buffers
    from memwise.models.decoder.quantized import quantized_linears
    again = build._build(dataclasses.replace(spec, synthetic=True), "float32", "cpu", scheme)
    targets = quantized_linears(again)
    parameters = dict(again.named_parameters())
    for name, tensor in dict(reference.named_parameters()).items():
        if name in targets:
            targets[name].fill_rows(0, tensor.detach())
        else:
            parameters[name].data.copy_(tensor)
    for (name, a), (_, b) in zip(blocked.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
