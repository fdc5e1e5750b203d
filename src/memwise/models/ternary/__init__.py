"""What the ternary families (hgrn_bit, bitnet) share: not a family, the packed-checkpoint machinery.

    packed_format.py  the packed checkpoint `memwise convert` writes: constants, reading, checks
    weights.py        weight sources: latent matrices ternarized once, packed ones, random codes
    writer.py         writing a packed checkpoint, tensor by tensor

A family describes its checkpoint as a list of TensorSlots (name, shape, ternary or not); everything
here works from that list, so the packed format is the same file for every ternary family.
"""
import importlib

from memwise.models.ternary.packed_format import (PACKED_FORMAT, PACKED_FORMAT_VERSION, PACKED_SUFFIX, SCALE_SUFFIX,
                                                  TensorSlot, check_packed_codes, is_packed, read_packed)

# weights.py and writer.py need torch: imported on first use, so that the packed format's names
# (above) reach the torch-free runtime without it.
_LAZY = {**dict.fromkeys(("LatentCheckpoint", "PackedCheckpoint", "RandomWeights", "WeightSource", "random_ternary",
                          "ternarize"), "memwise.models.ternary.weights"),
         "write_packed": "memwise.models.ternary.writer"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PACKED_FORMAT", "PACKED_FORMAT_VERSION", "PACKED_SUFFIX", "SCALE_SUFFIX", "LatentCheckpoint",
           "PackedCheckpoint", "RandomWeights", "TensorSlot", "WeightSource", "check_packed_codes", "is_packed",
           "random_ternary", "read_packed", "ternarize", "write_packed"]
