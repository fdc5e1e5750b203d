/* W4A8 products: 4-bit group-wise weights (memwise/kernels/int4.py's layout: groups of 64 columns,
 * byte j of a group = column j in the low nibble, column 32 + j in the high one) x int8 activation
 * rows.  Per group an exact int32 dot, then float32, one operation at a time and in int4.py's order:
 * t_g = scale_g * idot_g + zero_g * qsum_g, acc = t_0 + t_1 + ..., out = acc * (1 / s) (+ bias).
 *
 * Codes are 0..15, so they are the unsigned operand of VPDPBUSD / VPMADDUBSW as they stand and the
 * int8 activations the signed one: no shift, no sign trick, and VPMADDUBSW pairs stay below
 * 2 * 15 * 128 = 3840, far from saturation.  Four weight rows go together: they share each
 * activation load, their four group sums reduce together (i4_reduce4_*, about a third of the cost of
 * four separate reductions), and their float combines run as four independent chains.
 *
 * This file is compiled with -std=c11, under which GCC does not contract a * b + c into an FMA: the
 * float combine below is the reference's, bit for bit. */
#ifndef MEMWISE_KERNELS_INT4_PRODUCTS_H
#define MEMWISE_KERNELS_INT4_PRODUCTS_H

#include "common.h"

#define I4_GROUP 64
#define I4_MAX_GROUPS 2048 /* K < 2**17 (int4.py's MAX_COLS) */
#define I4_TILE 4

typedef struct {
    const uint8_t *codes;  /* [N, Kp / 2] */
    const float *params;   /* [N, G, 2]: scale, zero */
    const float *bias;     /* [N] or NULL */
    int64_t N, Kp, G, M;
    const int8_t *q;       /* [M, Kp] activations, zero padded */
    const float *qsum;     /* [M, G]: each group's sum of q, as float */
    const float *xinv;     /* [M]: 1 / s */
    int32_t *out_dots;     /* [M, N, G] or NULL */
    float *out_f32;        /* [M, N] or NULL */
} i4_job_t;

/* Dots of one token against the I4_TILE rows `c[r]` (repeat a row for a short tile): dots[g * 4 + r].
 * The four rows share each activation load, and their four sums of a group reduce together. */
typedef void (*i4_dots_fn)(const uint8_t *const c[I4_TILE], const int8_t *q, int64_t G, int32_t *dots);

static void i4_dots_scalar(const uint8_t *const c[I4_TILE], const int8_t *q, int64_t G, int32_t *dots) {
    for (int64_t g = 0; g < G; ++g)
        for (int r = 0; r < I4_TILE; ++r) {
            const uint8_t *w = c[r] + 32 * g;
            const int8_t *a = q + 64 * g;
            int32_t s = 0;
            for (int j = 0; j < 32; ++j) s += (int32_t)(w[j] & 15) * a[j] + (int32_t)(w[j] >> 4) * a[32 + j];
            dots[g * I4_TILE + r] = s;
        }
}

#if MW_X86
/* Four vectors of int32 lanes -> their four totals, in order, in one SSE register. */
static T256 inline __m128i i4_reduce4_256(__m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i ab = _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
    __m256i cd = _mm256_add_epi32(_mm256_unpacklo_epi32(c, d), _mm256_unpackhi_epi32(c, d));
    __m256i t = _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
    return _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
}

static T256 inline __m256i i4_group_avx2(const uint8_t *c, __m256i q0, __m256i q1) {
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const __m256i b = _mm256_loadu_si256((const __m256i *)c);
    const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo, q0), ones),
                            _mm256_madd_epi16(_mm256_maddubs_epi16(hi, q1), ones));
}

static T256 void i4_dots_avx2(const uint8_t *const c[I4_TILE], const int8_t *q, int64_t G, int32_t *dots) {
    for (int64_t g = 0; g < G; ++g) {
        const __m256i q0 = _mm256_loadu_si256((const __m256i *)(q + 64 * g));
        const __m256i q1 = _mm256_loadu_si256((const __m256i *)(q + 64 * g + 32));
        _mm_storeu_si128((__m128i *)(dots + g * I4_TILE),
                         i4_reduce4_256(i4_group_avx2(c[0] + 32 * g, q0, q1), i4_group_avx2(c[1] + 32 * g, q0, q1),
                                        i4_group_avx2(c[2] + 32 * g, q0, q1), i4_group_avx2(c[3] + 32 * g, q0, q1)));
    }
}

static T512 inline __m128i i4_reduce4_512(__m512i a, __m512i b, __m512i c, __m512i d) {
    __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    __m512i t = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
    __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64(t, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

static T512 inline __m512i i4_group_avx512(const uint8_t *c, __m512i q) {
    const __m256i low = _mm256_set1_epi8(15);
    const __m256i b = _mm256_loadu_si256((const __m256i *)c);
    const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
    const __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, q);
}

static T512 void i4_dots_avx512(const uint8_t *const c[I4_TILE], const int8_t *q, int64_t G, int32_t *dots) {
    for (int64_t g = 0; g < G; ++g) {
        const __m512i a = _mm512_loadu_si512((const void *)(q + 64 * g));
        _mm_storeu_si128((__m128i *)(dots + g * I4_TILE),
                         i4_reduce4_512(i4_group_avx512(c[0] + 32 * g, a), i4_group_avx512(c[1] + 32 * g, a),
                                        i4_group_avx512(c[2] + 32 * g, a), i4_group_avx512(c[3] + 32 * g, a)));
    }
}
#endif

static i4_dots_fn i4_dots_of(int isa) {
#if MW_X86
    if (isa == ISA_AMX || isa == ISA_AVX512VNNI) return i4_dots_avx512;
    if (isa == ISA_AVXVNNI || isa == ISA_AVX2) return i4_dots_avx2;
#endif
    (void)isa;
    return i4_dots_scalar;
}

/* The float combine of one token and the tile's rows, in int4.py's order for each row; the rows'
 * chains are independent, so they overlap instead of waiting on one add after another. */
static void i4_put(const i4_job_t *j, int64_t m, int64_t n0, int rows, const int32_t *dots) {
    if (j->out_dots) {
        for (int r = 0; r < rows; ++r)
            for (int64_t g = 0; g < j->G; ++g) j->out_dots[(m * j->N + n0 + r) * j->G + g] = dots[g * I4_TILE + r];
        return;
    }
    const float *p = j->params + n0 * j->G * 2, *qs = j->qsum + m * j->G;
    float acc[I4_TILE] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t g = 0; g < j->G; ++g)
        for (int r = 0; r < I4_TILE; ++r) {
            const float *pr = p + (r < rows ? r : 0) * j->G * 2;
            const float a = pr[2 * g] * (float)dots[g * I4_TILE + r], b = pr[2 * g + 1] * qs[g];
            const float t = a + b;
            acc[r] = g == 0 ? t : acc[r] + t;
        }
    for (int r = 0; r < rows; ++r) {
        const float v = acc[r] * j->xinv[m];
        j->out_f32[m * j->N + n0 + r] = j->bias ? v + j->bias[n0 + r] : v;
    }
}

#if MW_X86
/* i4_put's float combine with the four rows in the lanes of one SSE register: the same IEEE
 * operations in the same order per row (separate multiplies and adds, never an FMA). */
static T256 void i4_put_sse(const i4_job_t *j, int64_t m, int64_t n0, int rows, const int32_t *dots) {
    const int64_t G = j->G, stride = 2 * G;
    const float *p = j->params + n0 * stride, *qs = j->qsum + m * G;
    const int64_t o1 = (rows > 1 ? 1 : 0) * stride, o2 = (rows > 2 ? 2 : 0) * stride, o3 = (rows > 3 ? 3 : 0) * stride;
    __m128 acc = _mm_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        const float *pg = p + 2 * g;
        const __m128 scale = _mm_setr_ps(pg[0], pg[o1], pg[o2], pg[o3]);
        const __m128 zero = _mm_setr_ps(pg[1], pg[o1 + 1], pg[o2 + 1], pg[o3 + 1]);
        const __m128 d = _mm_cvtepi32_ps(_mm_loadu_si128((const __m128i *)(dots + g * I4_TILE)));
        const __m128 t = _mm_add_ps(_mm_mul_ps(scale, d), _mm_mul_ps(zero, _mm_set1_ps(qs[g])));
        acc = g == 0 ? t : _mm_add_ps(acc, t);
    }
    float v[I4_TILE];
    _mm_storeu_ps(v, _mm_mul_ps(acc, _mm_set1_ps(j->xinv[m])));
    for (int r = 0; r < rows; ++r) j->out_f32[m * j->N + n0 + r] = j->bias ? v[r] + j->bias[n0 + r] : v[r];
}
#endif

static void i4_run_tiles(const i4_job_t *j, i4_dots_fn fn, int64_t t0, int64_t t1) {
    int32_t dots[I4_MAX_GROUPS * I4_TILE];
    for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * I4_TILE;
        const int rows = j->N - n0 < I4_TILE ? (int)(j->N - n0) : I4_TILE;
        const uint8_t *c[I4_TILE];
        for (int r = 0; r < I4_TILE; ++r) c[r] = j->codes + (n0 + (r < rows ? r : 0)) * (j->Kp / 2);
        for (int64_t m = 0; m < j->M; ++m) {
            fn(c, j->q + m * j->Kp, j->G, dots);
#if MW_X86
            if (!j->out_dots && fn != i4_dots_scalar) {
                i4_put_sse(j, m, n0, rows, dots);
                continue;
            }
#endif
            i4_put(j, m, n0, rows, dots);
        }
    }
}

/* Each thread takes one contiguous stretch of row tiles (as int8_products.h). */
static void i4_run(int isa, const i4_job_t *j, int nthreads) {
    const i4_dots_fn fn = i4_dots_of(isa);
    const int64_t tiles = (j->N + I4_TILE - 1) / I4_TILE;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > tiles) nthreads = (int)(tiles > 0 ? tiles : 1);
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        i4_run_tiles(j, fn, tiles * id / nt, tiles * (id + 1) / nt);
    }
#else
    i4_run_tiles(j, fn, 0, tiles);
#endif
}

#endif /* MEMWISE_KERNELS_INT4_PRODUCTS_H */
