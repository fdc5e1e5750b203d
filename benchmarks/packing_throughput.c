/* Why memwise packs ternary weights at 2 bits and not at 1.6 (5 trits per byte).
 *
 * Five base-3 digits fit in a byte (3^5 = 243 <= 256), so a 1.6-bit layout reads 20% fewer bytes
 * per token than the 2-bit one.  That only pays if unpacking keeps up with memory.  This program
 * streams every weight matrix of the 2.7B model once per pass through an int8 GEMV, as a decode
 * step does, in three ways, and reports the best pass of each:
 *
 *   read  - only loads the packed 2-bit bytes: the memory limit.
 *   2bit  - memwise's layout (memwise/kernels/packed.py): one AND per 64 weights, then VPDPBUSD.
 *   base3 - 5 trits per byte; digit i comes out of the byte b as floor(3 t / 256) with
 *           t = b * 3^i mod 256, when b = ceil(v * 256 / 243) for the base-3 number v.  Each digit
 *           costs two byte additions (t = 3t) and two compares, then VPDPBUSD.
 *
 * "weights/s" is what counts for decoding: the 1.6-bit layout is only faster when its GB/s times
 * 5 beats the 2-bit layout's GB/s times 4.  The base-3 products are checked against a scalar
 * reference before timing.
 *
 * Build and run (x86-64 with AVX-512 BW and VNNI; 2 threads on the project's VM):
 *   gcc -O2 -fopenmp benchmarks/packing_throughput.c -o /tmp/packing_throughput
 *   OMP_NUM_THREADS=2 /tmp/packing_throughput
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define ROWS 4 /* weight rows sharing each activation load, as in memwise's GEMV */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Weights of one row: 2-bit rows hold 256 per 64-byte chunk, base-3 rows 320. */
typedef struct {
    uint8_t *w;
    int64_t rows, chunks;
} matrix_t;

static T512 void gemv_2bit(const matrix_t *m, const int8_t *q, int32_t *out) {
    const __m512i k0 = _mm512_set1_epi8(0x03), k1 = _mm512_set1_epi8(0x0c);
    const __m512i k2 = _mm512_set1_epi8(0x30), k3 = _mm512_set1_epi8((char)0xc0);
    const int64_t rs = m->chunks * 64;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < m->rows; n += ROWS) {
        __m512i a0[ROWS], a1[ROWS], a2[ROWS], a3[ROWS];
        for (int c = 0; c < ROWS; ++c) a0[c] = a1[c] = a2[c] = a3[c] = _mm512_setzero_si512();
        for (int64_t p = 0; p < m->chunks; ++p) {
            const int8_t *qp = q + p * 256;
            __m512i x0 = _mm512_loadu_si512(qp), x1 = _mm512_loadu_si512(qp + 64);
            __m512i x2 = _mm512_loadu_si512(qp + 128), x3 = _mm512_loadu_si512(qp + 192);
            for (int c = 0; c < ROWS; ++c) {
                const uint8_t *wp = m->w + (n + c) * rs + p * 64;
                _mm_prefetch((const char *)wp + ROWS * rs, _MM_HINT_T0);
                __m512i v = _mm512_loadu_si512(wp);
                /* Group g stays in place (code << 2g); its sum is scaled back by 4^g at the end. */
                a0[c] = _mm512_dpbusd_epi32(a0[c], _mm512_and_si512(v, k0), x0);
                a1[c] = _mm512_dpbusd_epi32(a1[c], _mm512_and_si512(v, k1), x1);
                a2[c] = _mm512_dpbusd_epi32(a2[c], _mm512_and_si512(v, k2), x2);
                a3[c] = _mm512_dpbusd_epi32(a3[c], _mm512_and_si512(v, k3), x3);
            }
        }
        for (int c = 0; c < ROWS; ++c) {
            __m512i t = _mm512_add_epi32(a0[c], _mm512_srai_epi32(a1[c], 2));
            t = _mm512_add_epi32(t, _mm512_srai_epi32(a2[c], 4));
            t = _mm512_add_epi32(t, _mm512_srai_epi32(a3[c], 6));
            out[n + c] = _mm512_reduce_add_epi32(t);
        }
    }
}

/* Byte j of a 64-byte base-3 chunk holds the codes of weights j, j+64, ..., j+256, most
 * significant digit first, so digit i of the 64 bytes is 64 consecutive codes. */
static T512 void gemv_base3(const matrix_t *m, const int8_t *q, int32_t *out) {
    const __m512i one = _mm512_set1_epi8(1), c86 = _mm512_set1_epi8(86), c171 = _mm512_set1_epi8((char)171);
    const int64_t rs = m->chunks * 64;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < m->rows; n += ROWS) {
        __m512i acc[ROWS], t[ROWS];
        for (int c = 0; c < ROWS; ++c) acc[c] = _mm512_setzero_si512();
        for (int64_t p = 0; p < m->chunks; ++p) {
            for (int c = 0; c < ROWS; ++c) {
                const uint8_t *wp = m->w + (n + c) * rs + p * 64;
                _mm_prefetch((const char *)wp + ROWS * rs, _MM_HINT_T0);
                t[c] = _mm512_loadu_si512(wp);
            }
            for (int i = 0; i < 5; ++i) {
                __m512i x = _mm512_loadu_si512(q + p * 320 + i * 64);
                for (int c = 0; c < ROWS; ++c) {
                    /* floor(3t / 256) = (t >= 86) + (t >= 171) */
                    __mmask64 ge1 = _mm512_cmpge_epu8_mask(t[c], c86);
                    __mmask64 ge2 = _mm512_cmpge_epu8_mask(t[c], c171);
                    __m512i d = _mm512_mask_add_epi8(_mm512_maskz_mov_epi8(ge1, one), ge2,
                                                     _mm512_maskz_mov_epi8(ge1, one), one);
                    acc[c] = _mm512_dpbusd_epi32(acc[c], d, x);
                    t[c] = _mm512_add_epi8(_mm512_add_epi8(t[c], t[c]), t[c]); /* 3t mod 256 */
                }
            }
        }
        for (int c = 0; c < ROWS; ++c) out[n + c] = _mm512_reduce_add_epi32(acc[c]);
    }
}

static T512 void read_only(const matrix_t *m, int32_t *out) {
    __m512i a = _mm512_setzero_si512(), b = a;
    const int64_t rs = m->chunks * 64;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < m->rows; ++n)
        for (int64_t p = 0; p + 1 < m->chunks; p += 2) {
            a = _mm512_add_epi32(a, _mm512_loadu_si512(m->w + n * rs + p * 64));
            b = _mm512_add_epi32(b, _mm512_loadu_si512(m->w + n * rs + p * 64 + 64));
        }
    out[omp_get_thread_num()] = _mm512_reduce_add_epi32(_mm512_add_epi32(a, b));
}

static uint8_t base3_byte(const int digits[5]) { /* codes 0..2, most significant first */
    int v = 0;
    for (int i = 0; i < 5; ++i) v = v * 3 + digits[i];
    return (uint8_t)((v * 256 + 242) / 243);
}

/* The base-3 GEMV against plain integer sums on a small random matrix. */
static int check_base3(void) {
    const int64_t rows = 8, chunks = 3, K = chunks * 320;
    int8_t *codes = malloc(rows * K), *q = aligned_alloc(64, K);
    matrix_t m = {aligned_alloc(64, rows * chunks * 64 + 64 * ROWS * chunks), rows, chunks};
    int32_t got[8];
    for (int64_t k = 0; k < K; ++k) q[k] = (int8_t)(rand() % 256 - 128);
    for (int64_t i = 0; i < rows * K; ++i) codes[i] = (int8_t)(rand() % 3);
    for (int64_t n = 0; n < rows; ++n)
        for (int64_t p = 0; p < chunks; ++p)
            for (int j = 0; j < 64; ++j) {
                int d[5];
                for (int i = 0; i < 5; ++i) d[i] = codes[n * K + p * 320 + i * 64 + j];
                m.w[(n * chunks + p) * 64 + j] = base3_byte(d);
            }
#pragma omp parallel
    gemv_base3(&m, q, got);
    int bad = 0;
    for (int64_t n = 0; n < rows; ++n) {
        int32_t want = 0;
        for (int64_t k = 0; k < K; ++k) want += codes[n * K + k] * q[k];
        bad += want != got[n];
    }
    free(codes);
    free(q);
    free(m.w);
    return bad;
}

int main(void) {
    if (!__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512vnni")) {
        fprintf(stderr, "packing_throughput: needs AVX-512 BW and VNNI\n");
        return 2;
    }
    if (check_base3()) {
        fprintf(stderr, "packing_throughput: base-3 GEMV differs from the integer reference\n");
        return 1;
    }
    /* N x K of one 2.7B layer: i, f, g (as one), o, gate_proj (2I rows), down_proj. */
    const int64_t shapes[4][2] = {{3 * 2560, 2560}, {2560, 2560}, {2 * 6912, 2560}, {2560, 6912}};
    const int layers = 32, passes = 12;
    const char *names[3] = {"read", "2bit", "base3"};
    printf("%-6s %8s %9s %8s %13s\n", "layout", "MB", "best ms", "GB/s", "Gweights/s");
    for (int mode = 0; mode < 3; ++mode) {
        const int per_chunk = mode == 2 ? 320 : 256;
        matrix_t m[32 * 4];
        int8_t *q[4];
        int32_t *out = aligned_alloc(64, 4 * 16384);
        double bytes = 0, weights = 0;
        for (int s = 0; s < 4; ++s) {
            const int64_t chunks = (shapes[s][1] + per_chunk - 1) / per_chunk;
            q[s] = aligned_alloc(64, chunks * 320);
            for (int64_t k = 0; k < chunks * 320; ++k) q[s][k] = (int8_t)(rand() % 255 - 127);
            for (int l = 0; l < layers; ++l) {
                matrix_t *mm = &m[l * 4 + s];
                const size_t size = (size_t)shapes[s][0] * chunks * 64;
                mm->rows = shapes[s][0];
                mm->chunks = chunks;
                mm->w = aligned_alloc(64, size + (size_t)ROWS * chunks * 64); /* prefetch overrun */
                for (size_t i = 0; i < size; ++i) mm->w[i] = (uint8_t)(rand() % 243 * 256 / 243 + 1);
                bytes += (double)size;
                weights += (double)shapes[s][0] * shapes[s][1];
            }
        }
        double best = 1e30;
        for (int pass = 0; pass < passes; ++pass) {
            double t0 = now();
            for (int k = 0; k < layers * 4; ++k) {
#pragma omp parallel
                {
                    if (mode == 0) read_only(&m[k], out);
                    else if (mode == 1) gemv_2bit(&m[k], q[k % 4], out);
                    else gemv_base3(&m[k], q[k % 4], out);
                }
            }
            double dt = now() - t0;
            if (pass > 0 && dt < best) best = dt;
        }
        if (mode == 0) /* loads only: no weights are used */
            printf("%-6s %8.1f %9.2f %8.1f %13s\n", names[mode], bytes / 1e6, best * 1e3, bytes / best / 1e9, "-");
        else
            printf("%-6s %8.1f %9.2f %8.1f %13.1f\n", names[mode], bytes / 1e6, best * 1e3, bytes / best / 1e9,
                   weights / best / 1e9);
        for (int k = 0; k < layers * 4; ++k) free(m[k].w);
        for (int s = 0; s < 4; ++s) free(q[s]);
        free(out);
    }
    return 0;
}
