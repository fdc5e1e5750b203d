"""The decode-step implementation of the decoder's float linears (float32 and bfloat16 models on the CPU).

A batch-1 decode step multiplies one token row by every matrix of the model: a GEMV per linear,
bound by memory bandwidth, where torch's general GEMM leaves speed on the table (the 50k-row lm_head
of gpt2 most of all). `DenseLinear` is an nn.Linear (same parameters, same state dict, the tied
lm_head still shares the embedding's tensor and the kernel reads that matrix in place) whose forward
sends products of up to memwise.kernels.dense.MAX_ROWS token rows to the decode kernels and larger
ones (a prefill) to torch's GEMM. The choice is made at load time, as for the quantized linears
(quantized.py): `use_dense_kernels` swaps the modules on the meta model, before weights exist.

Threads: the linears of one model share a CpuBudget (memwise.kernels.threads), which offers a thread
per core that other processes leave free. Each product waits for its slowest thread, and a decode
step has a few hundred of them: on a 2-core machine with one core busy elsewhere, two threads made a
1024 x 1024 product 20x slower than one (benchmarks/dense_gemv_ab.py, docs/dense-decode.md).
"""
from __future__ import annotations

import torch
from torch import nn

from memwise.kernels import dense, num_threads
from memwise.kernels.threads import CpuBudget

DTYPES = (torch.float32, torch.bfloat16)


class DenseLinear(nn.Linear):
    """nn.Linear whose few-row products run on memwise.kernels.dense (module docstring)."""

    budget: CpuBudget | None = None     # shared by the model's linears (use_dense_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        threads = None if self.budget is None else self.budget.threads(num_threads())
        return dense.linear(x, self.weight, self.bias, threads)


def use_dense_kernels(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Swap every plain nn.Linear of `model` (on the meta device) for a DenseLinear of the same shape,
    where the decode kernels apply: a float32 or bfloat16 model on the CPU."""
    if device.type != "cpu" or dtype not in DTYPES:
        return
    owners = [(owner, name, child) for owner in model.modules() for name, child in owner.named_children()
              if type(child) is nn.Linear]
    budget = CpuBudget()
    for owner, name, linear in owners:
        with torch.device(linear.weight.device):
            replacement = DenseLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                      dtype=linear.weight.dtype)
        replacement.budget = budget
        setattr(owner, name, replacement)
