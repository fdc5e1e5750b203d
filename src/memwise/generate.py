"""Token generation over a family's CausalLM: prefill, one-token decode steps, logits processing, stopping.

Options follow Hugging Face `generate` where the two share a name. One deliberate difference: the
repetition penalty and the no-repeat n-gram rule look only at real tokens, never at left padding, so a
prompt gives the same tokens alone and in a padded batch.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from memwise.errors import MemwiseError, shown
from memwise.heap import release_free_heap
from memwise.kernels import greedy_tokens
from memwise.memory_gate import check_fits
from memwise.tokenizer import decode_stream


@dataclass
class GenerationOptions:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    ignore_eos: bool = False
    stop_strings: tuple[str, ...] = ()

    def check(self) -> None:
        """Refuse values that would fail deep inside torch or be silently misread; numpy scalars
        become Python numbers so that everything downstream sees plain ints and floats."""
        self.max_new_tokens = _int_option("max_new_tokens", self.max_new_tokens, low=1)
        self.do_sample = _bool_option("do_sample", self.do_sample)
        self.ignore_eos = _bool_option("ignore_eos", self.ignore_eos)
        # A temperature is only used when sampling, where 0 would divide by zero; greedy callers
        # often pass 0 to mean "no randomness", which is harmless.
        self.temperature = _float_option("temperature (when sampling)" if self.do_sample else "temperature",
                                         self.temperature, low=0.0, low_open=self.do_sample)
        if self.top_k is not None:
            self.top_k = _int_option("top_k", self.top_k, low=1)
        if self.top_p is not None:
            self.top_p = _float_option("top_p", self.top_p, low=0.0, low_open=True, high=1.0)
        if self.seed is not None:
            # torch.Generator.manual_seed's range; outside it torch raises a RuntimeError.
            self.seed = _int_option("seed", self.seed, low=0, high=2**64 - 1)
        self.repetition_penalty = _float_option("repetition_penalty", self.repetition_penalty, low=0.0,
                                                low_open=True)
        self.no_repeat_ngram_size = _int_option("no_repeat_ngram_size", self.no_repeat_ngram_size, low=0)
        self.min_new_tokens = _int_option("min_new_tokens", self.min_new_tokens, low=0)
        self.stop_strings = _stop_strings_option(self.stop_strings)


def banned_ngram_tokens(tokens: list[int], n: int) -> set[int]:
    """Tokens that would repeat an n-gram already in `tokens` (HF's no_repeat_ngram_size rule)."""
    if n == 0 or len(tokens) + 1 < n:
        return set()
    prefix = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
    banned = set()
    for i in range(len(tokens) - n + 1):
        if tuple(tokens[i:i + n - 1]) == prefix:
            banned.add(tokens[i + n - 1])
    return banned


def sample_next(logits: torch.Tensor, options: GenerationOptions, generator: torch.Generator | None) -> torch.Tensor:
    if not options.do_sample:
        # The first maximum, as argmax picks it (kernels.greedy_tokens: in C on CPU, torch's
        # max(dim).indices elsewhere, which is itself about 3x faster than argmax on CPU).
        return greedy_tokens(logits)
    logits = logits / options.temperature
    if options.top_k is not None:
        k = min(options.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if options.top_p is not None and options.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - options.top_p
        remove[:, -1] = False   # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@dataclass
class GenerationState:
    """The growing token buffer of a batch: prompt (left-padded) + generated tokens.

    It grows as tokens come (doubling, up to prompt + max_new_tokens) instead of being reserved for
    the whole request: a recurrent model asked for 10^9 tokens then holds memory for the tokens it
    has made, not for those it may make."""

    tokens: torch.Tensor            # [B, capacity] long; [:, :length] written
    real: torch.Tensor              # [B, capacity] bool: not padding
    length: int                     # tokens written so far
    prompt_length: int
    finished: torch.Tensor          # [B] bool
    limit: int                      # prompt + max_new_tokens: the most it will ever hold

    @classmethod
    def start(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
              pad_token_id: int) -> "GenerationState":
        batch, prompt_len = input_ids.shape
        capacity = prompt_len + min(max_new_tokens, FIRST_CAPACITY)
        tokens = torch.full((batch, capacity), pad_token_id, dtype=torch.long, device=input_ids.device)
        real = torch.zeros((batch, capacity), dtype=torch.bool, device=input_ids.device)
        tokens[:, :prompt_len], real[:, :prompt_len] = input_ids, attention_mask
        return cls(tokens, real, prompt_len, prompt_len, torch.zeros(batch, dtype=torch.bool, device=input_ids.device),
                   prompt_len + max_new_tokens)

    def append(self, next_tokens: torch.Tensor) -> None:
        if self.length == self.tokens.shape[1]:
            capacity = min(2 * self.length, self.limit)
            grown = self.tokens.new_zeros((self.tokens.shape[0], capacity))
            grown[:, :self.length] = self.tokens
            self.tokens = grown
            grown_real = self.real.new_zeros((self.real.shape[0], capacity))
            grown_real[:, :self.length] = self.real
            self.real = grown_real
        self.tokens[:, self.length] = next_tokens
        self.real[:, self.length] = ~self.finished
        self.length += 1


FIRST_CAPACITY = 1024


def generate_steps(module, input_ids: torch.Tensor, attention_mask: torch.Tensor, options: GenerationOptions,
                   eos_token_ids: tuple[int, ...], pad_token_id: int,
                   decode: Callable[[list[int]], str] | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence ([B] long) until max_new_tokens, EOS or a stop string.

    Finished sequences keep receiving `pad_token_id`, like Hugging Face's generate.
    """
    options.check()
    if options.stop_strings and decode is None:
        raise MemwiseError("stop_strings need a tokenizer to decode the generated text")
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    total = prompt_len + options.max_new_tokens
    runtime = getattr(module, "offload_runtime", None)
    if runtime is not None:
        # an offloaded model: its plan for this batch (resident layers, micro-batches) before its cache
        runtime.prepare(batch, prompt_len, options.max_new_tokens)
    # The cache is allocated for the whole request up front (a KV cache grows with it, a recurrent
    # state does not): check it first. The token buffer grows as tokens come.
    check_fits(f"generating {options.max_new_tokens} tokens after {prompt_len} for {batch} sequence(s)",
               {"cache": module.cache_bytes(batch, total),
                "tokens": batch * (prompt_len + min(options.max_new_tokens, FIRST_CAPACITY)) * 9,
                "logits": 2 * batch * module.spec.vocab_size * 4}, device)
    return _steps(module, input_ids, attention_mask, options, eos_token_ids, pad_token_id, decode)


def _steps(module, input_ids: torch.Tensor, attention_mask: torch.Tensor, options: GenerationOptions,
           eos_token_ids: tuple[int, ...], pad_token_id: int,
           decode: Callable[[list[int]], str] | None) -> Iterator[torch.Tensor]:
    """generate_steps' loop, a generator: its checks run when it is called, this when it is iterated."""
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    total = prompt_len + options.max_new_tokens
    state = GenerationState.start(input_ids, attention_mask, options.max_new_tokens, pad_token_id)
    generator = None
    if options.do_sample:
        generator = torch.Generator(device=device)
        generator.manual_seed(options.seed if options.seed is not None else torch.seed())
    # An EOS id outside the vocabulary can never be generated (transformers only warns about it).
    eos_token_ids = tuple(t for t in eos_token_ids if 0 <= t < module.spec.vocab_size)
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device) if eos_token_ids else None
    stop_on_eos = eos is not None and not options.ignore_eos

    stop_strings = StopStrings(options.stop_strings, decode, batch) if options.stop_strings else None

    cache = module.new_cache(batch, total)
    ones = torch.ones((batch, 1), dtype=torch.bool, device=device)
    with torch.inference_mode():
        logits = module(input_ids, cache, attention_mask, last_only=True)[:, -1].float()
        if device.type == "cpu":
            # The prompt's activations, freed, stay resident in glibc's heap; the decode that follows needs
            # a few hundred KB of them while the cache fills the rest of its slots, so a run's peak was the
            # full cache plus the prefill's working set (opt-2.7b int4: ~20 MiB, docs/quantization.md).
            release_free_heap()
        for step in range(options.max_new_tokens):
            logits = _process(logits, state, options, eos, step)
            next_tokens = sample_next(logits, options, generator)
            next_tokens = torch.where(state.finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
            state.append(next_tokens)
            if stop_on_eos:
                state.finished |= torch.isin(next_tokens, eos)
            if stop_strings is not None:
                stop_strings.check(state, next_tokens)
            yield next_tokens
            if bool(state.finished.all()) or step + 1 == options.max_new_tokens:
                return
            logits = module(next_tokens[:, None], cache, ones, last_only=True)[:, -1].float()


def _process(logits: torch.Tensor, state: GenerationState, options: GenerationOptions,
             eos: torch.Tensor | None, step: int) -> torch.Tensor:
    tokens = state.tokens[:, :state.length]
    real = state.real[:, :state.length]
    if options.repetition_penalty != 1.0:
        logits = logits.clone()
        scores = logits.gather(1, tokens)
        penalized = torch.where(scores < 0, scores * options.repetition_penalty, scores / options.repetition_penalty)
        for b in range(logits.shape[0]):
            idx = tokens[b][real[b]]
            logits[b, idx] = penalized[b][real[b]]
    if options.no_repeat_ngram_size > 0:
        for b in range(logits.shape[0]):
            banned = banned_ngram_tokens(tokens[b][real[b]].tolist(), options.no_repeat_ngram_size)
            if banned:
                logits[b, list(banned)] = float("-inf")
    if eos is not None and step < options.min_new_tokens:
        logits[:, eos] = float("-inf")
    return logits


class StopStrings:
    """Finds stop strings in each sequence's generated text, decoded incrementally (linear in its length).

    Each sequence has its own incremental decoder (`memwise.tokenizer.decode_stream`), fed one token a
    step; the new text is searched together with the last len(longest stop string) - 1 characters
    before it, so a stop string that spans tokens is found on the step that completes it.
    """

    def __init__(self, stop_strings: tuple[str, ...], decode, batch: int):
        self.stop_strings = stop_strings
        self.keep = max(len(s) for s in stop_strings) - 1
        self.streams = [decode_stream(decode) for _ in range(batch)]
        self.tails = [""] * batch

    def check(self, state: GenerationState, next_tokens: torch.Tensor) -> None:
        """Mark finished the sequences whose text now contains a stop string."""
        finished = state.finished.tolist()
        for b, token in enumerate(next_tokens.tolist()):
            if finished[b]:
                continue
            text = self.tails[b] + self.streams[b].step(token)
            if any(s in text for s in self.stop_strings):
                state.finished[b] = True
            self.tails[b] = text[-self.keep:] if self.keep > 0 else ""


# ---- option checks: one message shape, "NAME must be EXPECTED, got VALUE (TYPE)" ----------------

def _refuse(name: str, expected: str, value: object) -> MemwiseError:
    return MemwiseError(f"{name} must be {expected}, got {shown(value)} ({type(value).__name__})")


def _int_option(name: str, value: object, low: int, high: int | None = None) -> int:
    # bool is an int subclass and a float like 3.0 is a likely typo for a count: both are refused.
    expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _refuse(name, expected, value)
    if value < low or (high is not None and value > high):
        raise _refuse(name, expected, value)
    return int(value)


def _float_option(name: str, value: object, low: float, low_open: bool = False,
                  high: float | None = None) -> float:
    expected = f"a finite number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise _refuse(name, expected, value)
    if value < low or (low_open and value == low) or (high is not None and value > high):
        raise _refuse(name, expected, value)
    return float(value)


def _bool_option(name: str, value: object) -> bool:
    # 0/1 or "false" would be truthy or falsy by accident, not by intent.
    if not isinstance(value, bool):
        raise _refuse(name, "True or False", value)
    return value


def _stop_strings_option(value: object) -> tuple[str, ...]:
    expected = "a str or a list of non-empty str"
    if isinstance(value, str):
        value = (value,)
    if value is None:
        return ()
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise _refuse("stop_strings", expected, value)
    for item in value:
        # "" is found in any text, so it would end every sequence after its first token.
        if not isinstance(item, str) or not item:
            raise MemwiseError(f"stop_strings must be {expected}, got item {shown(item)} ({type(item).__name__})")
    return tuple(value)
