"""The C workspaces of a fused decode step, kept by the sizes they were made for (no torch here)."""
from __future__ import annotations

from typing import Any, Callable, Hashable


class RecentWorkspaces:
    """Workspaces by key (batch size, cache length, ISA, threads): made on first use, and only the few
    made last are kept, since batch sizes and cache lengths come and go over a process's life."""

    def __init__(self, keep: int = 4):
        self._made: dict[Hashable, Any] = {}
        self._keep = keep

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        workspace = self._made.get(key)
        if workspace is None:
            if len(self._made) >= self._keep:
                self._made.pop(next(iter(self._made)))      # the oldest
            workspace = self._made[key] = make()
        return workspace

    def __len__(self) -> int:
        return len(self._made)
