"""estimate_finetune: formula behaviour, bad input, and one real training step measured in a subprocess."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import pytest

from memwise.errors import MemwiseError
from memwise.estimate.finetune import LORA_TARGETS, estimate_finetune, lora_parameters
from memwise.source import resolve_model

ROOT = Path(__file__).resolve().parents[1]


def spec(name: str = "preset:gpt2-medium"):
    return resolve_model(name).spec


def test_adamw_minus_sgd_is_exactly_the_state_bytes():
    s = spec()
    adam = estimate_finetune(s, optimizer="adamw", batch_size=2, seq_len=512)
    sgd = estimate_finetune(s, optimizer="sgd", batch_size=2, seq_len=512)
    trainable = adam.settings["trainable"]
    assert adam.parts["optimizer_states"] == 8 * trainable
    assert sgd.parts["optimizer_states"] == 0
    # at 1024 tokens AdamW's step buffers fit in the freed activations, so the states are the whole difference
    assert adam.parts["optimizer_step_temporaries"] == 0
    assert adam.predicted_peak_bytes - sgd.predicted_peak_bytes == 8 * trainable
    momentum = estimate_finetune(s, optimizer="sgd_momentum", batch_size=2, seq_len=512)
    assert momentum.parts["optimizer_states"] == 4 * trainable


def test_mixed_precision_adam_is_16_bytes_per_parameter_as_in_the_zero_paper():
    e = estimate_finetune(spec(), dtype="bfloat16")
    p = e.settings["parameters"]
    assert e.parts["weights"] + e.parts["gradients"] + e.parts["optimizer_states"] == 16 * p


def test_checkpointing_reduces_activations_and_batch_grows_them():
    s = spec()
    plain = estimate_finetune(s, seq_len=256, batch_size=2)
    ckpt = estimate_finetune(s, seq_len=256, batch_size=2, gradient_checkpointing=True)
    assert ckpt.parts["activations"] < plain.parts["activations"] / 2
    bigger = estimate_finetune(s, seq_len=256, batch_size=4)
    assert bigger.parts["activations"] > 1.9 * plain.parts["activations"]


def test_lora_freezes_the_base_and_qlora_shrinks_it():
    s = spec("preset:opt-350m")
    full = estimate_finetune(s, dtype="bfloat16")
    lora = estimate_finetune(s, method="lora", dtype="bfloat16")
    qlora = estimate_finetune(s, method="qlora")
    assert lora.settings["trainable"] == lora_parameters(s, 8, LORA_TARGETS["opt"])
    assert lora.parts["gradients"] == 4 * lora.settings["trainable"]
    assert lora.parts["gradients"] < full.parts["gradients"] / 100
    assert qlora.parts["weights"] < lora.parts["weights"] / 2
    assert lora.predicted_peak_bytes < full.predicted_peak_bytes


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft not installed")
@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_lora_parameter_count_equals_pefts(preset):
    import peft
    import torch
    import transformers

    s = spec(f"preset:{preset}")
    config = resolve_model(f"preset:{preset}").config
    fields = {k: v for k, v in config.items() if k != "model_type"}
    cls = {"gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[s.model_type]
    torch.manual_seed(0)
    model = peft.get_peft_model(cls[1](cls[0](**fields)), peft.LoraConfig(r=4))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate_finetune(s, method="lora", lora_rank=4).settings["trainable"] == trainable


def _largest_elements(s) -> int:
    from memwise.estimate.parallel import layer_linears

    return max([s.vocab_size * (s.embed_dim or s.hidden_size)] + [r * c for _, r, c in layer_linears(s)])


def test_cpu_adamw_temporaries_are_two_copies_of_the_largest_tensor_less_what_backward_returned():
    # torch's single-tensor AdamW (its foreach path is not taken for CPU tensors): sqrt(v) and its quotient
    import torch.utils._foreach_utils as foreach

    assert "cpu" not in foreach._get_foreach_kernels_supported_devices()
    s = spec("preset:opt-350m")
    largest = _largest_elements(s)
    assert largest == s.vocab_size * 512  # opt-350m's embedding is word_embed_proj_dim wide
    for tokens in (1, 2):
        e = estimate_finetune(s, batch_size=1, seq_len=tokens)
        acts = e.settings["activations_detail"]
        returned = acts["logits"] + acts["tied_embedding_gradient"]
        assert e.parts["optimizer_step_temporaries"] == 8 * largest - returned
    # at 256 tokens the logits buffers and the tied gradient the backward gave back exceed the step's
    assert estimate_finetune(s, batch_size=2, seq_len=128).parts["optimizer_step_temporaries"] == 0
    # LoRA: the largest tensor is an adapter matrix, and the base's size no longer matters
    lora = estimate_finetune(s, method="lora", lora_rank=4, batch_size=1, seq_len=1)
    assert lora.parts["optimizer_step_temporaries"] == max(0, 8 * 4 * 1024 - lora.settings["activations_detail"]["logits"])


def test_cpu_adamw8bit_temporaries_are_20_bytes_per_element_of_the_largest_tensor():
    for name in ("preset:opt-350m", "preset:gpt2-medium"):
        s = spec(name)
        e = estimate_finetune(s, optimizer="adamw8bit", batch_size=2, seq_len=128)
        assert e.parts["optimizer_step_temporaries"] == 20 * _largest_elements(s)


@pytest.mark.parametrize("name, outputs", [("preset:opt-350m", lambda h: 2 * h),   # q_proj, v_proj
                                           ("preset:gpt2-medium", lambda h: 3 * h)])  # c_attn's q, k, v
def test_lora_counts_peft_out_of_place_temporaries_per_adapted_output(name, outputs):
    from memwise.estimate.finetune import activation_bytes

    s = spec(name)
    h, b, t, r = s.hidden_size, 2, 128, 8
    full = estimate_finetune(s, batch_size=b, seq_len=t).settings["activations_detail"]["layers"]
    lora = estimate_finetune(s, method="lora", lora_rank=r, batch_size=b, seq_len=t)
    adapted = len(lora.settings["lora_targets"]) if s.model_type != "gpt2" else 1
    per_token = 4 * (r * adapted + 3 * outputs(h))  # saved rank-r intermediates + 3 freed outputs each
    assert lora.settings["activations_detail"]["layers"] - full == s.num_layers * b * t * per_token
    # the term scales with the tokens and the adapted outputs, not with the rank
    one = activation_bytes(s, 1, 1, 4, False, (r, adapted, outputs(h)))
    two = activation_bytes(s, 2, 1, 4, False, (r, adapted, 2 * outputs(h)))
    assert two["layers"] - 2 * one["layers"] == s.num_layers * 2 * 4 * 3 * outputs(h)


def test_zero_stages_shrink_per_device_memory():
    s, n = spec(), 8
    runs = {k: estimate_finetune(s, devices=n, strategy=k, seq_len=128) for k in ("dp", "zero1", "zero2", "zero3")}
    peaks = [runs[k].predicted_peak_bytes for k in ("dp", "zero1", "zero2", "zero3")]
    assert peaks == sorted(peaks, reverse=True)
    weights = runs["zero2"].parts["weights"]
    saved = runs["zero2"].predicted_peak_bytes - runs["zero3"].predicted_peak_bytes
    # zero3 also shards parameters: FSDP's SHARD_GRAD_OP holds the gathered weights and their shards,
    # FULL_SHARD only the shards, so it saves the whole weights, less what it gathers at a time: the root
    # unit (embeddings, final norm) and two layers (gpt2-medium's 48 MiB units: no heap retention term)
    from memwise.models import family_for

    count = family_for(s.model_type, "test").parameter_count
    layer = count(dataclasses.replace(s, num_layers=1)) - count(dataclasses.replace(s, num_layers=0))
    gathered = weights * (count(s) - s.num_layers * layer + 2 * layer) / count(s)
    assert saved == pytest.approx(weights - gathered, abs=4)
    assert runs["dp"].per_device is not None and estimate_finetune(s).per_device is None


def test_fsdp_heap_retention_counts_unit_buffers_up_to_glibcs_32_mib_mmap_ceiling():
    from memwise.estimate.parallel import heap_retention

    MiB = 1 << 20
    # gpt2 (h 768): a layer has 12 h^2 + 13 h = 7,087,872 parameters, 28,351,488 bytes in float32
    u = 4 * (12 * 768 * 768 + 13 * 768)
    assert u == 28_351_488
    assert heap_retention("zero3", u, u, 12) == 12 * 3 * 28_351_488  # two gathers and one gradient per unit
    assert heap_retention("zero2", u, u, 12) == 12 * 2 * 28_351_488  # last step's gather and the gradient
    assert heap_retention("zero3", 48 * MiB, 48 * MiB, 24) == 0        # mmapped, unmapped on free
    assert heap_retention("zero3", 48 * MiB, 20 * MiB, 24) == 24 * 20 * MiB
    assert heap_retention("zero3", 32 * MiB, 0, 2) == 2 * 2 * 32 * MiB   # the ceiling itself still counts
    assert heap_retention("dp", u, u, 12) == heap_retention("zero1", u, u, 12) == 0


def test_gpt2_sized_fsdp_adds_the_retained_units_and_gpt2_medium_does_not():
    from memwise.source import family_and_spec

    gpt2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
            "n_positions": 1024}
    _, small = family_and_spec(gpt2, "test")
    zero3 = estimate_finetune(small, devices=2, strategy="zero3", batch_size=2, seq_len=128)
    assert any("+973 MiB" in note for note in zero3.notes)   # 12 * 3 * 28,351,488 bytes
    medium = estimate_finetune(spec(), devices=2, strategy="zero3", batch_size=2, seq_len=128)
    assert not any("heap" in note for note in medium.notes)


def test_tensor_and_pipeline_parallel_split_the_model():
    s = spec()
    one = estimate_finetune(s, seq_len=128).predicted_peak_bytes
    for strategy in ("tp", "pp", "tp2xdp2"):
        four = estimate_finetune(s, devices=4, strategy=strategy, seq_len=128).predicted_peak_bytes
        assert four < one, strategy


@pytest.mark.parametrize("kwargs, words", [
    ({"method": "dora"}, "method"),
    ({"optimizer": "lion"}, "optimizer"),
    ({"strategy": "zero4", "devices": 2}, "strategy"),
    ({"devices": 0}, "devices"),
    ({"devices": 3, "strategy": "tp"}, "divisible"),
    ({"devices": 4, "strategy": "tp3xdp2"}, "tp x dp"),
    ({"dtype": "int8"}, "dtype"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_input_is_one_line_error(kwargs, words):
    with pytest.raises(MemwiseError) as info:
        estimate_finetune(spec(), **kwargs)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_qlora_of_a_non_decoder_family_and_a_config_lacking_sizes():
    with pytest.raises(MemwiseError, match="QLoRA"):
        estimate_finetune(spec("preset:tiny-mmfree"), method="qlora")
    broken = dataclasses.replace(spec(), intermediate_size=0)
    with pytest.raises(MemwiseError, match="intermediate_size"):
        estimate_finetune(broken)


def _plain_environment() -> dict[str, str]:
    """The child's environment without what other tests or tools may leave set (thread counts, debug
    and allocator switches): in the whole suite the same child once peaked 180 MiB higher than alone."""
    keep = ("PATH", "HOME", "PYTHONPATH", "LANG", "TMPDIR", "HF_HUB_OFFLINE")
    return {key: value for key, value in os.environ.items() if key in keep}
