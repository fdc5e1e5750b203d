/* The AMX path: 16 weight rows x 16 activation rows per TDPBUSD, the codes of each panel unpacked
 * to bytes first, and the packing of activation rows into tiles (which the AVX-512 panels read too). */
#ifndef MEMWISE_KERNELS_AMX_H
#define MEMWISE_KERNELS_AMX_H

#include "products_avx512.h"

#if MW_X86

/* ---- AMX: 16 weight rows x 16 activation rows per TDPBUSD ---- */

#define AMX_K 64 /* bytes of K per tile row */

typedef struct __attribute__((packed)) {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* AMX products take K in the AVX-512 path's order: activation rows are in its layout, whose
 * 64-byte unit u = 4 * pair + g holds group g (k = 32g .. 32g + 31) of the first block of the pair
 * of blocks, then of the second; the 64 packed bytes of a pair of blocks of a weight row hold the
 * codes of group g in bits 2g and 2g + 1 of every byte.  So the 64 codes of a weight unit come
 * from one 64-byte load and one GF2P8AFFINEQB, whose bit matrix moves bits 2g and 2g + 1 of every
 * byte to bits 0 and 1 and clears the rest (a shift and an AND would be two instructions). */

/* Row i of the GF2P8AFFINEQB matrix (byte 7 - i of the qword) selects the input bits that make
 * output bit i: bits 2g and 2g + 1 to bits 0 and 1. */
#define AMX_GROUP_BITS(g) ((((uint64_t)1 << (2 * (g))) << 56) | (((uint64_t)2 << (2 * (g))) << 48))

/* The four units of pair p of up to 16 weight rows (w: the panel's first row, rows ws bytes
 * apart) into dst, [4 units][16 rows][64], as codes 0-2.  Rows past nr are left alone (the
 * caller zeroes them once per panel). */
static inline __attribute__((always_inline)) TAMX void amx_unpack_pair(const uint8_t *w, size_t ws, int64_t nb,
                                                                       int nr, int64_t p, uint8_t *dst,
                                                                       const char *pf) {
    /* An odd last block is loaded alone; the bytes past it are never touched. */
    const __mmask64 part = p * 2 + 1 == nb ? 0xffffffffULL : ~0ULL;
    const __m512i k3 = _mm512_set1_epi8(3);
    const __m512i g1 = _mm512_set1_epi64((long long)AMX_GROUP_BITS(1));
    const __m512i g2 = _mm512_set1_epi64((long long)AMX_GROUP_BITS(2));
    const __m512i g3 = _mm512_set1_epi64((long long)AMX_GROUP_BITS(3));
    for (int r = 0; r < nr; ++r) {
        /* The same row of the panel ahead, a line per line loaded, into L2 only: the unpacked
         * codes pass through L1 and would evict lines prefetched there. */
        if (pf) _mm_prefetch(pf + (size_t)r * ws + (size_t)p * 64, _MM_HINT_T1);
        const __m512i v = _mm512_maskz_loadu_epi8(part, w + (size_t)r * ws + (size_t)p * 64);
        uint8_t *d = dst + r * AMX_K;
        _mm512_store_si512((void *)d, _mm512_and_si512(v, k3));
        _mm512_store_si512((void *)(d + 1024), _mm512_gf2p8affine_epi64_epi8(v, g1, 0));
        _mm512_store_si512((void *)(d + 2048), _mm512_gf2p8affine_epi64_epi8(v, g2, 0));
        _mm512_store_si512((void *)(d + 3072), _mm512_gf2p8affine_epi64_epi8(v, g3, 0));
    }
}

/* Writes a 16 (weight rows) x 16 (activation rows) block of code sums to the output, which is
 * [M][N]: transposed in registers so each activation row is one 16-wide vector.  The block is the
 * sum of nbuf tiles in cbuf (256 values each). */
static inline __attribute__((always_inline)) TAMX void amx_store(const job_t *j, int64_t m0, int64_t n0,
                                                                 int nr, const int32_t *cbuf, int nbuf) {
    __m512i r[16];
    for (int i = 0; i < 16; ++i) {
        r[i] = _mm512_load_si512((const void *)(cbuf + 16 * i));
        for (int g = 1; g < nbuf; ++g) {
            __m512i v = _mm512_load_si512((const void *)(cbuf + 256 * g + 16 * i));
            r[i] = _mm512_add_epi32(r[i], v);
        }
    }
    transpose16(r);
    const __mmask16 keep = (__mmask16)((1u << nr) - 1u);
    const int mr = j->M - m0 < 16 ? (int)(j->M - m0) : 16;
    for (int m = 0; m < mr; ++m) store_lanes(j, r[transposed_row[m]], m0 + m, n0, keep);
}

/* Sum tiles tmm0-3 += the four unpacked units of one pair (slot: [4][16][64]) times activation
 * tiles t0 .. t0 + nt - 1 of units u0 .. u0 + 3.  tmm4/tmm7 hold weight codes, tmm5/tmm6
 * activations; operands alternate between two tiles so a load can overlap the previous dot
 * product.  With one or two activation tiles, even and odd units add into different sum tiles:
 * one chain of dependent TDPBUSDs would wait on the instruction's latency. */
static inline __attribute__((always_inline)) TAMX void amx_pair(const uint8_t *slot, const uint8_t *bt,
                                                                int64_t t0, int64_t u0, int64_t units,
                                                                int nt) {
#define AMX_A(T, G) _tile_loadd(T, slot + (G) * 1024, AMX_K)
#define AMX_B(T, MT, G) _tile_loadd(T, bt + (size_t)((t0 + (MT)) * units + u0 + (G)) * 1024, 64)
    if (nt == 1) {
        for (int g = 0; g < 4; g += 2) {
            AMX_A(4, g);
            AMX_B(5, 0, g);
            _tile_dpbusd(0, 4, 5);
            AMX_A(7, g + 1);
            AMX_B(6, 0, g + 1);
            _tile_dpbusd(1, 7, 6);
        }
    } else if (nt == 2) {
        for (int g = 0; g < 4; g += 2) {
            AMX_A(4, g);
            AMX_B(5, 0, g);
            AMX_B(6, 1, g);
            _tile_dpbusd(0, 4, 5);
            _tile_dpbusd(2, 4, 6);
            AMX_A(7, g + 1);
            AMX_B(5, 0, g + 1);
            AMX_B(6, 1, g + 1);
            _tile_dpbusd(1, 7, 5);
            _tile_dpbusd(3, 7, 6);
        }
    } else {
        for (int g = 0; g < 4; g += 2) {
            AMX_A(4, g);
            AMX_B(5, 0, g);
            _tile_dpbusd(0, 4, 5);
            AMX_B(6, 1, g);
            _tile_dpbusd(1, 4, 6);
            AMX_B(5, 2, g);
            _tile_dpbusd(2, 4, 5);
            if (nt > 3) {
                AMX_B(6, 3, g);
                _tile_dpbusd(3, 4, 6);
            }
            AMX_A(7, g + 1);
            AMX_B(5, 0, g + 1);
            _tile_dpbusd(0, 7, 5);
            AMX_B(6, 1, g + 1);
            _tile_dpbusd(1, 7, 6);
            AMX_B(5, 2, g + 1);
            _tile_dpbusd(2, 7, 5);
            if (nt > 3) {
                AMX_B(6, 3, g + 1);
                _tile_dpbusd(3, 7, 6);
            }
        }
    }
#undef AMX_A
#undef AMX_B
}

/* Up to 64 activation rows (all activation tiles fit in the four sum tiles), a panel is unpacked
 * a pair of blocks at a time into a ring of AMX_RING pairs, so the unpacked codes stay in L1
 * whatever K is, and each pair is multiplied AMX_LAG pairs after it was unpacked, so the tile
 * loads do not wait on stores still in flight.  With more rows the panel is unpacked once and
 * every group of four activation tiles reads it. */
#define AMX_RING 4
#define AMX_LAG 2

/* Every pair of blocks of a panel reads the activation tiles of those blocks: 4 KB per pair and
 * tile of 16 rows, 44 KB for K = 2816 (mmfree-370m's down_proj), more than L1 holds next to the
 * ring.  So when the tiles of all of K pass AMX_CHUNK_BYTES, K is taken in chunks of at most that
 * many bytes of tiles, over AMX_GROUP panels at a time, the partial sums waiting in memory between
 * chunks; each chunk's tiles stay in L1 for the whole group (benchmarks/amx_product.c measures
 * it; docs/intel-xeon-amx-2026-11.md has the figures). */
#define AMX_CHUNK_BYTES (16 * 1024)
#define AMX_GROUP 8

/* Pairs [q0, q1) of one panel (up to 16 weight rows from w, nr of them real), through the ring,
 * into the sum tiles. */
static inline __attribute__((always_inline)) TAMX void amx_ring_pairs(const job_t *j, const uint8_t *w, size_t ws,
                                                                      int nr, int64_t q0, int64_t q1,
                                                                      uint8_t *ring, int64_t slots, int64_t lag,
                                                                      int64_t units, int nt, const char *pf) {
    const uint8_t *bt = (const uint8_t *)j->act_tiles;
    int64_t put_slot = 0, get_slot = 0;
    /* Each pass multiplies before it unpacks, so a slot is free again once its pair has been
     * multiplied in the same pass: 1 <= lag <= slots. */
    for (int64_t q = q0; q < q1 + lag; ++q) {
        if (q >= q0 + lag) {
            amx_pair(ring + get_slot * AMX_PAIR_BYTES, bt, 0, 4 * (q - lag), units, nt);
            get_slot = get_slot + 1 == slots ? 0 : get_slot + 1;
        }
        if (q < q1) {
            amx_unpack_pair(w, ws, j->nb, nr, q, ring + put_slot * AMX_PAIR_BYTES, pf);
            put_slot = put_slot + 1 == slots ? 0 : put_slot + 1;
        }
    }
}

/* The sum tiles of activation tiles t0 .. t0 + nt - 1 and panel rows n0 .. n0 + nr - 1 to the
 * output (cbuf: room for four tiles). */
static inline __attribute__((always_inline)) TAMX void amx_finish(const job_t *j, int64_t t0, int nt, int64_t n0,
                                                                  int nr, int32_t cbuf[4][256]) {
    _tile_stored(0, cbuf[0], 64);
    _tile_stored(1, cbuf[1], 64);
    _tile_stored(2, cbuf[2], 64);
    _tile_stored(3, cbuf[3], 64);
    if (nt == 1) {
        amx_store(j, t0 * 16, n0, nr, cbuf[0], 2);
    } else if (nt == 2) {
        amx_store(j, t0 * 16, n0, nr, cbuf[0], 2);
        amx_store(j, (t0 + 1) * 16, n0, nr, cbuf[2], 2);
    } else {
        for (int t = 0; t < nt; ++t) amx_store(j, (t0 + t) * 16, n0, nr, cbuf[t], 1);
    }
}

/* Up to 64 rows: panels [p0, p1) in groups of AMX_GROUP, K in chunks of `chunk` pairs (all of K
 * in one chunk when its tiles fit). */
static inline __attribute__((always_inline)) TAMX void amx_ringed(const job_t *j, int64_t p0, int64_t p1) {
    const int64_t pairs = (j->nb + 1) / 2, units = 4 * pairs;
    const size_t ws = (size_t)j->nb * BLOCK_BYTES;
    const int nt = (int)j->mtiles;
    int64_t chunk = AMX_CHUNK_BYTES / (nt * AMX_PAIR_BYTES);
    if (chunk < 1) chunk = 1;
    /* The ring is on the thread's stack: placed in the shared workspace, it made one of the two
     * threads of the fused step 1.6 times slower in every product (which one followed the
     * address, not the core); on the stack it is private to the thread and stays in its cache. */
    uint8_t ring[AMX_RING * AMX_PAIR_BYTES] __attribute__((aligned(64)));
    const int64_t slots = pairs < AMX_RING ? pairs : AMX_RING;
    const int64_t lag = slots < AMX_LAG ? slots : AMX_LAG;
    int32_t cbuf[4][16 * 16] __attribute__((aligned(64)));
    /* Partial sums of the group's panels between chunks: tiles 0-1 hold them for one activation
     * tile, 0-3 for more. */
    int32_t partial[AMX_GROUP][4][16 * 16] __attribute__((aligned(64)));
    for (int64_t g0 = p0; g0 < p1; g0 += AMX_GROUP) {
        const int64_t g1 = g0 + AMX_GROUP < p1 ? g0 + AMX_GROUP : p1;
        for (int64_t c0 = 0; c0 < pairs; c0 += chunk) {
            const int64_t c1 = c0 + chunk < pairs ? c0 + chunk : pairs;
            for (int64_t p = g0; p < g1; ++p) {
                const int64_t n0 = p * 16;
                const int nr = j->N - n0 < 16 ? (int)(j->N - n0) : 16;
                int32_t(*part)[256] = partial[p - g0];
                /* Rows past N multiply as zeros (their outputs are never stored). */
                if (nr < 16) memset(ring, 0, (size_t)slots * AMX_PAIR_BYTES);
                if (c0 == 0) {
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                } else {
                    _tile_loadd(0, part[0], 64);
                    _tile_loadd(1, part[1], 64);
                    if (nt > 1) {
                        _tile_loadd(2, part[2], 64);
                        _tile_loadd(3, part[3], 64);
                    }
                }
                amx_ring_pairs(j, j->w + (size_t)n0 * ws, ws, nr, c0, c1, ring, slots, lag, units, nt,
                               tile_ahead(j, p, p1, 16));
                if (c1 < pairs) {
                    _tile_stored(0, part[0], 64);
                    _tile_stored(1, part[1], 64);
                    if (nt > 1) {
                        _tile_stored(2, part[2], 64);
                        _tile_stored(3, part[3], 64);
                    }
                } else {
                    amx_finish(j, 0, nt, n0, nr, cbuf);
                }
            }
        }
    }
}

static TAMX void run_amx(const job_t *j, int64_t p0, int64_t p1, int tid) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
    if (j->mtiles <= 4) {
        amx_ringed(j, p0, p1);
        _tile_release();
        return;
    }
    const int64_t pairs = (j->nb + 1) / 2, units = 4 * pairs;
    const size_t ws = (size_t)j->nb * BLOCK_BYTES;
    const uint8_t *bt = (const uint8_t *)j->act_tiles;
    uint8_t *abuf = j->unpacked + (size_t)tid * unpacked_bytes(j->nb);
    int32_t cbuf[4][16 * 16] __attribute__((aligned(64)));
    for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * 16;
        const int nr = j->N - n0 < 16 ? (int)(j->N - n0) : 16;
        const uint8_t *w = j->w + (size_t)n0 * ws;
        const char *pf = tile_ahead(j, p, p1, 16);
        if (nr < 16) memset(abuf, 0, (size_t)pairs * AMX_PAIR_BYTES);
        for (int64_t q = 0; q < pairs; ++q) amx_unpack_pair(w, ws, j->nb, nr, q, abuf + q * AMX_PAIR_BYTES, pf);
        for (int64_t t0 = 0; t0 < j->mtiles; t0 += 4) {
            const int nt = j->mtiles - t0 < 4 ? (int)(j->mtiles - t0) : 4;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t q = 0; q < pairs; ++q) amx_pair(abuf + q * AMX_PAIR_BYTES, bt, t0, 4 * q, units, nt);
            amx_finish(j, t0, nt, n0, nr, cbuf);
        }
    }
    _tile_release();
}

/* Activation rows [m0, m1) of one tile (m1 - m0 <= 16, rows of qs bytes in the AVX-512 layout,
 * from q) to TDPBUSD B tiles for units [u0, u1): row r of tile (t, u) holds, for each of the
 * tile's 16 activation rows, bytes 4r .. 4r + 3 of unit u: a 16 x 16 transpose of 32-bit
 * elements.  Rows past m1 are zeros. */
static T512 void pack_act_tile(const int8_t *q, size_t qs, int64_t m0, int64_t m1, int64_t u0, int64_t u1,
                               int64_t units, int8_t *bt) {
    const int64_t t = m0 / 16;
    for (int64_t u = u0; u < u1; ++u) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i)
            r[i] = m0 + i < m1 ? _mm512_loadu_si512((const void *)(q + (size_t)(m0 + i) * qs + u * 64))
                               : _mm512_setzero_si512();
        transpose16(r);
        int8_t *dst = bt + (size_t)(t * units + u) * 1024;
        for (int i = 0; i < 16; ++i) _mm512_store_si512((void *)(dst + i * 64), r[transposed_row[i]]);
    }
}

/* All M activation rows to B tiles. */
static void pack_act_tiles(const int8_t *q, size_t qs, int64_t M, int64_t nb, int8_t *bt) {
    const int64_t units = 4 * ((nb + 1) / 2);
    for (int64_t m0 = 0; m0 < M; m0 += 16)
        pack_act_tile(q, qs, m0, m0 + 16 < M ? m0 + 16 : M, 0, units, units, bt);
}
#endif /* MW_X86 */

#endif /* MEMWISE_KERNELS_AMX_H */
