/* What a fused BitNet step reads: pointers into the buffers of one BitNetForCausalLM
 * (memwise/models/bitnet/modules.py) and into its DecoderCache.  memwise/models/bitnet/fused_step.py
 * fills these structs through ctypes mirrors of them; the extension exports their sizes and field
 * offsets (struct_layout()) and the mirrors are checked against those before the first step. */
#ifndef MEMWISE_BITNET_MODEL_H
#define MEMWISE_BITNET_MODEL_H

#include <stdint.h>

/* Ternary matrices over one RMSNorm'd input, stacked by rows (a TernaryProjection): packed codes
 * [sum(rows), ceil(cols / 128) * 32], the norm's gain [cols], and per matrix its rows and scale m. */
typedef struct {
    const uint8_t *codes;
    const float *gain;
    int64_t rows[3];
    float scales[3];
    int32_t count; /* matrices stacked: 1 to 3 */
} bitnet_projection_t;

typedef struct {
    bitnet_projection_t qkv;     /* [Q + 2 KV, H], input_layernorm */
    bitnet_projection_t o;       /* [H, Q], the attention sub-norm */
    bitnet_projection_t gate_up; /* [2 I, H], post_attention_layernorm */
    bitnet_projection_t down;    /* [H, I], the MLP sub-norm */
    float *keys, *values;        /* the cache's [1, kv_heads, max_length, head_dim] of this layer */
} bitnet_layer_t;

typedef struct {
    int64_t num_layers, hidden, intermediate, heads, kv_heads, head_dim, max_length;
    float eps;                   /* of every RMSNorm */
    int32_t relu2;               /* 1: relu(gate)^2 (2B-4T), 0: silu(gate) (1bitLLM) */
    int32_t weights_from_dram;   /* 1: far prefetches pay (PF_FAR_BYTES) */
    const float *inv_freq;       /* [head_dim / 2] */
    const bitnet_layer_t *layers; /* [L] */
} bitnet_model_t;

#endif /* MEMWISE_BITNET_MODEL_H */
