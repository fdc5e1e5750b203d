/* The float work of a fused BitNet step between its products: RMS and the GLU here, rotary
 * embedding and attention of one query over the cache from the kernel library's attend.h. Each
 * operation is compiled once per vector level (generic, AVX2, AVX-512) and picked with the product
 * path, so forcing a path with MEMWISE_ISA also runs the float code a machine with only that path
 * would run.  Float arithmetic in its own order: it agrees with the PyTorch path (modules.py,
 * torch's SDPA) to rounding, not bit for bit. */
#ifndef MEMWISE_BITNET_OPS_H
#define MEMWISE_BITNET_OPS_H

#include "attend.h"

/* u = act(gate) * up over n, act relu(x)^2 or silu(x) = x / (1 + exp(-x)) (e = exp(-gate) given). */
MW_INLINE void glu_relu2_body(const float *gate, const float *up, float *u, int64_t n) {
    for (int64_t k = 0; k < n; ++k) {
        const float g = gate[k] > 0.0f ? gate[k] : 0.0f;
        u[k] = g * g * up[k];
    }
}

MW_INLINE void glu_silu_body(const float *gate, const float *up, const float *e, float *u, int64_t n) {
    for (int64_t k = 0; k < n; ++k) u[k] = gate[k] / (1.0f + e[k]) * up[k];
}

typedef struct {
    float (*rms)(const float *, int64_t, float);
    void (*neg_exp)(const float *, float *, int64_t);
    void (*rope)(float *, const float *, const float *, int64_t);
    void (*attend)(const float *, const float *, const float *, int64_t, int64_t, float *, float *, float *);
    void (*glu_relu2)(const float *, const float *, float *, int64_t);
    void (*glu_silu)(const float *, const float *, const float *, float *, int64_t);
} bitnet_ops_t;

#define DEFINE_BITNET_OPS(NAME, ATTR, NEG_EXP)                                                  \
    static ATTR float NAME##_rms(const float *x, int64_t K, float eps) {                        \
        return rms_inverse_body(x, K, eps);                                                     \
    }                                                                                           \
    static ATTR void NAME##_rope(float *x, const float *cs, const float *sn, int64_t half) {     \
        rope_body(x, cs, sn, half);                                                             \
    }                                                                                           \
    static ATTR void NAME##_attend(const float *q, const float *k, const float *v, int64_t n,   \
                                   int64_t d, float *scores, float *e, float *out) {            \
        attend_body(q, k, v, n, d, scores, e, out, NEG_EXP);                                    \
    }                                                                                           \
    static ATTR void NAME##_relu2(const float *gate, const float *up, float *u, int64_t n) {    \
        glu_relu2_body(gate, up, u, n);                                                         \
    }                                                                                           \
    static ATTR void NAME##_silu(const float *gate, const float *up, const float *e, float *u,  \
                                 int64_t n) {                                                   \
        glu_silu_body(gate, up, e, u, n);                                                       \
    }                                                                                           \
    static const bitnet_ops_t NAME = {NAME##_rms, NEG_EXP, NAME##_rope, NAME##_attend,          \
                                      NAME##_relu2, NAME##_silu};

DEFINE_BITNET_OPS(bitnet_ops_generic, , neg_exp_generic)
#if MW_X86
DEFINE_BITNET_OPS(bitnet_ops_avx2, T256, neg_exp_avx2)
DEFINE_BITNET_OPS(bitnet_ops_avx512, T512, neg_exp_avx512)
#endif

static const bitnet_ops_t *bitnet_ops(int level) {
#if MW_X86
    if (level >= VEC_AVX512) return &bitnet_ops_avx512;
    if (level >= VEC_AVX2) return &bitnet_ops_avx2;
#endif
    (void)level;
    return &bitnet_ops_generic;
}

#endif /* MEMWISE_BITNET_OPS_H */
