"""Checks that a ctypes mirror of a C struct matches the struct an extension was built from.

A fused step passes its model to C as typed structs (design: what crosses the boundary is typed);
its extension reports each struct's size and field offsets, and this compares them with the mirrors.
A family's mirrors live beside its step (models/<family>/step_structs.py or fused_step.py), one
ctypes.Structure per C struct, field for field, with no torch: memwise.lite fills them too."""
from __future__ import annotations

import ctypes


def struct_mismatches(layout: dict[str, tuple[int, dict[str, int]]], mirrors: dict[str, type]) -> list[str]:
    """How `mirrors` (C struct name -> ctypes.Structure) differ from `layout` (C struct name -> (sizeof,
    {field: offset})) as the extension's struct_layout() reports it; empty when they agree."""
    found = []
    for name, (size, offsets) in layout.items():
        mirror = mirrors[name]
        if ctypes.sizeof(mirror) != size:
            found.append(f"sizeof({name}) is {size}, {mirror.__name__} has {ctypes.sizeof(mirror)}")
        fields = [field[0] for field in mirror._fields_]
        if fields != list(offsets):
            found.append(f"{name} has fields {list(offsets)}, {mirror.__name__} has {fields}")
        for field, offset in offsets.items():
            if field in fields and getattr(mirror, field).offset != offset:
                found.append(f"{name}.{field} is at {offset}, {mirror.__name__} has it at "
                             f"{getattr(mirror, field).offset}")
    return found


def require_agreement(extension: str, mismatches: list[str]) -> None:
    """Refuse to run a step whose extension (its module name) was built from other structs than its
    mirrors: the C code would read the model's pointers at the wrong offsets."""
    if mismatches:
        raise RuntimeError(f"{extension} was built from other structs than its ctypes mirrors "
                           f"(rebuild with python setup.py build_ext): {'; '.join(mismatches)}")
