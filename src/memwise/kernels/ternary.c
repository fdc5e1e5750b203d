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
#if defined(__linux__)
#include <sys/mman.h>
#endif

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
#if defined(__GNUC__) || defined(__clang__)
#include <sched.h>
#endif

/* Bodies inlined into per-instruction-set copies of their callers. */
#if defined(__GNUC__) || defined(__clang__)
#define MW_INLINE static inline __attribute__((always_inline))
#else
#define MW_INLINE static __forceinline
#endif

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVXVNNI = 2, ISA_AVX512VNNI = 3, ISA_AMX = 4 };
#define N_ISAS 5

/* Below this many activation rows the AMX path hands over to AVX-512 VNNI.  AMX must first
 * unpack each weight panel to one byte per code in memory, a fixed cost per panel that only
 * pays off when enough activation rows share it.  Fused decode steps on the Intel Xeon VM
 * (medians of 55, three alternating rounds): at 4 rows AVX-512 wins for mmfree-2.7b (48 vs 58 ms)
 * and ties for mmfree-370m; at 5 rows, where AVX-512 runs a 4-row tile and then a GEMV over the
 * same weights, AMX wins (2.7b 58 vs 62 ms, 370m 7.0 vs 9.4 ms). */
#define AMX_MIN_ROWS 5

/* Bytes of one pair of blocks of K in AMX buffers: 4 units of 64 bytes for 16 rows (run_amx). */
#define AMX_PAIR_BYTES (4 * 16 * 64)

/* AMX buffers: B tiles of M activation rows, [mtiles][units][16][64], and one thread's unpacked
 * weight codes for K of nb blocks, [pairs][4 units][16][64]. */
static size_t act_tiles_bytes(int64_t M, int64_t nb) {
    return (size_t)((M + 15) / 16) * (size_t)((nb + 1) / 2) * AMX_PAIR_BYTES;
}

static size_t unpacked_bytes(int64_t nb) { return (size_t)((nb + 1) / 2) * AMX_PAIR_BYTES; }

/* From this many activation rows the AVX-512 path multiplies unpacked panels (run_panels). */
#define PANEL_MIN_ROWS 4

/* Whether products of M activation rows on this path need the per-thread unpacked panels. */
static int uses_panels(int isa, int64_t M) {
    return isa == ISA_AMX || (isa == ISA_AVX512VNNI && M >= PANEL_MIN_ROWS);
}

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
static int64_t ceil_log2(int64_t x) {
    if (x <= 2) return 1;
    int64_t r = 0;
    uint64_t v = (uint64_t)x - 1;
    while (v) { ++r; v >>= 1; }
    return r;
}

/* Sum of squares of x[0 .. K) in torch's order, written once for two kinds of lanes: T holds W
 * floats, SQ(d, p) sets d to the squares of the W floats at p, ADD(a, b) adds b to a lane by lane,
 * ZERO(a) clears a and LANE(a, l) reads lane l.  The row splits into `size` W-float vectors, summed
 * in ILP interleaved accumulators with a cascade of LEVELS levels; then the K - size * W tail
 * elements one by one, and last the lanes. */
#define DEFINE_SUM_OF_SQUARES(NAME, T, W, SQ, ADD, ZERO, LANE)                                   \
    MW_INLINE float NAME(const float *x, int64_t K, int width) {                                \
        enum { LEVELS = 4, ILP = 4 };                                                            \
        (void)width;                                                                             \
        const int64_t size = K / (W), n = size / ILP;                                            \
        const int64_t power = ceil_log2(n) / LEVELS > 4 ? ceil_log2(n) / LEVELS : 4;              \
        const int64_t step = (int64_t)1 << power, mask = step - 1;                               \
        T acc[LEVELS][ILP], v;                                                                   \
        for (int j = 0; j < LEVELS; ++j)                                                         \
            for (int k = 0; k < ILP; ++k) ZERO(acc[j][k]);                                       \
        int64_t i = 0;                                                                           \
        while (i + step <= n) {                                                                  \
            for (int64_t s = 0; s < step; ++s, ++i)                                              \
                for (int k = 0; k < ILP; ++k) {                                                  \
                    SQ(v, x + (i * ILP + k) * (W));                                              \
                    ADD(acc[0][k], v);                                                           \
                }                                                                                \
            for (int j = 1; j < LEVELS; ++j) {                                                   \
                for (int k = 0; k < ILP; ++k) {                                                  \
                    ADD(acc[j][k], acc[j - 1][k]);                                               \
                    ZERO(acc[j - 1][k]);                                                         \
                }                                                                                \
                if (i & (mask << (j * power))) break;                                            \
            }                                                                                    \
        }                                                                                        \
        for (; i < n; ++i)                                                                       \
            for (int k = 0; k < ILP; ++k) {                                                      \
                SQ(v, x + (i * ILP + k) * (W));                                                  \
                ADD(acc[0][k], v);                                                               \
            }                                                                                    \
        for (int j = 1; j < LEVELS; ++j)                                                         \
            for (int k = 0; k < ILP; ++k) ADD(acc[0][k], acc[j][k]);                             \
        for (int64_t e = n * ILP; e < size; ++e) {                                               \
            SQ(v, x + e * (W));                                                                  \
            ADD(acc[0][0], v);                                                                   \
        }                                                                                        \
        for (int k = 1; k < ILP; ++k) ADD(acc[0][0], acc[0][k]);                                 \
        float total = 0.0f;                                                                      \
        for (int64_t k = size * (W); k < K; ++k) total = total + x[k] * x[k];                    \
        for (int l = 0; l < (W); ++l) total = total + LANE(acc[0][0], l);                        \
        return total;                                                                            \
    }

/* Any width up to MAXW: the lanes in a struct, a loop per operation. */
typedef struct { float v[MAXW]; } lanes;
#define LANES_SQ(d, p) for (int l_ = 0; l_ < width; ++l_) (d).v[l_] = (p)[l_] * (p)[l_]
#define LANES_ADD(a, b) for (int l_ = 0; l_ < width; ++l_) (a).v[l_] = (a).v[l_] + (b).v[l_]
#define LANES_ZERO(a) memset(&(a), 0, sizeof(a))
#define LANES_LANE(a, l) ((a).v[l])
DEFINE_SUM_OF_SQUARES(sum_of_squares_lanes, lanes, width, LANES_SQ, LANES_ADD, LANES_ZERO, LANES_LANE)

#if defined(__GNUC__) || defined(__clang__)
/* The usual widths with the lanes in one vector register, about 4x faster than the struct, which
 * GCC keeps copying through memory.  Each vector comes from memcpy (one unaligned load), and only
 * a float leaves the function, so no vector crosses a call (its ABI would depend on the target). */
typedef float mw_vf8 __attribute__((vector_size(32)));
typedef float mw_vf16 __attribute__((vector_size(64)));
#define VEC_SQ(d, p) (memcpy(&(d), (p), sizeof(d)), (d) = (d) * (d))
#define VEC_ADD(a, b) ((a) = (a) + (b))
#define VEC_ZERO(a) memset(&(a), 0, sizeof(a))
#define VEC_LANE(a, l) ((a)[l])
DEFINE_SUM_OF_SQUARES(sum_of_squares_v8, mw_vf8, 8, VEC_SQ, VEC_ADD, VEC_ZERO, VEC_LANE)
DEFINE_SUM_OF_SQUARES(sum_of_squares_v16, mw_vf16, 16, VEC_SQ, VEC_ADD, VEC_ZERO, VEC_LANE)
#define MW_VEC_SUMS 1
#else
#define MW_VEC_SUMS 0
#endif

/* A row shorter than W is summed as one lane. */
MW_INLINE float sum_of_squares_body(const float *x, int64_t K, int W) {
    if (K < W) W = 1;
#if MW_VEC_SUMS
    if (W == 8) return sum_of_squares_v8(x, K, W);
    if (W == 16) return sum_of_squares_v16(x, K, W);
#endif
    return sum_of_squares_lanes(x, K, W);
}

static float sum_of_squares(const float *x, int64_t K, int W) { return sum_of_squares_body(x, K, W); }

/* r = 1 / sqrt(mean(x^2) + eps), as torch's rmsnorm computes it. */
MW_INLINE float rms_inverse_body(const float *x, int64_t K, float eps, int W) {
    float mean = sum_of_squares_body(x, K, W) / (float)K;
    return 1.0f / sqrtf(mean + eps);
}

static float rms_inverse(const float *x, int64_t K, float eps, int W) {
    return rms_inverse_body(x, K, eps, W);
}

/* One row: y = (x * r) * g with r = 1 / sqrt(mean(x^2) + eps), s = (1 / max(max|y|, 1e-5)) * 127,
 * q = clamp(round_half_even(y * s), -128, 127).  Each operation is written as torch evaluates it
 * (torch computes `127 / t` as reciprocal(t) * 127, and rsqrt as 1 / sqrt, both in float32), and
 * the build uses -ffp-contract=off so that no multiply-add gets fused.  Writes q into `dst` in
 * the kernel's layout (dst must be zeroed beforehand), returns sum(q) and stores s.
 * quantize_row_r takes r given, so that a row normalized once can be quantized with several
 * gains (the i, f and g projections of HGRN-Bit share their input). */
/* max |(x * r) * g| over a row; NaN if any value is NaN, as torch's amax. */
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

static int32_t quantize_row(const float *x, const float *g, int64_t K, float eps, int W,
                            int isa, int natural_unpadded, int8_t *dst, float *s_out) {
    return quantize_row_r(x, rms_inverse(x, K, eps, W), g, K, isa, natural_unpadded, dst, s_out);
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

#define T256 __attribute__((target("avx2,fma")))
#define TVNNI __attribute__((target("avx2,fma,avxvnni")))

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

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

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

/* ---- AMX: 16 weight rows x 16 activation rows per TDPBUSD ---- */

#define TAMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,gfni,amx-tile,amx-int8")))
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
    int mr = j->M - m0 < 16 ? (int)(j->M - m0) : 16;
    for (int m = 0; m < mr; ++m) {
        __m512i v = _mm512_sub_epi32(r[transposed_row[m]], _mm512_set1_epi32(j->sumq[m0 + m]));
        if (j->out_f32) {
            float *o = j->out_f32 + (m0 + m) * j->ldo + n0;
            __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(j->rs[m0 + m]));
            if (j->residual) f = _mm512_add_ps(_mm512_maskz_loadu_ps(keep, o), f);
            _mm512_mask_storeu_ps(o, keep, f);
        } else
            _mm512_mask_storeu_epi32(j->out_i32 + (m0 + m) * j->ldo + n0, keep, v);
    }
}

/* Sum tiles tmm0-3 += the four unpacked units of one pair (slot: [4][16][64]) times activation
 * tiles t0 .. t0 + nt - 1 of units u0 .. u0 + 3.  tmm4/tmm7 hold weight codes, tmm5/tmm6
 * activations; operands alternate between two tiles so a load can overlap the previous dot
 * product.  With one or two activation tiles, even and odd units add into different sum tiles:
 * one chain of dependent TDPBUSDs would wait on the instruction's latency.  (Before the codes
 * were unpacked with GFNI, one tile summed each group; summing two tiles instead of four at the
 * end made the 16-row product about 5% faster.) */
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
 * loads do not wait on stores still in flight.  (The vector and the AMX work hardly overlap on
 * the machines measured, with this lag or a longer one, or interleaved finer: a 16-row product
 * costs about their sum.)  With more rows the panel is unpacked once and every group of four
 * activation tiles reads it. */
#define AMX_RING 4
#define AMX_LAG 2

/* Every pair of blocks of a panel reads the activation tiles of those blocks: 4 KB per pair and
 * tile of 16 rows, 44 KB for K = 2816 (mmfree-370m's down_proj), more than L1 holds next to the
 * ring.  So when the tiles of all of K pass AMX_CHUNK_BYTES, K is taken in chunks of at most that
 * many bytes of tiles, over AMX_GROUP panels at a time, the partial sums waiting in memory between
 * chunks; each chunk's tiles stay in L1 for the whole group.  On the Intel Xeon VM that made the
 * 16-row product with K = 2816 20-35% faster, from L2 and streaming from memory alike
 * (benchmarks/amx_product.c); products with K = 1024, whose tiles fit, gained nothing from
 * smaller chunks. */
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
    if (isa == ISA_AMX) /* GFNI unpacks the codes (amx_unpack_pair); every AMX CPU has it */
        return avx512 && __builtin_cpu_supports("gfni") && __builtin_cpu_supports("amx-tile") &&
               __builtin_cpu_supports("amx-int8") && amx_permitted();
#endif
    return 0;
}

static int isa_supported(int isa) {
    static int known[N_ISAS] = {-1, -1, -1, -1, -1};
    if (isa < 0 || isa >= N_ISAS) return 0;
    if (known[isa] < 0) known[isa] = isa_check(isa);
    return known[isa];
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

/* max |(x * r) * g| over the row of K; NaN if any value is NaN, as torch's amax. */
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

/* A buffer streamed like a model's packed codes: on Linux aligned to and advised for 2 MB pages,
 * as memwise.ternary.codes_buffer allocates the codes, so that a bandwidth measured in it compares
 * with the kernels' (with 4 KB pages the GEMV measured up to 23% above the read bandwidth). */
static void *alloc_streamed(size_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const size_t huge = (size_t)2 << 20, rounded = (n + huge - 1) & ~(huge - 1);
    void *p = NULL;
    if (posix_memalign(&p, huge, rounded ? rounded : huge) != 0) return NULL;
    (void)madvise(p, rounded, MADV_HUGEPAGE); /* refused where THP is off: small pages then */
    return p;
#else
    return alloc64(n);
#endif
}

/* ------------------------------------------------------------------------------------------ */
/* Fused HGRN-Bit decode step                                                                 */
/* ------------------------------------------------------------------------------------------ */

/* One call computes a whole decode step of an HGRN-Bit model (memwise/models/hgrn_bit.py): every
 * layer's MLGRU and GLU, the final norm and the lm_head, for B sequences of one token each, in one
 * OpenMP parallel region.  Products are split over output rows with barriers between dependent
 * steps, and use the same tiles, activation layouts and rescale (`put`) as bitlinear(); RMSNorm and
 * quantization use the same functions.  The elementwise float operations are written in the order
 * and with the roundings of the PyTorch code of the model, and exp is computed the way torch's CPU
 * kernels compute it (next section), so that the step can reproduce the unfused path bit for bit. */

/* ---- exp as torch's CPU kernels compute it ---- */

/* torch's sigmoid and silu kernels compute exp two ways in one call: the vectorized loop runs on
 * 2 * (vector width) elements at a time with Sleef's expf_u10 algorithm, and the elements left
 * over go through std::exp (glibc's expf).  Both are reproduced here; which elements take which
 * path follows torch's loop structure (see ew_geom_t).  The Sleef algorithm: q = rint(d / ln 2),
 * a two-part reduction s = d - q ln 2 with fused multiply-adds, a degree-6 polynomial, and a
 * scaling by 2^q done as two multiplications. */
#define EXP_R_LN2 1.442695040888963407359924681001892137426645954152985934135449406931f
#define EXP_L2U 0.693145751953125f
#define EXP_L2L 1.428606765330187045e-06f
#define EXP_C6 0.000198527617612853646278381f
#define EXP_C5 0.00139304355252534151077271f
#define EXP_C4 0.00833336077630519866943359f
#define EXP_C3 0.0416664853692054748535156f
#define EXP_C2 0.166666671633720397949219f

static inline float pow2i_scalar(int32_t q) {
    uint32_t bits = (uint32_t)(q + 0x7f) << 23;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static float vexpf_lane(float d) {
    if (d != d) return d;
    if (d < -104.0f) return 0.0f;
    if (100.0f < d) return INFINITY;
    int32_t q = (int32_t)rintf(d * EXP_R_LN2);
    float qf = (float)q;
    float s = fmaf(qf, -EXP_L2U, d);
    s = fmaf(qf, -EXP_L2L, s);
    float u = EXP_C6;
    u = fmaf(u, s, EXP_C5);
    u = fmaf(u, s, EXP_C4);
    u = fmaf(u, s, EXP_C3);
    u = fmaf(u, s, EXP_C2);
    u = fmaf(u, s, 0.5f);
    u = 1.0f + fmaf(s * s, u, s);
    int32_t h = q >> 1;
    return (u * pow2i_scalar(h)) * pow2i_scalar(q - h);
}

#if MW_X86
static inline __attribute__((always_inline)) T512 __m512 vexp512(__m512 d) {
    __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(d, _mm512_set1_ps(EXP_R_LN2)));
    __m512 qf = _mm512_cvtepi32_ps(q);
    __m512 s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-EXP_L2U), d);
    s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-EXP_L2L), s);
    __m512 u = _mm512_set1_ps(EXP_C6);
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(EXP_C5));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(EXP_C4));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(EXP_C3));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(EXP_C2));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.5f));
    u = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_mul_ps(s, s), u, s));
    __m512i h = _mm512_srai_epi32(q, 1);
    const __m512i bias = _mm512_set1_epi32(0x7f);
    __m512 p1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(h, bias), 23));
    __m512 p2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(q, h), bias), 23));
    u = _mm512_mul_ps(_mm512_mul_ps(u, p1), p2);
    u = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(d, _mm512_set1_ps(-104.0f), _CMP_LT_OQ), u,
                             _mm512_setzero_ps());
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_set1_ps(100.0f), d, _CMP_LT_OQ), u,
                                _mm512_set1_ps(INFINITY));
}

static T512 void vexp_neg_512(const float *x, float *e, int64_t n) {
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
#define NEG512(v) _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), sign))
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) _mm512_storeu_ps(e + k, vexp512(NEG512(_mm512_loadu_ps(x + k))));
    if (k < n) {
        __mmask16 m = (__mmask16)((1u << (n - k)) - 1u);
        _mm512_mask_storeu_ps(e + k, m, vexp512(NEG512(_mm512_maskz_loadu_ps(m, x + k))));
    }
#undef NEG512
}

static inline __attribute__((always_inline)) T256 __m256 vexp256(__m256 d) {
    __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(d, _mm256_set1_ps(EXP_R_LN2)));
    __m256 qf = _mm256_cvtepi32_ps(q);
    __m256 s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-EXP_L2U), d);
    s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-EXP_L2L), s);
    __m256 u = _mm256_set1_ps(EXP_C6);
    u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(EXP_C5));
    u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(EXP_C4));
    u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(EXP_C3));
    u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(EXP_C2));
    u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.5f));
    u = _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_mul_ps(s, s), u, s));
    __m256i h = _mm256_srai_epi32(q, 1);
    const __m256i bias = _mm256_set1_epi32(0x7f);
    __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, bias), 23));
    __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(q, h), bias), 23));
    u = _mm256_mul_ps(_mm256_mul_ps(u, p1), p2);
    u = _mm256_blendv_ps(u, _mm256_setzero_ps(), _mm256_cmp_ps(d, _mm256_set1_ps(-104.0f), _CMP_LT_OQ));
    return _mm256_blendv_ps(u, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(_mm256_set1_ps(100.0f), d, _CMP_LT_OQ));
}

static T256 void vexp_neg_256(const float *x, float *e, int64_t n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    int64_t k = 0;
    for (; k + 8 <= n; k += 8)
        _mm256_storeu_ps(e + k, vexp256(_mm256_xor_ps(_mm256_loadu_ps(x + k), sign)));
    for (; k < n; ++k) e[k] = vexpf_lane(-x[k]);
}
#endif

/* e[k] = Sleef-algorithm exp(-x[k]); every path gives the same bits (IEEE operations and fused
 * multiply-adds only), the vector ones are just faster. */
static void vexp_neg(int level, const float *x, float *e, int64_t n) {
#if MW_X86
    if (level >= VEC_AVX512) {
        vexp_neg_512(x, e, n);
        return;
    }
    if (level >= VEC_AVX2) {
        vexp_neg_256(x, e, n);
        return;
    }
#endif
    (void)level;
    for (int64_t k = 0; k < n; ++k) e[k] = vexpf_lane(-x[k]);
}

/* Which elements of an elementwise op torch computes in its vector loop.  The op runs over a
 * [rows, cols] tensor of N elements.  TensorIterator splits N into `chunk`-sized pieces when it
 * parallelizes (N > 32768 with more than one thread: ceil(N / threads) elements each, fewer
 * threads when the grain allows fewer), and a strided input (`rowsplit`, like the gate half of
 * the GLU projection) is walked one row at a time; each resulting segment runs the vector loop on
 * its first floor(len / step) * step elements and std::exp on the rest.  step = 0: all std::exp. */
typedef struct {
    int64_t N, chunk, cols;
    int rowsplit, step, level;
} ew_geom_t;

#define TORCH_GRAIN 32768

static ew_geom_t ew_geom(int64_t rows, int64_t cols, int rowsplit, int step, int torch_threads, int level) {
    ew_geom_t g = {rows * cols, rows * cols, cols, rowsplit, step, level};
    if (g.N > TORCH_GRAIN && torch_threads > 1) {
        int64_t nt = (g.N + TORCH_GRAIN - 1) / TORCH_GRAIN;
        if (nt > torch_threads) nt = torch_threads;
        g.chunk = (g.N + nt - 1) / nt;
    }
    if (g.chunk < 1) g.chunk = 1;
    return g;
}

/* e[k] = exp(-x[k]) for the n elements whose flat index in the op is base + k (all in one row),
 * each computed the way torch computes that element. */
static void neg_exp_like_torch(const float *x, float *e, int64_t n, int64_t base, const ew_geom_t *g) {
    if (g->step > 0) vexp_neg(g->level, x, e, n);
    int64_t pos = base, end = base + n;
    while (pos < end) {
        int64_t ss = pos / g->chunk * g->chunk;
        int64_t se = ss + g->chunk < g->N ? ss + g->chunk : g->N;
        if (g->rowsplit) {
            int64_t rs = pos / g->cols * g->cols;
            if (rs > ss) ss = rs;
            if (rs + g->cols < se) se = rs + g->cols;
        }
        int64_t vend = g->step > 0 ? ss + (se - ss) / g->step * g->step : ss;
        int64_t a = vend > pos ? vend : pos, b = se < end ? se : end;
        for (int64_t k = a; k < b; ++k) e[k - base] = expf(-x[k - base]);
        pos = b;
    }
}

/* ---- the step ---- */

/* Activation slots of a step: three with K = H (i, f, g; gate_proj and lm_head reuse the first),
 * one with K = D (o_proj), one with K = I (down_proj).  A slot always holds rows of one K, so the
 * padding of its rows stays zero from allocation on. */
enum { SLOT_I = 0, SLOT_F = 1, SLOT_G = 2, SLOT_O = 3, SLOT_DOWN = 4, N_SLOTS = 5 };

typedef struct {
    int isa, layout, level, nthreads;
    int64_t B, H, D, I, mtiles;
    int64_t nb[N_SLOTS];
    size_t qs[N_SLOTS];
    int8_t *q[N_SLOTS];
    int32_t *sumq[N_SLOTS];
    float *rs[N_SLOTS];
    int8_t *act_tiles[N_SLOTS];
    uint8_t *unpacked;
    float *h, *fi, *ff, *fg, *o, *y, *u, *e1, *e2;
    float *hs;  /* per thread, H floats: normalized rows when threads share a row's work */
    /* When threads share rows: per thread, [N_SLOTS][B] sums of the q it quantized (sum_part)
     * and the whole rows' sums it gathered for its products (sum_mine), sum_stride apart. */
    int32_t *sum_part, *sum_mine;
    int64_t sum_stride;
    int *barrier; /* spin_barrier's count, and its generation a line further */
    int64_t ew; /* floats per row of e1 / e2 */
    void *mem;
} hgrn_ws_t;

static void hgrn_ws_free(hgrn_ws_t *w) {
    if (w) free(w->mem);
    free(w);
}

static hgrn_ws_t *hgrn_ws_make(int isa, int64_t B, int64_t H, int64_t D, int64_t I, int nthreads) {
    hgrn_ws_t *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    w->isa = (isa == ISA_AMX && B < AMX_MIN_ROWS) ? ISA_AVX512VNNI : isa;
    /* AMX products take K in the AVX-512 path's order (see run_amx). */
    w->layout = w->isa == ISA_AMX ? ISA_AVX512VNNI : w->isa;
    w->level = vec_level_of(isa);
    w->nthreads = nthreads < 1 ? 1 : nthreads;
    w->B = B, w->H = H, w->D = D, w->I = I;
    w->mtiles = (B + 15) / 16;
    const int64_t ks[N_SLOTS] = {H, H, H, D, I};
    int64_t nb_max = 0;
    for (int s = 0; s < N_SLOTS; ++s) {
        w->nb[s] = (ks[s] + BLOCK - 1) / BLOCK;
        w->qs[s] = qrow_bytes(w->layout, w->nb[s]);
        if (w->nb[s] > nb_max) nb_max = w->nb[s];
    }
    w->ew = D > I ? D : I;
    /* One allocation, every piece 64-byte aligned. */
    size_t sizes[N_SLOTS * 4 + 16], total = 0;
    int n = 0;
    for (int s = 0; s < N_SLOTS; ++s) {
        sizes[n++] = w->qs[s] * (size_t)B;
        sizes[n++] = sizeof(int32_t) * (size_t)B;
        sizes[n++] = sizeof(float) * (size_t)B;
        sizes[n++] = uses_panels(w->isa, B) ? act_tiles_bytes(B, w->nb[s]) : 0;
    }
    sizes[n++] = uses_panels(w->isa, B) ? (size_t)w->nthreads * unpacked_bytes(nb_max) : 0;
    const int64_t widths[] = {H, D, D, D, D, 2 * I, I, w->ew, w->ew};
    for (int k = 0; k < 9; ++k) sizes[n++] = sizeof(float) * (size_t)(B * widths[k]);
    sizes[n++] = sizeof(float) * (size_t)(w->nthreads * H);
    w->sum_stride = (N_SLOTS * B + 15) / 16 * 16; /* a thread's sums on lines of their own */
    sizes[n++] = sizeof(int32_t) * (size_t)(w->nthreads * w->sum_stride);
    sizes[n++] = sizeof(int32_t) * (size_t)(w->nthreads * w->sum_stride);
    sizes[n++] = 128;
    for (int k = 0; k < n; ++k) total += (sizes[k] + 63) & ~(size_t)63;
    w->mem = alloc64(total);
    if (!w->mem) {
        free(w);
        return NULL;
    }
    memset(w->mem, 0, total);
    char *p = w->mem;
    n = 0;
#define TAKE(dst, type)                                                                         \
    do {                                                                                        \
        dst = (type)(void *)p;                                                                  \
        p += (sizes[n++] + 63) & ~(size_t)63;                                                   \
    } while (0)
    for (int s = 0; s < N_SLOTS; ++s) {
        TAKE(w->q[s], int8_t *);
        TAKE(w->sumq[s], int32_t *);
        TAKE(w->rs[s], float *);
        TAKE(w->act_tiles[s], int8_t *);
    }
    TAKE(w->unpacked, uint8_t *);
    TAKE(w->h, float *);
    TAKE(w->fi, float *);
    TAKE(w->ff, float *);
    TAKE(w->fg, float *);
    TAKE(w->o, float *);
    TAKE(w->y, float *);
    TAKE(w->u, float *);
    TAKE(w->e1, float *);
    TAKE(w->e2, float *);
    TAKE(w->hs, float *);
    TAKE(w->sum_part, int32_t *);
    TAKE(w->sum_mine, int32_t *);
    TAKE(w->barrier, int *);
#undef TAKE
    return w;
}

/* The plan: int64 words written by memwise/kernels/fused.py.
 * Header (PLAN_HEADER words): L, H, D, I, V, heads, final norm gain, lm_head codes, lm_head gain,
 * and 1 when the weights stream from DRAM (far prefetches on, see PF_FAR_BYTES), else 0.
 * Then per layer (PLAN_LAYER words): the pointers listed in the enum below.
 * Scales (float32): lm_head's m, then per layer (SCALES_LAYER floats) i, f, g, o, gate, down. */
#define PLAN_HEADER 16
#define PLAN_LAYER 16
#define SCALES_HEADER 8
#define SCALES_LAYER 8
enum {
    PL_ATTN_NORM, PL_I_W, PL_I_G, PL_F_W, PL_F_G, PL_G_W, PL_G_G, PL_G_NORM, PL_O_W, PL_O_G,
    PL_MLP_NORM, PL_GATE_W, PL_GATE_G, PL_DOWN_W, PL_DOWN_G, PL_LOWER
};
enum { SC_I, SC_F, SC_G, SC_O, SC_GATE, SC_DOWN };

#define PTR(type, word) ((type)(uintptr_t)(word))

/* Asks for the floats [p, p + n) in L2, a request per line.  Between two products the step's
 * float work reads gains and states that the streaming weights have pushed out of every cache;
 * each thread asks for the next phase's vectors as soon as its share of a product is done, so
 * they arrive while it waits for the other threads. */
static inline void prefetch_floats(const float *p, int64_t n) {
#if MW_X86
    const char *c = (const char *)p;
    for (int64_t o = 0; o < n * (int64_t)sizeof(float); o += 64) _mm_prefetch(c + o, _MM_HINT_T1);
#else
    (void)p, (void)n;
#endif
}

/* Rows of the batch handled by thread id of nt. */
static inline void my_rows(int64_t B, int id, int nt, int64_t *b0, int64_t *b1) {
    *b0 = B * id / nt;
    *b1 = B * (id + 1) / nt;
}

/* ---- row operations, compiled once per instruction set (the same IEEE operations in each) ---- */

/* h = rmsnorm(x) * gain, as torch computes x * rsqrt(mean(x^2) + eps) * gain. */
MW_INLINE void norm_body(const float *x, const float *gain, int64_t K, float eps, int W, float *h) {
    const float r = rms_inverse_body(x, K, eps, W);
    for (int64_t k = 0; k < K; ++k) h[k] = (x[k] * r) * gain[k];
}

/* The MLGRU's gates and recurrence over n channels, e_f = exp(-f) and e_i = exp(-i) given:
 * f = sigmoid(f), f = lower + (1 - lower) * f, c = silu(i) * (1 - f) (* mask),
 * state = state * f, state = state + c; each operation rounded as torch rounds it. */
MW_INLINE void gates_body(const float *iv, const float *e_f, const float *e_i, const float *lower,
                          const float *mask, float *st, int64_t n) {
    const float mk = mask ? *mask : 1.0f;
    for (int64_t k = 0; k < n; ++k) {
        float f = 1.0f / (e_f[k] + 1.0f);
        if (lower) f = lower[k] + (1.0f - lower[k]) * f;
        float c = (iv[k] / (1.0f + e_i[k])) * (1.0f - f);
        if (mask) c = c * mk;
        float s = st[k] * f;
        st[k] = s + c;
    }
}

/* o = (rmsnorm(g) * g_norm) * silu(state), r of g's head given, e = exp(-state). */
MW_INLINE void gate_out_body(const float *g, float r, const float *gnorm, const float *st, const float *e,
                             float *o, int64_t n) {
    for (int64_t k = 0; k < n; ++k) o[k] = ((g[k] * r) * gnorm[k]) * (st[k] / (1.0f + e[k]));
}

/* u = silu(gate) * up, e = exp(-gate). */
MW_INLINE void glu_body(const float *gate, const float *up, const float *e, float *u, int64_t n) {
    for (int64_t k = 0; k < n; ++k) u[k] = (gate[k] / (1.0f + e[k])) * up[k];
}

typedef struct {
    float (*rms)(const float *, int64_t, float, int);
    void (*norm)(const float *, const float *, int64_t, float, int, float *);
    void (*gates)(const float *, const float *, const float *, const float *, const float *, float *, int64_t);
    void (*gate_out)(const float *, float, const float *, const float *, const float *, float *, int64_t);
    void (*glu)(const float *, const float *, const float *, float *, int64_t);
} row_ops_t;

#define DEFINE_ROW_OPS(NAME, ATTR)                                                              \
    static ATTR float NAME##_rms(const float *x, int64_t K, float eps, int W) {                 \
        return rms_inverse_body(x, K, eps, W);                                                  \
    }                                                                                           \
    static ATTR void NAME##_norm(const float *x, const float *gain, int64_t K, float eps, int W, \
                                 float *h) {                                                    \
        norm_body(x, gain, K, eps, W, h);                                                       \
    }                                                                                           \
    static ATTR void NAME##_gates(const float *iv, const float *e_f, const float *e_i,          \
                                  const float *lower, const float *mask, float *st, int64_t n) { \
        gates_body(iv, e_f, e_i, lower, mask, st, n);                                           \
    }                                                                                           \
    static ATTR void NAME##_gate_out(const float *g, float r, const float *gnorm, const float *st, \
                                     const float *e, float *o, int64_t n) {                     \
        gate_out_body(g, r, gnorm, st, e, o, n);                                                \
    }                                                                                           \
    static ATTR void NAME##_glu(const float *gate, const float *up, const float *e, float *u,   \
                                int64_t n) {                                                    \
        glu_body(gate, up, e, u, n);                                                            \
    }                                                                                           \
    static const row_ops_t NAME = {NAME##_rms, NAME##_norm, NAME##_gates, NAME##_gate_out,      \
                                   NAME##_glu};

DEFINE_ROW_OPS(row_ops_generic, )
#if MW_X86
DEFINE_ROW_OPS(row_ops_avx2, T256)
DEFINE_ROW_OPS(row_ops_avx512, T512)
#endif

static const row_ops_t *row_ops(int level) {
#if MW_X86
    if (level >= VEC_AVX512) return &row_ops_avx512;
    if (level >= VEC_AVX2) return &row_ops_avx2;
#endif
    (void)level;
    return &row_ops_generic;
}

/* ---- products ---- */

/* Quantizes one row x (r given) into slot s at row b, with rescale m. */
static inline void put_row(const hgrn_ws_t *w, int s, int64_t b, const float *x, float r,
                           const float *gain, int64_t K, float m) {
    float sc;
    int8_t *dst = w->q[s] + (size_t)b * w->qs[s];
    w->sumq[s][b] = quantize_row_lv(w->level, x, r, gain, K, w->layout, 0, dst, &sc);
    /* torch evaluates `acc.float() * (m / s)` as acc * (reciprocal(s) * m) in float32. */
    w->rs[s][b] = (1.0f / sc) * m;
}

/* Elements [k0, k1) of a row of n, thread id's share when nt threads split one row (multiples of
 * 16, so vector loops stay whole). */
static inline void my_span(int64_t n, int id, int nt, int64_t *k0, int64_t *k1) {
    const int64_t units = (n + 15) / 16;
    *k0 = units * id / nt * 16;
    *k1 = units * (id + 1) / nt * 16;
    if (*k0 > n) *k0 = n;
    if (*k1 > n) *k1 = n;
}

/* Threads sharing rows: thread id quantizes its part [k0, k1) of row b (r given) into slot s.
 * Each thread computes the whole row's amax itself, so the only wait is the barrier before the
 * product, after which gather_sums adds up the parts' sums. */
static inline void put_row_part(const hgrn_ws_t *w, int s, int64_t b, const float *x, float r,
                                const float *gain, int64_t K, float m, int id, int nt) {
    int64_t k0, k1;
    my_span(K, id, nt, &k0, &k1);
    const float amax = row_amax_lv(w->level, x, r, gain, K);
    float sc;
    int8_t *dst = w->q[s] + (size_t)b * w->qs[s];
    w->sum_part[id * w->sum_stride + s * w->B + b] =
        k0 < k1 ? quantize_span_lv(w->level, x, r, gain, amax, w->layout, 0, dst, &sc, k0, k1) : 0;
    /* Every thread computes the same s; one stores the rescale. */
    if (id == 0) {
        if (k0 >= k1) quantize_span_lv(w->level, x, r, gain, amax, w->layout, 0, dst, &sc, 0, 0);
        w->rs[s][b] = (1.0f / sc) * m;
    }
}

/* The sums of slot s's rows for thread id's products: its own copy, so no thread writes what
 * another reads. */
static const int32_t *gather_sums(const hgrn_ws_t *w, int s, int id, int nt) {
    int32_t *mine = w->sum_mine + id * w->sum_stride + s * w->B;
    for (int64_t b = 0; b < w->B; ++b) {
        int32_t total = 0;
        for (int t = 0; t < nt; ++t) total += w->sum_part[t * w->sum_stride + s * w->B + b];
        mine[b] = total;
    }
    return mine;
}

/* AMX and AVX-512 panels: the quantized rows of slot s into tiles (pack_act_tile).  Threads split the tiles
 * by unit of K: a 64-byte line of a tile holds bytes of 16 rows, so splitting by row would have
 * threads write into the same lines. */
static void pack_act_tiles_share(const hgrn_ws_t *w, int s, int id, int nt) {
#if MW_X86
    const int64_t units = 4 * ((w->nb[s] + 1) / 2);
    const int64_t u0 = units * id / nt, u1 = units * (id + 1) / nt;
    for (int64_t m0 = 0; m0 < w->B; m0 += 16)
        pack_act_tile(w->q[s], w->qs[s], m0, m0 + 16 < w->B ? m0 + 16 : w->B, u0, u1, units, w->act_tiles[s]);
#else
    (void)w, (void)s, (void)id, (void)nt;
#endif
}

static inline job_t slot_job(const hgrn_ws_t *w, int s, const int32_t *sumq, const uint8_t *codes,
                             int64_t N, float *out, size_t pf_far) {
    job_t j = {codes, N, w->nb[s], w->q[s], w->qs[s], w->B, sumq, NULL, out, w->rs[s],
               w->act_tiles[s], w->mtiles, w->unpacked, pf_far, N};
    return j;
}

/* Thread id's share of the output tiles of up to three products that run together: an even share
 * of all their tiles, or with `each`, the rows my_span gives it of every product, so that
 * elementwise work split by my_span afterwards finds its inputs in the thread's own cache.
 * (Splitting the last tiles dynamically, by a shared counter, made the 370M batch-16 step about
 * 10% slower on the Intel Xeon VM: each extra range restarts the weight prefetches.) */
static void run_jobs(const hgrn_ws_t *w, const job_t *jobs, int njobs, int each, int id, int nt) {
    const int64_t tr = tile_rows(w->isa);
    run_fn fn = runner(w->isa);
    if (each) { /* my_span's rows are multiples of 16, so whole tiles */
        for (int k = 0; k < njobs; ++k) {
            int64_t n0, n1;
            my_span(jobs[k].N, id, nt, &n0, &n1);
            if (n0 < n1) fn(&jobs[k], n0 / tr, (n1 + tr - 1) / tr, id);
        }
        return;
    }
    int64_t tiles[3], total = 0;
    for (int k = 0; k < njobs; ++k) {
        tiles[k] = (jobs[k].N + tr - 1) / tr;
        total += tiles[k];
    }
    const int64_t a = total * id / nt, b = total * (id + 1) / nt;
    int64_t off = 0;
    for (int k = 0; k < njobs; ++k) {
        const int64_t lo = a > off ? a : off, hi = b < off + tiles[k] ? b : off + tiles[k];
        if (lo < hi) fn(&jobs[k], lo - off, hi - off, id);
        off += tiles[k];
    }
}

typedef struct {
    const int64_t *plan;
    const float *scales;
    float eps;
    int W, exp_step, torch_threads;
    float *x, *state, *logits;
    const float *mask;
} hgrn_args_t;

/* ---- the step ---- */

/* MLGRU gates, recurrence and output o for elements [k0, k1) of row b of layer l. */
static void mlgru_span(const hgrn_ws_t *w, const hgrn_args_t *a, const row_ops_t *ops, const int64_t *lp,
                       int64_t l, int64_t b, int64_t heads, const ew_geom_t *gflat, int64_t k0, int64_t k1) {
    const int64_t D = w->D, hd = D / heads, n = k1 - k0;
    if (n <= 0) return;
    const float *iv = w->fi + b * D, *fv = w->ff + b * D, *gv = w->fg + b * D;
    const float *lower = PTR(const float *, lp[PL_LOWER]);
    const float *gnorm = PTR(const float *, lp[PL_G_NORM]);
    float *st = a->state + (l * w->B + b) * D;
    float *e1 = w->e1 + b * w->ew, *e2 = w->e2 + b * w->ew, *o = w->o + b * D;
    neg_exp_like_torch(fv + k0, e1 + k0, n, b * D + k0, gflat);
    neg_exp_like_torch(iv + k0, e2 + k0, n, b * D + k0, gflat);
    ops->gates(iv + k0, e1 + k0, e2 + k0, lower ? lower + k0 : NULL, a->mask ? a->mask + b : NULL,
               st + k0, n);
    neg_exp_like_torch(st + k0, e1 + k0, n, b * D + k0, gflat);
    for (int64_t h0 = k0 / hd * hd; h0 < k1; h0 += hd) {
        const int64_t s0 = h0 > k0 ? h0 : k0, s1 = h0 + hd < k1 ? h0 + hd : k1;
        const float r = ops->rms(gv + h0, hd, a->eps, a->W);
        ops->gate_out(gv + s0, r, gnorm + (s0 - h0), st + s0, e1 + s0, o + s0, s1 - s0);
    }
}

/* The step's barrier.  A decode step of mmfree-2.7b passes about 320 of them; OpenMP's costs
 * 0.35-0.4 us on the Intel Xeon VM when both threads arrive together, this one 0.08 us.  It spins,
 * then yields the CPU, so that more threads than cores still make progress. */
#if defined(_OPENMP) && (defined(__GNUC__) || defined(__clang__))
#define MW_SPIN_BARRIER 1
#define SPIN_BEFORE_YIELD 20000

static inline void cpu_relax(void) {
#if MW_X86
    _mm_pause();
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

static void spin_barrier(int *count, int *gen, int nt, int *my_gen) {
    const int g = *my_gen;
    *my_gen = g + 1;
    if (__atomic_add_fetch(count, 1, __ATOMIC_ACQ_REL) == nt) {
        __atomic_store_n(count, 0, __ATOMIC_RELAXED); /* ordered before the release below */
        __atomic_store_n(gen, g + 1, __ATOMIC_RELEASE);
        return;
    }
    for (long spins = 0; __atomic_load_n(gen, __ATOMIC_ACQUIRE) == g; ++spins) {
        if (spins < SPIN_BEFORE_YIELD)
            cpu_relax();
        else
            sched_yield();
    }
}
#endif

static void hgrn_step_run(const hgrn_ws_t *w, const hgrn_args_t *a) {
    const int64_t *plan = a->plan;
    const int64_t L = plan[0], H = plan[1], D = plan[2], I = plan[3], V = plan[4], heads = plan[5];
    const size_t far = plan[9] ? PF_FAR_BYTES : 0;
    const int64_t B = w->B;
    const ew_geom_t gflat = ew_geom(B, D, 0, a->exp_step, a->torch_threads, w->level);
    const ew_geom_t ggate = ew_geom(B, I, 1, a->exp_step, a->torch_threads, w->level);
    const float eps = a->eps;
    const int W = a->W, tiled = uses_panels(w->isa, B);
    const row_ops_t *ops = row_ops(w->level);
    float *x = a->x;
#ifdef _OPENMP
#pragma omp parallel num_threads(w->nthreads)
#endif
    {
#ifdef _OPENMP
        const int id = omp_get_thread_num(), nt = omp_get_num_threads();
#if MW_SPIN_BARRIER
        /* Every thread reads the generation before its first arrival, so all start equal. */
        int my_gen = __atomic_load_n(w->barrier + 16, __ATOMIC_ACQUIRE);
#define SYNC spin_barrier(w->barrier, w->barrier + 16, nt, &my_gen);
#elif defined(_MSC_VER)
#define SYNC __pragma(omp barrier)
#else
#define SYNC _Pragma("omp barrier")
#endif
#else
        const int id = 0, nt = 1;
#define SYNC
#endif
        /* With at least as many rows as threads, each thread takes whole rows.  With fewer (decode
         * of one sequence), threads share rows: the elementwise work is split by element, and
         * the quantization of a row, which must see the whole row, follows a barrier. */
        const int split = B < nt;
        int64_t b0, b1;
        /* The row sums a product reads: gathered from the threads' parts when they share rows. */
#define sums(s) (split ? gather_sums(w, s, id, nt) : w->sumq[s])
        my_rows(B, id, nt, &b0, &b1);
        for (int64_t l = 0; l < L; ++l) {
            const int64_t *lp = plan + PLAN_HEADER + l * PLAN_LAYER;
            const float *scl = a->scales + SCALES_HEADER + l * SCALES_LAYER;
            /* h = attn_norm(x), quantized three times for i, f and g; when threads share rows,
             * the (row, projection) pairs are spread over them and each computes its own h. */
            const int slots[3] = {SLOT_I, SLOT_F, SLOT_G}, sc[3] = {SC_I, SC_F, SC_G};
            const int64_t gains[3] = {lp[PL_I_G], lp[PL_F_G], lp[PL_G_G]};
            if (!split) {
                for (int64_t b = b0; b < b1; ++b) {
                    float *hb = w->h + b * H;
                    ops->norm(x + b * H, PTR(const float *, lp[PL_ATTN_NORM]), H, eps, W, hb);
                    const float r = ops->rms(hb, H, eps, W);
                    for (int k = 0; k < 3; ++k)
                        put_row(w, slots[k], b, hb, r, PTR(const float *, gains[k]), H, scl[sc[k]]);
                }
            } else {
                for (int64_t b = 0; b < B; ++b) {
                    float *hb = w->hs + (int64_t)id * H;
                    ops->norm(x + b * H, PTR(const float *, lp[PL_ATTN_NORM]), H, eps, W, hb);
                    const float r = ops->rms(hb, H, eps, W);
                    for (int k = 0; k < 3; ++k)
                        put_row_part(w, slots[k], b, hb, r, PTR(const float *, gains[k]), H, scl[sc[k]], id, nt);
                }
            }
            SYNC
            if (tiled) {
                for (int k = 0; k < 3; ++k) pack_act_tiles_share(w, slots[k], id, nt);
                SYNC
            }
            {
                job_t jobs[3] = {slot_job(w, SLOT_I, sums(SLOT_I), PTR(const uint8_t *, lp[PL_I_W]), D, w->fi, far),
                                 slot_job(w, SLOT_F, sums(SLOT_F), PTR(const uint8_t *, lp[PL_F_W]), D, w->ff, far),
                                 slot_job(w, SLOT_G, sums(SLOT_G), PTR(const uint8_t *, lp[PL_G_W]), D, w->fg, far)};
                run_jobs(w, jobs, 3, split, id, nt);
                prefetch_floats(PTR(const float *, lp[PL_LOWER]), lp[PL_LOWER] ? D : 0);
                prefetch_floats(PTR(const float *, lp[PL_G_NORM]), D / heads);
                prefetch_floats(PTR(const float *, lp[PL_O_G]), D);
                if (split) {
                    int64_t k0, k1;
                    my_span(D, id, nt, &k0, &k1);
                    for (int64_t b = 0; b < B; ++b) prefetch_floats(a->state + (l * B + b) * D + k0, k1 - k0);
                } else {
                    prefetch_floats(a->state + (l * B + b0) * D, (b1 - b0) * D);
                }
            }
            SYNC
            /* MLGRU: gates, recurrence, o; then o quantized for o_proj. */
            if (!split) {
                for (int64_t b = b0; b < b1; ++b) {
                    mlgru_span(w, a, ops, lp, l, b, heads, &gflat, 0, D);
                    const float *o = w->o + b * D;
                    put_row(w, SLOT_O, b, o, ops->rms(o, D, eps, W), PTR(const float *, lp[PL_O_G]), D,
                            scl[SC_O]);
                }
            } else {
                int64_t k0, k1;
                my_span(D, id, nt, &k0, &k1);
                for (int64_t b = 0; b < B; ++b) mlgru_span(w, a, ops, lp, l, b, heads, &gflat, k0, k1);
                SYNC
                for (int64_t b = 0; b < B; ++b) {
                    const float *o = w->o + b * D;
                    put_row_part(w, SLOT_O, b, o, ops->rms(o, D, eps, W), PTR(const float *, lp[PL_O_G]), D,
                                 scl[SC_O], id, nt);
                }
            }
            SYNC
            if (tiled) {
                pack_act_tiles_share(w, SLOT_O, id, nt);
                SYNC
            }
            {
                /* x = x + attn(...), added as the product stores attn */
                job_t j = slot_job(w, SLOT_O, sums(SLOT_O), PTR(const uint8_t *, lp[PL_O_W]), H, x, far);
                j.residual = 1;
                run_jobs(w, &j, 1, 0, id, nt);
                prefetch_floats(PTR(const float *, lp[PL_MLP_NORM]), H);
                prefetch_floats(PTR(const float *, lp[PL_GATE_G]), H);
            }
            SYNC
            /* h = mlp_norm(x), quantized for gate_proj. */
            if (!split) {
                for (int64_t b = b0; b < b1; ++b) {
                    float *hb = w->h + b * H;
                    ops->norm(x + b * H, PTR(const float *, lp[PL_MLP_NORM]), H, eps, W, hb);
                    put_row(w, SLOT_I, b, hb, ops->rms(hb, H, eps, W), PTR(const float *, lp[PL_GATE_G]), H,
                            scl[SC_GATE]);
                }
            } else {
                for (int64_t b = 0; b < B; ++b) {
                    float *hb = w->hs + (int64_t)id * H;
                    ops->norm(x + b * H, PTR(const float *, lp[PL_MLP_NORM]), H, eps, W, hb);
                    put_row_part(w, SLOT_I, b, hb, ops->rms(hb, H, eps, W), PTR(const float *, lp[PL_GATE_G]), H,
                                 scl[SC_GATE], id, nt);
                }
            }
            SYNC
            if (tiled) {
                pack_act_tiles_share(w, SLOT_I, id, nt);
                SYNC
            }
            {
                const uint8_t *codes = PTR(const uint8_t *, lp[PL_GATE_W]);
                job_t j = slot_job(w, SLOT_I, sums(SLOT_I), codes, 2 * I, w->y, far);
                if (split) { /* the gate and up halves apart, so that each thread multiplies
                              * the rows of both that its part of the GLU needs */
                    job_t halves[2] = {j, j};
                    halves[0].N = halves[1].N = I;
                    halves[1].w = codes + (size_t)I * (size_t)w->nb[SLOT_I] * BLOCK_BYTES;
                    halves[1].out_f32 = w->y + I;
                    run_jobs(w, halves, 2, 1, id, nt);
                } else {
                    run_jobs(w, &j, 1, 0, id, nt);
                }
                prefetch_floats(PTR(const float *, lp[PL_DOWN_G]), I);
            }
            SYNC
            /* silu(gate) * up, quantized for down_proj. */
            {
                int64_t k0 = 0, k1 = I, r0 = b0, r1 = b1;
                if (split) {
                    my_span(I, id, nt, &k0, &k1);
                    r0 = 0;
                    r1 = B;
                }
                for (int64_t b = r0; b < r1 && k0 < k1; ++b) {
                    const float *gate = w->y + b * 2 * I + k0;
                    float *e = w->e1 + b * w->ew + k0;
                    neg_exp_like_torch(gate, e, k1 - k0, b * I + k0, &ggate);
                    ops->glu(gate, gate + I, e, w->u + b * I + k0, k1 - k0);
                }
                if (split) {
                    SYNC
                    for (int64_t b = 0; b < B; ++b) {
                        const float *u = w->u + b * I;
                        put_row_part(w, SLOT_DOWN, b, u, ops->rms(u, I, eps, W), PTR(const float *, lp[PL_DOWN_G]),
                                     I, scl[SC_DOWN], id, nt);
                    }
                }
                for (int64_t b = b0; b < b1 && !split; ++b) {
                    const float *u = w->u + b * I;
                    put_row(w, SLOT_DOWN, b, u, ops->rms(u, I, eps, W), PTR(const float *, lp[PL_DOWN_G]), I,
                            scl[SC_DOWN]);
                }
            }
            SYNC
            if (tiled) {
                pack_act_tiles_share(w, SLOT_DOWN, id, nt);
                SYNC
            }
            {
                /* x = x + mlp(...) */
                job_t j = slot_job(w, SLOT_DOWN, sums(SLOT_DOWN), PTR(const uint8_t *, lp[PL_DOWN_W]), H, x, far);
                j.residual = 1;
                run_jobs(w, &j, 1, 0, id, nt);
                if (l + 1 < L) {
                    const int64_t *next = lp + PLAN_LAYER;
                    const int64_t vecs[4] = {next[PL_ATTN_NORM], next[PL_I_G], next[PL_F_G], next[PL_G_G]};
                    for (int k = 0; k < 4; ++k) prefetch_floats(PTR(const float *, vecs[k]), H);
                } else {
                    prefetch_floats(PTR(const float *, plan[6]), H);
                    prefetch_floats(PTR(const float *, plan[8]), H);
                }
            }
            SYNC
        }
        /* The final norm and the lm_head. */
        for (int64_t b = split ? 0 : b0; b < (split ? B : b1); ++b) {
            float *hb = split ? w->hs + (int64_t)id * H : w->h + b * H;
            ops->norm(x + b * H, PTR(const float *, plan[6]), H, eps, W, hb);
            const float r = ops->rms(hb, H, eps, W);
            if (split)
                put_row_part(w, SLOT_I, b, hb, r, PTR(const float *, plan[8]), H, a->scales[0], id, nt);
            else
                put_row(w, SLOT_I, b, hb, r, PTR(const float *, plan[8]), H, a->scales[0]);
        }
        SYNC
        if (tiled) {
            pack_act_tiles_share(w, SLOT_I, id, nt);
            SYNC
        }
        {
            job_t j = slot_job(w, SLOT_I, sums(SLOT_I), PTR(const uint8_t *, plan[7]), V, a->logits, far);
            run_jobs(w, &j, 1, 0, id, nt);
        }
#undef sums
#undef SYNC
    }
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
 * written in; AMX rows are written in the AVX-512 layout and then rearranged into B tiles. */
typedef struct {
    int isa, layout;
    size_t qs;
    int8_t *qbuf;
    int32_t *sumq;
    float *rs;
    int8_t *act_tiles;
    uint8_t *unpacked;
} plan_t;

static void plan_free(plan_t *p) {
    free(p->qbuf);
    free(p->sumq);
    free(p->rs);
    free(p->act_tiles);
    free(p->unpacked);
}

static int plan_make(plan_t *p, int isa, long long N, long long nb, long long M, int nthreads) {
    memset(p, 0, sizeof *p);
    p->isa = (isa == ISA_AMX && M < AMX_MIN_ROWS) ? ISA_AVX512VNNI : isa;
    p->layout = p->isa == ISA_AMX ? ISA_AVX512VNNI : p->isa;
    p->qs = qrow_bytes(p->layout, nb);
    p->qbuf = alloc64(p->qs * (size_t)M);
    p->sumq = alloc64(sizeof(int32_t) * (size_t)M);
    p->rs = alloc64(sizeof(float) * (size_t)M);
    int ok = p->qbuf && p->sumq && p->rs;
    if (ok && uses_panels(p->isa, M)) {
        p->act_tiles = alloc64(act_tiles_bytes(M, nb));
        p->unpacked = alloc64((size_t)job_threads(p->isa, N, nthreads) * unpacked_bytes(nb));
        ok = p->act_tiles && p->unpacked;
    }
    if (!ok) plan_free(p);
    return ok;
}

static void plan_run(plan_t *p, const uint8_t *w, long long N, long long nb, long long M,
                     int32_t *out_i32, float *out_f32, int nthreads) {
#if MW_X86
    if (uses_panels(p->isa, M)) pack_act_tiles(p->qbuf, p->qs, M, nb, p->act_tiles);
#endif
    job_t j = {w, N, nb, p->qbuf, p->qs, M, p->sumq, out_i32, out_f32, p->rs,
               p->act_tiles, (M + 15) / 16, p->unpacked, PF_FAR_BYTES, N};
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
    uint64_t *buf = alloc_streamed(n * 8);
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

/* ---- fused HGRN-Bit step ---- */

#define WS_CAPSULE "memwise.kernels._ternary.hgrn_workspace"

static void py_ws_free(PyObject *capsule) {
    hgrn_ws_free(PyCapsule_GetPointer(capsule, WS_CAPSULE));
}

/* hgrn_workspace(isa, B, H, D, I, nthreads) -> capsule: the buffers of fused steps of B rows. */
static PyObject *py_hgrn_workspace(PyObject *self, PyObject *args) {
    int isa, nthreads;
    long long B, H, D, I;
    (void)self;
    if (!PyArg_ParseTuple(args, "iLLLLi", &isa, &B, &H, &D, &I, &nthreads)) return NULL;
    if (!isa_supported(isa)) return PyErr_Format(PyExc_ValueError, "isa %d not supported", isa);
    if (B < 1 || H < 1 || D < 1 || I < 1)
        return PyErr_Format(PyExc_ValueError, "hgrn_workspace: sizes must be >= 1");
    hgrn_ws_t *w = hgrn_ws_make(isa, B, H, D, I, nthreads);
    if (!w) return PyErr_NoMemory();
    PyObject *capsule = PyCapsule_New(w, WS_CAPSULE, py_ws_free);
    if (!capsule) hgrn_ws_free(w);
    return capsule;
}

/* hgrn_step(ws, plan_ptr, scales_ptr, eps, sum_width, exp_step, torch_threads, x_ptr, state_ptr,
 *           mask_ptr, logits_ptr): one decode step; x [B, H] holds the embedded tokens and is
 *           overwritten, state [L, B, D] is advanced in place, mask [B] float32 or 0 for none,
 *           logits [B, V] are written. */
static PyObject *py_hgrn_step(PyObject *self, PyObject *args) {
    PyObject *capsule;
    unsigned long long pp, sp, xp, stp, mp, lp;
    double eps;
    int W, step, tthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "OKKdiiiKKKK", &capsule, &pp, &sp, &eps, &W, &step, &tthreads, &xp,
                          &stp, &mp, &lp))
        return NULL;
    hgrn_ws_t *w = PyCapsule_GetPointer(capsule, WS_CAPSULE);
    if (!w) return NULL;
    if (W < 1 || W > MAXW) return PyErr_Format(PyExc_ValueError, "sum width %d out of range", W);
    const int64_t *plan = (const int64_t *)(uintptr_t)pp;
    if (plan[1] != w->H || plan[2] != w->D || plan[3] != w->I || plan[5] < 1 || w->D % plan[5])
        return PyErr_Format(PyExc_ValueError, "hgrn_step: the plan does not fit the workspace");
    hgrn_args_t a = {plan, (const float *)(uintptr_t)sp, (float)eps, W, step, tthreads,
                     (float *)(uintptr_t)xp, (float *)(uintptr_t)stp, (float *)(uintptr_t)lp,
                     (const float *)(uintptr_t)mp};
    Py_BEGIN_ALLOW_THREADS
    hgrn_step_run(w, &a);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* activation(kind, x_ptr, out_ptr, rows, cols, row_stride, rowsplit, exp_step, torch_threads):
 * sigmoid (kind 0) or silu (kind 1) of a [rows, cols] float32 input with the given row stride
 * into a contiguous output, computed like the fused step computes it (to compare with torch). */
static PyObject *py_activation(PyObject *self, PyObject *args) {
    int kind, rowsplit, step, tthreads;
    unsigned long long xp, op;
    long long rows, cols, stride;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKKLLLiii", &kind, &xp, &op, &rows, &cols, &stride, &rowsplit,
                          &step, &tthreads))
        return NULL;
    float *e = alloc64(sizeof(float) * (size_t)(cols > 0 ? cols : 1));
    if (!e) return PyErr_NoMemory();
    const ew_geom_t g = ew_geom(rows, cols, rowsplit, step, tthreads, vec_level_best());
    Py_BEGIN_ALLOW_THREADS
    for (long long r = 0; r < rows; ++r) {
        const float *x = (const float *)(uintptr_t)xp + r * stride;
        float *out = (float *)(uintptr_t)op + r * cols;
        neg_exp_like_torch(x, e, cols, r * cols, &g);
        for (long long k = 0; k < cols; ++k)
            out[k] = kind == 0 ? 1.0f / (e[k] + 1.0f) : x[k] / (1.0f + e[k]);
    }
    Py_END_ALLOW_THREADS
    free(e);
    Py_RETURN_NONE;
}

/* ---- greedy decoding's choice ---- */

/* The first largest of x[k0, k1), or the first NaN (torch.max's answer): *best and its index. */
static void argmax_scalar(const float *x, int64_t k0, int64_t k1, float *best, int64_t *at) {
    float m = x[k0];
    int64_t i = k0;
    if (m == m)
        for (int64_t k = k0 + 1; k < k1; ++k) {
            if (x[k] != x[k]) {
                m = x[k], i = k;
                break;
            }
            if (x[k] > m) m = x[k], i = k;
        }
    *best = m, *at = i;
}

#if MW_X86
static T512 void argmax_avx512(const float *x, int64_t k0, int64_t k1, float *best, int64_t *at) {
    if (k1 - k0 < 32) {
        argmax_scalar(x, k0, k1, best, at);
        return;
    }
    /* Per lane the first largest (strictly greater replaces); NaNs are looked up apart. */
    __m512 vmax = _mm512_loadu_ps(x + k0);
    __m512i vidx = _mm512_add_epi32(_mm512_set1_epi32((int)k0), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8,
                                                                                    9, 10, 11, 12, 13, 14, 15));
    __m512i cur = vidx;
    const __m512i sixteen = _mm512_set1_epi32(16);
    __mmask16 nan = _mm512_cmp_ps_mask(vmax, vmax, _CMP_UNORD_Q);
    int64_t k = k0 + 16;
    for (; k + 16 <= k1; k += 16) {
        const __m512 v = _mm512_loadu_ps(x + k);
        cur = _mm512_add_epi32(cur, sixteen);
        const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);
        vmax = _mm512_mask_mov_ps(vmax, gt, v);
        vidx = _mm512_mask_mov_epi32(vidx, gt, cur);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    if (nan) { /* rare: the plain scan finds the first NaN */
        argmax_scalar(x, k0, k1, best, at);
        return;
    }
    float lanes[16];
    int32_t idx[16];
    _mm512_storeu_ps(lanes, vmax);
    _mm512_storeu_si512((void *)idx, vidx);
    float m = lanes[0];
    int64_t i = idx[0];
    for (int l = 1; l < 16; ++l)
        if (lanes[l] > m || (lanes[l] == m && idx[l] < i)) m = lanes[l], i = idx[l];
    for (; k < k1; ++k) {
        if (x[k] != x[k]) {
            argmax_scalar(x, k0, k1, best, at);
            return;
        }
        if (x[k] > m) m = x[k], i = k;
    }
    *best = m, *at = i;
}
#endif

/* argmax_rows(x_ptr, rows, cols, out_ptr, nthreads): out int64 [rows] = x.max(dim=-1).indices for
 * a contiguous float32 [rows, cols].  Threads split each row's columns as the fused step's
 * lm_head splits its outputs (my_span), so each reads logits it has just written. */
static PyObject *py_argmax_rows(PyObject *self, PyObject *args) {
    unsigned long long xp, op;
    long long rows, cols;
    int nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "KLLKi", &xp, &rows, &cols, &op, &nthreads)) return NULL;
    if (rows < 0 || cols < 1) return PyErr_Format(PyExc_ValueError, "argmax_rows: bad shape [%lld, %lld]", rows, cols);
    if (nthreads < 1) nthreads = 1;
    if ((long long)nthreads * 4096 > cols) nthreads = (int)(cols / 4096) > 0 ? (int)(cols / 4096) : 1;
    const float *x = (const float *)(uintptr_t)xp;
    int64_t *out = (int64_t *)(uintptr_t)op;
    float *best = malloc(sizeof(float) * (size_t)(rows * nthreads + 1));
    int64_t *at = malloc(sizeof(int64_t) * (size_t)(rows * nthreads + 1));
    if (!best || !at) {
        free(best);
        free(at);
        return PyErr_NoMemory();
    }
    for (int64_t k = 0; k < rows * nthreads; ++k) at[k] = -1; /* parts no thread took */
    const int avx512 = vec_level_best() >= VEC_AVX512;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
    {
#ifdef _OPENMP
        const int id = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int id = 0, nt = 1;
#endif
        int64_t k0, k1;
        my_span(cols, id, nt, &k0, &k1);
        for (int64_t r = 0; r < rows; ++r) {
            float *b = best + r * nthreads + id;
            int64_t *a = at + r * nthreads + id;
            if (k0 >= k1) {
                *a = -1;
                continue;
            }
#if MW_X86
            if (avx512) {
                argmax_avx512(x + r * cols, k0, k1, b, a);
                continue;
            }
#endif
            argmax_scalar(x + r * cols, k0, k1, b, a);
        }
    }
    /* Parts in column order: the first NaN, else the largest, the earlier part on a tie. */
    for (int64_t r = 0; r < rows; ++r) {
        float m = 0.0f;
        int64_t i = -1;
        for (int t = 0; t < nthreads; ++t) {
            const float v = best[r * nthreads + t];
            const int64_t k = at[r * nthreads + t];
            if (k < 0) continue;
            if (v != v) {
                i = k;
                break;
            }
            if (i < 0 || v > m) m = v, i = k;
        }
        out[r] = i;
    }
    Py_END_ALLOW_THREADS
    (void)avx512;
    free(best);
    free(at);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"isa_supported", py_isa_supported, METH_VARARGS, "isa_supported(isa_id) -> bool"},
    {"argmax_rows", py_argmax_rows, METH_VARARGS, "argmax_rows(x_ptr, rows, cols, out_ptr, nthreads)"},
    {"matmul", py_matmul, METH_VARARGS, "int8 x packed ternary -> int32 (raw pointers)"},
    {"bitlinear", py_bitlinear, METH_VARARGS, "fused rmsnorm, int8 quantization, product"},
    {"quantize", py_quantize, METH_VARARGS, "rmsnorm and int8 quantization of rows"},
    {"sum_of_squares", py_sum_of_squares, METH_VARARGS, "row sum of squares in torch's order"},
    {"read_bandwidth", py_read_bandwidth, METH_VARARGS, "measured memory read bandwidth"},
    {"have_openmp", py_have_openmp, METH_NOARGS, "whether the build uses OpenMP"},
    {"hgrn_workspace", py_hgrn_workspace, METH_VARARGS, "buffers of fused HGRN-Bit decode steps"},
    {"hgrn_step", py_hgrn_step, METH_VARARGS, "one fused HGRN-Bit decode step (all layers)"},
    {"activation", py_activation, METH_VARARGS, "sigmoid or silu computed like torch's CPU kernels"},
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
