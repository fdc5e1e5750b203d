/* The float work of a fused HGRN-Bit step between its products: RMSNorm, the MLGRU gates and
 * recurrence, the GLU.  Each operation is compiled once per vector level (generic, AVX2, AVX-512)
 * and picked at run time with the product path, so forcing a path with MEMWISE_ISA also runs the
 * float code a machine with only that path would run.  This is float arithmetic in its own order:
 * it agrees with the PyTorch path of the model to rounding, not bit for bit. */
#ifndef MEMWISE_HGRN_OPS_H
#define MEMWISE_HGRN_OPS_H

#include "exp.h"
#include "quantize.h"

/* ---- row operations ---- */

/* h = rmsnorm(x) * gain. */
MW_INLINE void norm_body(const float *x, const float *gain, int64_t K, float eps, float *h) {
    const float r = rms_inverse_body(x, K, eps);
    for (int64_t k = 0; k < K; ++k) h[k] = x[k] * r * gain[k];
}

/* The MLGRU's gates and recurrence over n channels, e_f = exp(-f) and e_i = exp(-i) given:
 * f = sigmoid(f), f = lower + (1 - lower) * f, c = silu(i) * (1 - f) (* mask),
 * state = state * f + c. */
MW_INLINE void gates_body(const float *iv, const float *e_f, const float *e_i, const float *lower,
                          const float *mask, float *st, int64_t n) {
    const float mk = mask ? *mask : 1.0f;
    for (int64_t k = 0; k < n; ++k) {
        float f = 1.0f / (e_f[k] + 1.0f);
        if (lower) f = lower[k] + (1.0f - lower[k]) * f;
        const float c = iv[k] / (1.0f + e_i[k]) * (1.0f - f) * mk;
        st[k] = st[k] * f + c;
    }
}

/* o = (rmsnorm(g) * g_norm) * silu(state), r of g's head given, e = exp(-state). */
MW_INLINE void gate_out_body(const float *g, float r, const float *gnorm, const float *st, const float *e,
                             float *o, int64_t n) {
    for (int64_t k = 0; k < n; ++k) o[k] = g[k] * r * gnorm[k] * (st[k] / (1.0f + e[k]));
}

/* u = silu(gate) * up, e = exp(-gate). */
MW_INLINE void glu_body(const float *gate, const float *up, const float *e, float *u, int64_t n) {
    for (int64_t k = 0; k < n; ++k) u[k] = gate[k] / (1.0f + e[k]) * up[k];
}

typedef struct {
    float (*rms)(const float *, int64_t, float);
    void (*norm)(const float *, const float *, int64_t, float, float *);
    void (*neg_exp)(const float *, float *, int64_t);
    void (*gates)(const float *, const float *, const float *, const float *, const float *, float *, int64_t);
    void (*gate_out)(const float *, float, const float *, const float *, const float *, float *, int64_t);
    void (*glu)(const float *, const float *, const float *, float *, int64_t);
} row_ops_t;

#define DEFINE_ROW_OPS(NAME, ATTR, NEG_EXP)                                                     \
    static ATTR float NAME##_rms(const float *x, int64_t K, float eps) {                        \
        return rms_inverse_body(x, K, eps);                                                     \
    }                                                                                           \
    static ATTR void NAME##_norm(const float *x, const float *gain, int64_t K, float eps, float *h) { \
        norm_body(x, gain, K, eps, h);                                                          \
    }                                                                                           \
    static ATTR void NAME##_gates(const float *iv, const float *e_f, const float *e_i,          \
                                  const float *lower, const float *mask, float *st, int64_t n) { \
        gates_body(iv, e_f, e_i, lower, mask, st, n);                                           \
    }                                                                                           \
    static ATTR void NAME##_gate_out(const float *g, float r, const float *gnorm, const float *st, \
                                     const float *e, float *o, int64_t n) {                     \
        gate_out_body(g, r, gnorm, st, e, o, n);                                                \
    }                                                                                           \
    static ATTR void NAME##_glu(const float *gate, const float *up, const float *e, float *u,   \
                                int64_t n) {                                                    \
        glu_body(gate, up, e, u, n);                                                            \
    }                                                                                           \
    static const row_ops_t NAME = {NAME##_rms, NAME##_norm, NEG_EXP, NAME##_gates,              \
                                   NAME##_gate_out, NAME##_glu};

DEFINE_ROW_OPS(row_ops_generic, , neg_exp_generic)
#if MW_X86
DEFINE_ROW_OPS(row_ops_avx2, T256, neg_exp_avx2)
DEFINE_ROW_OPS(row_ops_avx512, T512, neg_exp_avx512)
#endif

static const row_ops_t *row_ops(int level) {
#if MW_X86
    if (level >= VEC_AVX512) return &row_ops_avx512;
    if (level >= VEC_AVX2) return &row_ops_avx2;
#endif
    (void)level;
    return &row_ops_generic;
}

#endif /* MEMWISE_HGRN_OPS_H */
