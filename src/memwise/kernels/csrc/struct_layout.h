/* What the fused steps' extension modules report to their ctypes mirrors (memwise/kernels/structs.py):
 * struct_layout() -> {struct name: (sizeof, {field: offset})}.  ADD_STRUCT(out, type, FIELDS) adds one
 * struct whose fields FIELDS(X) lists as X(type, field) ...; on failure it drops `out` and returns NULL
 * from the calling function.  Include after <Python.h>. */
#ifndef MEMWISE_KERNELS_STRUCT_LAYOUT_H
#define MEMWISE_KERNELS_STRUCT_LAYOUT_H

#include <stddef.h>

static int add_struct(PyObject *out, const char *name, size_t size, const char *const *fields,
                      const size_t *offsets, int n) {
    PyObject *offs = PyDict_New();
    if (!offs) return -1;
    for (int k = 0; k < n; ++k) {
        PyObject *v = PyLong_FromSize_t(offsets[k]);
        if (!v || PyDict_SetItemString(offs, fields[k], v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(offs);
            return -1;
        }
        Py_DECREF(v);
    }
    PyObject *entry = Py_BuildValue("(nN)", (Py_ssize_t)size, offs);
    if (!entry) return -1;
    const int rc = PyDict_SetItemString(out, name, entry);
    Py_DECREF(entry);
    return rc;
}

#define FIELD_NAME(type, f) #f,
#define FIELD_OFFSET(type, f) offsetof(type, f),
#define ADD_STRUCT(out, type, FIELDS)                                                           \
    do {                                                                                        \
        static const char *const names[] = {FIELDS(FIELD_NAME)};                                \
        static const size_t offsets[] = {FIELDS(FIELD_OFFSET)};                                 \
        if (add_struct(out, #type, sizeof(type), names, offsets,                                \
                       (int)(sizeof offsets / sizeof offsets[0])) < 0) {                        \
            Py_DECREF(out);                                                                     \
            return NULL;                                                                        \
        }                                                                                       \
    } while (0)

/* py_struct_layout, the struct_layout() method of a fused step's module, over its three structs A, B
 * and C (fields listed by FA, FB, FC); STRUCT_LAYOUT_METHOD is its entry in the module's methods. */
#define DEFINE_STRUCT_LAYOUT(A, FA, B, FB, C, FC)                                               \
    static PyObject *py_struct_layout(PyObject *self, PyObject *noargs) {                       \
        (void)self, (void)noargs;                                                               \
        PyObject *out = PyDict_New();                                                           \
        if (!out) return NULL;                                                                  \
        ADD_STRUCT(out, A, FA);                                                                 \
        ADD_STRUCT(out, B, FB);                                                                 \
        ADD_STRUCT(out, C, FC);                                                                 \
        return out;                                                                             \
    }
#define STRUCT_LAYOUT_METHOD                                                                    \
    {"struct_layout", py_struct_layout, METH_NOARGS, "sizes and field offsets of the model structs"}

#endif /* MEMWISE_KERNELS_STRUCT_LAYOUT_H */
