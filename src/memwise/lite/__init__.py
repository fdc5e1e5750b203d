"""memwise.lite: ternary models (HGRN-Bit, BitNet b1.58) on a plain CPU with numpy and memwise's C extensions, no PyTorch.

    import memwise.lite
    model = memwise.lite.load("out/mmfree-370m-packed")     # a `memwise convert` output directory
    out = model.generate([[1, 450, 4996]], max_new_tokens=16)   # numpy int64 [1, 3 + 16]

It reads the packed checkpoint that `memwise convert` writes, into the same buffers the torch path
builds, and runs the same C code: every decode step is the fused step (one C call per token,
memwise/models/<family>/csrc). An HGRN-Bit prompt goes through the kernel library's multi-row
BitLinear layer by layer with numpy for the float work between the products (hgrn_forward.py), a
BitNet prompt too, its attention over the KV cache in C (bitnet_forward.py). Importing
torch alone takes about 200 MiB of memory that no runtime can give back; this runtime never
imports it (tests/test_lite.py checks that in a fresh process).

    packed_file.py    the packed safetensors file, parsed and read with numpy
    hgrn_weights.py   the model's buffers (codes in huge pages, float32 gains) and the C step's view
    hgrn_forward.py   prefill: many tokens at once
    bitnet_weights.py BitNet's buffers (stacked codes in huge pages, gains, the bf16 lm_head) and the C step's view
    bitnet_forward.py BitNet prefill: many tokens at once, keys and values into the cache the step reads
    bitnet_model.py   BitNet: decode through the fused step, a numpy KV cache
    sampling.py       greedy or sampled next tokens
    model.py          LiteModel: logits, stream, generate, generate_text
    loader.py         load(): the family from config.json, then its weights and model
    __main__.py       python -m memwise.lite DIR --prompt TEXT: a completion from the shell
"""
from memwise.lite.loader import load
from memwise.lite.model import LiteModel
from memwise.lite.sampling import Sampling

__all__ = ["LiteModel", "Sampling", "load"]
