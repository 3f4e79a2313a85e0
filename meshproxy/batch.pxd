# Augmenting declarations for batch.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython

cdef class SendBatch:
    cdef public object call_soon, end
    cdef public list sends
    cdef public bint scheduled, deferring
    cdef public Py_ssize_t adds

    cpdef add(self, send)
    @cython.locals(sends=list, i=Py_ssize_t)
    cpdef run(self)
