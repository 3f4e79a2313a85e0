# Augmenting declarations for lists.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from cpython.list cimport PyList_SET_ITEM, PyList_GET_ITEM
from cpython.ref cimport Py_INCREF, Py_DECREF

cdef extern from "Python.h":
    ctypedef struct PyListObject:
        Py_ssize_t allocated
    Py_ssize_t Py_SIZE(object)
    void Py_SET_SIZE(object, Py_ssize_t)

cdef bint _direct

@cython.locals(empty=Py_ssize_t, slot=Py_ssize_t, allocated=Py_ssize_t, n=Py_ssize_t, probe=list)
cpdef bint layout_matches() except -1
cpdef bint use_struct(bint enabled) except -1
@cython.locals(n=Py_ssize_t)
cpdef push(list items, item)
@cython.locals(n=Py_ssize_t)
cpdef pop_last(list items)
