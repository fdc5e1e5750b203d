"""Model the AVX2 GEMV's hot loop with llvm-mca: cycles and instructions per row-block (128 weights
of one weight row, 32 bytes of codes), as docs/matmul-free.md reports them.

Compiles the kernel extension's source to assembly with the package's flags, takes the function of
the 4-row GEMV tile (tile_avx2_gemv4), cuts out its steady-state loop (from the block that issues
the prefetches to the loop head's jump back to it, both prefetch streams on) and runs llvm-mca on
it for each CPU model asked for.

    python benchmarks/gemv_mca.py                      # znver3
    python benchmarks/gemv_mca.py --cpu znver3,znver2,skylake,haswell --show
    python benchmarks/gemv_mca.py --mca llvm-mca-19 --cpu znver3,znver4,znver5  # LLVM 19 knows Zen 4/5
    git show a5b66b4:src/memwise/kernels/csrc/products.h > /tmp/old.h   # before the 16-bit GEMV,
    python benchmarks/gemv_mca.py --products /tmp/old.h --function run_avx2  # inlined in run_avx2

For each CPU it also prints what the modeled loop would stream on one core at --ghz, against that
core's share of --gbps of read bandwidth over --cores cores (by default the issue's Zen 3 VM: 26
GB/s, 2 cores, 3.0 GHz): the GEMV can reach the bandwidth only where the loop outruns the share.

Needs gcc and llvm-mca; no C extension, no PyTorch.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "src" / "memwise" / "kernels" / "csrc"
FLAGS = ["-O3", "-std=c11", "-fno-math-errno", "-fopenmp"]  # setup.py's UNIX_FLAGS and OpenMP


def function_lines(asm: str, name: str) -> list[str]:
    lines = asm.split("\n")
    start = lines.index(f"{name}:")
    end = next(i for i in range(start, len(lines)) if lines[i].startswith(f"\t.size\t{name},"))
    return lines[start + 1:end]


def hot_loop(lines: list[str]) -> list[str]:
    """The instructions from the label of the first block that prefetches to the jump back to it."""
    first = next(i for i, line in enumerate(lines) if "prefetcht0" in line)
    top = max(i for i in range(first) if re.match(r"^\.L\w+:", lines[i]))
    label = lines[top][:-1]
    loop = []
    for line in lines[top + 1:]:
        if re.match(r"^\s*\.|^\.L\w+:", line):
            continue
        loop.append(line)
        if re.match(rf"^\s*j\w+\s+{re.escape(label)}$", line):
            return loop
    raise SystemExit(f"gemv_mca: no jump back to {label}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", default="znver3", help="comma-separated llvm-mca CPU models")
    parser.add_argument("--function", default="tile_avx2_gemv4")
    parser.add_argument("--products", type=Path, help="a products.h to model instead of the repository's")
    parser.add_argument("--show", action="store_true", help="print the loop's assembly")
    parser.add_argument("--mca", default="llvm-mca", help="the llvm-mca to run (e.g. llvm-mca-19)")
    parser.add_argument("--gbps", type=float, default=26.0, help="read bandwidth of the machine modeled")
    parser.add_argument("--cores", type=int, default=2, help="cores that share it")
    parser.add_argument("--ghz", type=float, default=3.0, help="clock of one core")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        csrc = Path(tmp) / "csrc"
        shutil.copytree(CSRC, csrc)
        if args.products:
            shutil.copy(args.products, csrc / "products.h")
        out = Path(tmp) / "k.s"
        subprocess.run(["gcc", *FLAGS, f"-I{sysconfig.get_paths()['include']}", f"-I{csrc}", "-S", "-o",
                        str(out), str(csrc / "ternary_module.c")], check=True)
        loop = hot_loop(function_lines(out.read_text(), args.function))
    text = "\n".join(loop) + "\n"
    if args.show:
        print(text)
    row_blocks = sum("vpmaddubsw" in line for line in loop) / 4
    spills = sum("(%rsp)" in line for line in loop)
    print(f"{args.function}: {len(loop)} instructions for {row_blocks:g} row-blocks, "
          f"{len(loop) / row_blocks:.1f} a row-block, {spills} stack accesses")
    share = args.gbps / args.cores / args.ghz  # bytes a cycle that one core may stream
    print(f"budget: {args.gbps:g} GB/s over {args.cores} cores at {args.ghz:g} GHz, {share:.2f} bytes a "
          f"cycle a core, {32 / share:.2f} cycles a row-block at 100% ({32 / share / 0.75:.2f} at 75%)")
    for cpu in args.cpu.split(","):
        mca = subprocess.run([args.mca, f"-mcpu={cpu}", "-iterations=100"], input=text,
                             capture_output=True, text=True, check=True).stdout
        cycles = int(re.search(r"Total Cycles:\s+(\d+)", mca).group(1)) / 100
        per_block = cycles / row_blocks
        core_gbps = 32 / per_block * args.ghz
        print(f"{cpu}: {cycles:.2f} cycles an iteration, {per_block:.2f} a row-block; one core could "
              f"stream {core_gbps:.1f} GB/s, {core_gbps / (share * args.ghz):.2f}x its share")
    return 0


if __name__ == "__main__":
    sys.exit(main())
