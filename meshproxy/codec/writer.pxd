# Augmenting declarations for writer.py (Cython experiment, branch cython-exp).
# cpdef module functions: other compiled modules cimport them and call them in C.
cpdef bytes encode_request_head(method, target, headers)
cpdef bytes encode_response_head(int status, reason, headers, version=*)
cpdef bytes encode_chunk(data)
cpdef tuple content_length_field(n)
