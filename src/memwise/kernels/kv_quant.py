"""Quantized KV cache (kv_cache="int8" | "int4"): the block layout and its plain PyTorch reference.

FlexGen's group-wise scheme, along the head dimension. A cache of keys (or values) is a tensor
[..., D] (in the decoder: [batch, kv_heads, slots, head_dim]); each vector of D numbers is cut into
D / G groups of G = `group_size(D)` consecutive numbers: 64, or D when D is smaller, or else the
largest divisor of D below 64 (D = 80 -> 40), so that groups never need padding.

* "int8", symmetric: per group scale = absmax / 127 (float32; 1 for an all-zero group);
  code = clamp(round(x / scale), -127, 127), rounded half to even, int8. x ~ code * scale.
  Tensors: `codes` int8 [..., D]; `params` float32 [..., D / G, 1] (scale).
  Error bound: |x - x~| <= scale / 2 per element.
* "int4", asymmetric min/max: per group lo = min, hi = max, scale = (hi - lo) / 15 (1 when hi ==
  lo), code = clamp(round((x - lo) / scale), 0, 15). x ~ code * scale + lo.
  Tensors: `codes` uint8 [..., D / 2], byte j holding element 2j in its low nibble and element 2j + 1
  in its high one; `params` float32 [..., D / G, 2] (scale, lo) side by side.
  Error bound: |x - x~| <= scale / 2 per element.

Bytes per cached vector of D numbers: D + 4 D / G (int8: 1.0625 per number at G = 64) and
D / 2 + 8 D / G (int4: 0.625 per number at G = 64), against 4 (float32) or 2 (bfloat16).
Scales are float32 so that dequantization adds only its own rounding to the bound above.
"""
from __future__ import annotations

import torch

from memwise.errors import UnsupportedError

KV_SCHEMES = ("int8", "int4")
MAX_GROUP = 64

__all__ = ["KV_SCHEMES", "MAX_GROUP", "group_size", "codes_width", "params_width", "bytes_per_vector",
           "quantize_kv", "dequantize_kv", "error_bound"]


def group_size(head_dim: int) -> int:
    """G for vectors of `head_dim` numbers: the largest divisor of head_dim that is at most 64."""
    return next(g for g in range(min(MAX_GROUP, head_dim), 0, -1) if head_dim % g == 0)


def codes_width(scheme: str, head_dim: int) -> int:
    if scheme == "int4":
        if head_dim % 2:
            raise UnsupportedError(f"kv_cache='int4' packs two numbers per byte; head_dim {head_dim} is odd "
                                   "(use kv_cache='int8')")
        return head_dim // 2
    return head_dim


def params_width(scheme: str) -> int:
    return 2 if scheme == "int4" else 1


def bytes_per_vector(scheme: str, head_dim: int) -> int:
    """Bytes one cached key (or value) vector of one head takes: codes plus float32 group constants."""
    groups = head_dim // group_size(head_dim)
    return codes_width(scheme, head_dim) + 4 * params_width(scheme) * groups


def quantize_kv(x: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float [..., D] -> (codes, params) in the layout above."""
    d = x.shape[-1]
    g = group_size(d)
    grouped = x.float().reshape(*x.shape[:-1], d // g, g)
    if scheme == "int8":
        scale = grouped.abs().amax(dim=-1, keepdim=True) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round(grouped / scale).clamp_(-127, 127).to(torch.int8)
        return codes.reshape(x.shape), scale
    lo = grouped.amin(dim=-1, keepdim=True)
    scale = (grouped.amax(dim=-1, keepdim=True) - lo) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((grouped - lo) / scale).clamp_(0, 15).to(torch.uint8).reshape(*x.shape[:-1], d // 2, 2)
    packed = codes[..., 0] | (codes[..., 1] << 4)
    return packed, torch.cat((scale, lo), dim=-1)


def dequantize_kv(codes: torch.Tensor, params: torch.Tensor, scheme: str, dtype: torch.dtype = torch.float32,
                  out: torch.Tensor | None = None, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """(codes, params) -> [..., D] in `dtype` (computed in float32, then rounded once).

    `out` ([..., D] of `dtype`, any strides with a contiguous last dimension) receives the values when
    given, and `scratch` (uint8 [..., D / 2, 2], int4 only) the unpacked codes: a cache passes views
    of buffers it keeps, so that a decode step allocates nothing (fresh megabyte temporaries per
    layer cost page faults that outweigh the arithmetic)."""
    groups = params.shape[-2]
    d = codes.shape[-1] * (1 if scheme == "int8" else 2)
    if out is None:
        out = torch.empty((*codes.shape[:-1], d), dtype=dtype, device=codes.device)
    grouped_out = out.unflatten(-1, (groups, d // groups))
    if scheme == "int8":
        torch.mul(codes.unflatten(-1, (groups, d // groups)), params, out=grouped_out)
        return out
    if scratch is None:
        scratch = torch.empty((*codes.shape, 2), dtype=torch.uint8, device=codes.device)
    torch.bitwise_and(codes, 15, out=scratch[..., 0])
    torch.bitwise_right_shift(codes, 4, out=scratch[..., 1])
    values = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32, device=out.device)
    # float32 in place (vectorized) rather than one mixed uint8/float op, which measured 1.6x slower
    values.copy_(scratch.flatten(-2))
    values.unflatten(-1, (groups, d // groups)).mul_(params[..., :1]).add_(params[..., 1:])
    if values is not out:
        out.copy_(values)
    return out


def error_bound(x: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per element of x [..., D], half its group's quantization step: what the round trip may lose."""
    d = x.shape[-1]
    g = group_size(d)
    grouped = x.float().reshape(*x.shape[:-1], d // g, g)
    if scheme == "int8":
        step = grouped.abs().amax(dim=-1, keepdim=True) / 127.0
    else:
        step = (grouped.amax(dim=-1, keepdim=True) - grouped.amin(dim=-1, keepdim=True)) / 15.0
    return (step / 2).expand_as(grouped).reshape(x.shape)
