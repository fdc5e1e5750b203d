"""Peak memory of one training step (torch + transformers (+ peft)) on a model's Hugging Face checkpoint.

P = all parameters (memwise's count, a tied matrix once), T = trainable parameters, b = batch, s = sequence
length, h = hidden, i = intermediate, V = vocab, L = layers, a = heads, e = bytes of the compute dtype
(4 float32, 2 bfloat16/float16).

    peak = weights + gradients + optimizer_states + activations + step_temporaries + framework_overhead

weights: P * e (full, LoRA); QLoRA: the layers' linear weights in NF4 with double quantization,
    0.5 + 1/64 + 4/(64*256) byte each (4-bit codes, an 8-bit absmax per 64, an fp32 constant per 256
    absmax), the rest (embeddings, norms, lm_head) in bfloat16; LoRA adapters in float32.
gradients: T * e (mixed precision keeps e = 2 gradients, as the ZeRO paper counts them).
optimizer_states per trainable parameter: adamw 8 (two fp32 moments), sgd 0, sgd_momentum 4,
    adamw8bit 2 + 2*4/256 (two uint8 moments + an fp32 absmax per 256-block); mixed precision adds the
    fp32 master copy, 4 (ZeRO paper: 2 + 2 + 12 = 16 bytes/param with Adam).
activations (what autograd saves, measured by counting saved tensors on gpt2/opt/llama and fitted):
    per layer and token: e * (c_h * h + c_i * i) + 4 * a + 16   (fp32 norm statistics, attention
    log-sum-exp per head; sdpa's fused attention keeps no s x s scores)
        gpt2 (gelu_new in python ops): c_h 10, c_i 5;  opt (relu): c_h 8, c_i 1;
        llama/mistral (gated silu): c_h 10, c_i 4;  phi: c_h 8, c_i 5 (not measured: opt's attention,
        gpt2's activation)
    outside the layers per token: e * 2h + (held logits e*V + loss log-softmax 4V + two fp32 gradient
    buffers 8V at the start of backward).
    Gradient checkpointing: layer inputs only (e * h per layer and token) + one layer recomputed.
    LoRA/QLoRA: the same (the frozen base still saves its inputs) + the adapters' rank-r intermediates
    + per adapted linear 3 * out * e per token: peft computes base(x) + B(A(x)) * scaling out of place,
    so the base output, B's output and the scaled copy are freed temporaries lying between saved
    tensors; glibc keeps such holes in its heap, and in LoRA no weight gradient comes in backward to
    reuse them, so they are resident at the peak (measured: the forward's heap growth per opt-350m layer
    is 6.9 MiB above full fine-tuning's at b2 s128, 3 * 2 * h * 4 * 256 tokens = 6 MiB).
    Full fine-tuning of a tied embedding: the embedding's gradient is computed twice (lm_head and
    lookup) and summed, one more V x h gradient held at that moment.
step_temporaries (the optimizer step runs after backward, per parameter tensor):
    torch's AdamW picks its foreach path only for cuda/xpu/mtia tensors
    (torch.utils._foreach_utils._get_foreach_kernels_supported_devices), so on CPU it runs the
    single-tensor loop: sqrt(v) and its quotient by the bias correction, 8 bytes per element of one
    tensor at a time, the largest (the embedding) at the peak. Those buffers exceed glibc's mmap
    threshold (32 MiB at most), so they take fresh pages, and the only memory the step gets back is
    what the backward returned to the OS: the logits-sized buffers and the tied embedding's second
    gradient: max(0, 8 * largest - logits - tied_gradient) (measured: post-backward RSS + 2 embedding
    copies on opt-350m, the same transient as its backward's; the old 4T term was the CUDA foreach
    path and over-predicted opt-350m by 8-12%). bitsandbytes' CPU AdamW8bit dequantizes the largest
    tensor's two moments to fp32 and makes an fp32 scaled gradient and the denominator (sqrt and
    quotient): 20 bytes per element of it, on top (measured on opt-350m: the step adds 490 MiB =
    20 x its 25.7M-element embedding over the post-backward RSS).
framework_overhead: the process after one training step of a tiny model (python, torch, transformers,
    autograd and kernels loaded) measured at FRAMEWORK_BYTES on the 2-core AMD EPYC VM (Linux, torch
    2.13 CPU, transformers 5.25); peft and bitsandbytes imports add PEFT_BYTES and BNB_BYTES.

Multi-device partitioning is in memwise.estimate.parallel (formulas in its docstring).
"""
from __future__ import annotations

from memwise.errors import ConfigError, MemwiseError, UnsupportedError
from memwise.estimate.breakdown import Estimate
from memwise.estimate.parallel import check_parallel, layer_linears as _linears, per_device_parts
from memwise.spec import ModelSpec

MiB = 1 << 20
FRAMEWORK_BYTES = 470 * MiB   # calibrated: tiny-gpt2 full AdamW step peak RSS minus its modeled bytes
PEFT_BYTES = 58 * MiB         # measured: tiny LoRA minus tiny full (peft + accelerate imported)
BNB_BYTES = 46 * MiB          # measured: tiny AdamW8bit minus tiny AdamW (bitsandbytes imported)

METHODS = ("full", "lora", "qlora")
OPTIMIZERS = {"adamw": 8.0, "sgd": 0.0, "sgd_momentum": 4.0, "adamw8bit": 2.0 + 2 * 4 / 256}
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
DECODERS = ("gpt2", "opt", "llama", "mistral", "phi")
ACTIVATION_COEFFICIENTS = {"gpt2": (10, 5), "opt": (8, 1), "llama": (10, 4), "mistral": (10, 4), "phi": (8, 5)}
LORA_TARGETS = {"gpt2": ("c_attn",), "opt": ("q_proj", "v_proj"), "llama": ("q_proj", "v_proj"),
                "mistral": ("q_proj", "v_proj"), "phi": ("q_proj", "v_proj", "fc1", "fc2")}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
LORA_TEMPORARIES = 3  # peft's base output, B's output and B's scaled output per adapted linear


def _check_spec(spec: ModelSpec) -> None:
    where = spec.source or spec.model_type or "model"
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
        value = getattr(spec, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{where}: config lacks a usable '{name}' (found {value!r}); "
                              "a fine-tuning estimate needs the model's sizes")


def lora_parameters(spec: ModelSpec, rank: int, targets: tuple[str, ...]) -> int:
    """Parameters peft adds: A (r x in) and B (out x r) on each targeted linear of every layer."""
    matched = [(rows, cols) for name, rows, cols in _linears(spec) if name in targets]
    if not matched:
        names = sorted({name for name, _, _ in _linears(spec)})
        raise UnsupportedError(f"LoRA targets {list(targets)} match no linear of {spec.model_type} "
                               f"(its linears: {', '.join(names)})")
    return spec.num_layers * sum(rank * (rows + cols) for rows, cols in matched)


def _layer_linear_parameters(spec: ModelSpec) -> int:
    return spec.num_layers * sum(rows * cols for _, rows, cols in _linears(spec))


def activation_bytes(spec: ModelSpec, batch: int, seq: int, e: int, checkpointing: bool,
                     lora: tuple[int, int, int] | None = None) -> dict[str, int]:
    """Bytes autograd keeps at the start of backward: {"layers": ..., "logits": ..., "other": ...}.
    lora = (rank, number of adapted linears per layer, sum of their output widths) adds each adapter's
    saved rank-r intermediate and the freed out-of-place temporaries of peft's forward (module docstring)."""
    c_h, c_i = ACTIVATION_COEFFICIENTS[spec.model_type]
    tokens = batch * seq
    h, i = spec.hidden_size, spec.intermediate_size
    per_layer = tokens * (e * (c_h * h + c_i * i) + 4 * spec.num_heads + 16)
    if lora is not None:
        per_layer += tokens * e * (lora[0] * lora[1] + LORA_TEMPORARIES * lora[2])
    layers = spec.num_layers * per_layer
    if checkpointing:
        layers = spec.num_layers * tokens * e * h + per_layer
    logits = tokens * spec.vocab_size * (e + 4 + 8)
    return {"layers": layers, "logits": logits, "other": tokens * (e * 2 * h + 32)}


def _check_inputs(spec: ModelSpec, method: str, optimizer: str, dtype: str, batch_size: int, seq_len: int,
                  lora_rank: int) -> None:
    if method not in METHODS:
        raise UnsupportedError(f"unknown fine-tuning method {method!r} (choose from {', '.join(METHODS)})")
    if optimizer not in OPTIMIZERS:
        raise UnsupportedError(f"unknown optimizer {optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
    if dtype not in DTYPES:
        raise UnsupportedError(f"unknown dtype {dtype!r} for fine-tuning (choose from {', '.join(DTYPES)})")
    if spec.model_type not in DECODERS:
        what = "QLoRA" if method == "qlora" else "a fine-tuning estimate"
        raise UnsupportedError(f"{what} is modeled for the decoder families ({', '.join(DECODERS)}), "
                               f"not {spec.model_type!r}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("lora_rank", lora_rank)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MemwiseError(f"{name} should be a positive integer, found {value!r}")
    _check_spec(spec)


def model_parts(spec: ModelSpec, method: str, optimizer: str, dtype: str, lora_rank: int,
                lora_targets: tuple[str, ...] | None) -> tuple[dict[str, int], dict[str, int]]:
    """(bytes of weights, gradients, optimizer states, step temporaries; counts of params)."""
    from memwise.models import family_for

    total = family_for(spec.model_type, spec.source or "model").parameter_count(spec)
    mixed = dtype != "float32"
    e = 2 if method == "qlora" else DTYPES[dtype]
    targets = tuple(lora_targets) if lora_targets else LORA_TARGETS[spec.model_type]
    adapters = lora_parameters(spec, lora_rank, targets) if method != "full" else 0
    if method == "full":
        trainable, weights = total, total * e
    elif method == "lora":
        trainable, weights = adapters, total * e + adapters * 4
    else:
        linear = _layer_linear_parameters(spec)
        trainable = adapters
        weights = int(linear * NF4_BYTES) + (total - linear) * 2 + adapters * 4
    grad_bytes = e if method == "full" else 4
    states = OPTIMIZERS[optimizer] + (4 if mixed and method == "full" else 0)
    largest = _largest_trainable(spec, method, targets, lora_rank)
    temporaries = {"adamw": 8 * largest, "adamw8bit": 20 * largest}.get(optimizer, 0)
    parts = {"weights": weights, "gradients": trainable * grad_bytes,
             "optimizer_states": int(trainable * states), "optimizer_step_temporaries": temporaries}
    return parts, {"parameters": total, "trainable": trainable, "lora_adapters": adapters}


def _output_width(spec: ModelSpec, rows: int, cols: int) -> int:
    return cols if spec.model_type == "gpt2" else rows  # gpt2's Conv1D stores (in, out)


def _largest_trainable(spec: ModelSpec, method: str, targets: tuple[str, ...], rank: int) -> int:
    if method != "full":
        return max(rank * max(rows, cols) for name, rows, cols in _linears(spec) if name in targets)
    return max([spec.vocab_size * (spec.embed_dim or spec.hidden_size)] + [r * c for _, r, c in _linears(spec)])


def estimate_finetune(spec: ModelSpec, *, method: str = "full", optimizer: str = "adamw", batch_size: int = 1,
                      seq_len: int = 512, lora_rank: int = 8, lora_targets: list[str] | None = None,
                      gradient_checkpointing: bool = False, dtype: str = "float32", devices: int = 1,
                      strategy: str = "dp") -> Estimate:
    """Predicted peak bytes of a training step; with devices > 1, per device under `strategy`."""
    _check_inputs(spec, method, optimizer, dtype, batch_size, seq_len, lora_rank)
    check_parallel(spec, devices, strategy)
    parts, counts = model_parts(spec, method, optimizer, dtype, lora_rank,
                                tuple(lora_targets) if lora_targets else None)
    e = 2 if method == "qlora" else DTYPES[dtype]
    targets = tuple(lora_targets) if lora_targets else LORA_TARGETS[spec.model_type]
    adapted = [_output_width(spec, rows, cols) for name, rows, cols in _linears(spec)
               if name in targets] if method != "full" else []
    acts = activation_bytes(spec, batch_size, seq_len, e, gradient_checkpointing,
                            (lora_rank, len(adapted), sum(adapted)) if adapted else None)
    if method == "full" and spec.tie_word_embeddings:
        acts["tied_embedding_gradient"] = spec.vocab_size * (spec.embed_dim or spec.hidden_size) * e
    overhead = FRAMEWORK_BYTES + (PEFT_BYTES if method != "full" else 0) + \
        (BNB_BYTES if optimizer == "adamw8bit" or method == "qlora" else 0)
    if optimizer == "adamw":  # the step's fresh pages come after backward returned these (module docstring)
        returned = acts["logits"] + acts.get("tied_embedding_gradient", 0)
        parts["optimizer_step_temporaries"] = max(0, parts["optimizer_step_temporaries"] - returned)
    parts = {**parts, "activations": sum(acts.values()), "framework_overhead": overhead}
    settings = {"model": spec.source or spec.model_type, "method": method, "optimizer": optimizer,
                "batch_size": batch_size, "seq_len": seq_len, "dtype": dtype,
                "gradient_checkpointing": gradient_checkpointing, "devices": devices, "strategy": strategy,
                **counts, "activations_detail": acts}
    if method != "full":
        settings.update(lora_rank=lora_rank, lora_targets=list(targets))
    notes = ["dropout off; sdpa attention (no s x s scores kept); optimizer.zero_grad(set_to_none=True)"]
    if method == "qlora":
        notes.append("QLoRA: NF4 base with double quantization, compute and non-linear weights in bfloat16")
    per_device = None
    if devices > 1:
        per_device, notes_parallel = per_device_parts(spec, parts, acts, devices, strategy, method, e,
                                                         batch_size * seq_len)
        notes += notes_parallel
    return Estimate("finetune", settings, parts, per_device, notes)
