/* Products of int8 activation rows and packed ternary weights: the job every path runs, and the
 * scalar, AVX2, AVX-VNNI and AVX-512 VNNI paths (GEMV and the tiled GEMM; from PANEL_MIN_ROWS
 * rows the AVX-512 path multiplies unpacked panels of 16 weight rows). */
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
    const int64_t ahead = (int64_t)(bytes / span) + 1;
    if (bytes == 0 || t + ahead >= t1) return NULL;
    return (const char *)j->w + (size_t)(t + ahead) * span;
}

MW_INLINE const char *tile_ahead(const job_t *j, int64_t t, int64_t t1, int64_t tile_n) {
    return tile_ahead_by(j, t, t1, tile_n, PF_BYTES);
}

/* When weights stream from DRAM the decode GEMV also asks for the tile PF_FAR_BYTES ahead, into
 * L2 only: as other tenants load the memory system and latency grows, the near prefetches alone
 * leave too few lines in flight.  On the Intel Xeon VM the far ones made the 2.7B decode step 5-16%
 * faster (avx512vnni and avx2 alike); for weights that stay in the last-level cache (370M) they cost about 5%, so callers
 * whose weights fit there leave them off (job_t.pf_far). */
#ifndef PF_FAR_BYTES
#define PF_FAR_BYTES (4 * PF_BYTES)
#endif

#define DEFINE_RUN256(NAME, TILE, ATTR)                                                         \
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
                    if (cn == 4) { if (r2) TILE(j, n, m, 2, 4, pf, far); else TILE(j, n, m, 1, 4, pf, far); } \
                    else if (cn == 3) { if (r2) TILE(j, n, m, 2, 3, pf, far); else TILE(j, n, m, 1, 3, pf, far); } \
                    else if (cn == 2) { if (r2) TILE(j, n, m, 2, 2, pf, far); else TILE(j, n, m, 1, 2, pf, far); } \
                    else { if (r2) TILE(j, n, m, 2, 1, pf, far); else TILE(j, n, m, 1, 1, pf, far); } \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }

DEFINE_RUN256(run_avx2, tile_avx2, T256)
DEFINE_RUN256(run_avxvnni, tile_avxvnni, TVNNI)

/* ---- AVX-512 VNNI: two blocks per 64-byte load ---- */


/* Row m of a 16 x 16 matrix of 32-bit elements after transpose16 is r[transposed_row[m]]: the 64-bit
 * stage leaves columns 1 and 2 of each group of four swapped. */
static const int transposed_row[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};

/* 16x16 transpose of 32-bit elements: 2x2 blocks of 1, 2, 4 then 8 elements. */
static inline __attribute__((always_inline)) T512 void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4)
        for (int k = 0; k < 2; ++k) {
            r[i + k] = _mm512_unpacklo_epi64(t[i + k], t[i + k + 2]);
            r[i + k + 2] = _mm512_unpackhi_epi64(t[i + k], t[i + k + 2]);
        }
    for (int i = 0; i < 16; i += 8)
        for (int k = 0; k < 4; ++k) {
            t[i + k] = _mm512_shuffle_i32x4(r[i + k], r[i + k + 4], 0x88);
            t[i + k + 4] = _mm512_shuffle_i32x4(r[i + k], r[i + k + 4], 0xdd);
        }
    for (int k = 0; k < 8; ++k) {
        r[k] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0x88);
        r[k + 8] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0xdd);
    }
}

static inline __attribute__((always_inline)) T512 __m512i load_w512(const uint8_t *p, int half) {
    /* The odd last block of a row is loaded alone; masked-out bytes are never touched. */
    return half ? _mm512_maskz_loadu_epi8(0xffffffffULL, p) : _mm512_loadu_si512((const void *)p);
}

/* Decode (one activation row), C weight rows.  Instead of shifting codes down, group g is kept
 * in place with a mask (c << 2g, at most 128 as an unsigned byte) and accumulated separately;
 * each lane of accumulator g is a multiple of 4^g, so an arithmetic shift at the end is exact.
 * That leaves one AND per group next to each VPDPBUSD. */
static inline __attribute__((always_inline)) T512 void tile512_gemv(
    const job_t *j, int64_t n, int64_t m, const int C, const char *pf, const char *pf_far) {
    const __m512i k0 = _mm512_set1_epi8(0x03), k1 = _mm512_set1_epi8(0x0c);
    const __m512i k2 = _mm512_set1_epi8(0x30), k3 = _mm512_set1_epi8((char)0xc0);
    __m512i a0[4], a1[4], a2[4], a3[4];
    for (int c = 0; c < C; ++c)
        a0[c] = a1[c] = a2[c] = a3[c] = _mm512_setzero_si512();
    const size_t ws = (size_t)j->nb * BLOCK_BYTES;
    const uint8_t *w = j->w + n * ws;
    const int8_t *q = j->q + m * j->qs;
    const int64_t pairs = (j->nb + 1) / 2;
    for (int64_t p = 0; p < pairs; ++p) {
        const int half = (p * 2 + 1 == j->nb);
        const int8_t *qp = q + p * 256;
        __m512i x0 = _mm512_loadu_si512((const void *)qp);
        __m512i x1 = _mm512_loadu_si512((const void *)(qp + 64));
        __m512i x2 = _mm512_loadu_si512((const void *)(qp + 128));
        __m512i x3 = _mm512_loadu_si512((const void *)(qp + 192));
        for (int c = 0; c < C; ++c) {
            /* The same place in the tile ahead (see tile_ahead), a line per line consumed. */
            if (pf) _mm_prefetch(pf + c * ws + p * 64, _MM_HINT_T0);
            if (pf_far) _mm_prefetch(pf_far + c * ws + p * 64, _MM_HINT_T2);
            __m512i v = load_w512(w + c * ws + p * 64, half);
            a0[c] = _mm512_dpbusd_epi32(a0[c], _mm512_and_si512(v, k0), x0);
            a1[c] = _mm512_dpbusd_epi32(a1[c], _mm512_and_si512(v, k1), x1);
            a2[c] = _mm512_dpbusd_epi32(a2[c], _mm512_and_si512(v, k2), x2);
            a3[c] = _mm512_dpbusd_epi32(a3[c], _mm512_and_si512(v, k3), x3);
        }
    }
    for (int c = 0; c < C; ++c) {
        __m512i t = _mm512_add_epi32(a0[c], _mm512_srai_epi32(a1[c], 2));
        t = _mm512_add_epi32(t, _mm512_srai_epi32(a2[c], 4));
        t = _mm512_add_epi32(t, _mm512_srai_epi32(a3[c], 6));
        put(j, m, n + c, _mm512_reduce_add_epi32(t));
    }
}

/* Several activation rows: codes are shifted down (0..2) so one accumulator per (row, weight
 * row) suffices; each weight block is unpacked once and used by all R activation rows. */
static inline __attribute__((always_inline)) T512 void tile512_gemm(
    const job_t *j, int64_t n, int64_t m, const int R, const int C, const char *pf) {
    const __m512i k = _mm512_set1_epi8(3);
    __m512i acc[4][4];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_si512();
    const size_t ws = (size_t)j->nb * BLOCK_BYTES;
    const uint8_t *w = j->w + n * ws;
    const int8_t *q = j->q + m * j->qs;
    const int64_t pairs = (j->nb + 1) / 2;
    for (int64_t p = 0; p < pairs; ++p) {
        const int half = (p * 2 + 1 == j->nb);
        __m512i raw[4];
        for (int c = 0; c < C; ++c) {
            if (pf) _mm_prefetch(pf + c * ws + p * 64, _MM_HINT_T0);
            raw[c] = load_w512(w + c * ws + p * 64, half);
        }
        for (int g = 0; g < 4; ++g) {
            __m512i wc[4];
            for (int c = 0; c < C; ++c)
                wc[c] = _mm512_and_si512(g ? _mm512_srli_epi16(raw[c], 2 * g) : raw[c], k);
            for (int r = 0; r < R; ++r) {
                __m512i x = _mm512_loadu_si512((const void *)(q + r * j->qs + p * 256 + g * 64));
                for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], wc[c], x);
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) put(j, m + r, n + c, _mm512_reduce_add_epi32(acc[r][c]));
}

/* From PANEL_MIN_ROWS activation rows on, the AVX-512 path multiplies panels of 16 weight rows
 * with each output lane its own weight row, so no sum is ever reduced across lanes.  The 4x4
 * tiles above end every (activation row, weight row) with a horizontal sum, and at K = 1024 (most
 * 370M products) those sums cost about as much as the VPDPBUSDs themselves.
 *
 * A panel's 64-byte loads of pair p are transposed as 16 x 16 dwords, so vector d holds bytes
 * 4d .. 4d + 3 of every row; group g of those bytes (a shift and an AND) is then, lane by lane,
 * the four codes that meet the activation dword at byte 64g + 4d of the pair in the AVX-512
 * layout.  Unit u = 64p + 16g + d of the unpacked panel therefore pairs with dword u of an
 * activation row, and the activation tiles (pack_act_tile) hold dword u of 16 rows in one line. */
#define PANEL_ROWS 16

/* Pairs of blocks unpacked at a time when all activation rows fit one tile: the unpacked chunk
 * (16 KB) and the activations it meets stay in L1 together. */
#define PANEL_CHUNK_PAIRS 4

/* Pairs [p0, p1) of weight rows n0 .. n0 + nr - 1 (nr <= 16) to codes, [units][16 rows][4]:
 * rows past nr are zeros.  pf: the same rows of the panel ahead, or NULL. */
static inline __attribute__((always_inline)) T512 void panel_unpack(const job_t *j, int64_t n0, int nr,
                                                                    int64_t p0, int64_t p1, uint8_t *dst,
                                                                    const char *pf) {
    const size_t ws = (size_t)j->nb * BLOCK_BYTES;
    const uint8_t *w = j->w + (size_t)n0 * ws;
    const __m512i k3 = _mm512_set1_epi8(3);
    for (int64_t p = p0; p < p1; ++p) {
        /* An odd last block is loaded alone; the bytes past it are never touched. */
        const __mmask64 part = p * 2 + 1 == j->nb ? 0xffffffffULL : ~0ULL;
        __m512i r[16];
        for (int i = 0; i < 16; ++i) {
            if (i < nr) {
                if (pf) _mm_prefetch(pf + (size_t)i * ws + (size_t)p * 64, _MM_HINT_T0);
                r[i] = _mm512_maskz_loadu_epi8(part, w + (size_t)i * ws + (size_t)p * 64);
            } else
                r[i] = _mm512_setzero_si512();
        }
        transpose16(r);
        uint8_t *d = dst + (size_t)(p - p0) * 64 * 64;
        for (int k = 0; k < 16; ++k) {
            const __m512i v = r[transposed_row[k]];
            _mm512_store_si512((void *)(d + k * 64), _mm512_and_si512(v, k3));
            _mm512_store_si512((void *)(d + (16 + k) * 64), _mm512_and_si512(_mm512_srli_epi16(v, 2), k3));
            _mm512_store_si512((void *)(d + (32 + k) * 64), _mm512_and_si512(_mm512_srli_epi16(v, 4), k3));
            _mm512_store_si512((void *)(d + (48 + k) * 64), _mm512_and_si512(_mm512_srli_epi16(v, 6), k3));
        }
    }
}

typedef int32_t mw_i32_alias __attribute__((may_alias, aligned(1)));

/* acc + VPDPBUSD(c, b) in asm: written with the intrinsic, GCC 12 copies every accumulator to
 * another register around each VPDPBUSD, two moves per product (about 35% slower on the AMD
 * EPYC VM).  b stays a broadcast load of its own: VPDPBUSD with a {1to16} memory operand ran at
 * a third of the speed there. */
static inline __attribute__((always_inline)) T512 __m512i dpbusd_reg(__m512i acc, __m512i c, __m512i b) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(c), "v"(b));
    return acc;
}

/* acc[r] += units unpacked code vectors times dword u of activation row r, for R rows of a tile
 * (a: the tile's dwords from the first unit on). */
static inline __attribute__((always_inline)) T512 void panel_accumulate(__m512i *acc, const uint8_t *codes,
                                                                        const mw_i32_alias *a, int64_t units,
                                                                        const int R) {
    for (int64_t u = 0; u < units; ++u, a += 16) {
        const __m512i c = _mm512_load_si512((const void *)(codes + u * 64));
        for (int r = 0; r < R; ++r) acc[r] = dpbusd_reg(acc[r], c, _mm512_set1_epi32(a[r]));
    }
}

/* Code sums of activation rows m .. m + R - 1 and weight rows n0 .. n0 + nr - 1 to the output. */
static inline __attribute__((always_inline)) T512 void panel_store(const job_t *j, const __m512i *acc,
                                                                   int64_t n0, int nr, int64_t m, const int R) {
    const __mmask16 lanes = (__mmask16)((1u << nr) - 1);
    for (int r = 0; r < R; ++r) {
        const __m512i v = _mm512_sub_epi32(acc[r], _mm512_set1_epi32(j->sumq[m + r]));
        if (j->out_f32) {
            float *o = j->out_f32 + (m + r) * j->ldo + n0;
            /* float(acc) * rs, as put() rounds it; then the residual, whose add commutes */
            __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(j->rs[m + r]));
            if (j->residual) f = _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, o), f);
            _mm512_mask_storeu_ps(o, lanes, f);
        } else
            _mm512_mask_storeu_epi32(j->out_i32 + (m + r) * j->ldo + n0, lanes, v);
    }
}

/* One panel, all activation rows.  Up to 16 rows (decode) keep their sums in registers while K
 * is unpacked a chunk at a time; more rows unpack all of K once and take it 16 rows at a time. */
static inline __attribute__((always_inline)) T512 void panel_run(const job_t *j, uint8_t *codes, int64_t n0,
                                                                 int nr, const char *pf, int64_t m, const int R) {
    const int64_t pairs = (j->nb + 1) / 2, tile_units = 64 * pairs;
    const mw_i32_alias *a = (const mw_i32_alias *)j->act_tiles + (size_t)(m / 16) * (size_t)tile_units * 16;
    __m512i acc[PANEL_ROWS];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
    if (j->M <= PANEL_ROWS) {
        for (int64_t p0 = 0; p0 < pairs; p0 += PANEL_CHUNK_PAIRS) {
            const int64_t p1 = p0 + PANEL_CHUNK_PAIRS < pairs ? p0 + PANEL_CHUNK_PAIRS : pairs;
            panel_unpack(j, n0, nr, p0, p1, codes, pf);
            panel_accumulate(acc, codes, a + p0 * 64 * 16, 64 * (p1 - p0), R);
        }
    } else {
        if (m == 0) panel_unpack(j, n0, nr, 0, pairs, codes, pf);
        panel_accumulate(acc, codes, a, tile_units, R);
    }
    panel_store(j, acc, n0, nr, m, R);
}

/* Weight rows [n0, n1) of the job, all its activation rows, through unpacked panels in codes
 * (unpacked_bytes(nb) bytes, this thread's). */
static T512 void run_panels(const job_t *j, int64_t n0, int64_t n1, uint8_t *codes) {
    for (int64_t n = n0; n < n1; n += PANEL_ROWS) {
        const int nr = n1 - n < PANEL_ROWS ? (int)(n1 - n) : PANEL_ROWS;
        const char *pf = n + PANEL_ROWS < n1 ? (const char *)j->w + (size_t)(n + PANEL_ROWS) * j->nb * BLOCK_BYTES
                                             : NULL;
        for (int64_t m = 0; m < j->M; m += PANEL_ROWS) {
            switch (j->M - m < PANEL_ROWS ? (int)(j->M - m) : PANEL_ROWS) {
#define PANEL_CASE(R) case R: panel_run(j, codes, n, nr, pf, m, R); break;
            PANEL_CASE(1) PANEL_CASE(2) PANEL_CASE(3) PANEL_CASE(4) PANEL_CASE(5) PANEL_CASE(6)
            PANEL_CASE(7) PANEL_CASE(8) PANEL_CASE(9) PANEL_CASE(10) PANEL_CASE(11) PANEL_CASE(12)
            PANEL_CASE(13) PANEL_CASE(14) PANEL_CASE(15) PANEL_CASE(16)
#undef PANEL_CASE
            default: break;
            }
        }
    }
}

#define GEMM512_C(R)                                                                            \
    do {                                                                                        \
        const char *pfm = m == 0 ? pf : NULL;                                                   \
        if (cn == 4) tile512_gemm(j, n, m, R, 4, pfm);                                          \
        else if (cn == 3) tile512_gemm(j, n, m, R, 3, pfm);                                     \
        else if (cn == 2) tile512_gemm(j, n, m, R, 2, pfm);                                     \
        else tile512_gemm(j, n, m, R, 1, pfm);                                                  \
    } while (0)

static T512 void run_avx512vnni(const job_t *j, int64_t t0, int64_t t1, int tid) {
    if (j->M >= PANEL_MIN_ROWS && j->unpacked) {
        const int64_t n1 = t1 * TILE_N < j->N ? t1 * TILE_N : j->N;
        run_panels(j, t0 * TILE_N, n1, j->unpacked + (size_t)tid * unpacked_bytes(j->nb));
        return;
    }
    int64_t rows = gemm_row_chunk(j->qs);
    for (int64_t m0 = 0; m0 < j->M; m0 += rows) {
        int64_t m1 = m0 + rows < j->M ? m0 + rows : j->M;
        for (int64_t t = t0; t < t1; ++t) {
            int64_t n = t * TILE_N;
            int64_t cn = j->N - n < TILE_N ? j->N - n : TILE_N;
            int64_t m = m0;
            const char *pf = m0 == 0 ? tile_ahead(j, t, t1, TILE_N) : NULL;
            for (; m + 4 <= m1; m += 4) GEMM512_C(4);
            switch (m1 - m) {
            case 3: GEMM512_C(3); break;
            case 2: GEMM512_C(2); break;
            case 1: {
                if (m != 0) pf = NULL;
                const char *far = pf ? tile_ahead_by(j, t, t1, TILE_N, j->pf_far) : NULL;
                if (cn == 4) tile512_gemv(j, n, m, 4, pf, far);
                else if (cn == 3) tile512_gemv(j, n, m, 3, pf, far);
                else if (cn == 2) tile512_gemv(j, n, m, 2, pf, far);
                else tile512_gemv(j, n, m, 1, pf, far);
                break;
            }
            default: break;
            }
        }
    }
}

#endif /* MW_X86 */

#endif /* MEMWISE_KERNELS_PRODUCTS_H */
