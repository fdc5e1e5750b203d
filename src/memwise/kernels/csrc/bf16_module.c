/* memwise.kernels._bf16: y = x W^T for bfloat16 weights W [N, K] and float32 activations x [M, K],
 * accumulated in float32, for the few rows a decode step has (the full-precision output heads of
 * ternary models: BitNet's lm_head is the bf16 embedding).  Each weight is widened to float32 in a
 * register (a bfloat16 is the top half of a float32: shift left by 16), so the matrix is read once,
 * at 2 bytes per weight, with no float32 copy.
 *
 * Python calls it with raw data pointers; dtype, shape and contiguity are checked in
 * memwise/kernels/bf16.py.  Rows are split over threads in contiguous stretches of ROWS rows. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "common.h"

#define ROWS 4      /* weight rows that share each activation load */
#define MAX_M 4     /* activation rows per pass (accumulators: ROWS x MAX_M registers) */

typedef struct {
    const uint16_t *w;
    const float *x;
    float *y;
    int64_t N, K, M;
} bf16_job_t;

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void rows_scalar(const bf16_job_t *j, int64_t n0, int rows, int64_t m0, int ms) {
    for (int r = 0; r < rows; ++r)
        for (int m = 0; m < ms; ++m) {
            const uint16_t *w = j->w + (n0 + r) * j->K;
            const float *x = j->x + (m0 + m) * j->K;
            float acc = 0.0f;
            for (int64_t k = 0; k < j->K; ++k) acc += bf16_to_float(w[k]) * x[k];
            j->y[(m0 + m) * j->N + n0 + r] = acc;
        }
}

#if MW_X86
T512 static void rows_avx512(const bf16_job_t *j, int64_t n0, int rows, int64_t m0, int ms) {
    __m512 acc[ROWS][MAX_M];
    for (int r = 0; r < ROWS; ++r)
        for (int m = 0; m < MAX_M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < j->K; k += 16) {
        const int64_t left = j->K - k;
        const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        __m512 xs[MAX_M];
        for (int m = 0; m < ms; ++m) xs[m] = _mm512_maskz_loadu_ps(mask, j->x + (m0 + m) * j->K + k);
        for (int r = 0; r < rows; ++r) {
            const __m256i raw = _mm256_maskz_loadu_epi16(mask, j->w + (n0 + r) * j->K + k);
            const __m512 w = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
            for (int m = 0; m < ms; ++m) acc[r][m] = _mm512_fmadd_ps(w, xs[m], acc[r][m]);
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int m = 0; m < ms; ++m) j->y[(m0 + m) * j->N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]);
}

T256 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* Two activation rows per pass: ROWS x 2 accumulators, two activation and one weight register
 * stay within the 16 ymm registers. */
T256 static void rows_avx2(const bf16_job_t *j, int64_t n0, int rows, int64_t m0, int ms) {
    for (int64_t mp = 0; mp < ms; mp += 2) {
        const int mn = ms - mp < 2 ? (int)(ms - mp) : 2;
        __m256 acc[ROWS][2];
        for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        const int64_t body = j->K & ~(int64_t)7;
        for (int64_t k = 0; k < body; k += 8) {
            __m256 xs[2];
            for (int m = 0; m < mn; ++m) xs[m] = _mm256_loadu_ps(j->x + (m0 + mp + m) * j->K + k);
            for (int r = 0; r < rows; ++r) {
                const __m128i raw = _mm_loadu_si128((const __m128i *)(j->w + (n0 + r) * j->K + k));
                const __m256 w = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
                for (int m = 0; m < mn; ++m) acc[r][m] = _mm256_fmadd_ps(w, xs[m], acc[r][m]);
            }
        }
        for (int r = 0; r < rows; ++r)
            for (int m = 0; m < mn; ++m) {
                const uint16_t *w = j->w + (n0 + r) * j->K;
                const float *x = j->x + (m0 + mp + m) * j->K;
                float tail = 0.0f;
                for (int64_t k = body; k < j->K; ++k) tail += bf16_to_float(w[k]) * x[k];
                j->y[(m0 + mp + m) * j->N + n0 + r] = hsum256(acc[r][m]) + tail;
            }
    }
}
#endif

typedef void (*rows_fn)(const bf16_job_t *, int64_t, int, int64_t, int);

static rows_fn rows_of(int isa) {
#if MW_X86
    if (isa == ISA_AVX512VNNI || isa == ISA_AMX) return rows_avx512;
    if (isa == ISA_AVX2 || isa == ISA_AVXVNNI) return rows_avx2;
#endif
    (void)isa;
    return rows_scalar;
}

static void run_tiles(const bf16_job_t *j, rows_fn fn, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * ROWS;
        const int rows = j->N - n0 < ROWS ? (int)(j->N - n0) : ROWS;
        for (int64_t m0 = 0; m0 < j->M; m0 += MAX_M)
            fn(j, n0, rows, m0, j->M - m0 < MAX_M ? (int)(j->M - m0) : MAX_M);
    }
}

/* linear(isa, w_ptr, N, K, x_ptr, M, y_ptr, nthreads): y float32 [M, N] = x [M, K] @ W^T. */
static PyObject *py_linear(PyObject *self, PyObject *args) {
    int isa, nthreads;
    unsigned long long wp, xp, yp;
    long long N, K, M;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKLLKLKi", &isa, &wp, &N, &K, &xp, &M, &yp, &nthreads)) return NULL;
    if (!isa_supported(isa)) return PyErr_Format(PyExc_ValueError, "isa %d not supported", isa);
    bf16_job_t j = {(const uint16_t *)(uintptr_t)wp, (const float *)(uintptr_t)xp, (float *)(uintptr_t)yp, N, K, M};
    const rows_fn fn = rows_of(isa);
    const int64_t tiles = (N + ROWS - 1) / ROWS;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > tiles) nthreads = (int)(tiles > 0 ? tiles : 1);
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        run_tiles(&j, fn, tiles * id / nt, tiles * (id + 1) / nt);
    }
#else
    run_tiles(&j, fn, 0, tiles);
#endif
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"linear", py_linear, METH_VARARGS, "float32 activations x bfloat16 weights -> float32 (raw pointers)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bf16", "C kernels for bfloat16 weights.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__bf16(void) { return PyModule_Create(&module); }
