/* The float work of a fused decoder step between its products: LayerNorm and RMSNorm, the
 * activations, and (from the kernel library's attend.h) rotary embedding and attention of one query
 * over the cache.  Each operation is compiled once per vector level (generic, AVX2, AVX-512) and picked with the product path, so forcing a path with MEMWISE_ISA also runs
 * the float code a machine with only that path would run.  Float arithmetic in its own order: it
 * agrees with the PyTorch path (torch's LayerNorm, SDPA, GELU) to rounding, not bit for bit. */
#ifndef MEMWISE_DECODER_OPS_H
#define MEMWISE_DECODER_OPS_H

#include "attend.h"

#define DECODER_GELU_C 0.7978845608028654f /* sqrt(2 / pi) */

/* y = (x - mean) / sqrt(var + eps) * w + b over n (biased variance, as torch's LayerNorm); y may
 * not alias x. */
MW_INLINE void layer_norm_body(const float *x, const float *w, const float *b, int64_t n, float eps, float *y) {
    const float mean = lanes_dot(x, NULL, n) / (float)n;
    for (int64_t k = 0; k < n; ++k) y[k] = x[k] - mean;
    const float inv = 1.0f / sqrtf(lanes_dot(y, y, n) / (float)n + eps);
    for (int64_t k = 0; k < n; ++k) y[k] = y[k] * inv * w[k] + b[k];
}

/* y = (x / sqrt(mean(x^2) + eps)) * w over n, as F.rms_norm. */
MW_INLINE void rms_norm_body(const float *x, const float *w, int64_t n, float eps, float *y) {
    const float r = rms_inverse_body(x, n, eps);
    for (int64_t k = 0; k < n; ++k) y[k] = (x[k] * r) * w[k];
}

/* gelu_new(x) = x / 2 * (1 + tanh(z)), z = sqrt(2 / pi) (x + 0.044715 x^3), computed as the equal
 * x / (1 + exp(-2 z)), in place over n; t holds n floats. */
MW_INLINE void gelu_tanh_body(float *x, float *t, int64_t n, void (*neg_exp)(const float *, float *, int64_t)) {
    for (int64_t k = 0; k < n; ++k) t[k] = 2.0f * DECODER_GELU_C * (x[k] + 0.044715f * x[k] * x[k] * x[k]);
    neg_exp(t, t, n);
    for (int64_t k = 0; k < n; ++k) x[k] = x[k] / (1.0f + t[k]);
}

/* gate [k] = silu(gate[k]) * up[k] = gate / (1 + exp(-gate)) * up over n; t holds n floats. */
MW_INLINE void silu_glu_body(float *gate, const float *up, float *t, int64_t n,
                             void (*neg_exp)(const float *, float *, int64_t)) {
    neg_exp(gate, t, n);
    for (int64_t k = 0; k < n; ++k) gate[k] = gate[k] / (1.0f + t[k]) * up[k];
}

MW_INLINE void relu_body(float *x, int64_t n) {
    for (int64_t k = 0; k < n; ++k) x[k] = x[k] > 0.0f ? x[k] : 0.0f;
}

typedef struct {
    void (*layer_norm)(const float *, const float *, const float *, int64_t, float, float *);
    void (*rms_norm)(const float *, const float *, int64_t, float, float *);
    void (*rope)(float *, const float *, const float *, int64_t);
    void (*silu_glu)(float *, const float *, float *, int64_t);
    void (*attend)(const float *, const float *, const float *, int64_t, int64_t, float *, float *, float *);
    void (*gelu_tanh)(float *, float *, int64_t);
    void (*relu)(float *, int64_t);
} decoder_ops_t;

#define DEFINE_DECODER_OPS(NAME, ATTR, NEG_EXP)                                                 \
    static ATTR void NAME##_layer_norm(const float *x, const float *w, const float *b, int64_t n, \
                                       float eps, float *y) {                                   \
        layer_norm_body(x, w, b, n, eps, y);                                                    \
    }                                                                                           \
    static ATTR void NAME##_rms_norm(const float *x, const float *w, int64_t n, float eps, float *y) { \
        rms_norm_body(x, w, n, eps, y);                                                         \
    }                                                                                           \
    static ATTR void NAME##_rope(float *x, const float *cs, const float *sn, int64_t half) {     \
        rope_body(x, cs, sn, half);                                                             \
    }                                                                                           \
    static ATTR void NAME##_silu_glu(float *g, const float *u, float *t, int64_t n) {           \
        silu_glu_body(g, u, t, n, NEG_EXP);                                                     \
    }                                                                                           \
    static ATTR void NAME##_attend(const float *q, const float *k, const float *v, int64_t n,   \
                                   int64_t d, float *scores, float *e, float *out) {            \
        attend_body(q, k, v, n, d, scores, e, out, NEG_EXP);                                    \
    }                                                                                           \
    static ATTR void NAME##_gelu_tanh(float *x, float *t, int64_t n) { gelu_tanh_body(x, t, n, NEG_EXP); } \
    static ATTR void NAME##_relu(float *x, int64_t n) { relu_body(x, n); }                      \
    static const decoder_ops_t NAME = {NAME##_layer_norm, NAME##_rms_norm, NAME##_rope, NAME##_silu_glu,  \
                                       NAME##_attend, NAME##_gelu_tanh, NAME##_relu};

DEFINE_DECODER_OPS(decoder_ops_generic, , neg_exp_generic)
#if MW_X86
DEFINE_DECODER_OPS(decoder_ops_avx2, T256, neg_exp_avx2)
DEFINE_DECODER_OPS(decoder_ops_avx512, T512, neg_exp_avx512)
#endif

static const decoder_ops_t *decoder_ops(int level) {
#if MW_X86
    if (level >= VEC_AVX512) return &decoder_ops_avx512;
    if (level >= VEC_AVX2) return &decoder_ops_avx2;
#endif
    (void)level;
    return &decoder_ops_generic;
}

#endif /* MEMWISE_DECODER_OPS_H */
