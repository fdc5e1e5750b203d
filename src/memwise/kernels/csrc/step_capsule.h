/* The workspace capsule of a fused step's extension module (memwise/models/<family>/csrc/step_module.c):
 * Python holds a step's workspace as a capsule that frees it when dropped.  Include after <Python.h>,
 * with WS_CAPSULE (the capsule's name) and WS_FREE (the workspace's free function) defined. */
#ifndef MEMWISE_KERNELS_STEP_CAPSULE_H
#define MEMWISE_KERNELS_STEP_CAPSULE_H

#if !defined(WS_CAPSULE) || !defined(WS_FREE)
#error "define WS_CAPSULE and WS_FREE before including step_capsule.h"
#endif

static void py_ws_free(PyObject *capsule) { WS_FREE(PyCapsule_GetPointer(capsule, WS_CAPSULE)); }

/* The capsule of workspace w (NULL: it could not be allocated), or NULL with Python's error set. */
static PyObject *ws_capsule(void *w) {
    if (!w) return PyErr_NoMemory();
    PyObject *capsule = PyCapsule_New(w, WS_CAPSULE, py_ws_free);
    if (!capsule) WS_FREE(w);
    return capsule;
}

/* The workspace in a capsule, or NULL with Python's error set (not one of this module's). */
static void *ws_of(PyObject *capsule) { return PyCapsule_GetPointer(capsule, WS_CAPSULE); }

/* Whether a step's position lies in the cache's slots; if not, Python's error is set. */
static int position_fits(long long pos, long long slots) {
    if (pos >= 0 && pos < slots) return 1;
    PyErr_Format(PyExc_ValueError, "step: position %lld outside the cache's %lld slots", pos, slots);
    return 0;
}

#endif /* MEMWISE_KERNELS_STEP_CAPSULE_H */
