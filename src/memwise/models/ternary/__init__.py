"""What the ternary families (hgrn_bit, bitnet) share: not a family, the packed-checkpoint machinery.

    packed_format.py  the packed checkpoint `memwise convert` writes: constants, reading, checks
    weights.py        weight sources: latent matrices ternarized once, packed ones, random codes
    writer.py         writing a packed checkpoint, tensor by tensor

A family describes its checkpoint as a list of TensorSlots (name, shape, ternary or not); everything
here works from that list, so the packed format is the same file for every ternary family.
"""
from memwise.models.ternary.packed_format import (PACKED_FORMAT, PACKED_FORMAT_VERSION, PACKED_SUFFIX, SCALE_SUFFIX,
                                                  TensorSlot, check_packed_codes, is_packed, read_packed)
from memwise.models.ternary.weights import (LatentCheckpoint, PackedCheckpoint, RandomWeights, WeightSource,
                                            random_ternary, ternarize)
from memwise.models.ternary.writer import write_packed

__all__ = ["PACKED_FORMAT", "PACKED_FORMAT_VERSION", "PACKED_SUFFIX", "SCALE_SUFFIX", "LatentCheckpoint",
           "PackedCheckpoint", "RandomWeights", "TensorSlot", "WeightSource", "check_packed_codes", "is_packed",
           "random_ternary", "read_packed", "ternarize", "write_packed"]
