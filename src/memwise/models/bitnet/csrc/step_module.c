/* memwise.models.bitnet._step: the fused BitNet decode step (bitnet_step.h), and the attention of a
 * prompt's queries over the cache (memwise.lite's multi-row prefill), for Python.  It
 * compiles the kernel library's headers (memwise/kernels/csrc) into this one translation unit, so
 * that the per-instruction-set copies of the step inline the library's code they call.
 *
 * Python passes raw pointers, checked beforehand by memwise/models/bitnet/fused_step.py. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>

#include "struct_layout.h"
#include "bitnet_step.h"

#define WS_CAPSULE "memwise.models.bitnet._step.workspace"
#define WS_FREE bitnet_ws_free
#include "step_capsule.h"

/* workspace(isa, H, Q, KV, I, head_dim, max_length, nthreads) -> capsule: the buffers of steps. */
static PyObject *py_workspace(PyObject *self, PyObject *args) {
    int isa, nthreads;
    long long H, Q, KV, I, hd, max_length;
    (void)self;
    if (!PyArg_ParseTuple(args, "iLLLLLLi", &isa, &H, &Q, &KV, &I, &hd, &max_length, &nthreads)) return NULL;
    if (!isa_supported(isa)) return PyErr_Format(PyExc_ValueError, "isa %d not supported", isa);
    if (H < 1 || Q < 1 || KV < 1 || I < 1 || hd < 2 || hd % 2 || max_length < 1)
        return PyErr_Format(PyExc_ValueError, "workspace: sizes must be >= 1 (head_dim even)");
    return ws_capsule(bitnet_ws_make(isa, H, Q, KV, I, hd, max_length, nthreads));
}

/* step(ws, model_ptr, x_ptr, pos): one decode step (bitnet_io_t has the meaning of each). */
static PyObject *py_step(PyObject *self, PyObject *args) {
    PyObject *capsule;
    unsigned long long mp, xp;
    long long pos;
    (void)self;
    if (!PyArg_ParseTuple(args, "OKKL", &capsule, &mp, &xp, &pos)) return NULL;
    bitnet_ws_t *w = ws_of(capsule);
    if (!w) return NULL;
    const bitnet_model_t *m = (const bitnet_model_t *)(uintptr_t)mp;
    if (m->hidden != w->H || m->intermediate != w->I || m->head_dim != w->hd || m->heads * m->head_dim != w->Q ||
        m->kv_heads * m->head_dim != w->KV || m->max_length != w->max_length || m->kv_heads < 1 ||
        m->heads % m->kv_heads)
        return PyErr_Format(PyExc_ValueError, "step: the model does not fit the workspace");
    if (!position_fits(pos, m->max_length)) return NULL;
    const bitnet_io_t io = {(float *)(uintptr_t)xp, (int64_t)pos};
    Py_BEGIN_ALLOW_THREADS
    bitnet_step_run(w, m, &io);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* attend(isa, q_ptr, T, heads, kv_heads, head_dim, keys_ptr, values_ptr, max_length, start, out_ptr,
 * nthreads): a prefill's attention, each of T queries (float32 [T, heads, head_dim], rotated) at
 * position start + r over the cache slots 0..start + r of its key/value head (keys, values float32
 * [kv_heads, max_length, head_dim], slots up to start + T - 1 written), into out [T, heads, head_dim].
 * Every (head, query) is the decode step's attend on the same vector level, so a prompt's attention
 * is what token-by-token steps compute.  Threads take (head, query) pairs a few at a time: later
 * queries see more slots. */
static PyObject *py_attend(PyObject *self, PyObject *args) {
    int isa, nthreads;
    unsigned long long qp, kp, vp, op;
    long long T, heads, kvh, hd, max_length, start;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKLLLLKKLLKi", &isa, &qp, &T, &heads, &kvh, &hd, &kp, &vp, &max_length, &start,
                          &op, &nthreads))
        return NULL;
    if (!isa_supported(isa)) return PyErr_Format(PyExc_ValueError, "isa %d not supported", isa);
    if (T < 0 || heads < 1 || kvh < 1 || heads % kvh || hd < 1 || start < 0 || start + T > max_length)
        return PyErr_Format(PyExc_ValueError, "attend: bad sizes (T %lld, heads %lld / %lld, head_dim %lld, "
                            "slots %lld + T of %lld)", T, heads, kvh, hd, start, max_length);
    if (nthreads < 1) nthreads = 1;
    const int64_t slots = start + T, group = heads / kvh;
    float *scratch = malloc(sizeof(float) * 2 * (size_t)(slots + 1) * (size_t)nthreads);
    if (!scratch) return PyErr_NoMemory();
    const bitnet_ops_t *ops = bitnet_ops(vec_level_of(isa));
    const float *q = (const float *)(uintptr_t)qp, *keys = (const float *)(uintptr_t)kp;
    const float *values = (const float *)(uintptr_t)vp;
    float *out = (float *)(uintptr_t)op;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
    {
#ifdef _OPENMP
        float *scores = scratch + 2 * (size_t)(slots + 1) * (size_t)omp_get_thread_num();
#pragma omp for schedule(dynamic, 4)
#else
        float *scores = scratch;
#endif
        for (long long item = 0; item < heads * T; ++item) {
            const int64_t h = item / T, r = item % T, g = h / group;
            const size_t at = ((size_t)r * (size_t)heads + (size_t)h) * (size_t)hd;
            const size_t head = (size_t)g * (size_t)max_length * (size_t)hd;
            ops->attend(q + at, keys + head, values + head, start + r + 1, hd, scores, scores + slots + 1, out + at);
        }
    }
    Py_END_ALLOW_THREADS
    free(scratch);
    Py_RETURN_NONE;
}

#define PROJECTION_FIELDS(X)                                                                     \
    X(bitnet_projection_t, codes) X(bitnet_projection_t, gain) X(bitnet_projection_t, rows)      \
    X(bitnet_projection_t, scales) X(bitnet_projection_t, count)
#define LAYER_FIELDS(X)                                                                          \
    X(bitnet_layer_t, qkv) X(bitnet_layer_t, o) X(bitnet_layer_t, gate_up) X(bitnet_layer_t, down) \
    X(bitnet_layer_t, keys) X(bitnet_layer_t, values)
#define MODEL_FIELDS(X)                                                                          \
    X(bitnet_model_t, num_layers) X(bitnet_model_t, hidden) X(bitnet_model_t, intermediate)      \
    X(bitnet_model_t, heads) X(bitnet_model_t, kv_heads) X(bitnet_model_t, head_dim)             \
    X(bitnet_model_t, max_length) X(bitnet_model_t, eps) X(bitnet_model_t, relu2)                \
    X(bitnet_model_t, weights_from_dram) X(bitnet_model_t, inv_freq) X(bitnet_model_t, layers)

DEFINE_STRUCT_LAYOUT(bitnet_projection_t, PROJECTION_FIELDS, bitnet_layer_t, LAYER_FIELDS,
                     bitnet_model_t, MODEL_FIELDS)

static PyMethodDef methods[] = {
    {"workspace", py_workspace, METH_VARARGS,
     "workspace(isa, H, Q, KV, I, head_dim, max_length, nthreads): the buffers of steps"},
    {"step", py_step, METH_VARARGS, "step(ws, model_ptr, x_ptr, pos): one decode step"},
    {"attend", py_attend, METH_VARARGS,
     "attend(isa, q_ptr, T, heads, kv_heads, head_dim, keys_ptr, values_ptr, max_length, start, out_ptr, "
     "nthreads): a prefill's causal attention over the cache"},
    STRUCT_LAYOUT_METHOD,
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_step", "The fused BitNet decode step.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__step(void) { return PyModule_Create(&module); }
