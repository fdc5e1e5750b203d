/* What a fused HGRN-Bit step reads: pointers into the buffers of one HGRNBitForCausalLM
 * (memwise/models/hgrn_bit/modules.py).  memwise/models/hgrn_bit/fused_step.py fills these
 * structs through ctypes mirrors of them; the extension exports their sizes and field offsets
 * (struct_layout()) and the mirrors are checked against those before the first step. */
#ifndef MEMWISE_HGRN_MODEL_H
#define MEMWISE_HGRN_MODEL_H

#include <stdint.h>

/* One BitLinear: packed codes [rows, ceil(cols / 128) * 32], the gain of the RMSNorm on its
 * input [cols], and the matrix's scale m. */
typedef struct {
    const uint8_t *codes;
    const float *gain;
    float scale;
} hgrn_bitlinear_t;

typedef struct {
    const float *attn_norm;          /* [H] */
    hgrn_bitlinear_t i_proj, f_proj, g_proj; /* [D, H] */
    const float *g_norm;             /* [D / heads] */
    hgrn_bitlinear_t o_proj;         /* [H, D] */
    const float *mlp_norm;           /* [H] */
    hgrn_bitlinear_t gate_proj;      /* [2I, H]: gate rows, then up rows */
    hgrn_bitlinear_t down_proj;      /* [H, I] */
    const float *lower_bound;        /* [D]; NULL in layer 0 and without lower bounds */
} hgrn_layer_t;

typedef struct {
    int64_t num_layers, hidden, width, intermediate, vocab, heads; /* L, H, D, I, V, heads */
    float eps;                       /* of every RMSNorm */
    int32_t weights_from_dram;       /* 1: the weights do not stay in the last-level cache between
                                        steps, so far prefetches pay (PF_FAR_BYTES) */
    const float *final_norm;         /* [H] */
    hgrn_bitlinear_t lm_head;        /* [V, H] */
    const hgrn_layer_t *layers;      /* [L] */
} hgrn_model_t;

#endif /* MEMWISE_HGRN_MODEL_H */
