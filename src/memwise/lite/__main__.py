"""`python -m memwise.lite DIR --prompt TEXT`: stream a completion from a packed MatMul-free checkpoint
without torch (the `memwise` command imports torch; this one never does).

The text goes to stdout as it comes; tokens, TTFT, prefill and decode tok/s and the peak resident set
go to stderr after it. A user's mistake prints one line and exits 1; a usage error exits 2.
"""
from __future__ import annotations

import argparse
import sys
import time

from memwise.errors import MemwiseError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m memwise.lite",
                                description="Generate with a packed MatMul-free checkpoint, without torch.")
    p.add_argument("model", metavar="DIR", help="a packed checkpoint directory (`memwise convert` output) or hub id")
    p.add_argument("--prompt", required=True, metavar="TEXT")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--threads", type=int, metavar="N", help="threads of the C code (default: every CPU allowed)")
    return p


def peak_rss_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run(args: argparse.Namespace) -> None:
    import memwise.lite

    if args.max_new_tokens < 1 or (args.threads is not None and args.threads < 1):
        raise MemwiseError("--max-new-tokens and --threads must be >= 1")
    model = memwise.lite.load(args.model, threads=args.threads)
    ids = model.tokenizer.encode(args.prompt)
    text = model.tokenizer.decode_stream()
    start = time.perf_counter()
    first, count = None, 0
    for tokens in model.stream([ids], args.max_new_tokens, ignore_eos=args.ignore_eos, do_sample=args.sample,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed):
        first = first or time.perf_counter()
        count += 1
        sys.stdout.write(text.step(int(tokens[0])))
        sys.stdout.flush()
    end = time.perf_counter()
    sys.stdout.write("\n")
    ttft = (first or end) - start
    decode = f"{(count - 1) / (end - first):.1f}" if first and count > 1 and end > first else "-"
    print(f"{count} tokens · TTFT {ttft:.3f} s · prefill {len(ids) / ttft:.1f} tok/s · decode {decode} tok/s · "
          f"peak {peak_rss_mib() or 0:.0f} MiB (memwise.lite, {model.isa}, no torch)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
    except MemwiseError as e:
        print(f"memwise.lite: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
