"""Offloading (issue 21): weights (and, later, the KV cache) that do not fit the memory budget live on
disk and stream in layer by layer. One idea per module, each reading only from those before it:

    store.py     the offload file: header, one page-aligned region per layer, checks, writer
    budget.py    max_memory parsed and split into non-layer weights, resident layers, buffers, workspace
    files.py     where the file lives; the directory checked (writable, free space) before writing
    stream.py    O_DIRECT region reads and the read-ahead I/O thread (model-free)
    decoder.py   the decoder family's offloaded model: file written from the source, then opened
    load.py      memwise.load's offloaded path
    costs.py     this machine's measured figures; plan.py chooses the placement and the batch by
    plan_cli.py  linear programming; plan_cli.py is `memwise plan`

The byte layout and how streaming works: docs/offload.md.
"""
__all__ = ["BudgetPlan", "OffloadError", "StaleStoreError", "parse_size"]


def __getattr__(name: str):
    # imported on first use: `memwise plan --help` imports this package and must not wait for torch
    if name in ("BudgetPlan", "parse_size"):
        from memwise.offload import budget
        return getattr(budget, name)
    if name in ("OffloadError", "StaleStoreError"):
        from memwise.offload import store
        return getattr(store, name)
    raise AttributeError(f"module 'memwise.offload' has no attribute {name!r}")
