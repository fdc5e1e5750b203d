/* Activation quantization: RMSNorm's output rounded to int8 rows in the kernels' layout, the math
 * of memwise.kernels.packed.quantize_activations(rmsnorm(x)), in generic, AVX2 and AVX-512 code.
 * Float work, so it agrees with the PyTorch reference to rounding (an activation within an ulp of
 * a rounding boundary can land one int8 step away); the products that follow are exact. */
#ifndef MEMWISE_KERNELS_QUANTIZE_H
#define MEMWISE_KERNELS_QUANTIZE_H

#include "common.h"

/* Sum of squares of a row, in 16 interleaved lanes (GCC/clang vector extensions, so each
 * per-instruction-set copy of a caller gets that set's registers), then the lanes and the tail.
 * The order is fixed, so every instruction-set level computes the same bits. */
#if defined(__GNUC__) || defined(__clang__)
typedef float mw_vf16 __attribute__((vector_size(64)));

MW_INLINE float sum_of_squares_body(const float *x, int64_t K) {
    mw_vf16 acc0 = {0}, acc1 = {0}, v0, v1;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        memcpy(&v0, x + k, sizeof v0);
        memcpy(&v1, x + k + 16, sizeof v1);
        acc0 += v0 * v0;
        acc1 += v1 * v1;
    }
    acc0 += acc1;
    float total = 0.0f;
    for (int l = 0; l < 16; ++l) total += acc0[l];
    for (; k < K; ++k) total += x[k] * x[k];
    return total;
}
#else
MW_INLINE float sum_of_squares_body(const float *x, int64_t K) {
    float total = 0.0f;
    for (int64_t k = 0; k < K; ++k) total += x[k] * x[k];
    return total;
}
#endif

/* r = 1 / sqrt(mean(x^2) + eps): RMSNorm's factor. */
MW_INLINE float rms_inverse_body(const float *x, int64_t K, float eps) {
    return 1.0f / sqrtf(sum_of_squares_body(x, K) / (float)K + eps);
}

static float rms_inverse(const float *x, int64_t K, float eps) { return rms_inverse_body(x, K, eps); }

/* One row: y = (x * r) * g with r = 1 / sqrt(mean(x^2) + eps), s = 127 / max(max|y|, 1e-5),
 * q = clamp(round_half_even(y * s), -128, 127).  Writes q into `dst` in the kernel's layout (dst
 * must be zeroed beforehand), returns sum(q) and stores s.  quantize_row_r takes r given, so that
 * a row normalized once can be quantized with several gains (HGRN-Bit's i, f and g projections
 * share their input). */
/* max |(x * r) * g| over a row; NaN if any value is NaN (a NaN input must not quantize silently). */
static inline float row_amax_scalar(const float *x, float r, const float *g, int64_t K) {
    float amax = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
        float a = fabsf((x[k] * r) * g[k]);
        if (a > amax || a != a) amax = a;
    }
    return amax;
}

/* Elements [k0, k1) of the row, amax given: the part of the row a thread quantizes when threads
 * share one row (every thread computes the row's amax, so none waits for another's).  Returns
 * the sum of those q and stores s. */
MW_INLINE int32_t quantize_span_body(const float *x, float r, const float *g, float amax, int isa,
                                     int natural_unpadded, int8_t *dst, float *s_out, int64_t k0, int64_t k1) {
    if (!(amax >= 1e-5f) && amax == amax) amax = 1e-5f;
    float s = (1.0f / amax) * 127.0f;
    *s_out = s;
    int32_t sum = 0;
    for (int64_t k = k0; k < k1; ++k) {
        const int64_t c = k >> 5;
        int8_t *out = dst + (natural_unpadded ? (size_t)c * 32 : chunk_offset(isa, c));
        float v = nearbyintf(((x[k] * r) * g[k]) * s);
        v = v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v);
        int8_t qv = (int8_t)v;
        out[k & 31] = qv;
        sum += qv;
    }
    return sum;
}

/* Compiled once per instruction set below (the same IEEE operations in every copy; with SSE4.1 and
 * up, nearbyintf becomes one instruction instead of a library call) and chosen at run time. */
static int32_t quantize_row_r(const float *x, float r, const float *g, int64_t K, int isa,
                              int natural_unpadded, int8_t *dst, float *s_out);

static int32_t quantize_row(const float *x, const float *g, int64_t K, float eps, int isa,
                            int natural_unpadded, int8_t *dst, float *s_out) {
    return quantize_row_r(x, rms_inverse(x, K, eps), g, K, isa, natural_unpadded, dst, s_out);
}

/* Copies a plain int8 row into the kernel's layout (dst zeroed beforehand); returns sum(q). */
static int32_t place_row(const int8_t *q, int64_t K, int isa, int8_t *dst) {
    int32_t sum = 0;
    for (int64_t c = 0; c * 32 < K; ++c) {
        int64_t n = K - c * 32 < 32 ? K - c * 32 : 32;
        memcpy(dst + chunk_offset(isa, c), q + c * 32, (size_t)n);
        for (int64_t j = 0; j < n; ++j) sum += q[c * 32 + j];
    }
    return sum;
}


static float row_amax_generic(const float *x, float r, const float *g, int64_t K) {
    return row_amax_scalar(x, r, g, K);
}

static int32_t quantize_span_generic(const float *x, float r, const float *g, float amax, int isa,
                                     int natural_unpadded, int8_t *dst, float *s_out, int64_t k0, int64_t k1) {
    return quantize_span_body(x, r, g, amax, isa, natural_unpadded, dst, s_out, k0, k1);
}

#if MW_X86
/* The maximum is exact in any order; NaNs are tracked apart because MAXPS drops them. */
static T256 float row_amax_avx2(const float *x, float r, const float *g, int64_t K) {
    const __m256 vr = _mm256_set1_ps(r), absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 acc = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 a = _mm256_and_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), vr),
                                               _mm256_loadu_ps(g + k)), absmask);
        acc = _mm256_max_ps(a, acc);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    }
    float lanes[8], amax = row_amax_scalar(x + k, r, g + k, K - k);
    _mm256_storeu_ps(lanes, acc);
    for (int l = 0; l < 8; ++l) amax = lanes[l] > amax ? lanes[l] : amax;
    return _mm256_movemask_ps(nan) ? NAN : amax;
}

static T256 int32_t quantize_span_avx2(const float *x, float r, const float *g, float amax, int isa,
                                       int natural_unpadded, int8_t *dst, float *s_out, int64_t k0, int64_t k1) {
    return quantize_span_body(x, r, g, amax, isa, natural_unpadded, dst, s_out, k0, k1);
}

static T512 float row_amax_avx512(const float *x, float r, const float *g, int64_t K) {
    const __m512 vr = _mm512_set1_ps(r);
    __m512 acc = _mm512_setzero_ps();
    __mmask16 nan = 0;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 a = _mm512_abs_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + k), vr), _mm512_loadu_ps(g + k)));
        acc = _mm512_max_ps(a, acc);
        nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    }
    if (k < K) {
        const __mmask16 m = (__mmask16)((1u << (K - k)) - 1u);
        __m512 a = _mm512_abs_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), vr),
                                               _mm512_maskz_loadu_ps(m, g + k)));
        acc = _mm512_max_ps(a, acc);
        nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    }
    return nan ? NAN : _mm512_reduce_max_ps(acc);
}

/* q = clamp(round_half_even(((x * r) * g) * s), -128, 127), 16 values at a time: the same
 * roundings as quantize_span_body, stored at the 32-value chunk offsets of the layout.  k0 is a
 * multiple of 16. */
static T512 int32_t quantize_span_avx512(const float *x, float r, const float *g, float amax, int isa,
                                         int natural_unpadded, int8_t *dst, float *s_out, int64_t k0, int64_t k1) {
    if (amax != amax) return quantize_span_body(x, r, g, amax, isa, natural_unpadded, dst, s_out, k0, k1);
    if (!(amax >= 1e-5f)) amax = 1e-5f;
    const float s = (1.0f / amax) * 127.0f;
    *s_out = s;
    const __m512 vr = _mm512_set1_ps(r), vs = _mm512_set1_ps(s);
    const __m512 lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t k = k0; k < k1; k += 16) {
        const __mmask16 m = k1 - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (k1 - k)) - 1u);
        __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), vr),
                                               _mm512_maskz_loadu_ps(m, g + k)), vs);
        /* Clamping first and converting with the default rounding (to nearest even) gives the
         * same integer as rounding first: the bounds are integers. */
        __m512i q = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(y, lo), hi));
        q = _mm512_maskz_mov_epi32(m, q);
        sum = _mm512_add_epi32(sum, q);
        const int64_t c = k >> 5;
        int8_t *out = dst + (natural_unpadded ? (size_t)c * 32 : chunk_offset(isa, c)) + (k & 31);
        _mm_mask_storeu_epi8(out, m, _mm512_cvtepi32_epi8(q));
    }
    return _mm512_reduce_add_epi32(sum);
}
#endif

/* Vector code for the float work around the products (quantization, elementwise operations):
 * every level computes the same bits, higher ones faster.  The fused step uses the level of its
 * product path (so forcing a path with MEMWISE_ISA also runs the matching vector code); other
 * callers use the best level the CPU has. */
enum { VEC_GENERIC = 0, VEC_AVX2 = 1, VEC_AVX512 = 2 };

static int vec_level_of(int isa) {
    if (isa == ISA_AMX || isa == ISA_AVX512VNNI) return VEC_AVX512;
    if (isa == ISA_AVXVNNI || isa == ISA_AVX2) return VEC_AVX2;
    return VEC_GENERIC;
}

static int vec_level_best(void) {
    if (isa_supported(ISA_AVX512VNNI)) return VEC_AVX512;
    if (isa_supported(ISA_AVX2)) return VEC_AVX2;
    return VEC_GENERIC;
}

/* max |(x * r) * g| over the row of K; NaN if any value is NaN. */
static float row_amax_lv(int level, const float *x, float r, const float *g, int64_t K) {
#if MW_X86
    if (level >= VEC_AVX512) return row_amax_avx512(x, r, g, K);
    if (level >= VEC_AVX2) return row_amax_avx2(x, r, g, K);
#endif
    (void)level;
    return row_amax_generic(x, r, g, K);
}

static int32_t quantize_span_lv(int level, const float *x, float r, const float *g, float amax, int isa,
                                int natural_unpadded, int8_t *dst, float *s_out, int64_t k0, int64_t k1) {
#if MW_X86
    if (level >= VEC_AVX512) return quantize_span_avx512(x, r, g, amax, isa, natural_unpadded, dst, s_out, k0, k1);
    if (level >= VEC_AVX2) return quantize_span_avx2(x, r, g, amax, isa, natural_unpadded, dst, s_out, k0, k1);
#endif
    (void)level;
    return quantize_span_generic(x, r, g, amax, isa, natural_unpadded, dst, s_out, k0, k1);
}

static int32_t quantize_row_lv(int level, const float *x, float r, const float *g, int64_t K, int isa,
                               int natural_unpadded, int8_t *dst, float *s_out) {
    return quantize_span_lv(level, x, r, g, row_amax_lv(level, x, r, g, K), isa, natural_unpadded, dst,
                            s_out, 0, K);
}

static int32_t quantize_row_r(const float *x, float r, const float *g, int64_t K, int isa,
                              int natural_unpadded, int8_t *dst, float *s_out) {
    return quantize_row_lv(vec_level_best(), x, r, g, K, isa, natural_unpadded, dst, s_out);
}

#endif /* MEMWISE_KERNELS_QUANTIZE_H */
