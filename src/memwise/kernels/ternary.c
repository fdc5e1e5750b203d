/* Ternary kernels for memwise: int8 activations x 2-bit packed ternary weights, exact int32 sums.
 *
 * The packed layout is the one documented in memwise/ternary.py: per output row, blocks of 128
 * weights in 32 bytes; byte j of a block holds the codes c = t + 1 of weights j, j+32, j+64, j+96
 * in bits 0-1, 2-3, 4-5, 6-7. Codes are unsigned, activations signed, so every path computes
 * sum(c * q) with unsigned-by-signed products and subtracts sum(q) once per activation row; the
 * result equals sum(t * q) exactly, q = -128 included.
 *
 * Instruction-set paths are compiled per function with target attributes and chosen at run time,
 * so the extension never needs -march=native and runs on any x86-64 (or any other CPU, scalar).
 *
 * Python calls these functions with raw data pointers; all dtype, shape and contiguity checks are
 * done in memwise/kernels/__init__.py before the pointers get here.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MW_X86 1
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#else
#define MW_X86 0
#endif

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVXVNNI = 2, ISA_AVX512VNNI = 3, ISA_AMX = 4 };
#define N_ISAS 5

/* Below this many activation rows the AMX path hands over to AVX-512 VNNI.  AMX must first
 * unpack each weight panel to one byte per code in memory, a fixed cost per panel that only
 * pays off when enough activation rows share it (measured crossover: 8 to 12 rows). */
#define AMX_MIN_ROWS 12

#define BLOCK 128
#define BLOCK_BYTES 32

/* Weight rows processed together: each activation load is shared by this many rows. */
#define TILE_N 4

/* Bytes one activation row takes in the kernel's layout.  The AVX-512 path reads two blocks
 * per 64-byte load, so its rows are padded to pairs of blocks. */
static size_t qrow_bytes(int isa, int64_t nb) {
    if (isa == ISA_AVX512VNNI)
        return (size_t)((nb + 1) / 2) * 256;
    return (size_t)nb * BLOCK;
}

/* Where the 32 activations k = 32*chunk .. 32*chunk+31 go in a row of the kernel's layout.
 * 256-bit and scalar paths use the natural order.  The AVX-512 path interleaves block pairs so
 * that one 64-byte load lines up with the codes of group g of both blocks of a 64-byte weight
 * load: [b0 g0 | b1 g0][b0 g1 | b1 g1][b0 g2 | b1 g2][b0 g3 | b1 g3]. */
static inline size_t chunk_offset(int isa, int64_t chunk) {
    if (isa == ISA_AVX512VNNI) {
        int64_t b = chunk >> 2, g = chunk & 3;
        return (size_t)((b >> 1) * 256 + g * 64 + (b & 1) * 32);
    }
    return (size_t)chunk * 32;
}

/* ------------------------------------------------------------------------------------------ */
/* Activation quantization, bit-identical to memwise.ternary.quantize_activations(rmsnorm(x))  */
/* ------------------------------------------------------------------------------------------ */

#define MAXW 16

/* torch's CPU sum of a contiguous float row (aten/src/ATen/native/cpu/SumKernel.cpp) adds in a
 * fixed order: W-lane vectors, 4 interleaved partial sums, a cascade of 4 levels, then the tail
 * and the lanes.  Float addition is not associative, so reproducing that order is what makes our
 * mean(x^2), and therefore every int8 activation, equal to the PyTorch reference.  W is found at
 * run time by comparing with torch (memwise.kernels._sum_width) because it depends on the build. */
typedef struct { float v[MAXW]; } lanes;

static inline lanes sq_load(const float *x, int64_t idx, int W) {
    lanes r;
    const float *p = x + idx * W;
    for (int l = 0; l < W; ++l) r.v[l] = p[l] * p[l];
    return r;
}

static inline void lanes_add(lanes *a, const lanes *b, int W) {
    for (int l = 0; l < W; ++l) a->v[l] = a->v[l] + b->v[l];
}

static int64_t ceil_log2(int64_t x) {
    if (x <= 2) return 1;
    int64_t r = 0;
    uint64_t v = (uint64_t)x - 1;
    while (v) { ++r; v >>= 1; }
    return r;
}

/* Sum of squares of the `size` W-lane elements x[0 .. size*W), lane by lane, in torch's order. */
static lanes cascade_row_sum(const float *x, int64_t size, int W) {
    enum { LEVELS = 4, ILP = 4 };
    const int64_t n = size / ILP;   /* rows of ILP elements for multi_row_sum */
    const int64_t power = ceil_log2(n) / LEVELS > 4 ? ceil_log2(n) / LEVELS : 4;
    const int64_t step = (int64_t)1 << power, mask = step - 1;
    lanes acc[LEVELS][ILP];
    memset(acc, 0, sizeof acc);
    int64_t i = 0;
    while (i + step <= n) {
        for (int64_t j = 0; j < step; ++j, ++i)
            for (int k = 0; k < ILP; ++k) {
                lanes v = sq_load(x, i * ILP + k, W);
                lanes_add(&acc[0][k], &v, W);
            }
        for (int j = 1; j < LEVELS; ++j) {
            for (int k = 0; k < ILP; ++k) {
                lanes_add(&acc[j][k], &acc[j - 1][k], W);
                memset(&acc[j - 1][k], 0, sizeof(lanes));
            }
            if (i & (mask << (j * power))) break;
        }
    }
    for (; i < n; ++i)
        for (int k = 0; k < ILP; ++k) {
            lanes v = sq_load(x, i * ILP + k, W);
            lanes_add(&acc[0][k], &v, W);
        }
    for (int j = 1; j < LEVELS; ++j)
        for (int k = 0; k < ILP; ++k) lanes_add(&acc[0][k], &acc[j][k], W);
    for (int64_t e = n * ILP; e < size; ++e) {
        lanes v = sq_load(x, e, W);
        lanes_add(&acc[0][0], &v, W);
    }
    for (int k = 1; k < ILP; ++k) lanes_add(&acc[0][0], &acc[0][k], W);
    return acc[0][0];
}

static float sum_of_squares(const float *x, int64_t K, int W) {
    if (K >= W && W > 1) {
        int64_t nvec = K / W;
        lanes v = cascade_row_sum(x, nvec, W);
        float total = 0.0f;
        for (int64_t k = nvec * W; k < K; ++k) total = total + x[k] * x[k];
        for (int l = 0; l < W; ++l) total = total + v.v[l];
        return total;
    }
    return cascade_row_sum(x, K, 1).v[0];
}

/* One row: y = (x * r) * g with r = 1 / sqrt(mean(x^2) + eps), s = (1 / max(max|y|, 1e-5)) * 127,
 * q = clamp(round_half_even(y * s), -128, 127).  Each operation is written as torch evaluates it
 * (torch computes `127 / t` as reciprocal(t) * 127, and rsqrt as 1 / sqrt, both in float32), and
 * the build uses -ffp-contract=off so that no multiply-add gets fused.  Writes q into `dst` in
 * the kernel's layout (dst must be zeroed beforehand), returns sum(q) and stores s. */
static int32_t quantize_row(const float *x, const float *g, int64_t K, float eps, int W,
                            int isa, int natural_unpadded, int8_t *dst, float *s_out) {
    float mean = sum_of_squares(x, K, W) / (float)K;
    float r = 1.0f / sqrtf(mean + eps);
    float amax = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
        float y = (x[k] * r) * g[k];
        float a = fabsf(y);
        if (a > amax || a != a) amax = a;
    }
    if (!(amax >= 1e-5f) && amax == amax) amax = 1e-5f;
    float s = (1.0f / amax) * 127.0f;
    *s_out = s;
    int32_t sum = 0;
    for (int64_t c = 0; c * 32 < K; ++c) {
        int8_t *out = dst + (natural_unpadded ? (size_t)c * 32 : chunk_offset(isa, c));
        int64_t end = (c + 1) * 32 < K ? (c + 1) * 32 : K;
        for (int64_t k = c * 32; k < end; ++k) {
            float v = nearbyintf(((x[k] * r) * g[k]) * s);
            v = v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v);
            int8_t qv = (int8_t)v;
            out[k - c * 32] = qv;
            sum += qv;
        }
    }
    return sum;
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
    const int8_t *amx_b;   /* AMX only: activations as VNNI B tiles [mtiles][Kp / 64][16][64] */
    int64_t mtiles;
    uint8_t *amx_a;        /* AMX only: per-thread unpacked codes, [threads][16][Kp] */
} job_t;

static inline void put(const job_t *j, int64_t m, int64_t n, int32_t codesum) {
    int32_t acc = codesum - j->sumq[m];
    if (j->out_f32)
        j->out_f32[m * j->N + n] = (float)acc * j->rs[m];
    else
        j->out_i32[m * j->N + n] = acc;
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

#define T256 __attribute__((target("avx2,fma")))
#define TVNNI __attribute__((target("avx2,fma,avxvnni")))

/* R activation rows x C weight rows.  Codes are unpacked once per weight block (shift, and) and
 * reused by all R activation rows.  PMADDUBSW pairs stay far from int16 saturation: each
 * product is at most 2 * 128 in size, four groups of pairs sum to at most 2048. */
#define DEFINE_TILE256(NAME, ATTR, ...)                                                              \
    static inline __attribute__((always_inline)) ATTR void NAME(                                \
        const job_t *j, int64_t n, int64_t m, const int R, const int C) {                       \
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
            for (int c = 0; c < C; ++c)                                                          \
                raw[c] = _mm256_loadu_si256((const __m256i *)(w + c * ws + b * BLOCK_BYTES));    \
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

#define DEFINE_RUN256(NAME, TILE, ATTR)                                                         \
    static ATTR void NAME(const job_t *j, int64_t t0, int64_t t1, int tid) {                   \
        (void)tid;                                                                              \
        int64_t rows = gemm_row_chunk(j->qs);                                                   \
        for (int64_t m0 = 0; m0 < j->M; m0 += rows) {                                           \
            int64_t m1 = m0 + rows < j->M ? m0 + rows : j->M;                                   \
            for (int64_t t = t0; t < t1; ++t) {                                                 \
                int64_t n = t * TILE_N;                                                         \
                int64_t cn = j->N - n < TILE_N ? j->N - n : TILE_N;                             \
                for (int64_t m = m0; m < m1; m += 2) {                                          \
                    int r2 = m + 1 < m1;                                                        \
                    if (cn == 4) { if (r2) TILE(j, n, m, 2, 4); else TILE(j, n, m, 1, 4); }     \
                    else if (cn == 3) { if (r2) TILE(j, n, m, 2, 3); else TILE(j, n, m, 1, 3); } \
                    else if (cn == 2) { if (r2) TILE(j, n, m, 2, 2); else TILE(j, n, m, 1, 2); } \
                    else { if (r2) TILE(j, n, m, 2, 1); else TILE(j, n, m, 1, 1); }             \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }

DEFINE_RUN256(run_avx2, tile_avx2, T256)
DEFINE_RUN256(run_avxvnni, tile_avxvnni, TVNNI)

/* ---- AVX-512 VNNI: two blocks per 64-byte load ---- */

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

static inline __attribute__((always_inline)) T512 __m512i load_w512(const uint8_t *p, int half) {
    /* The odd last block of a row is loaded alone; masked-out bytes are never touched. */
    return half ? _mm512_maskz_loadu_epi8(0xffffffffULL, p) : _mm512_loadu_si512((const void *)p);
}

/* Decode (one activation row), C weight rows.  Instead of shifting codes down, group g is kept
 * in place with a mask (c << 2g, at most 128 as an unsigned byte) and accumulated separately;
 * each lane of accumulator g is a multiple of 4^g, so an arithmetic shift at the end is exact.
 * That leaves one AND per group next to each VPDPBUSD. */
static inline __attribute__((always_inline)) T512 void tile512_gemv(
    const job_t *j, int64_t n, int64_t m, const int C) {
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
    const job_t *j, int64_t n, int64_t m, const int R, const int C) {
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
        for (int c = 0; c < C; ++c) raw[c] = load_w512(w + c * ws + p * 64, half);
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

#define GEMM512_C(R)                                                                            \
    do {                                                                                        \
        if (cn == 4) tile512_gemm(j, n, m, R, 4);                                               \
        else if (cn == 3) tile512_gemm(j, n, m, R, 3);                                          \
        else if (cn == 2) tile512_gemm(j, n, m, R, 2);                                          \
        else tile512_gemm(j, n, m, R, 1);                                                       \
    } while (0)

static T512 void run_avx512vnni(const job_t *j, int64_t t0, int64_t t1, int tid) {
    (void)tid;
    int64_t rows = gemm_row_chunk(j->qs);
    for (int64_t m0 = 0; m0 < j->M; m0 += rows) {
        int64_t m1 = m0 + rows < j->M ? m0 + rows : j->M;
        for (int64_t t = t0; t < t1; ++t) {
            int64_t n = t * TILE_N;
            int64_t cn = j->N - n < TILE_N ? j->N - n : TILE_N;
            int64_t m = m0;
            for (; m + 4 <= m1; m += 4) GEMM512_C(4);
            switch (m1 - m) {
            case 3: GEMM512_C(3); break;
            case 2: GEMM512_C(2); break;
            case 1:
                if (cn == 4) tile512_gemv(j, n, m, 4);
                else if (cn == 3) tile512_gemv(j, n, m, 3);
                else if (cn == 2) tile512_gemv(j, n, m, 2);
                else tile512_gemv(j, n, m, 1);
                break;
            default: break;
            }
        }
    }
}

/* ---- AMX: 16 weight rows x 16 activation rows per TDPBUSD ---- */

#define TAMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")))
#define AMX_K 64 /* bytes of K per tile row */

typedef struct __attribute__((packed)) {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Codes of 16 weight rows, unpacked to one byte each in natural k order: [16][Kp].  Tile A of
 * TDPBUSD is the unsigned operand, so codes go there unchanged; rows past N are zero and their
 * outputs are never stored. */
static TAMX void amx_unpack_panel(const job_t *j, int64_t n0, int nr, uint8_t *abuf) {
    const size_t ws = (size_t)j->nb * BLOCK_BYTES;
    const size_t kp = (size_t)j->nb * BLOCK;
    /* One 32-byte block broadcast to both halves; shifting only the high half (16-bit lanes
     * 16-31) by two more bits gives weights 0-63 of the block from shifts 0 and 2, and weights
     * 64-127 from shifts 4 and 6. */
    const __mmask32 high = 0xffff0000u;
    const __m512i k3 = _mm512_set1_epi8(3);
    for (int r = 0; r < nr; ++r) {
        const uint8_t *w = j->w + (size_t)(n0 + r) * ws;
        uint8_t *dst = abuf + r * kp;
        for (int64_t b = 0; b < j->nb; ++b) {
            __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(w + b * 32)));
            __m512i v4 = _mm512_srli_epi16(v, 4);
            _mm512_storeu_si512((void *)(dst + b * 128),
                                _mm512_and_si512(_mm512_mask_srli_epi16(v, high, v, 2), k3));
            _mm512_storeu_si512((void *)(dst + b * 128 + 64),
                                _mm512_and_si512(_mm512_mask_srli_epi16(v4, high, v4, 2), k3));
        }
    }
    if (nr < 16) memset(abuf + nr * kp, 0, (16 - nr) * kp);
}

/* Writes a 16 (weight rows) x 16 (activation rows) block of code sums to the output, which is
 * [M][N]: transposed in registers so each activation row is one 16-wide vector. */
static inline __attribute__((always_inline)) TAMX void amx_store(const job_t *j, int64_t m0,
                                                                 int64_t n0, int nr,
                                                                 const int32_t *cbuf) {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512((const void *)(cbuf + 16 * i));
    /* 16x16 transpose of 32-bit elements: 2x2 blocks of 1, 2, 4 then 8 elements. */
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
    /* The 64-bit stage leaves columns 1 and 2 of each group of four swapped. */
    static const int where[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
    const __mmask16 keep = (__mmask16)((1u << nr) - 1u);
    int mr = j->M - m0 < 16 ? (int)(j->M - m0) : 16;
    for (int m = 0; m < mr; ++m) {
        __m512i v = _mm512_sub_epi32(r[where[m]], _mm512_set1_epi32(j->sumq[m0 + m]));
        if (j->out_f32)
            _mm512_mask_storeu_ps(j->out_f32 + (m0 + m) * j->N + n0, keep,
                                  _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(j->rs[m0 + m])));
        else
            _mm512_mask_storeu_epi32(j->out_i32 + (m0 + m) * j->N + n0, keep, v);
    }
}

/* Weight codes of chunk C (64 values of k) of the panel into tile A. */
#define AMX_CHUNK(A, C) _tile_loadd(A, abuf + (C) * AMX_K, kp)

/* Activation tile t0 + T of chunk C into tile B, then sum tile S += A . B. */
#define AMX_STEP(S, B, A, T, C)                                                                 \
    do {                                                                                        \
        _tile_loadd(B, bt + (size_t)((t0 + (T)) * chunks + (C)) * 1024, 64);                    \
        _tile_dpbusd(S, A, B);                                                                  \
    } while (0)

static inline __attribute__((always_inline)) TAMX void amx_sum(int32_t *into, const int32_t *add) {
    for (int i = 0; i < 256; i += 16)
        _mm512_store_si512((void *)(into + i), _mm512_add_epi32(_mm512_load_si512((const void *)(into + i)),
                                                                _mm512_load_si512((const void *)(add + i))));
}

static TAMX void run_amx(const job_t *j, int64_t p0, int64_t p1, int tid) {
    const size_t kp = (size_t)j->nb * BLOCK;
    const int64_t chunks = (int64_t)(kp / AMX_K);
    const uint8_t *bt = (const uint8_t *)j->amx_b;
    uint8_t *abuf = j->amx_a + (size_t)tid * 16 * kp;
    int32_t cbuf[4][16 * 16] __attribute__((aligned(64)));
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
    for (int64_t p = p0; p < p1; ++p) {
        int64_t n0 = p * 16;
        int nr = j->N - n0 < 16 ? (int)(j->N - n0) : 16;
        amx_unpack_panel(j, n0, nr, abuf);
        for (int64_t t0 = 0; t0 < j->mtiles; t0 += 4) {
            int nt = j->mtiles - t0 < 4 ? (int)(j->mtiles - t0) : 4;
            /* tmm0-3 hold int32 sums, tmm4/tmm7 weight codes, tmm5/tmm6 activations; operands
             * alternate between two tiles so a load can overlap the previous dot product.  With
             * fewer than three activation tiles, consecutive chunks go to different sum tiles:
             * one long chain of dependent TDPBUSDs would wait on the instruction's latency. */
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            int64_t c = 0;
            if (nt == 1) {
                for (; c + 4 <= chunks; c += 4) {
                    AMX_CHUNK(4, c);
                    AMX_STEP(0, 5, 4, 0, c);
                    AMX_CHUNK(7, c + 1);
                    AMX_STEP(1, 6, 7, 0, c + 1);
                    AMX_CHUNK(4, c + 2);
                    AMX_STEP(2, 5, 4, 0, c + 2);
                    AMX_CHUNK(7, c + 3);
                    AMX_STEP(3, 6, 7, 0, c + 3);
                }
                for (; c < chunks; ++c) {
                    AMX_CHUNK(4, c);
                    AMX_STEP(0, 5, 4, 0, c);
                }
            } else if (nt == 2) {
                for (; c + 2 <= chunks; c += 2) {
                    AMX_CHUNK(4, c);
                    AMX_STEP(0, 5, 4, 0, c);
                    AMX_STEP(2, 6, 4, 1, c);
                    AMX_CHUNK(7, c + 1);
                    AMX_STEP(1, 5, 7, 0, c + 1);
                    AMX_STEP(3, 6, 7, 1, c + 1);
                }
                for (; c < chunks; ++c) {
                    AMX_CHUNK(4, c);
                    AMX_STEP(0, 5, 4, 0, c);
                    AMX_STEP(2, 6, 4, 1, c);
                }
            } else {
                for (; c < chunks; ++c) {
                    if (c & 1) {
                        AMX_CHUNK(7, c);
                        AMX_STEP(0, 5, 7, 0, c);
                        AMX_STEP(1, 6, 7, 1, c);
                        AMX_STEP(2, 5, 7, 2, c);
                        if (nt > 3) AMX_STEP(3, 6, 7, 3, c);
                    } else {
                        AMX_CHUNK(4, c);
                        AMX_STEP(0, 5, 4, 0, c);
                        AMX_STEP(1, 6, 4, 1, c);
                        AMX_STEP(2, 5, 4, 2, c);
                        if (nt > 3) AMX_STEP(3, 6, 4, 3, c);
                    }
                }
            }
            _tile_stored(0, cbuf[0], 64);
            _tile_stored(1, cbuf[1], 64);
            _tile_stored(2, cbuf[2], 64);
            _tile_stored(3, cbuf[3], 64);
            if (nt == 1) {
                amx_sum(cbuf[0], cbuf[1]);
                amx_sum(cbuf[2], cbuf[3]);
                amx_sum(cbuf[0], cbuf[2]);
                amx_store(j, t0 * 16, n0, nr, cbuf[0]);
            } else if (nt == 2) {
                amx_sum(cbuf[0], cbuf[1]);
                amx_sum(cbuf[2], cbuf[3]);
                amx_store(j, t0 * 16, n0, nr, cbuf[0]);
                amx_store(j, (t0 + 1) * 16, n0, nr, cbuf[2]);
            } else {
                for (int t = 0; t < nt; ++t) amx_store(j, (t0 + t) * 16, n0, nr, cbuf[t]);
            }
        }
    }
    _tile_release();
}

/* Activation rows (natural order, [M][Kp]) to TDPBUSD B tiles: tile (t, c) row r holds, for each
 * of its 16 activation rows m, the four bytes k = 64c + 4r .. 64c + 4r + 3. */
static void amx_pack_activations(const int8_t *qnat, int64_t M, size_t kp, int8_t *bt) {
    const int64_t chunks = (int64_t)(kp / AMX_K), mtiles = (M + 15) / 16;
    memset(bt, 0, (size_t)mtiles * chunks * 1024);
    for (int64_t m = 0; m < M; ++m) {
        const int8_t *src = qnat + m * kp;
        int8_t *tile_base = bt + (size_t)(m / 16) * chunks * 1024 + (m % 16) * 4;
        for (int64_t c = 0; c < chunks; ++c)
            for (int r = 0; r < 16; ++r)
                memcpy(tile_base + c * 1024 + r * 64, src + c * AMX_K + r * 4, 4);
    }
}

static int amx_permitted(void) {
#if defined(__linux__)
    /* Linux hands out the AMX register state only to processes that ask for it. */
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#else
    return 0;
#endif
}

#endif /* MW_X86 */

typedef void (*run_fn)(const job_t *, int64_t, int64_t, int);

static run_fn runner(int isa) {
#if MW_X86
    switch (isa) {
    case ISA_AMX: return run_amx;
    case ISA_AVX512VNNI: return run_avx512vnni;
    case ISA_AVXVNNI: return run_avxvnni;
    case ISA_AVX2: return run_avx2;
    default: break;
    }
#endif
    (void)isa;
    return run_scalar;
}

static int isa_check(int isa) {
    if (isa == ISA_SCALAR) return 1;
#if MW_X86
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
    if (isa == ISA_AVX2) return 1;
    if (isa == ISA_AVXVNNI) return __builtin_cpu_supports("avxvnni") ? 1 : 0;
    int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    if (isa == ISA_AVX512VNNI) return avx512;
    if (isa == ISA_AMX)
        return avx512 && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") &&
               amx_permitted();
#endif
    return 0;
}

static int isa_supported(int isa) {
    static int known[N_ISAS] = {-1, -1, -1, -1, -1};
    if (isa < 0 || isa >= N_ISAS) return 0;
    if (known[isa] < 0) known[isa] = isa_check(isa);
    return known[isa];
}

/* Splits the weight tiles (TILE_N rows; 16 for AMX) evenly over the threads: each thread streams
 * one contiguous stretch of the packed matrix, which is what the hardware prefetchers handle
 * best. */
static int64_t tile_rows(int isa) { return isa == ISA_AMX ? 16 : TILE_N; }

static int job_threads(int isa, int64_t N, int nthreads) {
    int64_t tiles = (N + tile_rows(isa) - 1) / tile_rows(isa);
    if (nthreads < 1) nthreads = 1;
    if (nthreads > tiles) nthreads = (int)(tiles > 0 ? tiles : 1);
    return nthreads;
}

static void run_job(int isa, const job_t *j, int nthreads) {
    run_fn fn = runner(isa);
    int64_t tiles = (j->N + tile_rows(isa) - 1) / tile_rows(isa);
    nthreads = job_threads(isa, j->N, nthreads);
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
    {
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        int64_t t0 = tiles * id / nt, t1 = tiles * (id + 1) / nt;
        fn(j, t0, t1, id);
    }
#else
    fn(j, 0, tiles, 0);
#endif
}

static void *alloc64(size_t n) {
    size_t rounded = (n + 63) & ~(size_t)63;
    void *p = NULL;
    if (posix_memalign(&p, 64, rounded ? rounded : 64) != 0) return NULL;
    return p;
}

/* ------------------------------------------------------------------------------------------ */
/* Python bindings                                                                            */
/* ------------------------------------------------------------------------------------------ */

static PyObject *py_isa_supported(PyObject *self, PyObject *args) {
    int isa;
    (void)self;
    if (!PyArg_ParseTuple(args, "i", &isa)) return NULL;
    return PyBool_FromLong(isa_supported(isa));
}

/* Buffers of one product call.  `layout` is the ISA whose activation layout the rows are
 * written in; AMX rows are written in natural order and then rearranged into B tiles. */
typedef struct {
    int isa, layout;
    size_t qs;
    int8_t *qbuf;
    int32_t *sumq;
    float *rs;
    int8_t *amx_b;
    uint8_t *amx_a;
} plan_t;

static void plan_free(plan_t *p) {
    free(p->qbuf);
    free(p->sumq);
    free(p->rs);
    free(p->amx_b);
    free(p->amx_a);
}

static int plan_make(plan_t *p, int isa, long long N, long long nb, long long M, int nthreads) {
    memset(p, 0, sizeof *p);
    p->isa = (isa == ISA_AMX && M < AMX_MIN_ROWS) ? ISA_AVX512VNNI : isa;
    p->layout = p->isa == ISA_AMX ? ISA_AVX2 : p->isa;
    p->qs = qrow_bytes(p->layout, nb);
    p->qbuf = alloc64(p->qs * (size_t)M);
    p->sumq = alloc64(sizeof(int32_t) * (size_t)M);
    p->rs = alloc64(sizeof(float) * (size_t)M);
    int ok = p->qbuf && p->sumq && p->rs;
    if (ok && p->isa == ISA_AMX) {
        size_t kp = (size_t)nb * BLOCK;
        p->amx_b = alloc64((size_t)((M + 15) / 16) * kp * 16);
        p->amx_a = alloc64((size_t)job_threads(ISA_AMX, N, nthreads) * 16 * kp);
        ok = p->amx_b && p->amx_a;
    }
    if (!ok) plan_free(p);
    return ok;
}

static void plan_run(plan_t *p, const uint8_t *w, long long N, long long nb, long long M,
                     int32_t *out_i32, float *out_f32, int nthreads) {
#if MW_X86
    if (p->isa == ISA_AMX) amx_pack_activations(p->qbuf, M, (size_t)nb * BLOCK, p->amx_b);
#endif
    job_t j = {w, N, nb, p->qbuf, p->qs, M, p->sumq, out_i32, out_f32, p->rs,
               p->amx_b, (M + 15) / 16, p->amx_a};
    run_job(p->isa, &j, nthreads);
}

/* matmul(isa, w_ptr, N, nb, q_ptr, M, K, out_ptr, nthreads): out int32 [M, N] = q @ t^T. */
static PyObject *py_matmul(PyObject *self, PyObject *args) {
    int isa, nthreads;
    unsigned long long wp, qp, op;
    long long N, nb, M, K;
    plan_t p;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKLLKLLKi", &isa, &wp, &N, &nb, &qp, &M, &K, &op, &nthreads))
        return NULL;
    if (!isa_supported(isa)) return PyErr_Format(PyExc_ValueError, "isa %d not supported", isa);
    if (!plan_make(&p, isa, N, nb, M, nthreads)) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    memset(p.qbuf, 0, p.qs * (size_t)M);
    for (long long m = 0; m < M; ++m)
        p.sumq[m] = place_row((const int8_t *)(uintptr_t)qp + m * K, K, p.layout, p.qbuf + m * p.qs);
    plan_run(&p, (const uint8_t *)(uintptr_t)wp, N, nb, M, (int32_t *)(uintptr_t)op, NULL, nthreads);
    Py_END_ALLOW_THREADS
    plan_free(&p);
    Py_RETURN_NONE;
}

/* bitlinear(isa, w_ptr, N, nb, scale, x_ptr, M, K, g_ptr, eps, sum_width, out_ptr, nthreads):
 * out float32 [M, N] = BitLinear(x) as memwise.ternary.bitlinear_reference computes it. */
static PyObject *py_bitlinear(PyObject *self, PyObject *args) {
    int isa, nthreads, W;
    unsigned long long wp, xp, gp, op;
    long long N, nb, M, K;
    double scale, eps;
    plan_t p;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKLLdKLLKdiKi", &isa, &wp, &N, &nb, &scale, &xp, &M, &K, &gp,
                          &eps, &W, &op, &nthreads))
        return NULL;
    if (!isa_supported(isa)) return PyErr_Format(PyExc_ValueError, "isa %d not supported", isa);
    if (W < 1 || W > MAXW) return PyErr_Format(PyExc_ValueError, "sum width %d out of range", W);
    if (!plan_make(&p, isa, N, nb, M, nthreads)) return PyErr_NoMemory();
    const float *x = (const float *)(uintptr_t)xp, *g = (const float *)(uintptr_t)gp;
    const float m_f = (float)scale, eps_f = (float)eps;
    Py_BEGIN_ALLOW_THREADS
    int qt = nthreads < 1 ? 1 : (M < nthreads ? (int)M : nthreads);
    (void)qt;
#ifdef _OPENMP
#pragma omp parallel for num_threads(qt) schedule(static)
#endif
    for (long long m = 0; m < M; ++m) {
        float s;
        memset(p.qbuf + m * p.qs, 0, p.qs);
        p.sumq[m] = quantize_row(x + m * K, g, K, eps_f, W, p.layout, 0, p.qbuf + m * p.qs, &s);
        /* torch evaluates `acc.float() * (m / s)` as acc * (reciprocal(s) * m) in float32. */
        p.rs[m] = (1.0f / s) * m_f;
    }
    plan_run(&p, (const uint8_t *)(uintptr_t)wp, N, nb, M, NULL, (float *)(uintptr_t)op, nthreads);
    Py_END_ALLOW_THREADS
    plan_free(&p);
    Py_RETURN_NONE;
}

/* quantize(x_ptr, M, K, g_ptr, eps, sum_width, q_ptr, s_ptr): int8 [M, K] and float32 [M]. */
static PyObject *py_quantize(PyObject *self, PyObject *args) {
    int W;
    unsigned long long xp, gp, qp, sp;
    long long M, K;
    double eps;
    (void)self;
    if (!PyArg_ParseTuple(args, "KLLKdiKK", &xp, &M, &K, &gp, &eps, &W, &qp, &sp)) return NULL;
    if (W < 1 || W > MAXW) return PyErr_Format(PyExc_ValueError, "sum width %d out of range", W);
    Py_BEGIN_ALLOW_THREADS
    for (long long m = 0; m < M; ++m)
        quantize_row((const float *)(uintptr_t)xp + m * K, (const float *)(uintptr_t)gp, K,
                     (float)eps, W, ISA_SCALAR, 1, (int8_t *)(uintptr_t)qp + m * K,
                     (float *)(uintptr_t)sp + m);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* sum_of_squares(x_ptr, K, sum_width) -> float: lets Python find torch's summation width. */
static PyObject *py_sum_of_squares(PyObject *self, PyObject *args) {
    int W;
    unsigned long long xp;
    long long K;
    (void)self;
    if (!PyArg_ParseTuple(args, "KLi", &xp, &K, &W)) return NULL;
    if (W < 1 || W > MAXW) return PyErr_Format(PyExc_ValueError, "sum width %d out of range", W);
    return PyFloat_FromDouble(sum_of_squares((const float *)(uintptr_t)xp, K, W));
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#if MW_X86
__attribute__((target("avx2"))) static uint64_t read_span_avx2(const uint64_t *p, size_t n) {
    __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a = _mm256_xor_si256(a, _mm256_load_si256((const __m256i *)(p + i)));
        b = _mm256_xor_si256(b, _mm256_load_si256((const __m256i *)(p + i + 4)));
        c = _mm256_xor_si256(c, _mm256_load_si256((const __m256i *)(p + i + 8)));
        d = _mm256_xor_si256(d, _mm256_load_si256((const __m256i *)(p + i + 12)));
    }
    a = _mm256_xor_si256(_mm256_xor_si256(a, b), _mm256_xor_si256(c, d));
    uint64_t r = (uint64_t)_mm256_extract_epi64(a, 0) ^ (uint64_t)_mm256_extract_epi64(a, 1) ^
                 (uint64_t)_mm256_extract_epi64(a, 2) ^ (uint64_t)_mm256_extract_epi64(a, 3);
    for (; i < n; ++i) r ^= p[i];
    return r;
}
#endif

static uint64_t read_span(const uint64_t *p, size_t n) {
#if MW_X86
    if (isa_supported(ISA_AVX2)) return read_span_avx2(p, n);
#endif
    uint64_t a = 0, b = 0, c = 0, d = 0;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        a ^= p[i];
        b ^= p[i + 1];
        c ^= p[i + 2];
        d ^= p[i + 3];
    }
    for (; i < n; ++i) a ^= p[i];
    return a ^ b ^ c ^ d;
}

/* read_bandwidth(nbytes, passes, nthreads) -> bytes/s: every thread XORs its own contiguous
 * share of one buffer (first touched by the same thread); the best pass wins, since anything
 * else running on the machine can only make a pass slower. */
static PyObject *py_read_bandwidth(PyObject *self, PyObject *args) {
    unsigned long long nbytes;
    int passes, nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "Kii", &nbytes, &passes, &nthreads)) return NULL;
    size_t n = (size_t)(nbytes / 64) * 8; /* uint64 words, whole cache lines */
    if (n == 0 || passes < 1) return PyErr_Format(PyExc_ValueError, "empty bandwidth test");
    uint64_t *buf = alloc64(n * 8);
    if (!buf) return PyErr_NoMemory();
    if (nthreads < 1) nthreads = 1;
    double best = 1e30;
    volatile uint64_t sink = 0;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
    {
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        size_t a = (n / 8) * id / nt * 8, b = (n / 8) * (id + 1) / nt * 8;
        for (size_t i = a; i < b; ++i) buf[i] = i * 0x9e3779b97f4a7c15ULL;
    }
#else
    for (size_t i = 0; i < n; ++i) buf[i] = i * 0x9e3779b97f4a7c15ULL;
#endif
    for (int pass = 0; pass < passes; ++pass) {
        uint64_t acc = 0;
        double t0 = now_s();
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) reduction(^ : acc)
        {
            int nt = omp_get_num_threads(), id = omp_get_thread_num();
            size_t a = (n / 8) * id / nt * 8, b = (n / 8) * (id + 1) / nt * 8;
            acc ^= read_span(buf + a, b - a);
        }
#else
        acc ^= read_span(buf, n);
#endif
        double dt = now_s() - t0;
        sink ^= acc;
        if (dt < best) best = dt;
    }
    Py_END_ALLOW_THREADS
    (void)sink;
    free(buf);
    return PyFloat_FromDouble((double)(n * 8) / best);
}

static PyObject *py_have_openmp(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
#ifdef _OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"isa_supported", py_isa_supported, METH_VARARGS, "isa_supported(isa_id) -> bool"},
    {"matmul", py_matmul, METH_VARARGS, "int8 x packed ternary -> int32 (raw pointers)"},
    {"bitlinear", py_bitlinear, METH_VARARGS, "fused rmsnorm, int8 quantization, product"},
    {"quantize", py_quantize, METH_VARARGS, "rmsnorm and int8 quantization of rows"},
    {"sum_of_squares", py_sum_of_squares, METH_VARARGS, "row sum of squares in torch's order"},
    {"read_bandwidth", py_read_bandwidth, METH_VARARGS, "measured memory read bandwidth"},
    {"have_openmp", py_have_openmp, METH_NOARGS, "whether the build uses OpenMP"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ternary",
                                    "C kernels for 2-bit packed ternary weights.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__ternary(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyModule_AddIntConstant(m, "ISA_SCALAR", ISA_SCALAR);
    PyModule_AddIntConstant(m, "ISA_AVX2", ISA_AVX2);
    PyModule_AddIntConstant(m, "ISA_AVXVNNI", ISA_AVXVNNI);
    PyModule_AddIntConstant(m, "ISA_AVX512VNNI", ISA_AVX512VNNI);
    PyModule_AddIntConstant(m, "ISA_AMX", ISA_AMX);
    PyModule_AddIntConstant(m, "AMX_MIN_ROWS", AMX_MIN_ROWS);
    PyModule_AddIntConstant(m, "MAX_SUM_WIDTH", MAXW);
    return m;
}
