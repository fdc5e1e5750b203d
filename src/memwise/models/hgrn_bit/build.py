"""Building an HGRNBitForCausalLM from a weight source: a checkpoint (latent or packed) or random codes."""
from __future__ import annotations

import torch

from memwise.checkpoint import CheckpointReader
from memwise.dtypes import parse_dtype
from memwise.errors import ConfigError, UnsupportedError
from memwise.kernels.packed import padded_cols
from memwise.models.hgrn_bit.config import recurrence_width
from memwise.models.hgrn_bit.layout import checkpoint_layout, latent_name, packed_bytes
from memwise.models.hgrn_bit.modules import GLU, MLGRU, BitLinear, Gain, HGRNBitBlock, HGRNBitForCausalLM
from memwise.models.ternary.packed_format import PACKED_SUFFIX, is_packed
from memwise.models.ternary.weights import LatentCheckpoint, allocate_codes, PackedCheckpoint, RandomWeights, WeightSource
from memwise.spec import ModelSpec


def check_layout(spec: ModelSpec, reader: CheckpointReader, where: str, packed: bool) -> None:
    """Config fields that decide tensor shapes, checked against layer 0 and the layer count.

    A mismatch here is the config's fault more often than the tensors', so it is reported as a
    ConfigError naming the field, before any tensor is read.
    """
    config_path = f"{where}/config.json"
    names = set(reader.names())
    h, d = spec.hidden_size, recurrence_width(spec)
    i_proj = "model.layers.0.attn.i_proj.weight" + (PACKED_SUFFIX if packed else "")
    if i_proj in names:
        rows = reader.shape(i_proj)[0]
        if rows != d:
            raise ConfigError(f"{config_path}: expand_ratio {spec.expand_ratio} gives a recurrence width of "
                              f"hidden_size * expand_ratio = {d}, but '{i_proj}' has {rows} rows "
                              f"(expand_ratio {rows / h:g} would fit)")
    g_norm = "model.layers.0.attn.g_norm.weight"
    if g_norm in names and reader.shape(g_norm) != (d // spec.num_heads,):
        found = reader.shape(g_norm)
        fits = f" (num_heads {d // found[0]} would fit)" if len(found) == 1 and found[0] and d % found[0] == 0 else ""
        raise ConfigError(f"{config_path}: num_heads {spec.num_heads} gives a g_norm of width {d // spec.num_heads}, "
                          f"but '{g_norm}' has shape {list(found)}{fits}")
    reader.check_layer_count(spec.num_layers, config_path)
    conv = sorted(n for n in names if "conv1d" in n)
    if conv:
        raise ConfigError(f"{config_path}: use_short_conv is false, but the checkpoint has short-convolution "
                          f"tensors (e.g. '{conv[0]}')")


def _check_dtype(dtype: torch.dtype | str) -> None:
    if parse_dtype(dtype) is not torch.float32:
        raise UnsupportedError(f"hgrn_bit computes in float32 (its weights are 2-bit ternary codes); "
                               f"dtype {str(dtype).removeprefix('torch.')} is not supported")


def _build(spec: ModelSpec, source: WeightSource, device: torch.device) -> HGRNBitForCausalLM:
    """The model's modules over the tensors of checkpoint_layout (names and shapes come from there)."""
    layout = {slot.name: slot for slot in checkpoint_layout(spec)}
    codes, offsets = allocate_codes(list(layout.values()), device)

    def tensor(name: str) -> torch.Tensor:
        return source.tensor(name, layout[name].shape).to(device)

    def gain(name: str) -> Gain:
        return Gain(tensor(name).to(torch.float32))

    def bitlinear(prefix: str) -> BitLinear:
        rows, cols = layout[f"{prefix}.weight"].shape
        start = offsets[f"{prefix}.weight"]
        out = codes[start:start + packed_bytes(rows, cols)].view(rows, padded_cols(cols) // 4)
        weight = source.matrix(f"{prefix}.weight", cols, out)
        return BitLinear(weight, gain(f"{prefix}.norm.weight").weight, spec.norm_eps)

    embeddings = source.tensor("model.embeddings.weight", layout["model.embeddings.weight"].shape)
    if embeddings.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        embeddings = embeddings.float()
    lower_bounds = None
    if spec.use_lower_bound:
        lb = tensor("model.lower_bounds").to(torch.float32).softmax(dim=0)
        lower_bounds = lb.cumsum(dim=0) - lb[0]
    layers = []
    for n in range(spec.num_layers):
        p = f"model.layers.{n}"
        attn = MLGRU(bitlinear(f"{p}.attn.i_proj"), bitlinear(f"{p}.attn.f_proj"), bitlinear(f"{p}.attn.g_proj"),
                     gain(f"{p}.attn.g_norm.weight"), bitlinear(f"{p}.attn.o_proj"), spec.num_heads, spec.norm_eps)
        mlp = GLU(bitlinear(f"{p}.mlp.gate_proj"), bitlinear(f"{p}.mlp.down_proj"))
        layers.append(HGRNBitBlock(gain(f"{p}.attn_norm.weight"), attn, gain(f"{p}.mlp_norm.weight"), mlp,
                                   spec.norm_eps))
    return HGRNBitForCausalLM(spec, embeddings.to(device), lower_bounds, layers, gain("model.norm.weight"),
                              bitlinear("lm_head")).eval()


def load(spec: ModelSpec, reader: CheckpointReader, dtype: torch.dtype | str = torch.float32,
         device: torch.device | str = "cpu") -> HGRNBitForCausalLM:
    """The model from a latent (released) or packed (memwise convert) checkpoint, one tensor at a time."""
    _check_dtype(dtype)
    where = str(reader.directory)
    packed = is_packed(reader)
    check_layout(spec, reader, where, packed)
    with torch.no_grad():
        return _build(spec, weight_source(spec, reader), torch.device(device))


def weight_source(spec: ModelSpec, reader: CheckpointReader) -> WeightSource:
    """The checkpoint as a source of packed matrices: packed as written, or latent quantized once."""
    if is_packed(reader):
        return PackedCheckpoint(reader)
    return LatentCheckpoint(reader, lambda name: latent_name(spec, reader, name))


def synthetic(spec: ModelSpec, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu",
              seed: int = 0) -> HGRNBitForCausalLM:
    """Random ternary codes generated packed (no latent matrices), scales ~0.02, bf16 embedding."""
    _check_dtype(dtype)
    with torch.no_grad():
        return _build(spec, RandomWeights(seed, embeddings=("model.embeddings.weight",),
                                          zeros=("model.lower_bounds",)), torch.device(device))
