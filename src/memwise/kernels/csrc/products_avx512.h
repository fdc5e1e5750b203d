/* The AVX-512 VNNI product: two blocks per 64-byte load for the GEMV and small GEMMs, and from
 * PANEL_MIN_ROWS activation rows, unpacked panels of 16 weight rows, one output row per lane. */
#ifndef MEMWISE_KERNELS_PRODUCTS_AVX512_H
#define MEMWISE_KERNELS_PRODUCTS_AVX512_H

#include "products.h"

#if MW_X86

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

/* Pair p of blocks of weight row c of a tile starting at w (rows nb blocks apart), after asking
 * for the same place in the tiles ahead (see tile_ahead), a line per line consumed. */
static inline __attribute__((always_inline)) T512 __m512i load_pair(const job_t *j, const uint8_t *w, int c,
                                                                   int64_t p, const char *pf, const char *pf_far) {
    const size_t ws = (size_t)j->nb * BLOCK_BYTES;
    if (pf) _mm_prefetch(pf + c * ws + p * 64, _MM_HINT_T0);
    if (pf_far) _mm_prefetch(pf_far + c * ws + p * 64, _MM_HINT_T2);
    return load_w512(w + c * ws + p * 64, p * 2 + 1 == j->nb);
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
        const int8_t *qp = q + p * 256;
        __m512i x0 = _mm512_loadu_si512((const void *)qp);
        __m512i x1 = _mm512_loadu_si512((const void *)(qp + 64));
        __m512i x2 = _mm512_loadu_si512((const void *)(qp + 128));
        __m512i x3 = _mm512_loadu_si512((const void *)(qp + 192));
        for (int c = 0; c < C; ++c) {
            const __m512i v = load_pair(j, w, c, p, pf, pf_far);
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
        __m512i raw[4];
        for (int c = 0; c < C; ++c) raw[c] = load_pair(j, w, c, p, pf, NULL);
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
 * another register around each VPDPBUSD, two moves per product.  b stays a broadcast load of its
 * own: VPDPBUSD with a {1to16} memory operand is much slower on Zen. */
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

/* Code sums of activation row m for weight rows n0 .. n0 + 15 (the lanes in `lanes`) to the
 * output: minus the row's activation sum, then int32, or float(acc) * rs as put() rounds it plus
 * the residual (whose add commutes). */
static inline __attribute__((always_inline)) T512 void store_lanes(const job_t *j, __m512i acc, int64_t m,
                                                                   int64_t n0, __mmask16 lanes) {
    const __m512i v = _mm512_sub_epi32(acc, _mm512_set1_epi32(j->sumq[m]));
    if (j->out_f32) {
        float *o = j->out_f32 + m * j->ldo + n0;
        __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(j->rs[m]));
        if (j->residual) f = _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, o), f);
        _mm512_mask_storeu_ps(o, lanes, f);
    } else
        _mm512_mask_storeu_epi32(j->out_i32 + m * j->ldo + n0, lanes, v);
}

/* Code sums of activation rows m .. m + R - 1 and weight rows n0 .. n0 + nr - 1 to the output. */
static inline __attribute__((always_inline)) T512 void panel_store(const job_t *j, const __m512i *acc,
                                                                   int64_t n0, int nr, int64_t m, const int R) {
    const __mmask16 lanes = (__mmask16)((1u << nr) - 1);
    for (int r = 0; r < R; ++r) store_lanes(j, acc[r], m + r, n0, lanes);
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

#endif /* MEMWISE_KERNELS_PRODUCTS_AVX512_H */
