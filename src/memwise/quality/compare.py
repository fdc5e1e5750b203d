"""`memwise eval-quant`: what a quantization scheme does to a model's next-token distributions.

For each scheme, on held-out text, position by position, against the float32 model on the same ids
(as llama.cpp's `perplexity --kl-divergence` reports it):
- KL divergence KL(p_float32 || p_scheme) in nats: mean, and its 99th percentile;
- top-1 agreement: how often both put their largest probability on the same token;
- perplexity of each on the text (exp of the mean negative log-likelihood of the next byte).

With --kv-cache SCHEME the weights stay float32 and the KV cache is quantized (the row is named
"kv-SCHEME"): every position's attention then reads keys and values through that cache.

The default model is the one `python -m memwise.quality.train` trains on the standard library's
source; the text is the held-out files of that corpus (memwise/quality/corpus.py), read as bytes, in
windows of the model's context length.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

from memwise.errors import MemwiseError

WINDOWS_PER_BATCH = 8


@dataclass
class SchemeQuality:
    scheme: str
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    perplexity: float
    perplexity_float32: float
    positions: int


def windows(ids: list[int], length: int, count: int):
    """`count` windows of `length` ids from the start of the text, without overlap, as a [count, length] tensor."""
    import torch

    usable = min(count, len(ids) // length)
    if usable < 1:
        raise MemwiseError(f"the text has {len(ids)} tokens, fewer than one window of {length}")
    return torch.tensor(ids[:usable * length], dtype=torch.long).view(usable, length)


def log_probs(model, ids):
    """log softmax of the model's logits over every position, [windows, length, vocab], in batches."""
    import torch

    parts = [torch.log_softmax(model.logits(ids[i:i + WINDOWS_PER_BATCH]).float(), dim=-1)
             for i in range(0, ids.shape[0], WINDOWS_PER_BATCH)]
    return torch.cat(parts)


def compare(reference, candidate, ids, scheme: str) -> SchemeQuality:
    """The metrics of `candidate`'s log-probabilities against `reference`'s on the same ids."""
    import torch

    kl = (reference.exp() * (reference - candidate)).sum(-1).flatten().clamp_min(0.0)
    agree = (reference.argmax(-1) == candidate.argmax(-1)).float().mean()
    targets = ids[:, 1:]

    def perplexity(lp):
        return math.exp(float(-lp[:, :-1].gather(-1, targets.unsqueeze(-1)).mean()))

    return SchemeQuality(scheme, float(kl.mean()), float(torch.quantile(kl, 0.99)), float(agree),
                         perplexity(candidate), perplexity(reference), int(kl.numel()))


def evaluate(source: str, schemes: list[str], tokens: int, kv_schemes: list[str] = ()) -> list[SchemeQuality]:
    import memwise
    from memwise.quality.corpus import split, token_ids

    reference_model = memwise.load(source)
    length = reference_model.spec.max_positions
    ids = windows(token_ids(split()[1]), length, max(1, tokens // length))
    if reference_model.spec.vocab_size < 256:
        raise MemwiseError(f"{source}: a vocabulary of {reference_model.spec.vocab_size} ids cannot hold the text's "
                           "byte ids (eval-quant reads text as bytes)")
    reference = log_probs(reference_model, ids)
    del reference_model
    results = []
    runs = [(scheme, {"quantize": scheme}) for scheme in schemes]
    runs += [(f"kv-{scheme}", {"kv_cache": scheme}) for scheme in kv_schemes]
    for name, options in runs:
        candidate = log_probs(memwise.load(source, **options), ids)
        results.append(compare(reference, candidate, ids, name))
    return results


def add_parser(sub) -> argparse.ArgumentParser:
    from memwise.quality.train import default_dir

    p = sub.add_parser("eval-quant", help="KL divergence, top-1 agreement and perplexity of quantization schemes",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", nargs="?", default=None,
                   help=f"a gpt2-style byte-level model (default: the trained reference model in {default_dir()})")
    p.add_argument("--quantize", action="append", metavar="SCHEME",
                   help="a weight scheme to compare (repeatable; default int8 when no --kv-cache is given)")
    p.add_argument("--kv-cache", action="append", metavar="SCHEME",
                   help="a KV cache scheme to compare, weights float32 (repeatable: int8, int4)")
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens to evaluate (default 16384)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from memwise.quality.train import default_dir

    source = args.source
    if source is None:
        if not (default_dir() / "config.json").is_file():
            raise MemwiseError(f"no trained reference model in {default_dir()}: train it first with "
                               "`python -m memwise.quality.train` (about 20 minutes on 2 cores), or pass SOURCE")
        source = str(default_dir())
    if args.tokens < 1:
        raise MemwiseError(f"--tokens must be positive, got {args.tokens}")
    kv_schemes = args.kv_cache or []
    results = evaluate(source, args.quantize or ([] if kv_schemes else ["int8"]), args.tokens, kv_schemes)
    if args.json:
        print(json.dumps({"source": source, "results": [asdict(r) for r in results]}))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{source}: each scheme against float32 on {results[0].positions:,} held-out positions")
    for column in ("scheme", "KL mean", "KL p99", "top-1 agreement", "perplexity", "perplexity float32"):
        table.add_column(column, justify="left" if column == "scheme" else "right")
    for r in results:
        table.add_row(r.scheme, f"{r.kl_mean:.5f}", f"{r.kl_p99:.5f}", f"{100 * r.top1_agreement:.2f}%",
                      f"{r.perplexity:.4f}", f"{r.perplexity_float32:.4f}")
    Console().print(table)
    return 0

