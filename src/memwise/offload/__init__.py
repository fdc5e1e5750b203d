"""Offloading: weights and KV cache that do not fit the memory budget live on disk and stream in.

costs.py measures this machine's figures, plan.py chooses the placement and the batch by linear
programming, plan_cli.py is `memwise plan`.
"""
