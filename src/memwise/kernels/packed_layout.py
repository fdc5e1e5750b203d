"""The sizes of the 2-bit packed ternary format (its byte layout is documented in memwise.kernels.packed).

Plain numbers without torch, so that code which only reads or points at packed codes (the torch-free
runtime, memwise.lite) shares them with the kernels and the checkpoint writer.
"""
from __future__ import annotations

BLOCK = 128                 # weights per packed block
BLOCK_BYTES = BLOCK // 4    # 32
FORMAT_VERSION = 1
SCALE_FLOOR = 1e-5          # m = max(mean|W|, 1e-5); also the floor of max|y| for activations


def padded_cols(cols: int) -> int:
    """K rounded up to whole blocks: the columns a packed row holds."""
    return -(-cols // BLOCK) * BLOCK
