"""What the fused decode steps over a DecoderCache share (this family's and bitnet's): pointing the
layer views at a cache's key/value tensors, and one step of one token for one unpadded sequence.

A subclass sets `spec`, `view` (its ModelView), `_layers` (its LayerView array, with `keys` and
`values` pointers), `_extension` (its C module, with `step(workspace, model, x, position)`) and
`_workspace(isa, threads, max_length)`, and calls `_init_step(budget)`."""
from __future__ import annotations

import ctypes
import threading
import weakref
from typing import Any

import torch

from memwise import kernels
from memwise.kernels import KernelInputError
from memwise.kernels.threads import CpuBudget
from memwise.kernels.workspaces import RecentWorkspaces


def float_pointer(t: torch.Tensor, shape: tuple[int, ...], what: str) -> int:
    """t's data pointer, after checking that it is a contiguous float32 CPU tensor of `shape`."""
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or tuple(t.shape) != shape:
        raise KernelInputError(f"fused step: {what} must be a contiguous float32 CPU tensor {list(shape)}, "
                               f"got {t.dtype} {list(t.shape)} on {t.device}")
    return t.data_ptr()


class CachedFusedStep:
    spec: Any
    view: Any
    _layers: Any
    _extension: Any

    def _init_step(self, budget: CpuBudget | None) -> None:
        self._cache: Any = None     # a weak reference to the cache the layer views point into
        self._workspaces = RecentWorkspaces()
        self._lock = threading.Lock()
        self._budget = budget or CpuBudget()

    def _workspace(self, isa: str, threads: int, max_length: int) -> Any:
        raise NotImplementedError

    def _point_at(self, cache: Any) -> None:
        """The layer views' key/value pointers at `cache`'s tensors (checked)."""
        spec = self.spec
        shape = (1, spec.num_kv_heads, cache.max_length, spec.head_dim)
        for n in range(len(self._layers)):
            self._layers[n].keys = float_pointer(cache.keys[n], shape, f"cache keys of layer {n}")
            self._layers[n].values = float_pointer(cache.values[n], shape, f"cache values of layer {n}")
        self.view.max_length = cache.max_length
        self._cache = weakref.ref(cache)

    def step(self, x: torch.Tensor, cache: Any, isa: str | None = None) -> torch.Tensor:
        """The hidden state [1, 1, H] after the last layer for the embedded token x [1, 1, H] (float32),
        whose key and value go into `cache` at slot cache.length (the caller records the token in
        the cache and advances its length)."""
        if cache.batch_size != 1 or cache.padded or cache.length >= cache.max_length:
            raise KernelInputError(f"fused step: needs a cache of one unpadded sequence with a free slot, got "
                                   f"{cache.batch_size} sequences, {cache.length} of {cache.max_length} slots")
        x = x.to(torch.float32).contiguous().clone()
        float_pointer(x, (1, 1, self.spec.hidden_size), "x")
        name = kernels.resolve_isa(isa)
        threads = self._budget.threads(kernels.num_threads())
        with self._lock:
            if self._cache is None or self._cache() is not cache:
                self._point_at(cache)
            ws = self._workspace(name, threads, cache.max_length)
            self._extension.step(ws, ctypes.addressof(self.view), x.data_ptr(), cache.length)
        return x
