"""Offloaded loads (memwise.offload): layers streamed from disk give bit-identical logits and tokens to
the in-memory model with the same scheme, on tiny checkpoints written here and on presets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import memwise
from memwise.offload import parse_size
from memwise.offload.budget import BudgetPlan
from tiny_models import VOCAB, one_thread, randomize  # noqa: F401 (one_thread: autouse fixture)

LAYERS = 6
# a rebuild warning would mean a file this run wrote failed its own checks
pytestmark = pytest.mark.filterwarnings("error:.*rebuilding it:UserWarning")


@pytest.fixture(autouse=True)
def load_split(monkeypatch):
    """These tests check the load's own budget split (budget.py); generation would otherwise re-plan it
    for its batch (memwise.offload.runtime, tested in test_offload_throughput.py)."""
    monkeypatch.setenv("MEMWISE_OFFLOAD_PLAN", "0")


def tiny_config(name: str):
    import transformers
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if name == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64, **common)
    if name == "opt":
        return transformers.OPTConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, ffn_dim=48,
                                      max_position_embeddings=64, **common)
    return transformers.LlamaConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64, **common)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import transformers
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            directory = tmp_path_factory.mktemp(name)
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(tiny_config(name)).eval()
            randomize(model)
            model.save_pretrained(directory)
            made[name] = directory
        return made[name]
    return get


def plan_of(model: memwise.LanguageModel) -> BudgetPlan:
    return model.module.offload.plan


def budget_for(source, directory: Path, layers: int = 3, **options) -> int:
    """A budget with room for `layers` layers beside the rest: 3 keeps one resident and two buffers,
    1 is the minimum (one buffer, every layer streams)."""
    roomy = memwise.load(source, max_memory="64GiB", offload_dir=directory, **options)
    plan = plan_of(roomy)
    roomy.module.layer_stream.close()
    return plan.fixed + plan.workspace + layers * plan.layer


PROMPT = torch.tensor([[5, 17, 3, 44, 9, 60, 12, 7], [1, 8, 30, 2, 71, 4, 19, 23]])


@pytest.mark.parametrize("name", ["gpt2", "opt", "llama"])
@pytest.mark.parametrize("scheme", [None, "int8"])
def test_streamed_checkpoint_is_bit_identical(checkpoints, tmp_path, name, scheme):
    directory = checkpoints(name)
    reference = memwise.load(directory, quantize=scheme)
    budget = budget_for(directory, tmp_path, quantize=scheme)
    model = memwise.load(directory, quantize=scheme, max_memory=budget, offload_dir=tmp_path)
    assert plan_of(model).streamed >= LAYERS - 2 and plan_of(model).buffers == 2
    assert torch.equal(model.logits(PROMPT), reference.logits(PROMPT))
    assert torch.equal(model.generate(PROMPT, 12, ignore_eos=True), reference.generate(PROMPT, 12, ignore_eos=True))
    stream = model.module.layer_stream
    assert stream.bytes_read >= plan_of(model).streamed * plan_of(model).layer


@pytest.mark.parametrize("scheme", [None, "int8", "int4", "nf4"])
def test_streamed_preset_is_bit_identical(tmp_path, scheme):
    reference = memwise.load("preset:tiny-llama", quantize=scheme)
    budget = budget_for("preset:tiny-llama", tmp_path, 1, quantize=scheme)
    model = memwise.load("preset:tiny-llama", quantize=scheme, max_memory=budget, offload_dir=tmp_path)
    assert (plan_of(model).resident, plan_of(model).buffers) == (0, 1)
    assert torch.equal(model.logits(PROMPT % 512), reference.logits(PROMPT % 512))
    assert torch.equal(model.generate(PROMPT, 6, ignore_eos=True), reference.generate(PROMPT, 6, ignore_eos=True))


def test_bfloat16_preset_streams_bit_identical(tmp_path):
    reference = memwise.load("preset:tiny-gpt2", dtype="bfloat16")
    budget = budget_for("preset:tiny-gpt2", tmp_path, 1, dtype="bfloat16")
    model = memwise.load("preset:tiny-gpt2", dtype="bfloat16", max_memory=budget, offload_dir=tmp_path)
    assert plan_of(model).streamed > 0
    assert torch.equal(model.logits(PROMPT), reference.logits(PROMPT))


def test_the_file_is_written_once_and_reused(checkpoints, tmp_path):
    directory = checkpoints("llama")
    first = memwise.load(directory, max_memory="64GiB", offload_dir=tmp_path)
    path = first.module.offload.path
    stamp = path.stat().st_mtime_ns
    second = memwise.load(directory, max_memory="64GiB", offload_dir=tmp_path)
    assert second.module.offload.path == path and path.stat().st_mtime_ns == stamp
    assert torch.equal(first.logits(PROMPT), second.logits(PROMPT))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_layers_are_page_aligned_regions(checkpoints, tmp_path):
    from memwise.offload.store import ALIGN, StoreHeader
    model = memwise.load(checkpoints("gpt2"), max_memory="64GiB", offload_dir=tmp_path)
    raw = model.module.offload.path.read_bytes()
    length = int.from_bytes(raw[12:16], "little")
    header = StoreHeader.from_json(raw[20:20 + length])
    assert raw[:8] == b"MWOFFLD\0" and len(header.layers) == LAYERS
    offsets = [r.offset for r in header.layers]
    assert all(o % ALIGN == 0 for o in offsets) and all(r.size % ALIGN == 0 for r in header.layers)
    assert offsets == sorted(offsets) and header.rest.offset == offsets[-1] + header.layers[-1].size
    assert len(raw) == header.rest.offset + header.rest.size


def test_all_layers_resident_when_the_budget_holds_them(checkpoints, tmp_path):
    model = memwise.load(checkpoints("opt"), max_memory="64GiB", offload_dir=tmp_path)
    assert (plan_of(model).resident, plan_of(model).buffers) == (LAYERS, 0)
    assert torch.equal(model.logits(PROMPT), memwise.load(checkpoints("opt")).logits(PROMPT))


@pytest.mark.parametrize("text, expected", [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9),
                                            ("1.5G", int(1.5 * 2**30)), (" 300 kib ", 300 * 1024), (4096, 4096)])
def test_sizes_parse(text, expected):
    assert parse_size(text) == expected


def test_o_direct_fallback_on_tmpfs(checkpoints):
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs) on this machine")
    import tempfile
    with tempfile.TemporaryDirectory(dir=shm) as directory:
        model = memwise.load(checkpoints("gpt2"), max_memory=budget_for(checkpoints("gpt2"), Path(directory)),
                             offload_dir=directory)
        reason = model.module.offload.fallback_reason
        if reason is None:
            pytest.skip("this tmpfs accepts O_DIRECT")
        assert "O_DIRECT" in reason
        assert plan_of(model).streamed > 0
        assert torch.equal(model.logits(PROMPT), memwise.load(checkpoints("gpt2")).logits(PROMPT))
        model.module.layer_stream.close()


def test_reads_bypass_the_page_cache_where_the_filesystem_allows(checkpoints, tmp_path):
    from memwise.offload.stream import AlignedBuffer, RegionReader
    model = memwise.load(checkpoints("gpt2"), max_memory="64GiB", offload_dir=tmp_path)
    path = model.module.offload.path
    direct, buffered = RegionReader(path), RegionReader(path, direct=False)
    assert buffered.fallback_reason.startswith("O_DIRECT not requested")
    from memwise.offload.store import Region
    region = Region(0, 8192, 0)
    a, b = AlignedBuffer.allocate(8192), AlignedBuffer.allocate(8192)
    assert bytes(direct.read_into(region, a)) == bytes(buffered.read_into(region, b)) == path.read_bytes()[:8192]
    direct.close(), buffered.close()


def test_buffered_reads_when_o_direct_is_turned_off(checkpoints, tmp_path, monkeypatch):
    directory = checkpoints("llama")
    budget = budget_for(directory, tmp_path)
    monkeypatch.setenv("MEMWISE_OFFLOAD_DIRECT", "0")
    model = memwise.load(directory, max_memory=budget, offload_dir=tmp_path)
    assert "MEMWISE_OFFLOAD_DIRECT=0" in model.module.offload.fallback_reason and plan_of(model).streamed > 0
    assert torch.equal(model.logits(PROMPT), memwise.load(directory).logits(PROMPT))


def test_a_refused_o_direct_read_falls_back_to_ordinary_reads(checkpoints, tmp_path):
    import mmap
    from memwise.offload.store import Region
    from memwise.offload.stream import AlignedBuffer, RegionReader
    path = memwise.load(checkpoints("gpt2"), max_memory="64GiB", offload_dir=tmp_path).module.offload.path
    reader = RegionReader(path)
    if not reader.direct:
        pytest.skip(f"no O_DIRECT here: {reader.fallback_reason}")
    memory = mmap.mmap(-1, 3 * 4096)
    misaligned = memoryview(memory)[1:1 + 8192]      # O_DIRECT refuses a buffer that is not block-aligned
    buffer = AlignedBuffer(misaligned, torch.frombuffer(misaligned, dtype=torch.uint8))
    data = reader.read_into(Region(4096, 8192, 0), buffer)
    assert not reader.direct and "O_DIRECT read failed" in reader.fallback_reason
    assert bytes(data) == path.read_bytes()[4096:4096 + 8192]
    reader.close()


def test_the_header_never_runs_into_layer_zero():
    import dataclasses
    from memwise.offload.store import _PREAMBLE, Region, StoreHeader, TensorSlot, layout
    slots = [TensorSlot(f"t{i}", "float32", (3, 5), 64 * i) for i in range(40)]
    header = layout(StoreHeader("m", "d" * 64, "f" * 64, "int8", "float32", slots, slots, [], None), 300, 4096 * 10**5, 4096)
    widest = dataclasses.replace(header, layers=[dataclasses.replace(r, crc32=2**32 - 1) for r in header.layers],
                                 rest=dataclasses.replace(header.rest, crc32=2**32 - 1))
    assert _PREAMBLE.size + len(widest.to_json()) <= header.layers[0].offset
    assert isinstance(header.rest, Region) and header.rest.offset == header.layers[0].offset + 300 * 4096 * 10**5


@pytest.mark.parametrize("layers", [1, 2, 5, 17, 24, 32, 61, 128])
def test_streamed_layers_spread_through_the_pass(layers):
    """Every count of resident layers keeps a set that contains the previous count's (a plan one
    layer apart reads one layer), and the streamed layers are spread: no stretch of consecutive
    streamed layers is longer than 3x what an even spacing needs (2x while half stay resident)."""
    from memwise.offload.stream import spread_resident, streaming_order
    assert sorted(streaming_order(layers)) == list(range(layers))
    sets = [spread_resident(layers, r) for r in range(layers + 1)]
    assert sets[0] == [] and sets[-1] == list(range(layers))
    assert all(len(s) == r and set(s) <= set(bigger) for r, (s, bigger) in enumerate(zip(sets, sets[1:])))
    for resident in range(1, layers):
        streamed = [i for i in range(layers) if i not in sets[resident]]
        longest = run = 0
        for i in range(layers):
            run = run + 1 if i in streamed else 0
            longest = max(longest, run)
        even = -(-len(streamed) // (resident + 1))
        assert longest <= (2 if resident >= len(streamed) else 3) * even, (resident, streamed)
    with pytest.raises(ValueError, match="resident layers should be in 0..5"):
        spread_resident(5, 6)
