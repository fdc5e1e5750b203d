/* memwise.kernels._fourbit: the Python bindings of the 4-bit weight products, int4 (W4A8,
 * int4_products.h) and nf4 (float activations, nf4_products.h).  Its own extension, like _int8.
 *
 * Python calls these with raw data pointers; all dtype, shape and contiguity checks are done in
 * memwise/kernels/int4.py and nf4.py before the pointers get here. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "int4_products.h"
#include "nf4_products.h"
#include "quantize.h"

static void *fb_alloc(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? (n + 63) & ~(size_t)63 : 64) != 0) return NULL;
    return p;
}

static int fb_isa_ok(int isa) {
    if (isa_supported(isa)) return 1;
    PyErr_Format(PyExc_ValueError, "isa %d not supported", isa);
    return 0;
}

/* int4_dots(isa, codes_ptr, N, Kp, q_ptr, M, K, out_ptr, nthreads): out int32 [M, N, Kp / 64]. */
static PyObject *py_int4_dots(PyObject *self, PyObject *args) {
    int isa, nthreads;
    unsigned long long cp, qp, op;
    long long N, Kp, M, K;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKLLKLLKi", &isa, &cp, &N, &Kp, &qp, &M, &K, &op, &nthreads)) return NULL;
    if (!fb_isa_ok(isa)) return NULL;
    int8_t *q = fb_alloc((size_t)(M * Kp)), *pairs = i4_uses_pairs(isa) ? fb_alloc((size_t)(M * Kp)) : NULL;
    if (!q || (i4_uses_pairs(isa) && !pairs)) {
        free(q), free(pairs);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    memset(q, 0, (size_t)(M * Kp));
    for (long long m = 0; m < M; ++m) {
        memcpy(q + m * Kp, (const int8_t *)(uintptr_t)qp + m * K, (size_t)K);
        if (pairs) i4_pair_row(q + m * Kp, Kp / I4_GROUP, pairs + m * Kp);
    }
    i4_job_t j = {(const uint8_t *)(uintptr_t)cp, NULL, NULL, N, Kp, Kp / I4_GROUP, M, q, pairs, NULL, NULL,
                  (int32_t *)(uintptr_t)op, NULL};
    i4_run(isa, &j, nthreads);
    Py_END_ALLOW_THREADS
    free(q), free(pairs);
    Py_RETURN_NONE;
}

/* int4_linear(isa, codes_ptr, params_ptr (float16), bias_ptr (0: none), N, Kp, x_ptr, M, K, out_ptr, nthreads):
 * out float32 [M, N] = int4_linear_reference(x) for float32 x [M, K]. */
static PyObject *py_int4_linear(PyObject *self, PyObject *args) {
    int isa, nthreads;
    unsigned long long cp, pp, bp, xp, op;
    long long N, Kp, M, K;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKKKLLKLLKi", &isa, &cp, &pp, &bp, &N, &Kp, &xp, &M, &K, &op, &nthreads))
        return NULL;
    if (!fb_isa_ok(isa)) return NULL;
    const long long G = Kp / I4_GROUP;
    int8_t *q = fb_alloc((size_t)(M * Kp)), *pairs = i4_uses_pairs(isa) ? fb_alloc((size_t)(M * Kp)) : NULL;
    float *qsum = fb_alloc(sizeof(float) * (size_t)(M * G)), *xinv = fb_alloc(sizeof(float) * (size_t)M);
    float *ones = fb_alloc(sizeof(float) * (size_t)K);
    if (!q || !qsum || !xinv || !ones || (i4_uses_pairs(isa) && !pairs)) {
        free(q), free(qsum), free(xinv), free(ones), free(pairs);
        return PyErr_NoMemory();
    }
    const float *x = (const float *)(uintptr_t)xp;
    Py_BEGIN_ALLOW_THREADS
    memset(q, 0, (size_t)(M * Kp));
    for (long long k = 0; k < K; ++k) ones[k] = 1.0f;
    for (long long m = 0; m < M; ++m) {
        float s;   /* the int8 scheme's per-token quantization (int8.quantize_tokens_reference) */
        quantize_row_r(x + m * K, 1.0f, ones, K, ISA_SCALAR, 1, q + m * Kp, &s);
        xinv[m] = 1.0f / s;
        for (long long g = 0; g < G; ++g) {
            int32_t sum = 0;
            for (int i = 0; i < I4_GROUP; ++i) sum += q[m * Kp + g * I4_GROUP + i];
            qsum[m * G + g] = (float)sum;
        }
        if (pairs) i4_pair_row(q + m * Kp, G, pairs + m * Kp);
    }
    i4_job_t j = {(const uint8_t *)(uintptr_t)cp, (const uint16_t *)(uintptr_t)pp, (const float *)(uintptr_t)bp,
                  N, Kp, G, M, q, pairs, qsum, xinv, NULL, (float *)(uintptr_t)op};
    i4_run(isa, &j, nthreads);
    Py_END_ALLOW_THREADS
    free(q), free(qsum), free(xinv), free(ones), free(pairs);
    Py_RETURN_NONE;
}

/* nf4_linear(isa, codes_ptr, qabs_ptr, absmax2_ptr, code8_ptr, offset, bias_ptr (0: none), N, Kp,
 * x_ptr, M, K, out_ptr, nthreads): out float32 [M, N] = x W^T (+ bias), W dequantized in registers. */
static PyObject *py_nf4_linear(PyObject *self, PyObject *args) {
    int isa, nthreads;
    unsigned long long cp, ap, a2p, c8p, bp, xp, op;
    float offset;
    long long N, Kp, M, K;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKKKKfKLLKLLKi", &isa, &cp, &ap, &a2p, &c8p, &offset, &bp, &N, &Kp, &xp, &M, &K,
                          &op, &nthreads))
        return NULL;
    if (!fb_isa_ok(isa)) return NULL;
    float *xs = fb_alloc(sizeof(float) * (size_t)(M * Kp)), *row = fb_alloc(sizeof(float) * (size_t)Kp);
    if (!xs || !row) {
        free(xs), free(row);
        return PyErr_NoMemory();
    }
    const float *x = (const float *)(uintptr_t)xp;
    Py_BEGIN_ALLOW_THREADS
    for (long long m = 0; m < M; ++m) {
        memset(row, 0, sizeof(float) * (size_t)Kp);
        memcpy(row, x + m * K, sizeof(float) * (size_t)K);
        if (nf4_permuted(isa)) nf4_permute_row(row, Kp, xs + m * Kp);
        else memcpy(xs + m * Kp, row, sizeof(float) * (size_t)Kp);
    }
    nf4_job_t j = {(const uint8_t *)(uintptr_t)cp, (const uint8_t *)(uintptr_t)ap, (const float *)(uintptr_t)a2p,
                   (const float *)(uintptr_t)c8p, offset, (const float *)(uintptr_t)bp, N, Kp, Kp / 64, M, xs,
                   (float *)(uintptr_t)op};
    nf4_run(isa, &j, nthreads);
    Py_END_ALLOW_THREADS
    free(xs), free(row);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"int4_dots", py_int4_dots, METH_VARARGS, "per-group int8 x 4-bit dots -> int32 (raw pointers)"},
    {"int4_linear", py_int4_linear, METH_VARARGS, "per-token int8 quantization, W4A8 product, combine (+ bias)"},
    {"nf4_linear", py_nf4_linear, METH_VARARGS, "float x NF4 (double-quantized absmax) product (+ bias)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fourbit", "C kernels for 4-bit weights (int4, nf4).",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fourbit(void) { return PyModule_Create(&module); }
