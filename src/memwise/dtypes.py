"""dtypes by name: the ones models are loaded in, and the ones safetensors files store. One table each."""
from __future__ import annotations

import torch

from memwise.errors import UnsupportedError

# What a model can be loaded and run in, under the names flags, records and weight sizes use.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Other spellings memwise.load and --dtype accept for them.
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# The "dtype" field of a safetensors header.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a name in DTYPES or ALIASES (or of a torch dtype memwise runs in)."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        dtype = str(dtype).removeprefix("torch.")
    name = ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise UnsupportedError(f"dtype {dtype!r} is not supported (use float32, bfloat16 or float16)")
    return DTYPES[name]
