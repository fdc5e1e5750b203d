"""Builds memwise's optional C extension (memwise.kernels._ternary); metadata lives in pyproject.toml.

The extension is optional: without a C compiler the install still succeeds and memwise runs its
PyTorch reference kernels. Instruction sets are chosen per function at run time, so there is no
-march=native here; OpenMP is used when the compiler has it and dropped when it does not.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = os.path.join("src", "memwise", "kernels")
SOURCE = os.path.join(KERNELS, "ternary.c")
# ternary.c includes these parts (one translation unit); a change in any of them rebuilds it.
PARTS = sorted(glob.glob(os.path.join(KERNELS, "*.h")))

# -ffp-contract=off: the activation quantization must round exactly like PyTorch, so no
# multiply-add may be fused.  -fno-math-errno lets sqrtf compile to one instruction.
UNIX_FLAGS = ["-O3", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-Wall"]
OPENMP_FLAGS = ["-fopenmp"]


class BuildExt(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if self.compiler.compiler_type == "msvc":
            ext.extra_compile_args = ["/O2", "/fp:precise", "/openmp"]
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
    ext_modules=[Extension("memwise.kernels._ternary", sources=[SOURCE], depends=PARTS, optional=True)],
    cmdclass={"build_ext": BuildExt},
)
