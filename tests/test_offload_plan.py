"""The offload planner (memwise.offload.plan), its cost file and `memwise plan`, on preset shapes
(no weights are read) and cost figures the tests write: nothing depends on this machine's speed."""
from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest

from memwise.cli import main
from memwise.offload.costs import KERNEL_SCHEMES, Costs, CostsError, cache_path, load_costs, save_costs
from memwise.offload.probes import disk_read_bandwidth, machine_costs
from memwise.offload.plan import STREAM_BUFFERS, PlanError, _case, _product_s, model_figures, plan

GiB = 2**30
MODEL = "preset:opt-2.7b"       # 32 layers of 300 MiB in float32; only its config is read


def costs(disk: float = 2e9, kernels: float = 2e10, gemm: float = 2e10) -> Costs:
    return Costs(machine="test", disk_read_bytes_per_s=disk, memory_read_bytes_per_s=2e10,
                 gemv_bytes_per_s={s: kernels for s in KERNEL_SCHEMES}, gemm_bytes_per_s={s: gemm for s in KERNEL_SCHEMES},
                 prefill_gemm_bytes_per_s={s: gemm / 4 for s in KERNEL_SCHEMES})


def test_everything_stays_resident_when_the_budget_allows():
    policy = plan(MODEL, 64 * GiB, costs(), batch_sizes=(1, 8), prompt_tokens=16, new_tokens=8).policy
    assert (policy.resident_layers, policy.streamed_layers) == (32, 0)
    assert policy.kv_placement == "memory" and policy.kv_disk_layers == 0
    assert policy.disk_bytes_per_token == 0
    assert policy.memory["stream_buffers"] == 0 and policy.memory["kv_buffers"] == 0


def test_layers_stream_when_the_budget_is_short_and_the_budget_holds():
    fig = model_figures(MODEL)
    budget = 3 * GiB                                  # a third of the float32 weights
    policy = plan(MODEL, budget, costs(), batch_sizes=(1, 8, 32), prompt_tokens=16, new_tokens=8).policy
    assert 0 < policy.streamed_layers < 32
    assert policy.resident_layers + policy.streamed_layers == 32
    assert policy.budgeted_bytes <= budget
    assert policy.predicted_peak_bytes == policy.budgeted_bytes + fig.runtime_base
    assert policy.memory["resident_weights"] == policy.resident_layers * fig.layer_bytes
    assert policy.memory["stream_buffers"] == STREAM_BUFFERS * fig.layer_bytes
    # what each token reads from disk: the streamed layers shared by the batch (and any KV on disk)
    assert policy.disk_bytes_per_token >= policy.streamed_layers * fig.layer_bytes / policy.batch_size


@pytest.mark.parametrize("busy_disk, beside", [(0.0, 1.0), (7e8, 0.8)])
def test_the_milp_finds_the_best_of_every_placement(busy_disk, beside):
    """Brute force over every (resident layers, KV layers on disk) against the solver's choice, with
    free overlap and with reads and products slowing each other (each step then ends with its reads,
    D / R', or with its products, C + (1 - f) D / R'). The prefill yields the first token: N - 1 steps."""
    c = replace(costs(disk=1e9, kernels=4e10, gemm=1e10), disk_read_busy_bytes_per_s=busy_disk,
                products_beside_reads=beside)
    budget, prompt, new = int(2.5 * GiB), 32, 8
    fig = model_figures(MODEL, "int8")
    policy = plan(MODEL, budget, c, scheme="int8", batch_sizes=(4,), prompt_tokens=prompt, new_tokens=new).policy
    case = _case(fig, c, 4, policy.micro_batches, prompt, new)
    L, W, R = fig.layers, fig.layer_bytes, busy_disk or c.disk_read_bytes_per_s
    best = None
    for r, q in itertools.product(range(L + 1), repeat=2):
        memory = (sum(case.fixed.values()) + r * W * (1 + fig.workspace_per_weight) + 2 * W * (r < L)
                  + (L - q) * case.kv_full + 2 * case.kv_buffer * (q > 0))
        if memory > budget:
            continue
        prefill_reads, step_reads = (((L - r) * W + q * kv) / R for kv in (case.kv_prefill, case.kv_decode))
        time = (max(prefill_reads, case.compute_prefill + (1 - beside) * prefill_reads)
                + (new - 1) * max(step_reads, case.compute_decode + (1 - beside) * step_reads))
        best = time if best is None else min(best, time)
    assert best is not None
    assert policy.predicted_prefill_s + (new - 1) * policy.predicted_step_s == pytest.approx(best, rel=1e-6)
    assert policy.predicted_tokens_per_s == pytest.approx(4 * new / best, rel=1e-6)


@pytest.mark.parametrize("disk, kernels, gemm, scheme", [(5e8, 1e11, 1e11, "int4"), (2e8, 1e11, 1e11, None),
                                                         (2.4e9, 4.4e9, 1.2e9, "int8")])
def test_throughput_never_falls_as_the_budget_grows(disk, kernels, gemm, scheme):
    """A larger budget only adds feasible policies, so the best predicted throughput cannot fall
    (with slow kernels it is compute-bound, and flat, from a small budget on)."""
    c = costs(disk, kernels, gemm)
    rates = [plan(MODEL, int(gib * GiB), c, scheme=scheme, batch_sizes=(1, 4, 16, 64, 256), prompt_tokens=128,
                  new_tokens=32).policy.predicted_tokens_per_s for gib in (1.25, 1.5, 2, 3, 4, 6, 8, 12, 16)]
    assert all(later >= earlier * (1 - 1e-9) for earlier, later in zip(rates, rates[1:]))
    assert rates[-1] > rates[0]


def test_the_batch_grows_with_the_budget_while_layers_stream():
    """Disk-bound figures: each streamed layer is read once per step for the whole batch, so while
    layers stream a larger budget buys a larger batch. (Once every layer is resident the batch may
    fall again: a small batch is then as fast and leaves room; docs/offload-plan.md.)"""
    c = costs(disk=2e8, kernels=1e11, gemm=1e11)
    policies = [plan(MODEL, int(gib * GiB), c, batch_sizes=(1, 4, 16, 64, 256), prompt_tokens=128,
                     new_tokens=32).policy for gib in (1.5, 2, 3, 4, 6, 8)]
    assert all(p.streamed_layers > 0 for p in policies)
    batches = [p.batch_size for p in policies]
    assert batches == sorted(batches) and batches[-1] > batches[0]


def test_micro_batches_split_the_batch_when_memory_is_short():
    c = costs(disk=2.4e9, kernels=4.4e9, gemm=1.2e9)
    short, roomy = (plan(MODEL, int(gib * GiB), c, scheme="int8", batch_sizes=(32,), prompt_tokens=128,
                         new_tokens=32).policy for gib in (1, 16))
    assert short.micro_batches > 1 and short.streamed_layers == 32
    assert roomy.micro_batches == 1 and roomy.streamed_layers == 0


def test_a_budget_below_the_minimum_says_the_minimum():
    result = plan(MODEL, 4 * GiB, costs(), scheme="int8", batch_sizes=(2, 8), prompt_tokens=16, new_tokens=8)
    minimum = result.minimum_budget_bytes
    at_minimum = plan(MODEL, minimum, costs(), scheme="int8", batch_sizes=(2, 8), prompt_tokens=16, new_tokens=8)
    assert at_minimum.policy.resident_layers == 0 and at_minimum.policy.kv_placement == "disk"
    assert at_minimum.policy.batch_size == 2 and at_minimum.policy.micro_batches == 2
    with pytest.raises(PlanError, match=rf"below the minimum of {minimum / 2**20:.1f} MiB"):
        plan(MODEL, minimum - 1, costs(), scheme="int8", batch_sizes=(2, 8), prompt_tokens=16, new_tokens=8)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_sizes": (0,)}, "batch sizes"), ({"prompt_tokens": 0}, "prompt_tokens"),
    ({"new_tokens": 5000}, "exceed"), ({"scheme": "int9"}, "unknown quantization scheme"),
])
def test_bad_plan_inputs(kwargs, message):
    with pytest.raises(Exception, match=message):
        plan(MODEL, 4 * GiB, costs(), **kwargs)


def test_ternary_models_are_refused():
    with pytest.raises(Exception, match="conventional decoders"):
        plan("preset:tiny-mmfree", 4 * GiB, costs())


def test_product_cost_runs_through_the_measured_points():
    """c_S(t) is piecewise linear through (1, 8, 32, 256) tokens, proportional beyond; without the
    8-row figure (a hand-made Costs) it runs straight from 1 to 32."""
    rates = {1: 4e10, 8: 2e10, 32: 1e10, 256: 2e9}
    c = Costs(machine="test", disk_read_bytes_per_s=1e9, memory_read_bytes_per_s=2e10,
              gemv_bytes_per_s={s: rates[1] for s in KERNEL_SCHEMES}, few_rows_bytes_per_s={s: rates[8] for s in KERNEL_SCHEMES},
              gemm_bytes_per_s={s: rates[32] for s in KERNEL_SCHEMES},
              prefill_gemm_bytes_per_s={s: rates[256] for s in KERNEL_SCHEMES})
    W = 1e9
    for tokens, rate in rates.items():
        assert _product_s(c, "int8", W, tokens) == pytest.approx(W / rate)
    assert _product_s(c, "int8", W, 20) == pytest.approx(W / 2e10 + 12 / 24 * (W / 1e10 - W / 2e10))
    assert _product_s(c, "int8", W, 512) == pytest.approx(2 * W / 2e9)
    plain = replace(c, few_rows_bytes_per_s={})
    assert _product_s(plain, "int8", W, 8) == pytest.approx(W / 4e10 + 7 / 31 * (W / 1e10 - W / 4e10))


@pytest.mark.parametrize("changes, message", [
    ({"products_beside_reads": 0.0}, "overlap figures"), ({"products_beside_reads": 1.2}, "overlap figures"),
    ({"disk_read_busy_bytes_per_s": -1.0}, "overlap figures"), ({"attention_bytes_per_s": -1.0}, "attention_bytes_per_s"),
    ({"attention_s_per_head": float("nan")}, "attention_s_per_head"),
    ({"few_rows_bytes_per_s": {"int8": 1e10}}, "missing for float32, int4, nf4"),
])
def test_bad_overlap_and_row_figures_are_refused(changes, message):
    with pytest.raises(CostsError, match=message):
        replace(costs(), **changes).check()


def test_overlap_probe_reads_beside_the_products(tmp_path):
    from memwise.offload.probes import overlap_figures
    disk, beside = overlap_figures(tmp_path, seconds=0.05)
    assert disk > 0 and 0 < beside <= 1
    assert list(tmp_path.iterdir()) == []       # the test file is gone


def test_decode_attention_uses_the_attention_figures():
    """A decode step's attention costs (batch x heads) x seconds per head plus its KV bytes over
    the attention's measured rate (the memory figure where none was measured), per layer; the
    prefill is not affected."""
    from memwise.offload.probes import attention_figures
    per_head, rate = attention_figures(batch=2, heads=2, head_dim=8, repeats=1)
    assert per_head >= 0 and rate > 0
    fig = model_figures(MODEL, "int8")
    plain = costs()
    slow = replace(plain, attention_bytes_per_s=plain.memory_read_bytes_per_s / 4, attention_s_per_head=1e-6)
    base, slower = (_case(fig, c, 32, 2, 64, 32) for c in (plain, slow))
    extra = fig.layers * (32 * fig.heads * 1e-6 + base.kv_decode * (4 - 1) / plain.memory_read_bytes_per_s)
    assert slower.compute_decode - base.compute_decode == pytest.approx(extra)
    assert slower.compute_prefill == base.compute_prefill


def test_cost_file_round_trip(tmp_path):
    figures = replace(costs(disk=1.5e9), few_rows_bytes_per_s={s: 3e10 for s in KERNEL_SCHEMES},
                      disk_read_busy_bytes_per_s=1.2e9, products_beside_reads=0.9, attention_bytes_per_s=1.5e10,
                      attention_s_per_head=4e-7)
    path = tmp_path / "costs.json"
    save_costs(figures, path)
    assert load_costs(path) == figures
    assert [p.name for p in tmp_path.iterdir()] == ["costs.json"]    # no temporary left behind
    # a cached file is used as it is: nothing is measured
    cached = cache_path(tmp_path / "cache")
    save_costs(figures, cached)
    assert machine_costs(cache_dir=tmp_path / "cache") == figures


@pytest.mark.parametrize("text, message", [
    ("{", "malformed JSON"), ('{"format_version": 99}', "not a memwise cost file"),
    ('{"format_version": 3, "machine": "x"}', "malformed cost file"),
])
def test_bad_cost_files(tmp_path, text, message):
    path = tmp_path / "costs.json"
    path.write_text(text)
    with pytest.raises(CostsError, match=message):
        load_costs(path)


def test_negative_figures_are_refused(tmp_path):
    data = costs().to_json()
    data["disk_read_bytes_per_s"] = -1
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CostsError, match="disk_read_bytes_per_s should be a positive"):
        load_costs(path)


def test_disk_read_leaves_nothing_behind(tmp_path):
    rate, _direct = disk_read_bandwidth(tmp_path, size=32 << 20, passes=1)
    assert rate > 0
    assert list(tmp_path.iterdir()) == []


def test_disk_probe_reads_into_the_streams_kind_of_buffer(tmp_path, monkeypatch):
    # O_DIRECT speed depends on the destination memory (private huge pages ran 2x shared small pages
    # on the EPYC VM), so the probe must read the way the layer stream does.
    from memwise.offload import stream
    made = []
    allocate = stream.AlignedBuffer.allocate

    def recording(size):
        made.append(size)
        return allocate(size)
    monkeypatch.setattr(stream.AlignedBuffer, "allocate", staticmethod(recording))
    rate, _direct = disk_read_bandwidth(tmp_path, size=32 << 20, passes=1)
    assert rate > 0 and made == [16 << 20]


def test_another_offload_dir_gets_its_own_disk_figure(tmp_path):
    cache, disk = tmp_path / "cache", tmp_path / "disk"
    save_costs(costs(disk=1.5e9), cache_path(cache))
    measured = machine_costs(disk, cache_dir=cache)
    assert measured.disk_directory == str(disk) and measured.disk_read_bytes_per_s != 1.5e9
    assert measured.gemv_bytes_per_s == costs().gemv_bytes_per_s     # the kernels are not measured again
    assert load_costs(cache_path(cache)) == measured
    assert list(disk.iterdir()) == []


def test_an_offload_dir_that_cannot_be_a_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    save_costs(costs(), cache_path())
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["plan", "preset:opt-350m", "--max-memory", "2GiB", "--offload-dir", str(blocker / "sub")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"memwise: error: {blocker / 'sub'}: cannot create the directory for the disk test")


def _cost_file(tmp_path):
    path = tmp_path / "costs.json"
    save_costs(costs(), path)
    return str(path)


def test_plan_cli_json(tmp_path, capsys):
    assert main(["plan", "preset:opt-350m", "--max-memory", "700MiB", "--batch", "1", "8", "--prompt-tokens", "32",
                 "--new-tokens", "8", "--costs", _cost_file(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    policy = out["policy"]
    assert {"resident_layers", "streamed_layers", "kv_placement", "batch_size", "micro_batches",
            "predicted_tokens_per_s", "predicted_peak_bytes", "disk_bytes_per_token", "memory"} <= set(policy)
    assert policy["resident_layers"] + policy["streamed_layers"] == 24
    assert policy["budget_bytes"] == 700 * 2**20 and policy["budgeted_bytes"] <= 700 * 2**20
    assert policy["batch_size"] in (1, 8) and policy["kv_placement"] in ("memory", "disk", "split")
    assert [(c["batch_size"], c["micro_batches"]) for c in out["candidates"]] == [(1, 1), (8, 1), (8, 2), (8, 4), (8, 8)]
    assert out["costs"]["machine"] == "test"


def test_plan_cli_table(tmp_path, capsys):
    assert main(["plan", "preset:opt-350m", "--max-memory", "4GiB", "--costs", _cost_file(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "resident layers" in out and "24 of 24" in out and "tokens/s" in out


@pytest.mark.parametrize("flags, status, message", [
    (["--max-memory", "lots"], 1, "--max-memory 'lots': not an amount of memory"),
    (["--max-memory", "10MiB"], 1, "is below the minimum of"),
    (["--max-memory", "2GiB", "--quantize", "int9"], 1, "unknown quantization scheme"),
    (["--max-memory", "2GiB", "--batch", "0"], 2, "expected a positive integer"),
])
def test_plan_cli_bad_input(tmp_path, capsys, flags, status, message):
    try:
        code = main(["plan", "preset:opt-350m", *flags, "--costs", _cost_file(tmp_path)])
    except SystemExit as e:     # argparse's usage errors
        code = e.code
    assert code == status
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
