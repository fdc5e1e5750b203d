/* W4A8 products: 4-bit group-wise weights (memwise/kernels/int4.py's layout: groups of 64 columns,
 * byte j of a group = column j in the low nibble, column 32 + j in the high one) x int8 activation
 * rows.  Per group an exact int32 dot, then float32, one operation at a time and in int4.py's order:
 * t_g = scale_g * idot_g + zero_g * qsum_g, acc = t_0 + t_1 + ..., out = acc * (1 / s) (+ bias).
 * The constants are float16 (their bits as uint16_t); each row's are widened to float32 before the
 * combine (VCVTPH2PS on the AVX paths, i4_half_to_float on the scalar one: both exact, so the
 * combine sees the same floats on every path).
 *
 * Codes are 0..15, so they are the unsigned operand of VPDPBUSD / VPMADDUBSW as they stand and the
 * int8 activations the signed one: no shift, no sign trick, and VPMADDUBSW pairs stay below
 * 2 * 15 * 128 = 3840, far from saturation.  One group's 64 lanes reduce to one int32; four groups
 * reduce together (i4_reduce4_*), which costs about a third of four separate reductions.  The
 * AVX-512 path reads two groups per 64-byte load, against activations rearranged once per call
 * (i4_pair_row), and reduces eight groups together: 10-15% fewer cycles per row than one group per
 * 32-byte load.
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
    const uint16_t *params; /* [N, G, 2]: scale, zero, float16 bits */
    const float *bias;     /* [N] or NULL */
    int64_t N, Kp, G, M;
    const int8_t *q;       /* [M, Kp] activations, zero padded */
    const int8_t *qp;      /* [M, Kp] the same in pair order (i4_pair_row), AVX-512 only; or NULL */
    const float *qsum;     /* [M, G]: each group's sum of q, as float */
    const float *xinv;     /* [M]: 1 / s */
    int32_t *out_dots;     /* [M, N, G] or NULL */
    float *out_f32;        /* [M, N] or NULL */
} i4_job_t;

typedef void (*i4_dots_fn)(const uint8_t *codes, const int8_t *q, const int8_t *qp, int64_t G, int32_t *dots);
typedef void (*i4_widen_fn)(const uint16_t *half, int64_t n, float *out);

/* float16 bits -> float32, exact for every value (subnormals become normal floats: man * 2**-24). */
static inline float i4_half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 31u, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
    else {
        const float f = (float)man * 0x1p-24f;
        return sign ? -f : f;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void i4_widen_scalar(const uint16_t *half, int64_t n, float *out) {
    for (int64_t i = 0; i < n; ++i) out[i] = i4_half_to_float(half[i]);
}

/* The pair order of an activation row for the AVX-512 path, which reads two groups' codes (64
 * bytes) per load: per pair of groups (2p, 2p + 1), 64 bytes that line up with the low nibbles
 * (columns 0..31 of group 2p, then of group 2p + 1) and 64 that line up with the high nibbles
 * (columns 32..63 of each).  A last unpaired group is not written (it is read from q). */
static void i4_pair_row(const int8_t *q, int64_t G, int8_t *qp) {
    for (int64_t p = 0; p + 1 < G; p += 2) {
        const int8_t *g0 = q + 64 * p, *g1 = g0 + 64;
        int8_t *out = qp + 64 * p;
        memcpy(out, g0, 32), memcpy(out + 32, g1, 32);
        memcpy(out + 64, g0 + 32, 32), memcpy(out + 96, g1 + 32, 32);
    }
}

static void i4_dots_scalar(const uint8_t *c, const int8_t *q, const int8_t *qp, int64_t G, int32_t *dots) {
    (void)qp;
    for (int64_t g = 0; g < G; ++g, c += 32, q += 64) {
        int32_t s = 0;
        for (int j = 0; j < 32; ++j) s += (int32_t)(c[j] & 15) * q[j] + (int32_t)(c[j] >> 4) * q[32 + j];
        dots[g] = s;
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

static T256 inline __m256i i4_group_avx2(const uint8_t *c, const int8_t *q) {
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const __m256i b = _mm256_loadu_si256((const __m256i *)c);
    const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
    const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)q)), ones);
    const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(q + 32))), ones);
    return _mm256_add_epi32(p0, p1);
}

static T256 void i4_dots_avx2(const uint8_t *c, const int8_t *q, const int8_t *qp, int64_t G, int32_t *dots) {
    int64_t g = 0;
    (void)qp;
    for (; g + 4 <= G; g += 4)
        _mm_storeu_si128((__m128i *)(dots + g),
                         i4_reduce4_256(i4_group_avx2(c + 32 * g, q + 64 * g), i4_group_avx2(c + 32 * (g + 1), q + 64 * (g + 1)),
                                        i4_group_avx2(c + 32 * (g + 2), q + 64 * (g + 2)),
                                        i4_group_avx2(c + 32 * (g + 3), q + 64 * (g + 3))));
    if (g < G) i4_dots_scalar(c + 32 * g, q + 64 * g, NULL, G - g, dots + g);
}

static T512 inline __m128i i4_reduce4_512(__m512i a, __m512i b, __m512i c, __m512i d) {
    __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    __m512i t = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
    __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64(t, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

static T512 inline __m512i i4_group_avx512(const uint8_t *c, const int8_t *q) {
    const __m256i low = _mm256_set1_epi8(15);
    const __m256i b = _mm256_loadu_si256((const __m256i *)c);
    const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
    const __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, _mm512_loadu_si512((const void *)q));
}

/* Two groups' 64 codes in one 64-byte load: lanes 0..7 of the result sum group 2p, 8..15 group 2p + 1
 * (qp in pair order, i4_pair_row). */
static T512 inline __m512i i4_pair_avx512(const uint8_t *c, const int8_t *qp) {
    const __m512i low = _mm512_set1_epi8(15);
    const __m512i b = _mm512_loadu_si512((const void *)c);
    const __m512i lo = _mm512_and_si512(b, low), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
    const __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)qp));
    return _mm512_dpbusd_epi32(acc, hi, _mm512_loadu_si512((const void *)(qp + 64)));
}

/* Four pair sums (groups g .. g + 7) -> their eight totals, in group order. */
static T512 inline void i4_reduce8_512(__m512i a, __m512i b, __m512i c, __m512i d, int32_t *dots) {
    __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    __m512i t = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
    /* 128-bit lanes 0 and 1 hold the first group of each pair (a, b, c, d), lanes 2 and 3 the second */
    const __m256i first = _mm512_castsi512_si256(t), second = _mm512_extracti64x4_epi64(t, 1);
    const __m128i x0 = _mm_add_epi32(_mm256_castsi256_si128(first), _mm256_extracti128_si256(first, 1));
    const __m128i x1 = _mm_add_epi32(_mm256_castsi256_si128(second), _mm256_extracti128_si256(second, 1));
    _mm_storeu_si128((__m128i *)dots, _mm_unpacklo_epi32(x0, x1));
    _mm_storeu_si128((__m128i *)(dots + 4), _mm_unpackhi_epi32(x0, x1));
}

static T512 void i4_dots_avx512(const uint8_t *c, const int8_t *q, const int8_t *qp, int64_t G, int32_t *dots) {
    int64_t g = 0;
    for (; g + 8 <= G; g += 8)
        i4_reduce8_512(i4_pair_avx512(c + 32 * g, qp + 64 * g), i4_pair_avx512(c + 32 * (g + 2), qp + 64 * (g + 2)),
                       i4_pair_avx512(c + 32 * (g + 4), qp + 64 * (g + 4)),
                       i4_pair_avx512(c + 32 * (g + 6), qp + 64 * (g + 6)), dots + g);
    for (; g + 4 <= G; g += 4)
        _mm_storeu_si128((__m128i *)(dots + g),
                         i4_reduce4_512(i4_group_avx512(c + 32 * g, q + 64 * g),
                                        i4_group_avx512(c + 32 * (g + 1), q + 64 * (g + 1)),
                                        i4_group_avx512(c + 32 * (g + 2), q + 64 * (g + 2)),
                                        i4_group_avx512(c + 32 * (g + 3), q + 64 * (g + 3))));
    if (g < G) i4_dots_scalar(c + 32 * g, q + 64 * g, NULL, G - g, dots + g);
}
#endif

#if MW_X86
/* F16C came with AVX2 on every x86 that has both (Intel Haswell, AMD Piledriver and later) */
static __attribute__((target("avx2,fma,f16c"))) void i4_widen_avx2(const uint16_t *half, int64_t n, float *out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(half + i))));
    i4_widen_scalar(half + i, n - i, out + i);
}

static T512 void i4_widen_avx512(const uint16_t *half, int64_t n, float *out) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(half + i))));
    i4_widen_scalar(half + i, n - i, out + i);
}
#endif

static i4_widen_fn i4_widen_of(int isa) {
#if MW_X86
    if (isa == ISA_AMX || isa == ISA_AVX512VNNI) return i4_widen_avx512;
    if ((isa == ISA_AVXVNNI || isa == ISA_AVX2) && __builtin_cpu_supports("f16c")) return i4_widen_avx2;
#endif
    (void)isa;
    return i4_widen_scalar;
}

/* Whether the path reads activations in pair order (i4_pair_row). */
static int i4_uses_pairs(int isa) { return isa == ISA_AMX || isa == ISA_AVX512VNNI; }

static i4_dots_fn i4_dots_of(int isa) {
#if MW_X86
    if (isa == ISA_AMX || isa == ISA_AVX512VNNI) return i4_dots_avx512;
    if (isa == ISA_AVXVNNI || isa == ISA_AVX2) return i4_dots_avx2;
#endif
    (void)isa;
    return i4_dots_scalar;
}

/* The float combine of one (token, row), in int4.py's order; p: the row's constants widened. */
static void i4_put(const i4_job_t *j, int64_t m, int64_t n, const int32_t *dots, const float *p) {
    if (j->out_dots) {
        memcpy(j->out_dots + (m * j->N + n) * j->G, dots, sizeof(int32_t) * (size_t)j->G);
        return;
    }
    const float *qs = j->qsum + m * j->G;
    float acc = 0.0f;
    for (int64_t g = 0; g < j->G; ++g) {
        const float a = p[2 * g] * (float)dots[g], b = p[2 * g + 1] * qs[g];
        const float t = a + b;
        acc = g == 0 ? t : acc + t;
    }
    const float v = acc * j->xinv[m];
    j->out_f32[m * j->N + n] = j->bias ? v + j->bias[n] : v;
}

/* Each tile's constants are widened once for all M tokens (64 KiB of stack at the largest K). */
static void i4_run_tiles(const i4_job_t *j, i4_dots_fn fn, i4_widen_fn widen, int64_t t0, int64_t t1) {
    int32_t dots[I4_MAX_GROUPS];
    float p[I4_TILE * 2 * I4_MAX_GROUPS];
    for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * I4_TILE, rows = j->N - n0 < I4_TILE ? j->N - n0 : I4_TILE;
        if (!j->out_dots) widen(j->params + n0 * j->G * 2, rows * j->G * 2, p);
        for (int64_t m = 0; m < j->M; ++m)
            for (int64_t r = 0; r < rows; ++r) {
                fn(j->codes + (n0 + r) * (j->Kp / 2), j->q + m * j->Kp, j->qp ? j->qp + m * j->Kp : NULL, j->G, dots);
                i4_put(j, m, n0 + r, dots, p + r * j->G * 2);
            }
    }
}

/* Each thread takes one contiguous stretch of row tiles (as int8_products.h). */
static void i4_run(int isa, const i4_job_t *j, int nthreads) {
    const i4_dots_fn fn = i4_dots_of(isa);
    const i4_widen_fn widen = i4_widen_of(isa);
    const int64_t tiles = (j->N + I4_TILE - 1) / I4_TILE;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > tiles) nthreads = (int)(tiles > 0 ? tiles : 1);
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        i4_run_tiles(j, fn, widen, tiles * id / nt, tiles * (id + 1) / nt);
    }
#else
    i4_run_tiles(j, fn, widen, 0, tiles);
#endif
}

#endif /* MEMWISE_KERNELS_INT4_PRODUCTS_H */
