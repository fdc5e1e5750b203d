"""memwise's quantized checkpoint of a decoder (`memwise convert SOURCE OUT --quantize SCHEME`).

A directory holding:

* `config.json`: the source's config plus `"memwise_quantization": {"scheme": S, "format_version": 3}`;
* `model.safetensors`: the state dict of the Decoder loaded with quantize=S, by memwise's own names
  (`layers.0.attn.qkv.codes`, `embed.weight` int8 with `embed.scale`, `lm_head.weight` int8, ...),
  each tensor exactly as the load-time quantization made it; a tied lm_head is the embedding's
  tensors, stored once under `embed.*`; its header metadata repeats the scheme and the format
  version (`memwise.scheme`, `memwise.format_version`);
* the source's tokenizer files.

Loading it builds the same quantized modules and copies the stored tensors into them, so its logits
are bit-identical to quantizing the source at load. Writing streams the source one tensor at a time
through the ordinary quantized load (no float copy of the model exists), then writes the quantized
tensors. FORMAT_VERSION grows when the layout of a scheme changes; a reader refuses newer versions,
version 1 (a float32 embedding beside an int8 copy for the tied lm_head), and version 2 of int4
(float32 group constants; version 3 made them float16), which it asks to convert again; int8 and
nf4 did not change in version 3, so it still reads their version 2.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from memwise.checkpoint import CheckpointReader
from memwise.errors import CheckpointError
from memwise.models.decoder.build import _build, load
from memwise.spec import ModelSpec

FORMAT_VERSION = 3
# The oldest version whose layout of the scheme this memwise still reads (int4 changed in 3).
OLDEST_READ = {"int8": 2, "nf4": 2, "int4": 3}
CONFIG_KEY = "memwise_quantization"
SCHEME_KEY, VERSION_KEY = "memwise.scheme", "memwise.format_version"


def write_quantized(spec: ModelSpec, reader: CheckpointReader, config: dict, out: Path, scheme: str) -> None:
    """Write the quantized checkpoint of `reader`'s weights into the (new, empty) directory `out`."""
    model = load(spec, reader, torch.float32, "cpu", quantize=scheme)
    tensors = {name: tensor.contiguous() for name, tensor in stored_tensors(model).items()}
    save_file(tensors, str(out / "model.safetensors"),
              metadata={SCHEME_KEY: scheme, VERSION_KEY: str(FORMAT_VERSION)})
    stored = {**config, CONFIG_KEY: {"scheme": scheme, "format_version": FORMAT_VERSION}}
    (out / "config.json").write_text(json.dumps(stored, indent=2) + "\n")


def stored_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each tensor once: a tied lm_head's tensors are the embedding's."""
    state = model.state_dict()
    if model.spec.tie_word_embeddings:
        for name, _ in model.embed.named_buffers(recurse=False):
            state.pop(f"lm_head.{name}", None)
    return state


def stored_scheme(config: dict, reader: CheckpointReader, where: str) -> str | None:
    """The scheme a memwise quantized checkpoint holds (None: an ordinary checkpoint), or one clear
    error when its metadata is missing, inconsistent or from a newer format version."""
    entry = config.get(CONFIG_KEY)
    header = reader.metadata
    if entry is None:
        if SCHEME_KEY in header:
            raise CheckpointError(f"{where}: no '{CONFIG_KEY}' entry, but {reader.directory} holds memwise "
                                  f"quantized weights ({header[SCHEME_KEY]}); the config of the quantized "
                                  "checkpoint is missing its metadata")
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("scheme"), str) \
            or not isinstance(entry.get("format_version"), int):
        raise CheckpointError(f"{where}: '{CONFIG_KEY}' should be {{\"scheme\": str, \"format_version\": int}}, "
                              f"found {entry!r}")
    if entry["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{where}: quantized checkpoint format version {entry['format_version']} is newer "
                              f"than this memwise reads ({FORMAT_VERSION}); upgrade memwise or convert again")
    if entry["format_version"] < 2:
        raise CheckpointError(f"{where}: quantized checkpoint format version {entry['format_version']} keeps a "
                              f"float32 embedding; this memwise reads version {FORMAT_VERSION} (an int8 "
                              "embedding): convert the source again")
    if entry["format_version"] < OLDEST_READ.get(entry["scheme"], 2):
        raise CheckpointError(f"{where}: quantized checkpoint format version {entry['format_version']} keeps int4's "
                              f"group constants in float32; this memwise reads version {FORMAT_VERSION} (float16 "
                              "constants): convert the source again")
    if header.get(SCHEME_KEY) != entry["scheme"] or header.get(VERSION_KEY) != str(entry["format_version"]):
        raise CheckpointError(f"{reader.directory}: the weights' metadata ({SCHEME_KEY}={header.get(SCHEME_KEY)!r}, "
                              f"{VERSION_KEY}={header.get(VERSION_KEY)!r}) is missing or does not match "
                              f"{where} (scheme {entry['scheme']!r}, version {entry['format_version']})")
    return entry["scheme"]


def load_quantized(spec: ModelSpec, reader: CheckpointReader, dtype: torch.dtype, device: torch.device,
                   scheme: str) -> torch.nn.Module:
    """The Decoder of a memwise quantized checkpoint: its modules built for `scheme`, then each stored
    tensor read and copied in, one at a time."""
    model = _build(spec, dtype, device, scheme)
    state = stored_tensors(model)
    missing = sorted(set(state) - set(reader.names()))
    extra = sorted(set(reader.names()) - set(state))
    if missing or extra:
        raise CheckpointError(f"{reader.directory}: the quantized checkpoint does not match its config "
                              f"({'missing ' + missing[0] if missing else 'unexpected ' + extra[0]})")
    with torch.no_grad():
        for name, target in state.items():
            tensor = reader.read(name)
            if tuple(tensor.shape) != tuple(target.shape) or tensor.is_floating_point() != target.is_floating_point():
                raise CheckpointError(f"{reader.directory}: tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                                      f"expected {target.dtype} {tuple(target.shape)}")
            target.copy_(tensor)
            del tensor
    model.tie_weights()
    return model
