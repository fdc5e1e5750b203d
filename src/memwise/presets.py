"""Named architectures with their exact Hugging Face configurations, for synthetic-weight models.

Speed and memory do not depend on weight values, so `memwise.load("preset:gpt2-medium")` builds the
real architecture with random weights and no download. Such models are marked synthetic everywhere.
"""
from __future__ import annotations

import copy
from typing import Any

from memwise.errors import SourceError

PRESET_PREFIX = "preset:"

_GPT2 = {"model_type": "gpt2", "activation_function": "gelu_new", "vocab_size": 50257, "n_positions": 1024,
         "layer_norm_epsilon": 1e-5, "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True}
_OPT = {"model_type": "opt", "activation_function": "relu", "vocab_size": 50272, "max_position_embeddings": 2048,
        "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1, "enable_bias": True,
        "_remove_final_layer_norm": False, "tie_word_embeddings": True}
_PHI = {"model_type": "phi", "hidden_act": "gelu_new", "vocab_size": 51200, "max_position_embeddings": 2048,
        "layer_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "qk_layernorm": False,
        "num_key_value_heads": None, "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": False}
_MMFREE = {"model_type": "hgrn_bit", "vocab_size": 32000, "num_heads": 1, "expand_ratio": 1, "hidden_ratio": 4,
           "intermediate_size": None, "attn_mode": "fused_recurrent", "use_short_conv": False,
           "use_lower_bound": True, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
           "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
# BitNetConfig's defaults (transformers 5) for every field but max_position_embeddings (4096: the
# model card's context length; BitNetConfig says 2048) and tie_word_embeddings (true in the released
# config.json: the checkpoint has no lm_head).
_BITNET = {"model_type": "bitnet", "hidden_act": "relu2", "vocab_size": 128256, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "attention_bias": False, "bos_token_id": 128000, "eos_token_id": 128001,
           "tie_word_embeddings": True}
# 1bitLLM's Llama-shaped BitNet b1.58 (their config.json: model_type llama + BitnetForCausalLM). Tied: the
# released checkpoints have no lm_head (their published sizes, 729M and 3.32B parameters, count the
# embedding once, and llama.cpp's converter has no output tensor for this architecture).
_ONE_BIT_LLM = {"model_type": "llama", "architectures": ["BitnetForCausalLM"], "hidden_act": "silu",
                "vocab_size": 32002, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
                "weight_bits": 1, "input_bits": 8, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32000,
                "tie_word_embeddings": True}
_LLAMA = {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}

PRESETS: dict[str, dict[str, Any]] = {
    # The comparison models of the public MatMul-free side-by-side test.
    "gpt2-medium": {**_GPT2, "n_embd": 1024, "n_layer": 24, "n_head": 16},
    "gpt2-xl": {**_GPT2, "n_embd": 1600, "n_layer": 48, "n_head": 25},
    "opt-350m": {**_OPT, "hidden_size": 1024, "ffn_dim": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "word_embed_proj_dim": 512, "do_layer_norm_before": False},
    "opt-2.7b": {**_OPT, "hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "word_embed_proj_dim": 2560, "do_layer_norm_before": True},
    # larger than this project's 24 GiB machine in float32 (26.8 GB): the offloading demonstration
    "opt-6.7b": {**_OPT, "hidden_size": 4096, "ffn_dim": 16384, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "word_embed_proj_dim": 4096, "do_layer_norm_before": True},
    "phi-1_5": {**_PHI, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                "num_attention_heads": 32, "partial_rotary_factor": 0.5},
    "phi-2": {**_PHI, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 32,
              "num_attention_heads": 32, "partial_rotary_factor": 0.4},
    # The released MatMul-free sizes (ridger/MMfreeLM-*).
    "mmfree-370m": {**_MMFREE, "hidden_size": 1024, "num_hidden_layers": 24},
    "mmfree-1.3b": {**_MMFREE, "hidden_size": 2048, "num_hidden_layers": 24},
    "mmfree-2.7b": {**_MMFREE, "hidden_size": 2560, "num_hidden_layers": 32},
    # microsoft/bitnet-b1.58-2B-4T
    "bitnet-2b-4t": {**_BITNET, "hidden_size": 2560, "intermediate_size": 6912, "num_hidden_layers": 30,
                     "num_attention_heads": 20, "num_key_value_heads": 5, "max_position_embeddings": 4096},
    "bitnet-b1.58-large": {**_ONE_BIT_LLM, "hidden_size": 1536, "intermediate_size": 4096,
                           "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16},
    "bitnet-b1.58-3b": {**_ONE_BIT_LLM, "hidden_size": 3200, "intermediate_size": 8640, "num_hidden_layers": 26,
                        "num_attention_heads": 32, "num_key_value_heads": 32},
    # Llama-architecture twins of the MatMul-free sizes, for engines without hgrn_bit (llama.cpp): every
    # matrix has the shape of the HGRN-Bit matrix in its place (q, k, v, o = i, f, g, o; gate and up =
    # gate_proj; down = down_proj; lm_head), so with ternary weights a token reads the same bytes of them.
    # head_dim 128; tests/test_peers.py checks the shapes against hgrn_bit's checkpoint_layout.
    "mmfree-370m-shapes": {**_LLAMA, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24,
                           "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 32000},
    "mmfree-1.3b-shapes": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
                           "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000},
    "mmfree-2.7b-shapes": {**_LLAMA, "hidden_size": 2560, "intermediate_size": 6912, "num_hidden_layers": 32,
                           "num_attention_heads": 20, "num_key_value_heads": 20, "vocab_size": 32000},
    # Tiny architectures for quick trials and tests.
    "tiny-gpt2": {**_GPT2, "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512, "n_positions": 256,
                  "bos_token_id": 0, "eos_token_id": 0},
    "tiny-llama": {**_LLAMA, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512},
    "tiny-mmfree": {**_MMFREE, "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 512},
    "tiny-bitnet": {**_BITNET, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
                    "max_position_embeddings": 256, "bos_token_id": 0, "eos_token_id": 0},
}

# Where the real weights of a preset's architecture live, for engines that can use them when cached.
HUB_IDS = {
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-xl": "openai-community/gpt2-xl",
    "opt-350m": "facebook/opt-350m",
    "opt-2.7b": "facebook/opt-2.7b",
    "opt-6.7b": "facebook/opt-6.7b",
    "phi-1_5": "microsoft/phi-1_5",
    "phi-2": "microsoft/phi-2",
    "mmfree-370m": "ridger/MMfreeLM-370M",
    "mmfree-1.3b": "ridger/MMfreeLM-1.3B",
    "mmfree-2.7b": "ridger/MMfreeLM-2.7B",
    "bitnet-2b-4t": "microsoft/bitnet-b1.58-2B-4T",
    "bitnet-b1.58-large": "1bitLLM/bitnet_b1_58-large",
    "bitnet-b1.58-3b": "1bitLLM/bitnet_b1_58-3B",
}


def is_preset(source: str) -> bool:
    return source.startswith(PRESET_PREFIX)


def preset_name(source: str) -> str:
    return source[len(PRESET_PREFIX):] if is_preset(source) else source


def preset_config(name: str) -> dict[str, Any]:
    """The Hugging Face config dict of a preset (a copy; accepts "NAME" or "preset:NAME")."""
    name = preset_name(name)
    if name not in PRESETS:
        raise SourceError(f"unknown preset {name!r} (available: {', '.join(PRESETS)})")
    return copy.deepcopy(PRESETS[name])
