"""Builds memwise's optional C extensions; metadata lives in pyproject.toml.

* memwise.kernels._ternary: the model-free kernel library (memwise/kernels/csrc).
* memwise.kernels._int8: the library's int8-weight (W8A8) products, from the same folder.
* memwise.kernels._fourbit: the 4-bit weight products (int4 W4A8, nf4), from the same folder.
* memwise.kernels._bf16, memwise.kernels._dense: bfloat16- and float32-weight products for decode.
* memwise.models.hgrn_bit._step: the fused HGRN-Bit decode step, which compiles the library's
  headers into its own translation unit so that its per-instruction-set code inlines them.
* memwise.models.bitnet._step: the fused BitNet decode step, built the same way.
* memwise.models.decoder._step: the fused decode step of int8 / int4 conventional decoders, likewise.

Both are optional: without a C compiler the install still succeeds and memwise runs its PyTorch
reference kernels. Instruction sets are chosen per function at run time, so there is no
-march=native here; OpenMP is used when the compiler has it and dropped when it does not. No
PyTorch headers are needed.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS_C = os.path.join("src", "memwise", "kernels", "csrc")
HGRN_C = os.path.join("src", "memwise", "models", "hgrn_bit", "csrc")
BITNET_C = os.path.join("src", "memwise", "models", "bitnet", "csrc")
DECODER_C = os.path.join("src", "memwise", "models", "decoder", "csrc")
LIBRARY_HEADERS = sorted(glob.glob(os.path.join(KERNELS_C, "*.h")))

# -fno-math-errno lets sqrtf compile to one instruction.  -Wno-unused-function: each extension
# compiles the whole header library and uses part of it.
UNIX_FLAGS = ["-O3", "-std=c11", "-fno-math-errno", "-Wall", "-Wno-unused-function"]
OPENMP_FLAGS = ["-fopenmp"]


class BuildExt(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if self.compiler.compiler_type == "msvc":
            ext.extra_compile_args = ["/O2", "/openmp"]
            super().build_extension(ext)
            return
        ext.extra_compile_args = UNIX_FLAGS + OPENMP_FLAGS
        ext.extra_link_args = OPENMP_FLAGS
        try:
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001 - any compiler or linker failure
            # Compilers without OpenMP (Apple clang without libomp): build single-threaded.
            print(f"memwise: building {ext.name} without OpenMP ({error})", file=sys.stderr)
            ext.extra_compile_args = UNIX_FLAGS
            ext.extra_link_args = []
            super().build_extension(ext)


setup(
    ext_modules=[
        Extension("memwise.kernels._ternary", sources=[os.path.join(KERNELS_C, "ternary_module.c")],
                  include_dirs=[KERNELS_C], depends=LIBRARY_HEADERS, optional=True),
        Extension("memwise.kernels._int8", sources=[os.path.join(KERNELS_C, "int8_module.c")],
                  include_dirs=[KERNELS_C], depends=LIBRARY_HEADERS, optional=True),
        Extension("memwise.kernels._bf16", sources=[os.path.join(KERNELS_C, "bf16_module.c")],
                  include_dirs=[KERNELS_C], depends=LIBRARY_HEADERS, optional=True),
        Extension("memwise.kernels._dense", sources=[os.path.join(KERNELS_C, "dense_module.c")],
                  include_dirs=[KERNELS_C], depends=LIBRARY_HEADERS, optional=True),
        Extension("memwise.kernels._fourbit", sources=[os.path.join(KERNELS_C, "fourbit_module.c")],
                  include_dirs=[KERNELS_C], depends=LIBRARY_HEADERS, optional=True),
        Extension("memwise.models.hgrn_bit._step", sources=[os.path.join(HGRN_C, "step_module.c")],
                  include_dirs=[KERNELS_C, HGRN_C],
                  depends=LIBRARY_HEADERS + sorted(glob.glob(os.path.join(HGRN_C, "*.h"))), optional=True),
        Extension("memwise.models.bitnet._step", sources=[os.path.join(BITNET_C, "step_module.c")],
                  include_dirs=[KERNELS_C, BITNET_C],
                  depends=LIBRARY_HEADERS + sorted(glob.glob(os.path.join(BITNET_C, "*.h"))), optional=True),
        Extension("memwise.models.decoder._step", sources=[os.path.join(DECODER_C, "step_module.c")],
                  include_dirs=[KERNELS_C, DECODER_C],
                  depends=LIBRARY_HEADERS + sorted(glob.glob(os.path.join(DECODER_C, "*.h"))), optional=True),
    ],
    cmdclass={"build_ext": BuildExt},
)
