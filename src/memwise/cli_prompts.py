"""`memwise generate --prompts-file FILE`: one prompt per line, generated as one batch (throughput mode);
an offloaded run (--max-memory) runs its plan's block schedule and reports the plan's predicted
throughput next to the measured one."""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

from memwise.errors import MemwiseError


class PromptsFileError(MemwiseError):
    """A --prompts-file that is missing, unreadable, not UTF-8 or without a prompt."""


def read_prompts(path: str | Path) -> list[str]:
    """The non-blank lines of `path` (each a prompt, its line break removed)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptsFileError(f"--prompts-file {path}: no such file") from None
    except IsADirectoryError:
        raise PromptsFileError(f"--prompts-file {path}: is a directory, expected a text file with one prompt a line") from None
    except UnicodeDecodeError as e:
        raise PromptsFileError(f"--prompts-file {path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise PromptsFileError(f"--prompts-file {path}: cannot be read ({e.strerror})") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptsFileError(f"--prompts-file {path}: no prompts (expected one prompt a line)")
    return prompts


def generate_prompts(args, model, prompts: list[str]) -> int:
    """Generate for every prompt as one batch; print each completion on its own line, then the figures."""
    ids, mask = model.encode_batch(prompts)
    start = time.perf_counter()
    out = model.generate(ids, args.max_new_tokens, mask, do_sample=args.sample, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                         repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                         min_new_tokens=args.min_new_tokens, ignore_eos=args.ignore_eos, stop_strings=tuple(args.stop))
    seconds = time.perf_counter() - start
    new = out[:, ids.shape[1]:]
    pad = model.pad_token_id
    generated = 0
    for index, row in enumerate(new.tolist()):
        if not args.ignore_eos:
            row = _until_padding(row, pad)
        generated += len(row)
        text = model.tokenizer.decode(row).replace("\n", "\\n")
        print(f"{index}\t{text}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    measured = generated / seconds if seconds > 0 else float("nan")
    print(f"[{len(prompts)} prompts | {generated} tokens in {seconds:.2f} s | {measured:.2f} tok/s (prefill + decode) "
          f"| peak RSS {peak / 2**30:.2f} GiB]")
    _report_plan(model, measured)
    return 0


def _until_padding(row: list[int], pad: int) -> list[int]:
    # a finished sequence receives padding; what it generated ends at the first of the trailing pads
    end = len(row)
    while end > 0 and row[end - 1] == pad:
        end -= 1
    return row[:end + 1] if end < len(row) else row


def _report_plan(model, measured: float) -> None:
    runtime = getattr(model.module, "offload_runtime", None)
    run = runtime.last if runtime is not None else None
    if run is None:
        return
    if run.policy is None:
        print(f"[offload: no plan ({run.reason}); {run.resident_layers} layers resident, one block]", file=sys.stderr)
        return
    p = run.policy
    print(f"[plan: {p.resident_layers} of {p.layers} layers resident, {run.micro_batches} micro-batch(es) of "
          f"{run.micro_batch_size or run.batch_size}, KV cache in memory | predicted {p.predicted_tokens_per_s:.2f} "
          f"tok/s, measured {measured:.2f} tok/s ({measured / p.predicted_tokens_per_s:.2f}x)]", file=sys.stderr)
