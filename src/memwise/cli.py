"""The `memwise` command: a thin layer over the library. User mistakes print one line and exit 1."""
from __future__ import annotations

import argparse
import resource
import sys
import time

from memwise.cli_support import interrupted, one_line_errors, run_command


def main(argv: list[str] | None = None) -> int:
    try:    # building the parser imports torch: seconds in which a Ctrl-C is likely
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt as e:
        return interrupted(e)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(args)


def build_parser() -> argparse.ArgumentParser:
    from memwise import __version__
    parser = argparse.ArgumentParser(prog="memwise", description="Run LLMs in the memory you have, and measure what it costs.")
    parser.add_argument("--version", action="version", version=f"memwise {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an unexpected error (also MEMWISE_DEBUG=1)")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    gen = sub.add_parser("generate", help="stream a completion, then print speed and peak memory",
                         description="Generate text from a prompt. SOURCE: a model directory, a hub id, or preset:NAME.")
    gen.add_argument("source", metavar="SOURCE")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt")
    prompt.add_argument("--prompts-file", metavar="FILE", help="one prompt per line, generated as one batch "
                        "(with --max-memory: the plan's block schedule, docs/offload-plan.md)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--quantize", metavar="SCHEME", help="store the decoder layers' weights in SCHEME (int8, int4, nf4)")
    gen.add_argument("--kv-cache", metavar="SCHEME", help="store the KV cache in SCHEME (int8, int4)")
    _add_load_flags(gen)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--no-repeat-ngram-size", type=int, default=0)
    gen.add_argument("--min-new-tokens", type=int, default=0)
    gen.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens tokens")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when TEXT is generated (repeatable)")
    gen.add_argument("--max-memory", metavar="BYTES", help="keep the weights within BYTES (2GiB, 512MiB): the "
                     "layers that do not fit stream from --offload-dir (docs/offload.md)")
    gen.add_argument("--offload-dir", metavar="DIR", help="where --max-memory keeps the offloaded weights")
    gen.add_argument("--force", action="store_true",
                     help="run even if the predicted peak memory exceeds the memory available now")
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="show a model's spec, parameter count and weight sizes (no weights are loaded)")
    info.add_argument("source", metavar="SOURCE")
    info.add_argument("--revision")
    info.set_defaults(func=cmd_info)

    conv = sub.add_parser("convert", help="write a MatMul-free checkpoint packed at 2 bits per weight, or a "
                                          "decoder's quantized checkpoint (--quantize)")
    conv.add_argument("source", metavar="SOURCE")
    conv.add_argument("out", metavar="OUT", help="output directory (must not exist yet)")
    conv.add_argument("--quantize", metavar="SCHEME", help="conventional decoders: write weights quantized in "
                                                           "SCHEME (int8, int4, nf4)")
    conv.set_defaults(func=cmd_convert)

    serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (docs/serve.md)")
    serve.add_argument("source", metavar="SOURCE")
    serve.add_argument("--quantize", metavar="SCHEME", help="store the decoder layers' weights in SCHEME (int8, int4, nf4)")
    _add_load_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    serve.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 429")
    serve.add_argument("--max-step-tokens", type=int, default=128, metavar="N",
                       help="tokens one engine step computes: a decode token per running sequence, then "
                            "chunks of newcomers' prompts (default 128; 0: whole prompts at once)")
    serve.add_argument("--api-key", help="require Authorization: Bearer KEY")
    serve.add_argument("--served-name", help="the model name clients send (default SOURCE)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--ray", action="store_true",
                       help="run as Ray Serve replicas on a local Ray instance (the serve-ray extra)")
    serve.add_argument("--replicas", type=int, default=1, help="with --ray: replicas, each its own engine")
    serve.set_defaults(func=cmd_serve)

    from memwise.quality.compare import add_parser as add_eval_quant_parser
    evalq = add_eval_quant_parser(sub)

    from memwise.bench.cli import add_parser as add_bench_parser
    add_bench_parser(sub)
    from memwise.estimate.cli import add_parser as add_estimate_parser
    add_estimate_parser(sub)
    from memwise.offload.plan_cli import add_parser as add_plan_parser
    add_plan_parser(sub)
    for p in (parser, gen, info, conv, evalq, serve):
        one_line_errors(p)
    return parser


def _add_load_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--threads", type=_threads, help="CPU threads (default: torch's choice)")


def _threads(text: str) -> int:
    """A usage error (exit 2) for --threads 0 or less, which torch.set_num_threads would raise on."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.force:
        from memwise.estimate.gate import memory_checks_off
        with memory_checks_off():
            return _generate(args)
    _gate_generate(args)
    return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    import memwise
    from memwise.cli_prompts import generate_prompts, read_prompts
    prompts = read_prompts(args.prompts_file) if args.prompts_file is not None else None
    model = memwise.load(args.source, dtype=args.dtype, device=args.device, revision=args.revision,
                         quantize=args.quantize, kv_cache=args.kv_cache, max_memory=args.max_memory,
                         offload_dir=args.offload_dir)
    if prompts is not None:
        _describe_offload(model)
        return generate_prompts(args, model, prompts)
    ids, mask = model.encode_batch([args.prompt])
    steps = model.stream(ids, args.max_new_tokens, mask, do_sample=args.sample, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                         repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                         min_new_tokens=args.min_new_tokens, ignore_eos=args.ignore_eos, stop_strings=tuple(args.stop))
    # After stream() has checked the options, so that a bad option is the only line on stderr.
    _describe_offload(model)
    if model.synthetic:
        print(f"[{args.source}: synthetic random weights, the text is meaningless]", file=sys.stderr)
    from memwise.tokenizer import decode_stream
    text_stream = decode_stream(model.tokenizer)   # each token's new text; holds back a split character
    n = 0
    start = time.perf_counter()
    ttft = None
    for token in steps:
        if ttft is None:
            ttft = time.perf_counter() - start
        n += 1
        text = text_stream.step(int(token[0]))
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
    total = time.perf_counter() - start
    decode_s = total - (ttft or 0.0)
    decode_rate = f"{(n - 1) / decode_s:.1f}" if n > 1 and decode_s > 0 else "n/a"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print()
    print(f"[{n} tokens | TTFT {ttft or 0:.3f} s | prefill {ids.shape[1] / (ttft or 1):.1f} tok/s | "
          f"decode {decode_rate} tok/s | peak RSS {peak / 2**30:.2f} GiB]")
    return 0


def _describe_offload(model) -> None:
    offload = getattr(model.module, "offload", None)
    if offload is not None:
        direct = "O_DIRECT reads" if offload.fallback_reason is None else f"ordinary reads: {offload.fallback_reason}"
        print(f"[offloaded to {offload.path}: {offload.plan.describe()}; {direct}]", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    from memwise.serve.cli import cmd_serve as serve
    return serve(args)


def _gate_generate(args: argparse.Namespace) -> None:
    """Refuse a generation predicted not to fit, before loading. The prompt is not tokenized yet: its
    UTF-8 bytes (plus a BOS) bound its token count for byte and BPE tokenizers alike."""
    from memwise.bench.memory import current_rss_bytes
    from memwise.estimate import estimate_inference
    from memwise.estimate.gate import check_predicted_peak, gate_disabled
    if gate_disabled() or args.max_memory is not None:
        return      # an offloaded run is held to its own budget (memwise.offload.budget)
    from memwise.cli_prompts import read_prompts
    prompts = read_prompts(args.prompts_file) if args.prompts_file is not None else [args.prompt]
    prediction = estimate_inference(args.source, batch_size=len(prompts),
                                    prompt_tokens=max(len(p.encode()) for p in prompts) + 1,
                                    new_tokens=max(args.max_new_tokens, 1), dtype=args.dtype,
                                    quantize=args.quantize, device=args.device, kv_cache=args.kv_cache)
    check_predicted_peak(f"generating {args.max_new_tokens} tokens with {args.source}", prediction, args.device,
                         resident_now=current_rss_bytes())


def cmd_info(args: argparse.Namespace) -> int:
    from memwise.info import describe
    from rich.console import Console
    Console().print(describe(args.source, args.revision))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path
    from memwise.convert import convert
    out = convert(args.source, Path(args.out), quantize=args.quantize)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
