"""Sans-IO HTTP/1.1 codec: bytes in, handler calls out (see :mod:`meshproxy.codec.api`).

Backends are chosen by name once, at start-up::

    parser = make_request_parser(DEFAULT_BACKEND, handler, limits)

The hot path holds the parser object and never asks which backend it is.
"""
from __future__ import annotations

import importlib

from .api import (
    CodecLimits,
    ProtocolError,
    RequestHandler,
    RequestParser,
    ResponseHandler,
    ResponseParser,
)
from . import llhttp_driver
from .httptools_backend import HttptoolsRequestParser, HttptoolsResponseParser

# name -> module and its (request parser class, response parser class).  ``llhttp`` (llhttp
# driven through its C API) only where llhttp_driver found it and its self-check passed:
# compiled, with the httptools release it was written for; ``httptools`` (the same parsers on
# httptools' public parser objects) everywhere.  The h11 backend is imported only by a proxy
# that runs it (``--codec h11``).
BACKENDS = {
    "httptools": (".httptools_backend", "HttptoolsRequestParser", "HttptoolsResponseParser"),
    "h11": (".h11_backend", "H11RequestParser", "H11ResponseParser"),
}
_loaded: dict = {"httptools": (HttptoolsRequestParser, HttptoolsResponseParser)}
if llhttp_driver.available():
    BACKENDS["llhttp"] = (".llhttp_driver", "LlhttpRequestParser", "LlhttpResponseParser")
    _loaded["llhttp"] = (llhttp_driver.LlhttpRequestParser, llhttp_driver.LlhttpResponseParser)
DEFAULT_BACKEND = "llhttp" if "llhttp" in BACKENDS else "httptools"


def _backend(name: str):
    classes = _loaded.get(name)
    if classes is None:
        try:
            module, request, response = BACKENDS[name]
        except KeyError:
            if name == "llhttp":
                raise ValueError("codec backend 'llhttp' is not available here (pure-Python hot path, or an "
                                 "httptools release the llhttp driver was not written for); use 'httptools'") from None
            raise ValueError(f"unknown codec backend {name!r}; choose one of {sorted(BACKENDS)}") from None
        module = importlib.import_module(module, __name__)
        classes = _loaded[name] = (getattr(module, request), getattr(module, response))
    return classes


def make_request_parser(backend: str, handler: RequestHandler, limits: CodecLimits) -> RequestParser:
    return _backend(backend)[0](handler, limits)


def make_response_parser(backend: str, handler: ResponseHandler, limits: CodecLimits) -> ResponseParser:
    """The body cap (``--max-body-bytes``) is for what clients send; a response streams
    through whatever its length (its head limits still hold)."""
    if limits.max_body_bytes:
        limits = CodecLimits(max_header_bytes=limits.max_header_bytes, max_header_count=limits.max_header_count,
                             max_target_bytes=limits.max_target_bytes, max_body_bytes=0,
                             max_chunk_ext_bytes=limits.max_chunk_ext_bytes)
    return _backend(backend)[1](handler, limits)


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "CodecLimits", "ProtocolError", "make_request_parser",
           "make_response_parser"]
