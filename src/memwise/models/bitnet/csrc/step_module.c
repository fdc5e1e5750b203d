/* memwise.models.bitnet._step: the fused BitNet decode step (bitnet_step.h) for Python.  It
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
    STRUCT_LAYOUT_METHOD,
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_step", "The fused BitNet decode step.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__step(void) { return PyModule_Create(&module); }
