/* memwise.kernels._dense: y = x W^T + b for float32 weights W [N, K], float32 activations x [M, K]
 * and the few rows M (1..8) that a decode step has.  Such a product reads every weight once and does
 * two flops per 4-byte load, so it runs at the speed the matrix streams in from memory; the work is
 * to keep enough loads in flight and to read each weight only once.
 *
 * Split: output rows are cut into tiles of TILE consecutive rows; each thread takes one contiguous
 * stretch of tiles, so it streams one contiguous stretch of W (what the hardware prefetchers follow
 * best) and no two threads touch the same cache line of W or y.  Within a tile, each activation load
 * is shared by TILE weight rows, and each weight load by up to PASS_M activation rows; more
 * activation rows take another pass over the tile, which then comes from the L2 cache.
 *
 * Accumulation order of y[m, n] (what the tolerance in memwise/kernels/dense.py rests on): with L
 * lanes (16 on AVX-512, 8 on AVX2), lane l sums w[n, k] * x[m, k] for k = l, l + L, l + 2L, ... in
 * increasing k, one fused multiply-add (a single rounding) per term; the last partial vector is
 * loaded masked (missing terms are zeros).  The L lanes are then added as a pairwise tree, and the
 * bias is added last.  The scalar path sums k = 0 .. K-1 in order, a multiply and an add per term.
 *
 * Python calls it with raw data pointers; dtype, shape and contiguity are checked in
 * memwise/kernels/dense.py. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "common.h"

#define TILE 4      /* weight rows that share each activation load */
#define PASS_M 4    /* activation rows per pass over a tile on AVX-512 (TILE x PASS_M accumulators) */
#define MIN_WEIGHTS_PER_THREAD (64 * 1024)  /* below this a thread costs more to wake than it saves */

typedef struct {
    const float *w, *x, *bias;
    float *y;
    int64_t N, K, M;
} dense_job_t;

static inline void put(const dense_job_t *j, int64_t m, int64_t n, float sum) {
    j->y[m * j->N + n] = j->bias ? sum + j->bias[n] : sum;
}

static void tile_scalar(const dense_job_t *j, int64_t n0, int rows) {
    for (int r = 0; r < rows; ++r)
        for (int64_t m = 0; m < j->M; ++m) {
            const float *w = j->w + (n0 + r) * j->K, *x = j->x + m * j->K;
            float acc = 0.0f;
            for (int64_t k = 0; k < j->K; ++k) acc += w[k] * x[k];
            put(j, m, n0 + r, acc);
        }
}

#if MW_X86
/* One pass of ms activation rows over `rows` weight rows.  Inlined with constant rows and ms for the
 * common shapes, so that the accumulators live in registers. */
MW_INLINE T512 void pass_avx512(const dense_job_t *j, int64_t n0, const int rows, int64_t m0, const int ms) {
    const int64_t K = j->K;
    const float *w = j->w + n0 * K, *x = j->x + m0 * K;
    __m512 acc[TILE][PASS_M], xs[PASS_M];
    for (int r = 0; r < rows; ++r)
        for (int m = 0; m < ms; ++m) acc[r][m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        for (int m = 0; m < ms; ++m) xs[m] = _mm512_loadu_ps(x + m * K + k);
        for (int r = 0; r < rows; ++r) {
            const __m512 wv = _mm512_loadu_ps(w + r * K + k);
            for (int m = 0; m < ms; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xs[m], acc[r][m]);
        }
    }
    if (k < K) {
        const __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);
        for (int m = 0; m < ms; ++m) xs[m] = _mm512_maskz_loadu_ps(mask, x + m * K + k);
        for (int r = 0; r < rows; ++r) {
            const __m512 wv = _mm512_maskz_loadu_ps(mask, w + r * K + k);
            for (int m = 0; m < ms; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xs[m], acc[r][m]);
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int m = 0; m < ms; ++m) put(j, m0 + m, n0 + r, _mm512_reduce_add_ps(acc[r][m]));
}

T512 static void tile_avx512(const dense_job_t *j, int64_t n0, int rows) {
    for (int64_t m0 = 0; m0 < j->M; m0 += PASS_M) {
        const int ms = j->M - m0 < PASS_M ? (int)(j->M - m0) : PASS_M;
        if (rows == TILE && ms == 1) pass_avx512(j, n0, TILE, m0, 1);
        else if (rows == TILE && ms == 2) pass_avx512(j, n0, TILE, m0, 2);
        else if (rows == TILE && ms == 3) pass_avx512(j, n0, TILE, m0, 3);
        else if (rows == TILE && ms == 4) pass_avx512(j, n0, TILE, m0, 4);
        else pass_avx512(j, n0, rows, m0, ms);  /* the last, partial tile */
    }
}

T256 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* Two activation rows per pass: TILE x 2 accumulators, two activations and a weight stay within
 * the 16 ymm registers. */
MW_INLINE T256 void pass_avx2(const dense_job_t *j, int64_t n0, const int rows, int64_t m0, const int ms) {
    const int64_t K = j->K;
    const float *w = j->w + n0 * K, *x = j->x + m0 * K;
    __m256 acc[TILE][2], xs[2];
    for (int r = 0; r < rows; ++r)
        for (int m = 0; m < ms; ++m) acc[r][m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        for (int m = 0; m < ms; ++m) xs[m] = _mm256_loadu_ps(x + m * K + k);
        for (int r = 0; r < rows; ++r) {
            const __m256 wv = _mm256_loadu_ps(w + r * K + k);
            for (int m = 0; m < ms; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xs[m], acc[r][m]);
        }
    }
    if (k < K) {
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(K - k)), lane);
        for (int m = 0; m < ms; ++m) xs[m] = _mm256_maskload_ps(x + m * K + k, mask);
        for (int r = 0; r < rows; ++r) {
            const __m256 wv = _mm256_maskload_ps(w + r * K + k, mask);
            for (int m = 0; m < ms; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xs[m], acc[r][m]);
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int m = 0; m < ms; ++m) put(j, m0 + m, n0 + r, hsum256(acc[r][m]));
}

T256 static void tile_avx2(const dense_job_t *j, int64_t n0, int rows) {
    for (int64_t m0 = 0; m0 < j->M; m0 += 2) {
        const int ms = j->M - m0 < 2 ? 1 : 2;
        if (rows == TILE && ms == 1) pass_avx2(j, n0, TILE, m0, 1);
        else if (rows == TILE) pass_avx2(j, n0, TILE, m0, 2);
        else pass_avx2(j, n0, rows, m0, ms);
    }
}
#endif

typedef void (*tile_fn)(const dense_job_t *, int64_t, int);

static tile_fn tile_of(int isa) {
#if MW_X86
    if (isa == ISA_AVX512VNNI || isa == ISA_AMX) return tile_avx512;
    if (isa == ISA_AVX2 || isa == ISA_AVXVNNI) return tile_avx2;
#endif
    (void)isa;
    return tile_scalar;
}

static void run_tiles(const dense_job_t *j, tile_fn fn, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * TILE;
        fn(j, n0, j->N - n0 < TILE ? (int)(j->N - n0) : TILE);
    }
}

/* linear(isa, w_ptr, N, K, x_ptr, M, bias_ptr or 0, y_ptr, nthreads): y [M, N] = x [M, K] @ W^T + b. */
static PyObject *py_linear(PyObject *self, PyObject *args) {
    int isa, nthreads;
    unsigned long long wp, xp, bp, yp;
    long long N, K, M;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKLLKLKKi", &isa, &wp, &N, &K, &xp, &M, &bp, &yp, &nthreads)) return NULL;
    if (!isa_supported(isa)) return PyErr_Format(PyExc_ValueError, "isa %d not supported", isa);
    if (N < 1 || K < 1 || M < 1) return PyErr_Format(PyExc_ValueError, "empty product %lldx%lld, %lld rows", N, K, M);
    const dense_job_t j = {(const float *)(uintptr_t)wp, (const float *)(uintptr_t)xp,
                           (const float *)(uintptr_t)bp, (float *)(uintptr_t)yp, N, K, M};
    const tile_fn fn = tile_of(isa);
    const int64_t tiles = (N + TILE - 1) / TILE, by_work = N * K / MIN_WEIGHTS_PER_THREAD;
    if (nthreads > by_work) nthreads = (int)by_work;
    if (nthreads > tiles) nthreads = (int)tiles;
    if (nthreads < 1) nthreads = 1;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
    if (nthreads > 1) {
#pragma omp parallel num_threads(nthreads)
        {
            const int nt = omp_get_num_threads(), id = omp_get_thread_num();
            run_tiles(&j, fn, tiles * id / nt, tiles * (id + 1) / nt);
        }
    } else
        run_tiles(&j, fn, 0, tiles);
#else
    run_tiles(&j, fn, 0, tiles);
#endif
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"linear", py_linear, METH_VARARGS, "float32 activations x float32 weights (+ bias) -> float32 (raw pointers)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dense", "C kernels for dense float32 weights.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__dense(void) { return PyModule_Create(&module); }
