/* NF4 products (memwise/kernels/nf4.py): bitsandbytes' NormalFloat4 codes, blocks of 64 along the
 * flattened [N, Kp] matrix (Kp = K padded to 64, so a block never crosses a row), two codes a byte,
 * the even element in the high nibble.  Block absmax is double-quantized: absmax_b =
 * code8[qabs[b]] * absmax2[b / 256] + offset.  Weights are dequantized in registers exactly as
 * bitsandbytes' dequantize_4bit computes them (NF4[code] * absmax_b, float32) and multiplied with
 * float32 activations; the sums are float32 in each path's own order.
 *
 * SIMD paths read the activations in a per-32-column order (nf4_permute_row): the 16 even columns,
 * then the 16 odd ones, which is what a 16-byte load of codes unpacks to (high nibbles, low nibbles). */
#ifndef MEMWISE_KERNELS_NF4_PRODUCTS_H
#define MEMWISE_KERNELS_NF4_PRODUCTS_H

#include "common.h"

#define NF4_TILE 4

/* The 16 NormalFloat4 values (QLoRA, Dettmers et al. 2023; the table bitsandbytes uses). */
static const float NF4_VALUES[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

typedef struct {
    const uint8_t *codes;   /* [N, Kp / 2] */
    const uint8_t *qabs;    /* [N * G] */
    const float *absmax2;   /* [ceil(N * G / 256)] */
    const float *code8;     /* [256] */
    float offset;
    const float *bias;      /* [N] or NULL */
    int64_t N, Kp, G, M;
    const float *x;         /* [M, Kp]: zero padded; permuted per 32 columns for the SIMD paths */
    float *out;             /* [M, N] */
} nf4_job_t;

static inline float nf4_absmax(const nf4_job_t *j, int64_t b) {
    const float a = j->code8[j->qabs[b]] * j->absmax2[b >> 8];
    return a + j->offset;
}

static void nf4_permute_row(const float *x, int64_t Kp, float *dst) {
    for (int64_t c = 0; c < Kp; c += 32)
        for (int i = 0; i < 16; ++i) {
            dst[c + i] = x[c + 2 * i];
            dst[c + 16 + i] = x[c + 2 * i + 1];
        }
}

typedef float (*nf4_row_fn)(const nf4_job_t *, int64_t n, int64_t m);

static float nf4_row_scalar(const nf4_job_t *j, int64_t n, int64_t m) {
    const uint8_t *c = j->codes + n * (j->Kp / 2);
    const float *x = j->x + m * j->Kp;
    float acc = 0.0f;
    for (int64_t g = 0; g < j->G; ++g) {
        const float a = nf4_absmax(j, n * j->G + g);
        for (int i = 0; i < 32; ++i) {
            const uint8_t byte = c[32 * g + i];
            const float w0 = NF4_VALUES[byte >> 4] * a, w1 = NF4_VALUES[byte & 15] * a;
            acc += w0 * x[64 * g + 2 * i];
            acc += w1 * x[64 * g + 2 * i + 1];
        }
    }
    return acc;
}

#if MW_X86
static T256 inline __m256 nf4_lookup8(__m256i idx, __m256 lo, __m256 hi) {
    const __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), upper);
}

static T256 float nf4_row_avx2(const nf4_job_t *j, int64_t n, int64_t m) {
    const uint8_t *c = j->codes + n * (j->Kp / 2);
    const float *x = j->x + m * j->Kp;
    const __m256 lo = _mm256_loadu_ps(NF4_VALUES), hi = _mm256_loadu_ps(NF4_VALUES + 8);
    const __m256i low = _mm256_set1_epi32(15);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t g = 0; g < j->G; ++g) {
        const __m256 a = _mm256_set1_ps(nf4_absmax(j, n * j->G + g));
        for (int part = 0; part < 4; ++part) {  /* 8 bytes: columns 16 part .. 16 part + 15 of the group */
            const int64_t chunk = 64 * g + 32 * (part >> 1), half = 8 * (part & 1);
            long long bits;
            memcpy(&bits, c + 32 * g + 8 * part, 8);
            const __m256i v = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bits));
            const __m256 we = _mm256_mul_ps(nf4_lookup8(_mm256_srli_epi32(v, 4), lo, hi), a);
            const __m256 wo = _mm256_mul_ps(nf4_lookup8(_mm256_and_si256(v, low), lo, hi), a);
            acc0 = _mm256_fmadd_ps(we, _mm256_loadu_ps(x + chunk + half), acc0);
            acc1 = _mm256_fmadd_ps(wo, _mm256_loadu_ps(x + chunk + 16 + half), acc1);
        }
    }
    const __m256 s = _mm256_add_ps(acc0, acc1);
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    return _mm_cvtss_f32(t);
}

static T512 float nf4_row_avx512(const nf4_job_t *j, int64_t n, int64_t m) {
    const uint8_t *c = j->codes + n * (j->Kp / 2);
    const float *x = j->x + m * j->Kp;
    const __m512 table = _mm512_loadu_ps(NF4_VALUES);
    const __m512i low = _mm512_set1_epi32(15);
    /* four accumulators: one FMA chain each per block, so their latency overlaps */
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t g = 0; g < j->G; ++g) {
        const __m512 a = _mm512_set1_ps(nf4_absmax(j, n * j->G + g));
        for (int h = 0; h < 2; ++h) {   /* 16 bytes: the 32 columns 64 g + 32 h .. + 31 */
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + 32 * g + 16 * h)));
            const __m512 we = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table), a);
            const __m512 wo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, low), table), a);
            acc[2 * h] = _mm512_fmadd_ps(we, _mm512_loadu_ps(x + 64 * g + 32 * h), acc[2 * h]);
            acc[2 * h + 1] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(x + 64 * g + 32 * h + 16), acc[2 * h + 1]);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}
#endif

static nf4_row_fn nf4_row_of(int isa) {
#if MW_X86
    if (isa == ISA_AMX || isa == ISA_AVX512VNNI) return nf4_row_avx512;
    if (isa == ISA_AVXVNNI || isa == ISA_AVX2) return nf4_row_avx2;
#endif
    (void)isa;
    return nf4_row_scalar;
}

static int nf4_permuted(int isa) { return nf4_row_of(isa) != nf4_row_scalar; }

static void nf4_run_tiles(const nf4_job_t *j, nf4_row_fn fn, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * NF4_TILE, rows = j->N - n0 < NF4_TILE ? j->N - n0 : NF4_TILE;
        for (int64_t m = 0; m < j->M; ++m)
            for (int64_t n = n0; n < n0 + rows; ++n) {
                const float v = fn(j, n, m);
                j->out[m * j->N + n] = j->bias ? v + j->bias[n] : v;
            }
    }
}

static void nf4_run(int isa, const nf4_job_t *j, int nthreads) {
    const nf4_row_fn fn = nf4_row_of(isa);
    const int64_t tiles = (j->N + NF4_TILE - 1) / NF4_TILE;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > tiles) nthreads = (int)(tiles > 0 ? tiles : 1);
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        nf4_run_tiles(j, fn, tiles * id / nt, tiles * (id + 1) / nt);
    }
#else
    nf4_run_tiles(j, fn, 0, tiles);
#endif
}

#endif /* MEMWISE_KERNELS_NF4_PRODUCTS_H */
