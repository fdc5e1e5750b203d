"""Tiny random Hugging Face checkpoints of the decoder families, built and saved by transformers itself."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

VOCAB = 96


def tiny_configs():
    """name -> transformers config of a tiny model; every structural variant the decoder family supports."""
    import transformers
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    rotary = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=64, **common)
    return {
        "gpt2": transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common),
        "opt": transformers.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                                      max_position_embeddings=64, **common),
        # opt-350m's shape: post-norm, no final norm, 16-wide embeddings projected in and out
        "opt-post": transformers.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                                           max_position_embeddings=64, do_layer_norm_before=False,
                                           word_embed_proj_dim=16, **common),
        "phi": transformers.PhiConfig(partial_rotary_factor=0.5, **rotary),
        "llama": transformers.LlamaConfig(num_key_value_heads=2, **rotary),
        "llama-linear": transformers.LlamaConfig(
            num_key_value_heads=2, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
            **rotary),
        "llama3": transformers.LlamaConfig(
            num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, **rotary),
        # a window shorter than the test prompts, so the window is exercised
        "mistral": transformers.MistralConfig(num_key_value_heads=2, sliding_window=6, **rotary),
    }


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights big enough that every tensor matters: from_config leaves biases at 0 and norms at 1,
    which would hide a bias or norm loaded into the wrong place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or ".ln_" in name):
                p.copy_(torch.rand(p.shape, generator=generator) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def build(name: str, directory: Path, **save_options) -> torch.nn.Module:
    """Save the tiny `name` model to `directory` (save_pretrained options pass through); the HF model, eval mode."""
    import transformers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_configs()[name]).eval()
    randomize(model)
    model.save_pretrained(directory, **save_options)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and spinning threads cost a lot on a shared machine.
    A test module that imports this fixture runs on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def checkpoint_builder(tmp_path_factory) -> Callable[[str], tuple[torch.nn.Module, Path]]:
    """name -> (the HF model, the directory of its tiny checkpoint), each built and saved on first use."""
    built = {}

    def get(name):
        if name not in built:
            directory = tmp_path_factory.mktemp(name)
            built[name] = (build(name, directory), directory)
        return built[name]
    return get


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> the directory of its tiny checkpoint, written once per module and on first use."""
    get = checkpoint_builder(tmp_path_factory)
    return lambda name: get(name)[1]
