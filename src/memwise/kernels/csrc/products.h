/* Products of int8 activation rows and packed ternary weights: the job every path runs, and the
 * scalar, AVX2 and AVX-VNNI paths (GEMV and the tiled GEMM), and the prefetch distances all paths
 * share.  The AVX-512 VNNI path is in products_avx512.h. */
#ifndef MEMWISE_KERNELS_PRODUCTS_H
#define MEMWISE_KERNELS_PRODUCTS_H

#include "common.h"

/* ------------------------------------------------------------------------------------------ */
/* Products                                                                                   */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    const uint8_t *w;      /* packed weights [N, nb * 32] */
    int64_t N, nb;
    const int8_t *q;       /* activations in the kernel's layout, [M, qs] */
    size_t qs;
    int64_t M;
    const int32_t *sumq;   /* [M] */
    int32_t *out_i32;      /* [M, N] or NULL */
    float *out_f32;        /* [M, N] or NULL: then out = float(acc) * rs[m] */
    const float *rs;
    const int8_t *act_tiles; /* AMX and AVX-512 panels: activations in tiles of 16 rows,
                                [mtiles][Kp / 64][16][64] (pack_act_tile) */
    int64_t mtiles;
    uint8_t *unpacked;     /* AMX, and AVX-512 from PANEL_MIN_ROWS rows: per-thread unpacked
                              codes of a panel of 16 weight rows, unpacked_bytes(nb) each */
    size_t pf_far;         /* GEMV: bytes ahead of the far prefetches (tile_ahead_by), 0 for none */
    int64_t ldo;           /* elements from one output row to the next (N unless a job writes
                              part of a wider output) */
    int residual;          /* float outputs: out = out + float(acc) * rs[m], the residual add
                              x = x + f(x) done as the product stores f(x) */
    int64_t pf_end;        /* tiles up to which the prefetches may run when a call's range
                              [t0, t1) is one chunk of a longer stretch (0: up to t1) */
} job_t;

static inline void put(const job_t *j, int64_t m, int64_t n, int32_t codesum) {
    int32_t acc = codesum - j->sumq[m];
    if (j->out_f32) {
        float *o = j->out_f32 + m * j->ldo + n;
        const float v = (float)acc * j->rs[m];
        *o = j->residual ? *o + v : v;
    } else
        j->out_i32[m * j->ldo + n] = acc;
}

/* Activation rows per chunk in the GEMM: a chunk of activations should stay in L2 while every
 * weight tile streams past it once. */
static int64_t gemm_row_chunk(size_t qs) {
    int64_t rows = (int64_t)((256u * 1024u) / (qs ? qs : 1));
    rows &= ~(int64_t)3;
    return rows < 4 ? 4 : rows;
}

/* ---- scalar ---- */

static void codesum_scalar(const uint8_t *w, int64_t nb, const int8_t *q, int32_t *out) {
    int32_t s = 0;
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *wb = w + b * BLOCK_BYTES;
        const int8_t *qb = q + b * BLOCK;
        for (int j = 0; j < BLOCK_BYTES; ++j) {
            int v = wb[j];
            s += (v & 3) * qb[j] + ((v >> 2) & 3) * qb[32 + j] + ((v >> 4) & 3) * qb[64 + j] +
                 ((v >> 6) & 3) * qb[96 + j];
        }
    }
    *out = s;
}

static void run_scalar(const job_t *j, int64_t t0, int64_t t1, int tid) {
    (void)tid;
    int64_t rows = gemm_row_chunk(j->qs);
    for (int64_t m0 = 0; m0 < j->M; m0 += rows) {
        int64_t m1 = m0 + rows < j->M ? m0 + rows : j->M;
        for (int64_t n = t0 * TILE_N; n < t1 * TILE_N && n < j->N; ++n)
            for (int64_t m = m0; m < m1; ++m) {
                int32_t s;
                codesum_scalar(j->w + n * j->nb * BLOCK_BYTES, j->nb, j->q + m * j->qs, &s);
                put(j, m, n, s);
            }
    }
}

#if MW_X86

/* ---- AVX2 and AVX-VNNI (256-bit): one block per load, activations in natural order ---- */


/* R activation rows x C weight rows.  Codes are unpacked once per weight block (shift, and) and
 * reused by all R activation rows.  PMADDUBSW pairs stay far from int16 saturation: each
 * product is at most 2 * 128 in size, four groups of pairs sum to at most 2048. */
#define DEFINE_TILE256(NAME, ATTR, ...)                                                              \
    static inline __attribute__((always_inline)) ATTR void NAME(                                \
        const job_t *j, int64_t n, int64_t m, const int R, const int C, const char *pf,         \
        const char *far) {                                                                      \
        const __m256i k3 = _mm256_set1_epi8(3);                                                  \
        const __m256i ones = _mm256_set1_epi16(1);                                               \
        (void)ones;                                                                              \
        __m256i acc[2][4];                                                                       \
        for (int r = 0; r < R; ++r)                                                              \
            for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_si256();                      \
        const size_t ws = (size_t)j->nb * BLOCK_BYTES;                                           \
        const uint8_t *w = j->w + n * ws;                                                        \
        const int8_t *q = j->q + m * j->qs;                                                      \
        for (int64_t b = 0; b < j->nb; ++b) {                                                    \
            __m256i raw[4];                                                                      \
            for (int c = 0; c < C; ++c) {                                                        \
                if (pf && !(b & 1)) _mm_prefetch(pf + c * ws + b * BLOCK_BYTES, _MM_HINT_T0);    \
                if (far && !(b & 1)) _mm_prefetch(far + c * ws + b * BLOCK_BYTES, _MM_HINT_T2);  \
                raw[c] = _mm256_loadu_si256((const __m256i *)(w + c * ws + b * BLOCK_BYTES));    \
            }                                                                                    \
            __VA_ARGS__                                                                          \
        }                                                                                        \
        for (int r = 0; r < R; ++r)                                                              \
            for (int c = 0; c < C; ++c) {                                                        \
                __m128i h = _mm_add_epi32(_mm256_castsi256_si128(acc[r][c]),                     \
                                          _mm256_extracti128_si256(acc[r][c], 1));               \
                h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));                                \
                h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));                                \
                put(j, m + r, n + c, _mm_cvtsi128_si32(h));                                      \
            }                                                                                    \
    }

DEFINE_TILE256(tile_avx2, T256, {
    __m256i s16[2][4];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) s16[r][c] = _mm256_setzero_si256();
    for (int g = 0; g < 4; ++g) {
        __m256i wc[4];
        for (int c = 0; c < C; ++c) wc[c] = _mm256_and_si256(_mm256_srli_epi16(raw[c], 2 * g), k3);
        for (int r = 0; r < R; ++r) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(q + r * j->qs + b * BLOCK + g * 32));
            for (int c = 0; c < C; ++c)
                s16[r][c] = _mm256_add_epi16(s16[r][c], _mm256_maddubs_epi16(wc[c], x));
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c)
            acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(s16[r][c], ones));
})

/* The AVX2 GEMV (one activation row).  One shift unpacks a block: groups 0 and 2 are (raw & 3)
 * and ((raw >> 4) & 3), groups 1 and 3 stay in place at 4 times their code, (raw & 12) and
 * ((raw >> 4) & 12), summed apart in `hi` and shifted back once per GEMV16_BLOCKS blocks.  Sums
 * stay in 16-bit lanes for those blocks, so the widening PMADDWD is paid once per 8 blocks
 * instead of every block: a row-block costs one load, one shift, four ANDs, four PMADDUBSW and
 * four 16-bit adds, against three shifts, four ANDs, four PMADDUBSW, three adds, a PMADDWD and a
 * 32-bit add before (llvm-mca figures in docs/matmul-free.md).
 * Bounds, activations in [-128, 127] (quantize.h clamps there): a PMADDUBSW lane of codes <= 2 lies
 * in [-512, 508], of in-place codes <= 8 in [-2048, 2032], and never saturates.  `hi` takes two of
 * the latter per block, so 8 blocks stay within [-32768, 32512]; `lo` within [-8192, 8128].  Each
 * `hi` lane is a multiple of 4, so hi >> 2 is exact and lo + (hi >> 2) lies within +-16384. */
#define GEMV16_BLOCKS 8

MW_INLINE T256 __m256i mac16(__m256i sum, __m256i codes, const __m256i *x) {
    return _mm256_add_epi16(sum, _mm256_maddubs_epi16(codes, _mm256_loadu_si256(x)));
}

/* Block b of C weight rows (ws bytes apart from w) against block b of the activation row q.  The
 * activations are read as memory operands of PMADDUBSW: held in registers beside the 2C sums,
 * they would not fit in sixteen. */
MW_INLINE T256 void gemv_rows_avx2(__m256i lo[4], __m256i hi[4], const uint8_t *w, size_t ws,
                                   const int C, const int8_t *q, int64_t b) {
    const __m256i k03 = _mm256_set1_epi8(0x03), k0c = _mm256_set1_epi8(0x0c);
    const __m256i *x = (const __m256i *)(q + b * BLOCK);
    for (int c = 0; c < C; ++c) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(w + c * ws + b * BLOCK_BYTES));
        const __m256i up = _mm256_srli_epi16(raw, 4);
        lo[c] = mac16(lo[c], _mm256_and_si256(raw, k03), x);
        hi[c] = mac16(hi[c], _mm256_and_si256(raw, k0c), x + 1);
        lo[c] = mac16(lo[c], _mm256_and_si256(up, k03), x + 2);
        hi[c] = mac16(hi[c], _mm256_and_si256(up, k0c), x + 3);
        /* An empty asm that pins the sums in registers: without it GCC reassociates the adds of
         * consecutive blocks, keeps each block's products live at once, and spills. */
        __asm__("" : "+x"(lo[c]), "+x"(hi[c]));
    }
}

/* One activation row x C weight rows.  Blocks go in pairs, one 64-byte line of each row, so each
 * line of the tile ahead is prefetched once without a test on the block's parity. */
static inline __attribute__((always_inline)) T256 void tile_avx2_gemv(
    const job_t *j, int64_t n, int64_t m, const int C, const char *pf, const char *far) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[4], lo[4], hi[4];
    for (int c = 0; c < C; ++c) acc[c] = _mm256_setzero_si256();
    const size_t ws = (size_t)j->nb * BLOCK_BYTES;
    const uint8_t *w = j->w + n * ws;
    const int8_t *q = j->q + m * j->qs;
    for (int64_t b0 = 0; b0 < j->nb; b0 += GEMV16_BLOCKS) {
        const int64_t b1 = b0 + GEMV16_BLOCKS < j->nb ? b0 + GEMV16_BLOCKS : j->nb;
        for (int c = 0; c < C; ++c) lo[c] = hi[c] = _mm256_setzero_si256();
        int64_t b = b0;
        for (; b < b1; b += 2) {
            for (int c = 0; c < C; ++c) {
                if (pf) _mm_prefetch(pf + c * ws + b * BLOCK_BYTES, _MM_HINT_T0);
                if (far) _mm_prefetch(far + c * ws + b * BLOCK_BYTES, _MM_HINT_T2);
            }
            if (b + 1 == b1) break; /* an odd last block of the row */
            gemv_rows_avx2(lo, hi, w, ws, C, q, b);
            gemv_rows_avx2(lo, hi, w, ws, C, q, b + 1);
        }
        if (b < b1) gemv_rows_avx2(lo, hi, w, ws, C, q, b);
        for (int c = 0; c < C; ++c) {
            const __m256i s = _mm256_add_epi16(lo[c], _mm256_srai_epi16(hi[c], 2));
            acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(s, ones));
        }
    }
    for (int c = 0; c < C; ++c) {
        __m128i h = _mm_add_epi32(_mm256_castsi256_si128(acc[c]),
                                  _mm256_extracti128_si256(acc[c], 1));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
        put(j, m, n + c, _mm_cvtsi128_si32(h));
    }
}

/* Each width its own function: inlined into run_avx2 beside the other tiles, GCC spilled the
 * sums of this loop to the stack. */
#define DEFINE_GEMV_AVX2(C)                                                                      \
    static __attribute__((noinline)) T256 void tile_avx2_gemv##C(                               \
        const job_t *j, int64_t n, int64_t m, const char *pf, const char *far) {                \
        tile_avx2_gemv(j, n, m, C, pf, far);                                                    \
    }
DEFINE_GEMV_AVX2(1)
DEFINE_GEMV_AVX2(2)
DEFINE_GEMV_AVX2(3)
DEFINE_GEMV_AVX2(4)
#define tile_avx2_gemv_n(j, n, m, C, pf, far) tile_avx2_gemv##C(j, n, m, pf, far)

DEFINE_TILE256(tile_avxvnni, TVNNI, {
    for (int g = 0; g < 4; ++g) {
        __m256i wc[4];
        for (int c = 0; c < C; ++c) wc[c] = _mm256_and_si256(_mm256_srli_epi16(raw[c], 2 * g), k3);
        for (int r = 0; r < R; ++r) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(q + r * j->qs + b * BLOCK + g * 32));
            for (int c = 0; c < C; ++c) acc[r][c] = _mm256_dpbusd_avx_epi32(acc[r][c], wc[c], x);
        }
    }
})

/* Weights stream from memory once per product, a few hundred KB per thread in a decode step: too
 * short for the hardware prefetchers, which restart at every 4 KB page, to reach full speed.  Each
 * tile therefore prefetches the weight rows of the tile about PF_BYTES ahead in its thread's range,
 * a line for each line it loads (a burst of prefetches would stall on the fill buffers). */
#ifndef PF_BYTES
#define PF_BYTES 8192
#endif
MW_INLINE const char *tile_ahead_by(const job_t *j, int64_t t, int64_t t1, int64_t tile_n, size_t bytes) {
    const size_t span = (size_t)j->nb * BLOCK_BYTES * (size_t)tile_n;
    const int64_t ahead = (int64_t)(bytes / span) + 1, end = j->pf_end > t1 ? j->pf_end : t1;
    if (bytes == 0 || t + ahead >= end) return NULL;
    return (const char *)j->w + (size_t)(t + ahead) * span;
}

MW_INLINE const char *tile_ahead(const job_t *j, int64_t t, int64_t t1, int64_t tile_n) {
    return tile_ahead_by(j, t, t1, tile_n, PF_BYTES);
}

/* When weights stream from DRAM the decode GEMV also asks for the tile PF_FAR_BYTES ahead, into
 * L2 only: as other tenants load the memory system and latency grows, the near prefetches alone
 * leave too few lines in flight.  For weights that stay in the last-level cache between calls the
 * far prefetches only cost, so callers whose weights fit there leave them off (job_t.pf_far). */
#ifndef PF_FAR_BYTES
#define PF_FAR_BYTES (4 * PF_BYTES)
#endif

#define DEFINE_RUN256(NAME, TILE, GEMV, ATTR)                                                         \
    static ATTR void NAME(const job_t *j, int64_t t0, int64_t t1, int tid) {                   \
        (void)tid;                                                                              \
        int64_t rows = gemm_row_chunk(j->qs);                                                   \
        for (int64_t m0 = 0; m0 < j->M; m0 += rows) {                                           \
            int64_t m1 = m0 + rows < j->M ? m0 + rows : j->M;                                   \
            for (int64_t t = t0; t < t1; ++t) {                                                 \
                int64_t n = t * TILE_N;                                                         \
                int64_t cn = j->N - n < TILE_N ? j->N - n : TILE_N;                             \
                const char *ahead = m0 == 0 ? tile_ahead(j, t, t1, TILE_N) : NULL;              \
                const char *ahead_far = ahead ? tile_ahead_by(j, t, t1, TILE_N, j->pf_far) : NULL; \
                for (int64_t m = m0; m < m1; m += 2) {                                          \
                    int r2 = m + 1 < m1;                                                        \
                    const char *pf = m == 0 ? ahead : NULL, *far = m == 0 ? ahead_far : NULL;  \
                    if (cn == 4) { if (r2) TILE(j, n, m, 2, 4, pf, far); else GEMV(j, n, m, 4, pf, far); } \
                    else if (cn == 3) { if (r2) TILE(j, n, m, 2, 3, pf, far); else GEMV(j, n, m, 3, pf, far); } \
                    else if (cn == 2) { if (r2) TILE(j, n, m, 2, 2, pf, far); else GEMV(j, n, m, 2, pf, far); } \
                    else { if (r2) TILE(j, n, m, 2, 1, pf, far); else GEMV(j, n, m, 1, pf, far); } \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }

DEFINE_RUN256(run_avx2, tile_avx2, tile_avx2_gemv_n, T256)
#define tile_avxvnni_gemv(j, n, m, C, pf, far) tile_avxvnni(j, n, m, 1, C, pf, far)
DEFINE_RUN256(run_avxvnni, tile_avxvnni, tile_avxvnni_gemv, TVNNI)

#endif /* MW_X86 */

#endif /* MEMWISE_KERNELS_PRODUCTS_H */
