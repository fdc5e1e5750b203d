"""Offloading (issue 21, part 1): weights that do not fit a memory budget live on disk and stream in
layer by layer. One idea per module, each reading only from those before it:

    store.py    the offload file: header, one page-aligned region per layer, checks, writer
    budget.py   max_memory parsed and split into non-layer weights, resident layers, buffers, workspace
    files.py    where the file lives; the directory checked (writable, free space) before writing
    stream.py   O_DIRECT region reads and the read-ahead I/O thread (model-free)
    decoder.py  the decoder family's offloaded model: file written from the source, then opened

The byte layout and how streaming works: docs/offload.md.
"""
from memwise.offload.budget import BudgetPlan, parse_size
from memwise.offload.store import OffloadError, StaleStoreError

__all__ = ["BudgetPlan", "OffloadError", "StaleStoreError", "parse_size"]
