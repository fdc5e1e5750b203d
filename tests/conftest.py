"""Session-wide test settings."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def offload_costs(tmp_path_factory):
    """Offloaded generations solve memwise plan's policy from cost figures (memwise.offload.runtime):
    fixed ones here, so that no test measures this machine (tens of seconds) or depends on its cache."""
    from memwise.offload.costs import KERNEL_SCHEMES, Costs, save_costs
    path = tmp_path_factory.mktemp("costs") / "costs.json"
    save_costs(Costs(machine="test", disk_read_bytes_per_s=2e9, memory_read_bytes_per_s=2e10,
                     gemv_bytes_per_s={s: 1e10 for s in KERNEL_SCHEMES}, gemm_bytes_per_s={s: 1e10 for s in KERNEL_SCHEMES},
                     prefill_gemm_bytes_per_s={s: 2.5e9 for s in KERNEL_SCHEMES}), path)
    patch = pytest.MonkeyPatch()
    patch.setenv("MEMWISE_OFFLOAD_COSTS", str(path))
    yield path
    patch.undo()


@pytest.fixture
def count_calls(monkeypatch: pytest.MonkeyPatch):
    """count_calls(owner, name) -> a list that gains an entry at each call of owner.name, which still
    runs (undone after the test)."""
    def count(owner, name: str) -> list[int]:
        calls: list[int] = []
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
        return calls
    return count
