"""Random HGRN-Bit checkpoints in the released layout (bf16 safetensors + config.json), for tests.

The tensor names and shapes are written out here from the HGRN-Bit notes, independently of
memwise.models.hgrn_bit, so that a wrong name or shape in the loader shows up as a failing test.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def hgrn_config(hidden_size: int = 64, num_hidden_layers: int = 3, vocab_size: int = 301,
                **overrides: Any) -> dict[str, Any]:
    """A config.json dict like the released ones (defaults spelled out), small enough for tests."""
    config = {
        "model_type": "hgrn_bit", "architectures": ["HGRNBitForCausalLM"],
        "vocab_size": vocab_size, "hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers,
        "num_heads": 1, "expand_ratio": 1, "hidden_ratio": 4, "intermediate_size": None,
        "attn_mode": "fused_recurrent", "use_short_conv": False, "conv_size": 4, "share_conv_kernel": True,
        "use_lower_bound": True, "hidden_act": "swish", "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    config.update(overrides)
    return config


def intermediate_size(config: dict[str, Any]) -> int:
    if config.get("intermediate_size") is not None:
        return config["intermediate_size"]
    return 256 * math.ceil(int(config["hidden_size"] * config["hidden_ratio"] * 2 / 3) / 256)


def random_latent_tensors(config: dict[str, Any], seed: int = 0,
                          dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Every tensor of the released layout, random. Norm gains vary around 1 and the lower bounds
    differ between layers, so a loader that ignores or swaps either produces different logits."""
    g = torch.Generator().manual_seed(seed)
    v, h, n_layers = config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]
    d = h * config.get("expand_ratio", 1)
    i = intermediate_size(config)
    head_dim = d // config.get("num_heads", 1)

    def latent(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=g) * 0.02).to(dtype)

    def gain(width: int) -> torch.Tensor:
        return (1 + 0.3 * torch.randn(width, generator=g)).to(dtype)

    t: dict[str, torch.Tensor] = {"model.embeddings.weight": torch.randn(v, h, generator=g).to(dtype)}
    if config.get("use_lower_bound", True):
        t["model.lower_bounds"] = (2 * torch.randn(n_layers, h, generator=g)).to(dtype)
    for n in range(n_layers):
        p = f"model.layers.{n}"
        t[f"{p}.attn_norm.weight"] = gain(h)
        for proj, rows, cols in (("i_proj", d, h), ("f_proj", d, h), ("g_proj", d, h), ("o_proj", h, d)):
            t[f"{p}.attn.{proj}.weight"] = latent(rows, cols)
            t[f"{p}.attn.{proj}.norm.weight"] = gain(cols)
        t[f"{p}.attn.g_norm.weight"] = gain(head_dim)
        t[f"{p}.mlp_norm.weight"] = gain(h)
        t[f"{p}.mlp.gate_proj.weight"] = latent(2 * i, h)
        t[f"{p}.mlp.gate_proj.norm.weight"] = gain(h)
        t[f"{p}.mlp.down_proj.weight"] = latent(h, i)
        t[f"{p}.mlp.down_proj.norm.weight"] = gain(i)
    t["model.norm.weight"] = gain(h)
    t["lm_head.weight"] = latent(v, h)
    t["lm_head.norm.weight"] = gain(h)
    return t


def write_hgrn_checkpoint(directory: Path, config: dict[str, Any] | None = None, seed: int = 0,
                          dtype: torch.dtype = torch.bfloat16, drop: tuple[str, ...] = (),
                          replace: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Write config.json + model.safetensors into `directory`; returns the tensors written.

    `drop` leaves tensors out and `replace` swaps in others, to make broken checkpoints.
    """
    config = config if config is not None else hgrn_config()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = random_latent_tensors(config, seed, dtype)
    for name in drop:
        del tensors[name]
    tensors.update(replace or {})
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return tensors
