/* memwise.kernels._ternary: the Python bindings of the model-free kernel library (int8
 * activations x 2-bit packed ternary weights with exact int32 sums, activation quantization,
 * greedy argmax, a read-bandwidth probe).  The library itself is the headers beside this file;
 * model code (the csrc folder of a model family) compiles them into its own extension the same way.
 *
 * Python calls these functions with raw data pointers; all dtype, shape and contiguity checks are
 * done in memwise/kernels/__init__.py before the pointers get here. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "argmax.h"
#include "jobs.h"
#include "quantize.h"

/* ------------------------------------------------------------------------------------------ */
/* Python bindings                                                                            */
/* ------------------------------------------------------------------------------------------ */

static PyObject *py_isa_supported(PyObject *self, PyObject *args) {
    int isa;
    (void)self;
    if (!PyArg_ParseTuple(args, "i", &isa)) return NULL;
    return PyBool_FromLong(isa_supported(isa));
}

/* matmul(isa, w_ptr, N, nb, q_ptr, M, K, out_ptr, nthreads): out int32 [M, N] = q @ t^T. */
static PyObject *py_matmul(PyObject *self, PyObject *args) {
    int isa, nthreads;
    unsigned long long wp, qp, op;
    long long N, nb, M, K;
    product_call_t p;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKLLKLLKi", &isa, &wp, &N, &nb, &qp, &M, &K, &op, &nthreads))
        return NULL;
    if (!isa_supported(isa)) return PyErr_Format(PyExc_ValueError, "isa %d not supported", isa);
    if (!product_call_make(&p, isa, N, nb, M, nthreads)) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    memset(p.qbuf, 0, p.qs * (size_t)M);
    for (long long m = 0; m < M; ++m)
        p.sumq[m] = place_row((const int8_t *)(uintptr_t)qp + m * K, K, p.layout, p.qbuf + m * p.qs);
    product_call_run(&p, (const uint8_t *)(uintptr_t)wp, N, nb, M, (int32_t *)(uintptr_t)op, NULL, nthreads);
    Py_END_ALLOW_THREADS
    product_call_free(&p);
    Py_RETURN_NONE;
}

/* bitlinear(isa, w_ptr, N, nb, scale, x_ptr, M, K, g_ptr, eps, out_ptr, nthreads):
 * out float32 [M, N] = BitLinear(x), the math of memwise.kernels.packed.bitlinear_reference. */
static PyObject *py_bitlinear(PyObject *self, PyObject *args) {
    int isa, nthreads;
    unsigned long long wp, xp, gp, op;
    long long N, nb, M, K;
    double scale, eps;
    product_call_t p;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKLLdKLLKdKi", &isa, &wp, &N, &nb, &scale, &xp, &M, &K, &gp,
                          &eps, &op, &nthreads))
        return NULL;
    if (!isa_supported(isa)) return PyErr_Format(PyExc_ValueError, "isa %d not supported", isa);
    if (!product_call_make(&p, isa, N, nb, M, nthreads)) return PyErr_NoMemory();
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
        p.sumq[m] = quantize_row(x + m * K, g, K, eps_f, p.layout, 0, p.qbuf + m * p.qs, &s);
        p.rs[m] = m_f / s;
    }
    product_call_run(&p, (const uint8_t *)(uintptr_t)wp, N, nb, M, NULL, (float *)(uintptr_t)op, nthreads);
    Py_END_ALLOW_THREADS
    product_call_free(&p);
    Py_RETURN_NONE;
}

/* quantize(x_ptr, M, K, g_ptr, eps, q_ptr, s_ptr): int8 [M, K] and float32 [M]. */
static PyObject *py_quantize(PyObject *self, PyObject *args) {
    unsigned long long xp, gp, qp, sp;
    long long M, K;
    double eps;
    (void)self;
    if (!PyArg_ParseTuple(args, "KLLKdKK", &xp, &M, &K, &gp, &eps, &qp, &sp)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    for (long long m = 0; m < M; ++m)
        quantize_row((const float *)(uintptr_t)xp + m * K, (const float *)(uintptr_t)gp, K, (float)eps,
                     ISA_SCALAR, 1, (int8_t *)(uintptr_t)qp + m * K, (float *)(uintptr_t)sp + m);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
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

/* argmax_rows(x_ptr, rows, cols, out_ptr, nthreads): out int64 [rows] = x.max(dim=-1).indices for
 * a contiguous float32 [rows, cols].  Threads split each row's columns by my_span, as a model's
 * fused step splits its lm_head outputs, so each reads logits it has just written. */
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
    {"read_bandwidth", py_read_bandwidth, METH_VARARGS, "measured memory read bandwidth"},
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
    return m;
}
