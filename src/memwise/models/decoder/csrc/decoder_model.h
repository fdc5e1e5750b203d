/* What a fused decoder step reads: pointers into the buffers of one quantized Decoder
 * (memwise/models/decoder/modules.py, quantized.py) and into its DecoderCache.
 * memwise/models/decoder/fused_step.py fills these structs through ctypes mirrors of them; the
 * extension exports their sizes and field offsets (struct_layout()) and the mirrors are checked
 * against those before the first step. */
#ifndef MEMWISE_DECODER_MODEL_H
#define MEMWISE_DECODER_MODEL_H

#include <stdint.h>

enum { DECODER_INT8 = 0, DECODER_INT4 = 1 };
enum { DECODER_GELU_TANH = 0, DECODER_RELU = 1, DECODER_SILU = 2 };
enum { DECODER_LAYER_NORM = 0, DECODER_RMS_NORM = 1 };

/* One quantized linear y = x W^T + b of `rows` outputs over `cols` inputs, padded to padded_cols
 * (a multiple of 64 in both schemes).  int8 (Int8Linear): weights int8 [rows, padded_cols], row_sums
 * int32 [rows], scales float [rows].  int4 (Int4Linear): weights the packed codes uint8
 * [rows, padded_cols / 2], scales the group constants float16 [rows, padded_cols / 64, 2] (their
 * bits), row_sums NULL.  bias float [rows] or NULL. */
typedef struct {
    const void *weights;
    const int32_t *row_sums;
    const void *scales;         /* float (int8) or float16 bits (int4) */
    const float *bias;
    int64_t rows, cols, padded_cols;
} decoder_projection_t;

typedef struct {
    decoder_projection_t qkv;   /* [Q + 2 KV, H] */
    decoder_projection_t out;   /* [H, Q] */
    decoder_projection_t up;    /* [I, H], or [2 I, H] when gated: gate rows first, then up */
    decoder_projection_t down;  /* [H, I] */
    const float *attn_norm_weight, *attn_norm_bias;   /* [H] each; no biases with RMSNorm (NULL) */
    const float *mlp_norm_weight, *mlp_norm_bias;
    float *keys, *values;       /* the cache's [1, kv_heads, max_length, head_dim] of this layer */
} decoder_layer_t;

typedef struct {
    int64_t num_layers, hidden, intermediate, heads, kv_heads, head_dim, max_length;
    float eps;                  /* of every norm */
    int32_t scheme;             /* DECODER_INT8 or DECODER_INT4, every projection of every layer */
    int32_t activation;         /* DECODER_GELU_TANH (gpt2's gelu_new), DECODER_RELU (opt), DECODER_SILU */
    int32_t norm;               /* DECODER_LAYER_NORM (gpt2, opt) or DECODER_RMS_NORM (llama, mistral) */
    int32_t gated;              /* 1: act(gate) * up (llama, mistral), 0: act(up) */
    int64_t rotary_dim;         /* 0: learned positions (added by the model), else rotary over these dims */
    const float *inv_freq;      /* [rotary_dim / 2] or NULL */
    const decoder_layer_t *layers; /* [L] */
} decoder_model_t;

#endif /* MEMWISE_DECODER_MODEL_H */
