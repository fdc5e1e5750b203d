/* memwise.models.decoder._step: the fused decoder step (decoder_step.h) for Python.  It compiles
 * the kernel library's headers (memwise/kernels/csrc) into this one translation unit, so that the
 * per-instruction-set copies of the step inline the library's code they call.
 *
 * Python passes raw pointers, checked beforehand by memwise/models/decoder/fused_step.py. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>

#include "struct_layout.h"
#include "decoder_step.h"

#define WS_CAPSULE "memwise.models.decoder._step.workspace"
#define WS_FREE decoder_ws_free
#include "step_capsule.h"

/* workspace(isa, scheme, H, Q, KV, I, head_dim, max_length, nthreads) -> capsule: the buffers of steps. */
static PyObject *py_workspace(PyObject *self, PyObject *args) {
    int isa, scheme, nthreads;
    long long H, Q, KV, I, hd, max_length;
    (void)self;
    if (!PyArg_ParseTuple(args, "iiLLLLLLi", &isa, &scheme, &H, &Q, &KV, &I, &hd, &max_length, &nthreads))
        return NULL;
    if (!isa_supported(isa)) return PyErr_Format(PyExc_ValueError, "isa %d not supported", isa);
    if (scheme != DECODER_INT8 && scheme != DECODER_INT4) return PyErr_Format(PyExc_ValueError, "scheme %d", scheme);
    if (H < 1 || Q < 1 || KV < 1 || I < 1 || hd < 1 || max_length < 1)
        return PyErr_Format(PyExc_ValueError, "workspace: sizes must be >= 1");
    if (decoder_padded(H > I ? (H > Q ? H : Q) : (I > Q ? I : Q)) / I4_GROUP > I4_MAX_GROUPS)
        return PyErr_Format(PyExc_ValueError, "workspace: a row of more than %d columns", I4_MAX_GROUPS * I4_GROUP);
    return ws_capsule(decoder_ws_make(isa, scheme, H, Q, KV, I, hd, max_length, nthreads));
}

static int projection_fits(const decoder_projection_t *p, int64_t rows, int64_t cols, int64_t kp) {
    return p->rows == rows && p->cols == cols && p->padded_cols == kp && p->weights && p->scales;
}

/* Every layer's projections have the sizes the workspace was made for. */
static int model_fits(const decoder_ws_t *w, const decoder_model_t *m) {
    if (m->hidden != w->H || m->intermediate != w->I || m->head_dim != w->hd || m->heads * m->head_dim != w->Q ||
        m->kv_heads * m->head_dim != w->KV || m->max_length != w->max_length || m->kv_heads < 1 ||
        m->heads % m->kv_heads || m->scheme != w->scheme || m->rotary_dim < 0 || m->rotary_dim % 2 ||
        m->rotary_dim > m->head_dim || (m->rotary_dim && !m->inv_freq) || (m->gated && m->activation != DECODER_SILU))
        return 0;
    for (int64_t l = 0; l < m->num_layers; ++l) {
        const decoder_layer_t *y = m->layers + l;
        if (!projection_fits(&y->qkv, w->Q + 2 * w->KV, w->H, w->kp[DSLOT_H]) ||
            !projection_fits(&y->out, w->H, w->Q, w->kp[DSLOT_Q]) ||
            !projection_fits(&y->up, m->gated ? 2 * w->I : w->I, w->H, w->kp[DSLOT_H]) ||
            !projection_fits(&y->down, w->H, w->I, w->kp[DSLOT_I]) || !y->attn_norm_weight || !y->mlp_norm_weight ||
            (m->norm == DECODER_LAYER_NORM && (!y->attn_norm_bias || !y->mlp_norm_bias)) || !y->keys || !y->values)
            return 0;
    }
    return 1;
}

/* step(ws, model_ptr, x_ptr, pos): one decode step (decoder_io_t has the meaning of each). */
static PyObject *py_step(PyObject *self, PyObject *args) {
    PyObject *capsule;
    unsigned long long mp, xp;
    long long pos;
    (void)self;
    if (!PyArg_ParseTuple(args, "OKKL", &capsule, &mp, &xp, &pos)) return NULL;
    decoder_ws_t *w = ws_of(capsule);
    if (!w) return NULL;
    const decoder_model_t *m = (const decoder_model_t *)(uintptr_t)mp;
    if (!model_fits(w, m)) return PyErr_Format(PyExc_ValueError, "step: the model does not fit the workspace");
    if (!position_fits(pos, m->max_length)) return NULL;
    const decoder_io_t io = {(float *)(uintptr_t)xp, (int64_t)pos};
    Py_BEGIN_ALLOW_THREADS
    decoder_step_run(w, m, &io);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

#define PROJECTION_FIELDS(X)                                                                     \
    X(decoder_projection_t, weights) X(decoder_projection_t, row_sums) X(decoder_projection_t, scales) \
    X(decoder_projection_t, bias) X(decoder_projection_t, rows) X(decoder_projection_t, cols)    \
    X(decoder_projection_t, padded_cols)
#define LAYER_FIELDS(X)                                                                          \
    X(decoder_layer_t, qkv) X(decoder_layer_t, out) X(decoder_layer_t, up) X(decoder_layer_t, down) \
    X(decoder_layer_t, attn_norm_weight) X(decoder_layer_t, attn_norm_bias)                      \
    X(decoder_layer_t, mlp_norm_weight) X(decoder_layer_t, mlp_norm_bias) X(decoder_layer_t, keys) \
    X(decoder_layer_t, values)
#define MODEL_FIELDS(X)                                                                          \
    X(decoder_model_t, num_layers) X(decoder_model_t, hidden) X(decoder_model_t, intermediate)   \
    X(decoder_model_t, heads) X(decoder_model_t, kv_heads) X(decoder_model_t, head_dim)          \
    X(decoder_model_t, max_length) X(decoder_model_t, eps) X(decoder_model_t, scheme)            \
    X(decoder_model_t, activation) X(decoder_model_t, norm) X(decoder_model_t, gated)            \
    X(decoder_model_t, rotary_dim) X(decoder_model_t, inv_freq) X(decoder_model_t, layers)

DEFINE_STRUCT_LAYOUT(decoder_projection_t, PROJECTION_FIELDS, decoder_layer_t, LAYER_FIELDS,
                     decoder_model_t, MODEL_FIELDS)

static PyMethodDef methods[] = {
    {"workspace", py_workspace, METH_VARARGS,
     "workspace(isa, scheme, H, Q, KV, I, head_dim, max_length, nthreads): the buffers of steps"},
    {"step", py_step, METH_VARARGS, "step(ws, model_ptr, x_ptr, pos): one decode step"},
    STRUCT_LAYOUT_METHOD,
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_step", "The fused decoder step (int8, int4 layers).", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__step(void) { return PyModule_Create(&module); }
