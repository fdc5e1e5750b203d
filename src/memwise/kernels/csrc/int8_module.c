/* memwise.kernels._int8: the Python bindings of the W8A8 products (int8_products.h) and of the
 * per-token activation quantization they use (quantize.h's, with no norm).  Its own extension so
 * that the ternary bindings stay as they are.
 *
 * Python calls these with raw data pointers; all dtype, shape and contiguity checks are done in
 * memwise/kernels/int8.py before the pointers get here. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "int8_products.h"
#include "quantize.h"

/* Padded activation rows and their per-path form, for one call. */
typedef struct {
    int8_t *q;
    uint8_t *a;
    float *xinv, *ones;
} i8_acts_t;

static void i8_acts_free(i8_acts_t *b) {
    free(b->q);
    free(b->a);
    free(b->xinv);
    free(b->ones);
}

static void *i8_alloc(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? (n + 63) & ~(size_t)63 : 64) != 0) return NULL;
    return p;
}

static int i8_acts_make(i8_acts_t *b, int64_t M, int64_t K, int64_t Kp) {
    b->q = i8_alloc((size_t)(M * Kp));
    b->a = i8_alloc((size_t)(M * Kp));
    b->xinv = i8_alloc(sizeof(float) * (size_t)M);
    b->ones = i8_alloc(sizeof(float) * (size_t)K);
    if (!b->q || !b->a || !b->xinv || !b->ones) {
        i8_acts_free(b);
        return 0;
    }
    memset(b->q, 0, (size_t)(M * Kp));
    for (int64_t k = 0; k < K; ++k) b->ones[k] = 1.0f;
    return 1;
}

/* Row m: q = clamp(round_half_even(x * s), -128, 127), s = 127 / max(max|x|, 1e-5), computed as
 * quantize_row's RMSNorm-free case (r = 1 and g = 1 multiply exactly). */
static float i8_quantize_row(const i8_acts_t *b, const float *x, int64_t m, int64_t K, int64_t Kp) {
    float s;
    quantize_row_r(x + m * K, 1.0f, b->ones, K, ISA_SCALAR, 1, b->q + m * Kp, &s);
    return s;
}

static PyObject *i8_check_isa(int isa) {
    if (!isa_supported(isa)) return PyErr_Format(PyExc_ValueError, "isa %d not supported", isa);
    return Py_None;
}

/* matmul(isa, w_ptr, wsum_ptr, N, Kp, q_ptr, M, K, out_ptr, nthreads): out int32 [M, N] = q @ w^T. */
static PyObject *py_matmul(PyObject *self, PyObject *args) {
    int isa, nthreads;
    unsigned long long wp, sp, qp, op;
    long long N, Kp, M, K;
    i8_acts_t b;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKKLLKLLKi", &isa, &wp, &sp, &N, &Kp, &qp, &M, &K, &op, &nthreads)) return NULL;
    if (!i8_check_isa(isa)) return NULL;
    if (!i8_acts_make(&b, M, K, Kp)) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    for (long long m = 0; m < M; ++m) {
        memcpy(b.q + m * Kp, (const int8_t *)(uintptr_t)qp + m * K, (size_t)K);
        i8_act_row(i8_act_form(isa), b.q + m * Kp, Kp, b.a + m * Kp);
    }
    i8_job_t j = {(const int8_t *)(uintptr_t)wp, (const int32_t *)(uintptr_t)sp, NULL, NULL, N, Kp, M,
                  b.q, b.a, NULL, (int32_t *)(uintptr_t)op, NULL};
    i8_run(isa, &j, nthreads);
    Py_END_ALLOW_THREADS
    i8_acts_free(&b);
    Py_RETURN_NONE;
}

/* linear(isa, w_ptr, wsum_ptr, wscale_ptr, bias_ptr (0: none), N, Kp, x_ptr, M, K, out_ptr, nthreads):
 * out float32 [M, N] = int8_linear_reference(x) for float32 x [M, K]. */
static PyObject *py_linear(PyObject *self, PyObject *args) {
    int isa, nthreads;
    unsigned long long wp, sp, cp, bp, xp, op;
    long long N, Kp, M, K;
    i8_acts_t b;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKKKKLLKLLKi", &isa, &wp, &sp, &cp, &bp, &N, &Kp, &xp, &M, &K, &op, &nthreads))
        return NULL;
    if (!i8_check_isa(isa)) return NULL;
    if (!i8_acts_make(&b, M, K, Kp)) return PyErr_NoMemory();
    const float *x = (const float *)(uintptr_t)xp;
    Py_BEGIN_ALLOW_THREADS
    const int qt = nthreads < 1 ? 1 : (M < nthreads ? (int)M : nthreads);
    (void)qt;
#ifdef _OPENMP
#pragma omp parallel for num_threads(qt) schedule(static)
#endif
    for (long long m = 0; m < M; ++m) {
        b.xinv[m] = 1.0f / i8_quantize_row(&b, x, m, K, Kp);
        i8_act_row(i8_act_form(isa), b.q + m * Kp, Kp, b.a + m * Kp);
    }
    i8_job_t j = {(const int8_t *)(uintptr_t)wp, (const int32_t *)(uintptr_t)sp, (const float *)(uintptr_t)cp,
                  (const float *)(uintptr_t)bp, N, Kp, M, b.q, b.a, b.xinv, NULL, (float *)(uintptr_t)op};
    i8_run(isa, &j, nthreads);
    Py_END_ALLOW_THREADS
    i8_acts_free(&b);
    Py_RETURN_NONE;
}

/* quantize(x_ptr, M, K, q_ptr, s_ptr): int8 [M, K] and float32 [M], the activations linear() uses. */
static PyObject *py_quantize(PyObject *self, PyObject *args) {
    unsigned long long xp, qp, sp;
    long long M, K;
    i8_acts_t b;
    (void)self;
    if (!PyArg_ParseTuple(args, "KLLKK", &xp, &M, &K, &qp, &sp)) return NULL;
    if (!i8_acts_make(&b, 0, K, K)) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    for (long long m = 0; m < M; ++m)
        quantize_row_r((const float *)(uintptr_t)xp + m * K, 1.0f, b.ones, K, ISA_SCALAR, 1,
                       (int8_t *)(uintptr_t)qp + m * K, (float *)(uintptr_t)sp + m);
    Py_END_ALLOW_THREADS
    i8_acts_free(&b);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"matmul", py_matmul, METH_VARARGS, "int8 x int8 -> int32 (raw pointers)"},
    {"linear", py_linear, METH_VARARGS, "per-token int8 quantization, product, rescale (+ bias)"},
    {"quantize", py_quantize, METH_VARARGS, "per-token int8 quantization of rows"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_int8", "C kernels for int8 weights (W8A8).", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__int8(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyModule_AddIntConstant(m, "ALIGN", I8_ALIGN);
    return m;
}
