/* memwise.models.hgrn_bit._step: the fused HGRN-Bit decode step (hgrn_step.h) for Python.  It
 * compiles the kernel library's headers (memwise/kernels/csrc) into this one translation unit, so
 * that the per-instruction-set copies of the step inline the library's code they call.
 *
 * Python passes raw pointers, checked beforehand by memwise/models/hgrn_bit/fused_step.py. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>

#include "struct_layout.h"
#include "hgrn_step.h"

#define WS_CAPSULE "memwise.models.hgrn_bit._step.workspace"
#define WS_FREE hgrn_ws_free
#include "step_capsule.h"

/* workspace(isa, B, H, D, I, nthreads) -> capsule: the buffers of fused steps of B rows. */
static PyObject *py_workspace(PyObject *self, PyObject *args) {
    int isa, nthreads;
    long long B, H, D, I;
    (void)self;
    if (!PyArg_ParseTuple(args, "iLLLLi", &isa, &B, &H, &D, &I, &nthreads)) return NULL;
    if (!isa_supported(isa)) return PyErr_Format(PyExc_ValueError, "isa %d not supported", isa);
    if (B < 1 || H < 1 || D < 1 || I < 1) return PyErr_Format(PyExc_ValueError, "workspace: sizes must be >= 1");
    return ws_capsule(hgrn_ws_make(isa, B, H, D, I, nthreads));
}

/* step(ws, model_ptr, x_ptr, state_ptr, mask_ptr, logits_ptr): one decode step (hgrn_io_t has
 * the meaning of each buffer; mask_ptr 0 for none). */
static PyObject *py_step(PyObject *self, PyObject *args) {
    PyObject *capsule;
    unsigned long long mp, xp, sp, kp, lp;
    (void)self;
    if (!PyArg_ParseTuple(args, "OKKKKK", &capsule, &mp, &xp, &sp, &kp, &lp)) return NULL;
    hgrn_ws_t *w = ws_of(capsule);
    if (!w) return NULL;
    const hgrn_model_t *model = (const hgrn_model_t *)(uintptr_t)mp;
    if (model->hidden != w->H || model->width != w->D || model->intermediate != w->I || model->heads < 1 ||
        w->D % model->heads)
        return PyErr_Format(PyExc_ValueError, "step: the model does not fit the workspace");
    const hgrn_io_t io = {(float *)(uintptr_t)xp, (float *)(uintptr_t)sp, (float *)(uintptr_t)lp,
                          (const float *)(uintptr_t)kp};
    Py_BEGIN_ALLOW_THREADS
    hgrn_step_run(w, model, &io);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

#define BITLINEAR_FIELDS(X) X(hgrn_bitlinear_t, codes) X(hgrn_bitlinear_t, gain) X(hgrn_bitlinear_t, scale)
#define LAYER_FIELDS(X)                                                                          \
    X(hgrn_layer_t, attn_norm) X(hgrn_layer_t, i_proj) X(hgrn_layer_t, f_proj) X(hgrn_layer_t, g_proj) \
    X(hgrn_layer_t, g_norm) X(hgrn_layer_t, o_proj) X(hgrn_layer_t, mlp_norm) X(hgrn_layer_t, gate_proj) \
    X(hgrn_layer_t, down_proj) X(hgrn_layer_t, lower_bound)
#define MODEL_FIELDS(X)                                                                          \
    X(hgrn_model_t, num_layers) X(hgrn_model_t, hidden) X(hgrn_model_t, width)                  \
    X(hgrn_model_t, intermediate) X(hgrn_model_t, vocab) X(hgrn_model_t, heads)                 \
    X(hgrn_model_t, eps) X(hgrn_model_t, weights_from_dram) X(hgrn_model_t, final_norm)         \
    X(hgrn_model_t, lm_head) X(hgrn_model_t, layers)

DEFINE_STRUCT_LAYOUT(hgrn_bitlinear_t, BITLINEAR_FIELDS, hgrn_layer_t, LAYER_FIELDS,
                     hgrn_model_t, MODEL_FIELDS)

#ifdef MW_STEP_TIMING
/* step_timings() -> (steps, [(phase, wall s, [each thread's working s])]) summed since the last
 * call, which resets them. */
static PyObject *py_step_timings(PyObject *self, PyObject *noargs) {
#define PHASE_NAME(id, name) name,
    static const char *const names[N_PHASES] = {HGRN_PHASES(PHASE_NAME)};
#undef PHASE_NAME
    (void)self, (void)noargs;
    PyObject *phases = PyList_New(0);
    if (!phases) return NULL;
    for (int k = 0; k < N_PHASES; ++k) {
        PyObject *work = PyList_New(0);
        for (int t = 0; work && t < TIMING_THREADS; ++t) {
            if (step_timings.work[t][k] <= 0) continue;
            PyObject *v = PyFloat_FromDouble(step_timings.work[t][k]);
            if (!v || PyList_Append(work, v) < 0) Py_CLEAR(work);
            Py_XDECREF(v);
        }
        PyObject *row = work ? Py_BuildValue("(sdN)", names[k], step_timings.wall[k], work) : NULL;
        if (!row || PyList_Append(phases, row) < 0) {
            Py_XDECREF(row);
            Py_DECREF(phases);
            return NULL;
        }
        Py_DECREF(row);
    }
    PyObject *result = Py_BuildValue("(lN)", step_timings.steps, phases);
    memset(&step_timings, 0, sizeof step_timings);
    return result;
}
#endif

static PyMethodDef methods[] = {
    {"workspace", py_workspace, METH_VARARGS, "workspace(isa, B, H, D, I, nthreads): buffers of steps of B rows"},
    {"step", py_step, METH_VARARGS, "step(ws, model_ptr, x_ptr, state_ptr, mask_ptr, logits_ptr): one decode step"},
    STRUCT_LAYOUT_METHOD,
#ifdef MW_STEP_TIMING
    {"step_timings", py_step_timings, METH_NOARGS, "time per phase since the last call"},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_step", "The fused HGRN-Bit decode step.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__step(void) {
    PyObject *m = PyModule_Create(&module);
    if (m) PyModule_AddIntConstant(m, "TIMING", 
#ifdef MW_STEP_TIMING
                                   1
#else
                                   0
#endif
    );
    return m;
}
