"""The four quantized gpt2-medium cells of `memwise bench --suite peers` in one run, without the suite's
other nine: memwise int8 / llama.cpp Q8_0 and memwise int4 / llama.cpp Q4_0, batch 1, 128 + 128
tokens, each cell in its own process as the bench runs it, then the bench's table and the two ratios.

    PYTHONPATH=src python benchmarks/quant_peers.py --runs 3 [--threads 2] [--out DIR]

Ratios mean something only within one run; on a shared machine, say its load average with them.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from memwise.bench.machine import machine_metadata, read_bandwidth
from memwise.bench.report import print_table, write_outputs
from memwise.bench.runner import RunOptions, add_decode_ceilings, run_matrix
from memwise.bench.suites import PEERS_CELLS, Matrix

PAIRS = (("int8", "q8_0"), ("int4", "q4_0"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, help="CPU threads per cell (default: the bench's)")
    parser.add_argument("--out", type=Path, help="write the bench's results files here")
    args = parser.parse_args()
    cells = [c for c in PEERS_CELLS if c[0] == "gpt2-medium" and c[3] in {s for pair in PAIRS for s in pair}]
    matrix = Matrix(models=[c[0] for c in cells], explicit=cells, runs=args.runs, suite="peers")
    metadata = machine_metadata(f"benchmarks/quant_peers.py --runs {args.runs}"
                                + (f" --threads {args.threads}" if args.threads else ""))
    metadata.update(suite="peers", sweep=None, threads=args.threads, device="cpu", runs=args.runs, warmup=1,
                    busy_cores=None, load_average_before=os.getloadavg())
    bandwidth, method = read_bandwidth("cpu")
    records = run_matrix(matrix, RunOptions(threads=args.threads), on_done=lambda i, n, r: print(
        f"cell {i + 1}/{n}: {r['engine']} {r.get('quantize') or r['dtype']}: {r['status']}, decode "
        f"{r.get('decode_tok_s')} tok/s, load average {os.getloadavg()[0]:.1f}", flush=True))
    metadata.update(memory_bandwidth_bytes_per_s=bandwidth, memory_bandwidth_method=method,
                    load_average_after=os.getloadavg())
    add_decode_ceilings(records, bandwidth)
    print_table(records, metadata)
    speed = {r.get("quantize") or r["dtype"]: r.get("decode_tok_s") for r in records}
    for ours, theirs in PAIRS:
        if speed.get(ours) and speed.get(theirs):
            print(f"memwise {ours} / llama.cpp {theirs.upper()}: {speed[ours] / speed[theirs]:.2f}x decode "
                  f"({speed[ours]:.1f} vs {speed[theirs]:.1f} tok/s)")
    print(f"load average before {metadata['load_average_before']}, after {metadata['load_average_after']}")
    if args.out is not None:
        write_outputs(args.out, metadata, records)


if __name__ == "__main__":
    main()
