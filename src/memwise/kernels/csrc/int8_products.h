/* W8A8 products: int8 weights [N, Kp] (symmetric per output row) x int8 activation rows, exact
 * int32 sums, then out = acc * w_scale[n] / s[m] (+ bias), the math of memwise/kernels/int8.py.
 *
 * Kp is K rounded up to I8_ALIGN with zero weights, so every path's loop is whole; activation rows
 * are written at the same padded width with zeros.  Weights are in [-127, 127] (the quantizer
 * never makes -128; int8.py checks matrices built by hand), activations in [-128, 127].
 *
 * Per path, what the activation row is turned into before the product (I8_ACT_* below):
 * - AVX-512 VNNI: u = q + 128 as u8, because VPDPBUSD multiplies u8 by s8; the sums then carry
 *   128 * sum(w) extra, which is subtracted with the row sums computed once at load.  Lane sums
 *   may wrap, but wrapping is modular and the true sum fits in int32 (|sum| <= 128 * 127 * K),
 *   so the result is exact.
 * - AVX2: a = |q| as u8 and the sign of q moved onto the weight (VPSIGNB), so VPMADDUBSW sees
 *   pairs of at most 2 * 128 * 127 = 32512 < 32767 and never saturates.  The sign goes onto the
 *   weight rather than the activation because -(-128) does not fit in int8 and -(w) always does.
 * - scalar: q itself.
 * AVX-VNNI (256-bit) and AMX machines run the AVX2 and AVX-512 VNNI code for now. */
#ifndef MEMWISE_KERNELS_INT8_PRODUCTS_H
#define MEMWISE_KERNELS_INT8_PRODUCTS_H

#include "common.h"

#define I8_ALIGN 64 /* one AVX-512 register of int8 */
#define I8_TILE 4   /* weight rows that share each activation load */

enum { I8_ACT_PLAIN = 0, I8_ACT_ABS = 1, I8_ACT_SHIFTED = 2 };

typedef struct {
    const int8_t *w;       /* [N, Kp] */
    const int32_t *wsum;   /* [N]: sum of each weight row (AVX-512 VNNI correction) */
    const float *wscale;   /* [N], float outputs only */
    const float *bias;     /* [N] or NULL */
    int64_t N, Kp, M;
    const int8_t *q;       /* [M, Kp] activations, zero padded */
    const uint8_t *a;      /* [M, Kp] the path's form of them (I8_ACT_ABS or I8_ACT_SHIFTED) */
    const float *xinv;     /* [M]: 1 / s of each activation row, float outputs only */
    int32_t *out_i32;      /* [M, N] or NULL */
    float *out_f32;        /* [M, N] or NULL */
} i8_job_t;

static int i8_act_form(int isa) {
    if (isa == ISA_AMX || isa == ISA_AVX512VNNI) return I8_ACT_SHIFTED;
    if (isa == ISA_AVXVNNI || isa == ISA_AVX2) return I8_ACT_ABS;
    return I8_ACT_PLAIN;
}

/* Writes the path's form of one padded activation row. */
static void i8_act_row(int form, const int8_t *q, int64_t Kp, uint8_t *a) {
    if (form == I8_ACT_SHIFTED)
        for (int64_t k = 0; k < Kp; ++k) a[k] = (uint8_t)((int)q[k] + 128);
    else if (form == I8_ACT_ABS)
        for (int64_t k = 0; k < Kp; ++k) a[k] = (uint8_t)(q[k] < 0 ? -(int)q[k] : q[k]);
}

static inline void i8_put(const i8_job_t *j, int64_t m, int64_t n, int32_t acc) {
    if (!j->out_f32) {
        j->out_i32[m * j->N + n] = acc;
        return;
    }
    float v = (float)acc * j->wscale[n] * j->xinv[m];
    j->out_f32[m * j->N + n] = j->bias ? v + j->bias[n] : v;
}

/* ---- scalar ---- */

static void i8_rows_scalar(const i8_job_t *j, int64_t n0, int rows, int64_t m) {
    const int8_t *q = j->q + m * j->Kp;
    for (int r = 0; r < rows; ++r) {
        const int8_t *w = j->w + (n0 + r) * j->Kp;
        int32_t s = 0;
        for (int64_t k = 0; k < j->Kp; ++k) s += (int32_t)w[k] * q[k];
        i8_put(j, m, n0 + r, s);
    }
}

#if MW_X86
/* ---- AVX2: |q| x sign(q) * w, pairs summed by VPMADDUBSW, quads by VPMADDWD ---- */

static T256 inline int32_t i8_hsum256(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static T256 void i8_rows_avx2(const i8_job_t *j, int64_t n0, int rows, int64_t m) {
    const uint8_t *a = j->a + m * j->Kp;
    const int8_t *q = j->q + m * j->Kp, *w = j->w + n0 * j->Kp;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[I8_TILE] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                            _mm256_setzero_si256()};
    for (int64_t k = 0; k < j->Kp; k += 32) {
        const __m256i va = _mm256_loadu_si256((const __m256i *)(a + k));
        const __m256i vq = _mm256_loadu_si256((const __m256i *)(q + k));
        for (int r = 0; r < rows; ++r) {
            __m256i vw = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(w + r * j->Kp + k)), vq);
            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_maddubs_epi16(va, vw), ones));
        }
    }
    for (int r = 0; r < rows; ++r) i8_put(j, m, n0 + r, i8_hsum256(acc[r]));
}

/* ---- AVX-512 VNNI: (q + 128) x w by VPDPBUSD, minus 128 * sum(w) ---- */

static T512 void i8_rows_avx512(const i8_job_t *j, int64_t n0, int rows, int64_t m) {
    const uint8_t *a = j->a + m * j->Kp;
    const int8_t *w = j->w + n0 * j->Kp;
    __m512i acc[I8_TILE] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                            _mm512_setzero_si512()};
    for (int64_t k = 0; k < j->Kp; k += 64) {
        const __m512i va = _mm512_loadu_si512((const void *)(a + k));
        for (int r = 0; r < rows; ++r)
            acc[r] = _mm512_dpbusd_epi32(acc[r], va, _mm512_loadu_si512((const void *)(w + r * j->Kp + k)));
    }
    for (int r = 0; r < rows; ++r)
        i8_put(j, m, n0 + r, (int32_t)((uint32_t)_mm512_reduce_add_epi32(acc[r]) -
                                       (uint32_t)j->wsum[n0 + r] * 128u));
}

/* ---- AVX-512 VNNI, many activation rows: register tiles ----
 * A prefill's product runs I8_TILE weight rows x I8_GEMM_COLS activation rows at a time, the
 * I8_TILE * I8_GEMM_COLS = 24 accumulators held in registers across all of Kp: per 64 bytes of K,
 * 4 weight and 6 activation loads feed 24 VPDPBUSD (0.42 loads each, against 1.25 one activation
 * row at a time), and the 16 lanes of four accumulators are summed together (i8_sum4_512) instead
 * of one horizontal reduce per output. Integer sums wrap modulo 2^32 in any order, so the result
 * is the same exact int32 as the other paths; the float rescale is i8_put's, unchanged. */
#define I8_GEMM_COLS 6

/* Lanes of a0..a3 summed: {sum a0, sum a1, sum a2, sum a3}. */
static inline __attribute__((always_inline)) T512 __m128i i8_sum4_512(__m512i a0, __m512i a1, __m512i a2,
                                                                       __m512i a3) {
    const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
    const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* One activation row c of a register tile: its 4 accumulators x0c..x3c take one K step.  Named
 * variables, not an array: GCC kept an array of 24 accumulators in registers but also stored
 * every one of them to the stack on every step. */
#define I8_COL(c)                                                                     \
    if (C > c) {                                                                      \
        const __m512i va = _mm512_loadu_si512((const void *)(a + c * Kp + k));        \
        x0##c = _mm512_dpbusd_epi32(x0##c, va, w0);                                   \
        x1##c = _mm512_dpbusd_epi32(x1##c, va, w1);                                   \
        x2##c = _mm512_dpbusd_epi32(x2##c, va, w2);                                   \
        x3##c = _mm512_dpbusd_epi32(x3##c, va, w3);                                   \
    }
#define I8_PUT_COL(c) \
    if (C > c) i8_put4(j, n0, m0 + c, _mm_sub_epi32(i8_sum4_512(x0##c, x1##c, x2##c, x3##c), shift));
#define I8_ZERO4(c) __m512i x0##c = z, x1##c = z, x2##c = z, x3##c = z

static inline __attribute__((always_inline)) T512 void i8_put4(const i8_job_t *j, int64_t n0, int64_t m,
                                                               __m128i sums) {
    int32_t v[I8_TILE];
    _mm_storeu_si128((__m128i *)v, sums);
    for (int r = 0; r < I8_TILE; ++r) i8_put(j, m, n0 + r, v[r]);
}

/* Weight rows n0..n0+3 x activation rows m0..m0+C-1 (C <= I8_GEMM_COLS, a constant once inlined). */
static inline __attribute__((always_inline)) T512 void i8_tile512(const i8_job_t *j, int64_t n0, int64_t m0,
                                                                  const int C, const int8_t *pf) {
    const int64_t Kp = j->Kp;
    const int8_t *w = j->w + n0 * Kp;
    const uint8_t *a = j->a + m0 * Kp;
    const __m512i z = _mm512_setzero_si512();
    I8_ZERO4(0); I8_ZERO4(1); I8_ZERO4(2); I8_ZERO4(3); I8_ZERO4(4); I8_ZERO4(5);
    for (int64_t k = 0; k < Kp; k += 64) {
        const __m512i w0 = _mm512_loadu_si512((const void *)(w + k));
        const __m512i w1 = _mm512_loadu_si512((const void *)(w + Kp + k));
        const __m512i w2 = _mm512_loadu_si512((const void *)(w + 2 * Kp + k));
        const __m512i w3 = _mm512_loadu_si512((const void *)(w + 3 * Kp + k));
        if (pf)
            for (int r = 0; r < I8_TILE; ++r) _mm_prefetch((const char *)(pf + r * Kp + k), _MM_HINT_T0);
        I8_COL(0) I8_COL(1) I8_COL(2) I8_COL(3) I8_COL(4) I8_COL(5)
    }
    const __m128i shift = _mm_slli_epi32(_mm_loadu_si128((const __m128i *)(j->wsum + n0)), 7);
    I8_PUT_COL(0) I8_PUT_COL(1) I8_PUT_COL(2) I8_PUT_COL(3) I8_PUT_COL(4) I8_PUT_COL(5)
}
#undef I8_COL
#undef I8_PUT_COL
#undef I8_ZERO4

/* GCC 12's partial redundancy elimination (-O3) made the 24-accumulator loop load and store every
 * accumulator on every step; without it the loop is 10 loads and 24 VPDPBUSD. */
#if defined(__GNUC__) && !defined(__clang__)
#define I8_NO_PRE __attribute__((optimize("no-tree-pre")))
#else
#define I8_NO_PRE
#endif

static I8_NO_PRE T512 void i8_tile512_cols(const i8_job_t *j, int64_t n0, int64_t m0, int C, const int8_t *pf) {
    switch (C) {
    case 6: i8_tile512(j, n0, m0, 6, pf); break;
    case 5: i8_tile512(j, n0, m0, 5, pf); break;
    case 4: i8_tile512(j, n0, m0, 4, pf); break;
    case 3: i8_tile512(j, n0, m0, 3, pf); break;
    case 2: i8_tile512(j, n0, m0, 2, pf); break;
    default: i8_tile512(j, n0, m0, 1, pf); break;
    }
}

/* Activation bytes one pass keeps in L2 while a thread's weight tiles go by: the rows are read
 * again for every tile, so a prompt whose rows outgrow L2 (256 x 8192 is 2 MiB) is taken in
 * blocks of rows, each block with its own pass over the weights. */
#define I8_GEMM_BLOCK_BYTES (384 << 10)

/* Tiles [t0, t1) of I8_TILE weight rows against every activation row, in register tiles. */
static T512 void i8_gemm_avx512(const i8_job_t *j, int64_t t0, int64_t t1) {
    int64_t mb = I8_GEMM_BLOCK_BYTES / j->Kp / I8_GEMM_COLS * I8_GEMM_COLS;
    if (mb < I8_GEMM_COLS) mb = I8_GEMM_COLS;
    for (int64_t b0 = 0; b0 < j->M; b0 += mb) {
        const int64_t b1 = j->M - b0 < mb ? j->M : b0 + mb;
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t n0 = t * I8_TILE;
            if (j->N - n0 < I8_TILE) {
                for (int64_t m = b0; m < b1; ++m) i8_rows_avx512(j, n0, (int)(j->N - n0), m);
                continue;
            }
            /* The first register tile of a weight tile asks for the next weight tile (4 rows, 4
             * streams from L3 or DRAM), so that its first register tile waits less; a small gain
             * in A/B runs (benchmarks/int8_gemm_ab.py), within a shared machine's noise. */
            const int8_t *pf = j->N - n0 >= 2 * I8_TILE ? j->w + (n0 + I8_TILE) * j->Kp : NULL;
            for (int64_t m = b0; m < b1; m += I8_GEMM_COLS, pf = NULL)
                i8_tile512_cols(j, n0, m, b1 - m < I8_GEMM_COLS ? (int)(b1 - m) : I8_GEMM_COLS, pf);
        }
    }
}
#endif

typedef void (*i8_rows_fn)(const i8_job_t *, int64_t, int, int64_t);

static i8_rows_fn i8_rows_of(int isa) {
#if MW_X86
    if (isa == ISA_AMX || isa == ISA_AVX512VNNI) return i8_rows_avx512;
    if (isa == ISA_AVXVNNI || isa == ISA_AVX2) return i8_rows_avx2;
#endif
    (void)isa;
    return i8_rows_scalar;
}

/* Weight rows per tile.  A few activation rows (a decode step's) take one weight row at a time, so
 * that the matrix is read in one sequential stream: four rows side by side are four streams of Kp
 * bytes each, which the hardware prefetchers follow poorly when rows are short (a 3072 x 1024
 * GEMV out of cache ran 1.9x faster one row at a time; docs/quantization.md).  More activation rows
 * (a prefill) share each weight tile, which then stays in L1/L2 while they pass. */
#define I8_STREAM_M 4

static int64_t i8_tile_rows(int64_t M) { return M <= I8_STREAM_M ? 1 : I8_TILE; }

/* Activation rows from which the AVX-512 VNNI path runs register tiles (i8_gemm_avx512); above
 * I8_STREAM_M, so that the threads' stretches are of I8_TILE rows, the register tiles' height. */
#define I8_GEMM_M 5
#if I8_GEMM_M <= I8_STREAM_M
#error "I8_GEMM_M must exceed I8_STREAM_M"
#endif

static int i8_uses_gemm(int isa, int64_t M) {
    return MW_X86 && (isa == ISA_AMX || isa == ISA_AVX512VNNI) && M >= I8_GEMM_M;
}

/* Tiles [t0, t1) of `tile` weight rows against every activation row. */
static void i8_run_tiles(const i8_job_t *j, i8_rows_fn fn, int64_t tile, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * tile;
        const int rows = j->N - n0 < tile ? (int)(j->N - n0) : (int)tile;
        for (int64_t m = 0; m < j->M; ++m) fn(j, n0, rows, m);
    }
}

static void i8_run_part(int isa, const i8_job_t *j, i8_rows_fn fn, int64_t tile, int64_t t0, int64_t t1) {
#if MW_X86
    if (i8_uses_gemm(isa, j->M)) {
        i8_gemm_avx512(j, t0, t1);
        return;
    }
#endif
    (void)isa;
    i8_run_tiles(j, fn, tile, t0, t1);
}

/* The threading of the ternary products (jobs.h): each thread takes one contiguous stretch of
 * weight tiles, which the hardware prefetchers stream best. */
static void i8_run(int isa, const i8_job_t *j, int nthreads) {
    const i8_rows_fn fn = i8_rows_of(isa);
    const int64_t tile = i8_tile_rows(j->M), tiles = (j->N + tile - 1) / tile;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > tiles) nthreads = (int)(tiles > 0 ? tiles : 1);
#ifdef _OPENMP
    if (nthreads > 1) {
#pragma omp parallel num_threads(nthreads)
        {
            const int nt = omp_get_num_threads(), id = omp_get_thread_num();
            i8_run_part(isa, j, fn, tile, tiles * id / nt, tiles * (id + 1) / nt);
        }
        return;
    }
#endif
    i8_run_part(isa, j, fn, tile, 0, tiles);
}

#endif /* MEMWISE_KERNELS_INT8_PRODUCTS_H */
