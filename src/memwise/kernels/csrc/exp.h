/* A vectorised exp for the float work around the products (sigmoid, SiLU, softmax), in generic,
 * AVX2 and AVX-512 code: exp_scalar, exp256, exp512 and neg_exp_* (e = exp(-x) over an array).
 * Model-free: the fused decode steps of the model families include it. */
#ifndef MEMWISE_KERNELS_EXP_H
#define MEMWISE_KERNELS_EXP_H

#include "common.h"

/* exp(d) = 2^n * exp(r) with n = rint(d / ln 2) and r = d - n ln 2 (|r| <= ln 2 / 2), ln 2 split
 * in two so that n * LN2_HI is exact; exp(r) by its Taylor series to degree 7 (truncation error
 * below 1e-8 relative); 2^n applied as two factors so that no intermediate leaves the float range
 * before the result does. */
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693145751953125f
#define EXP_LN2_LO 1.4286068202862268e-06f
#define EXP_UNDERFLOW (-104.0f) /* exp of anything below is 0 in float32 */
#define EXP_OVERFLOW 89.0f      /* and of anything above, infinity */
/* n = rint(d / ln 2) and r = d - n ln 2, with MUL, ROUND (to nearest), FNMADD(a, b, c) = c - a * b
 * and C(x) the constant x of a vector width. */
#define EXP_REDUCE(N, R, D, MUL, ROUND, FNMADD, C)                                              \
    N = ROUND(MUL(D, C(EXP_LOG2E)));                                                            \
    R = FNMADD(N, C(EXP_LN2_HI), D);                                                            \
    R = FNMADD(N, C(EXP_LN2_LO), R)

/* p = exp(r) by Horner's rule, MADD(a, b, c) = a * b + c. */
#define EXP_TAYLOR(P, R, MADD, C)                                                               \
    P = MADD(C(1.0f / 5040.0f), R, C(1.0f / 720.0f));                                           \
    P = MADD(P, R, C(1.0f / 120.0f));                                                           \
    P = MADD(P, R, C(1.0f / 24.0f));                                                            \
    P = MADD(P, R, C(1.0f / 6.0f));                                                             \
    P = MADD(P, R, C(0.5f));                                                                    \
    P = MADD(P, R, C(1.0f));                                                                    \
    P = MADD(P, R, C(1.0f))

static inline float pow2_int(int32_t n) {
    uint32_t bits = (uint32_t)(n + 127) << 23;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#define SCALAR_MADD(a, b, c) ((a) * (b) + (c))
#define SCALAR_C(x) (x)

MW_INLINE float exp_scalar(float d) {
    if (d != d) return d;
    if (d < EXP_UNDERFLOW) return 0.0f;
    if (d > EXP_OVERFLOW) return INFINITY;
    const float n = rintf(d * EXP_LOG2E);
    const float r = (d - n * EXP_LN2_HI) - n * EXP_LN2_LO;
    float p;
    EXP_TAYLOR(p, r, SCALAR_MADD, SCALAR_C);
    const int32_t ni = (int32_t)n, half = ni / 2;
    return p * pow2_int(half) * pow2_int(ni - half);
}

static void neg_exp_generic(const float *x, float *e, int64_t n) {
    for (int64_t k = 0; k < n; ++k) e[k] = exp_scalar(-x[k]);
}

#if MW_X86
#define ROUND512(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define ROUND256(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

static inline __attribute__((always_inline)) T512 __m512 exp512(__m512 d) {
    __m512 n, r;
    EXP_REDUCE(n, r, d, _mm512_mul_ps, ROUND512, _mm512_fnmadd_ps, _mm512_set1_ps);
    __m512 p;
    EXP_TAYLOR(p, r, _mm512_fmadd_ps, _mm512_set1_ps);
    /* p * 2^n; scalef takes n as a float and rounds under- and overflow as a product would. */
    p = _mm512_scalef_ps(p, n);
    p = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(d, _mm512_set1_ps(EXP_UNDERFLOW), _CMP_LT_OQ), p,
                             _mm512_setzero_ps());
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(d, _mm512_set1_ps(EXP_OVERFLOW), _CMP_GT_OQ), p,
                                _mm512_set1_ps(INFINITY));
}

static T512 void neg_exp_avx512(const float *x, float *e, int64_t n) {
    const __m512 zero = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) _mm512_storeu_ps(e + k, exp512(_mm512_sub_ps(zero, _mm512_loadu_ps(x + k))));
    if (k < n) {
        const __mmask16 m = (__mmask16)((1u << (n - k)) - 1u);
        _mm512_mask_storeu_ps(e + k, m, exp512(_mm512_sub_ps(zero, _mm512_maskz_loadu_ps(m, x + k))));
    }
}

static inline __attribute__((always_inline)) T256 __m256 exp256(__m256 d) {
    __m256 n, r;
    EXP_REDUCE(n, r, d, _mm256_mul_ps, ROUND256, _mm256_fnmadd_ps, _mm256_set1_ps);
    __m256 p;
    EXP_TAYLOR(p, r, _mm256_fmadd_ps, _mm256_set1_ps);
    /* 2^n as two factors built in the exponent field; n is clamped so both stay normal. */
    const __m256i ni = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(n, _mm256_set1_ps(-160.0f)),
                                                        _mm256_set1_ps(160.0f)));
    const __m256i half = _mm256_srai_epi32(ni, 1), bias = _mm256_set1_epi32(127);
    const __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
    const __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23));
    p = _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
    p = _mm256_blendv_ps(p, _mm256_setzero_ps(), _mm256_cmp_ps(d, _mm256_set1_ps(EXP_UNDERFLOW), _CMP_LT_OQ));
    return _mm256_blendv_ps(p, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(d, _mm256_set1_ps(EXP_OVERFLOW), _CMP_GT_OQ));
}

static T256 void neg_exp_avx2(const float *x, float *e, int64_t n) {
    const __m256 zero = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) _mm256_storeu_ps(e + k, exp256(_mm256_sub_ps(zero, _mm256_loadu_ps(x + k))));
    for (; k < n; ++k) e[k] = exp_scalar(-x[k]);
}
#endif

#endif /* MEMWISE_KERNELS_EXP_H */
