"""Amounts of memory as people write them: '2GiB', '1.5 GB', '512M', '1e9' (K, M, G, T alone are
binary, like free -h). One parser for every flag that takes one (--budget, --max-memory)."""
from __future__ import annotations

import re

from memwise.errors import MemwiseError, shown

UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
         "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(text: str | int, what: str, error: type[MemwiseError] = MemwiseError) -> int:
    """Bytes of `text` (an int is bytes already); `error` with `what` named when it is not a size."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
        if not match or match.group(2) not in UNITS:
            raise error(f"{what} {shown(text)}: not an amount of memory (examples: 2GiB, 1.5GB, 512MiB)")
        value = float(match.group(1)) * UNITS[match.group(2)]
    if value < 1:
        raise error(f"{what} {shown(text)}: should be at least one byte")
    return int(value)
