"""A CPU generation hands the heap's free pages back to the kernel after the prefill: the prompt's
freed activations do not stay resident beside the KV cache while the decode fills it (the peak of an
opt-2.7b int4 run, docs/quantization.md). Resident sets of a fresh process; no timing."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memwise

SRC = Path(__file__).resolve().parents[1] / "src"

# 64 MiB of freed heap blocks (64 KiB each: under glibc's mmap threshold, so they come from the heap)
# below a live block that keeps glibc from trimming the heap's top on its own.
_CHILD = """
import json, torch
import memwise

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

model = memwise.load("preset:tiny-gpt2", quantize="int4")
prompt = torch.tensor([[72, 101, 108, 108, 111]])
model.generate(prompt, max_new_tokens=2, ignore_eos=True)
blocks = [torch.ones(16384) for _ in range(1024)]
pin = torch.ones(16384)
del blocks
before = rss()
steps = model.stream(prompt, max_new_tokens=2, ignore_eos=True)
next(steps)
after_prefill = rss()
print(json.dumps({"before": before, "after_prefill": after_prefill}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not os.path.exists("/proc/self/status"),
                    reason="the release is glibc's malloc_trim; the check reads Linux's /proc")
def test_prefill_releases_freed_heap_before_the_decode():
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads(result.stdout.strip().splitlines()[-1])
    # without the release the 64 MiB stay resident (after_prefill >= before)
    assert run["before"] - run["after_prefill"] >= 48 * 2**20, run


def test_generate_tokens_equal_a_plain_greedy_loop_over_the_same_cache():
    # the release touches memory only: generate's tokens are argmax of the logits of the same forward calls
    model = memwise.load("preset:tiny-gpt2", quantize="int4")
    module = model.module
    prompt = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    new = 12
    out = model.generate(prompt, max_new_tokens=new, ignore_eos=True)
    cache = module.new_cache(1, prompt.shape[1] + new)
    ones = torch.ones((1, 1), dtype=torch.bool)
    tokens = []
    with torch.inference_mode():
        logits = module(prompt, cache, None, last_only=True)[:, -1]
        for _ in range(new):
            tokens.append(int(logits.argmax(dim=-1)))
            logits = module(torch.tensor([[tokens[-1]]]), cache, ones, last_only=True)[:, -1]
    assert torch.equal(out[0, prompt.shape[1]:], torch.tensor(tokens))
