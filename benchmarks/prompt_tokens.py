"""How many tokens `memwise bench serve`'s built-in prompts are, by one tokenizer or another.

    PYTHONPATH=src python benchmarks/prompt_tokens.py preset:mmfree-370m            # memwise's tokenizer of MODEL
    PYTHONPATH=src python benchmarks/prompt_tokens.py --gguf DIR/ggml-vocab-llama-spm.gguf   # a GGUF vocabulary

The synthetic presets carry a byte tokenizer (one id per UTF-8 byte: about five per English word),
where the real checkpoints carry a subword vocabulary (about one id per common word), so the same
prompts are a different load on each. `--gguf` reads a vocabulary-only GGUF file, such as those in
llama.cpp's models/ folder (ggml-vocab-llama-spm.gguf: Llama's 32,000-piece SentencePiece
vocabulary), through transformers' GGUF loader (`pip install gguf`).
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from memwise.bench.serve_load import builtin_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="count with memwise's tokenizer of this source")
    parser.add_argument("--gguf", type=Path, help="count with the tokenizer of this GGUF file instead")
    parser.add_argument("--count", type=int, default=64, help="prompts (bench serve uses 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if (args.model is None) == (args.gguf is None):
        parser.error("give MODEL or --gguf FILE")
    if args.gguf is not None:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(args.gguf.parent), gguf_file=args.gguf.name)
        encode, name = (lambda text: tokenizer(text)["input_ids"]), args.gguf.name
    else:
        from memwise.language_model import load_tokenizer_of
        encode, name = load_tokenizer_of(args.model).encode, args.model
    prompts = builtin_prompts(args.count, args.seed)
    counts = [len(encode(p)) for p in prompts]
    words = statistics.mean(len(p.split()) for p in prompts)
    print(f"{name}: {len(prompts)} built-in prompts (seed {args.seed}, {words:.1f} words on average): "
          f"{statistics.mean(counts):.2f} tokens on average, {min(counts)} to {max(counts)}")


if __name__ == "__main__":
    main()
