"""memwise.lite: MatMul-free (HGRN-Bit) models on a plain CPU with numpy and memwise's C extensions, no PyTorch.

    import memwise.lite
    model = memwise.lite.load("out/mmfree-370m-packed")     # a `memwise convert` output directory
    out = model.generate([[1, 450, 4996]], max_new_tokens=16)   # numpy int64 [1, 3 + 16]

It reads the packed checkpoint that `memwise convert` writes, into the same buffers the torch path
builds, and runs the same C code: every decode step is the fused step (one C call per token,
memwise/models/hgrn_bit/csrc), and a prompt goes through the kernel library's multi-row BitLinear
layer by layer with numpy for the float work between the products (hgrn_forward.py). Importing
torch alone takes about 200 MiB of memory that no runtime can give back; this runtime never
imports it (tests/test_lite.py checks that in a fresh process).

    packed_file.py    the packed safetensors file, parsed and read with numpy
    hgrn_weights.py   the model's buffers (codes in huge pages, float32 gains) and the C step's view
    hgrn_forward.py   prefill: many tokens at once
    sampling.py       greedy or sampled next tokens
    model.py          load() and LiteModel: logits, stream, generate, generate_text
    __main__.py       python -m memwise.lite DIR --prompt TEXT: a completion from the shell
"""
from memwise.lite.model import LiteModel, load
from memwise.lite.sampling import Sampling

__all__ = ["LiteModel", "Sampling", "load"]
