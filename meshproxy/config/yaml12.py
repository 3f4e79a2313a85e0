"""YAML read the way Kubernetes tools read Istio YAML: the YAML 1.2 core schema.

PyYAML implements YAML 1.1, where plain scalars such as ``on``, ``yes``, ``off``, ``no``
are booleans, ``0777`` is octal 511, ``1:20`` is the base-60 number 80, ``2024-01-01`` is a
date and ``1_000`` is 1000.  Under the YAML 1.2 core schema (what Kubernetes' YAML reads)
those are strings, except ``0777`` which is the decimal 777; octal is written ``0o777``.
Only ``true``/``false`` (any of three cases) are booleans and only ``null``/``~``/empty is null.

One more difference: an IPv6 literal ending in ``::`` (``- 001:db8::``) is one string
(an address) for Kubernetes; PyYAML's scanner sees its last colon as a mapping indicator
and builds ``{"001:db8:": null}`` (or fails).  Here a colon that completes an IPv6 address
right after a plain scalar stays part of that scalar.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Any

import yaml

__all__ = ["load", "load_all", "Loader"]


class Loader(yaml.SafeLoader):
    """A safe loader with YAML 1.2 core schema scalars (pure Python: it also scans
    ``- 001:db8::`` as one scalar)."""

    yaml_implicit_resolvers: dict = {}

    def scan_plain(self):
        """A ``:`` right after a plain scalar that it turns into an IPv6 address (``001:db8:`` +
        ``:``) belongs to the scalar; any other ``:`` is the mapping indicator, as always."""
        token = super().scan_plain()
        if self.peek() == ":" and token.end_mark.index == self.index and _is_ipv6(token.value + ":"):
            self.forward()
            token.value += ":"
            token.end_mark = self.get_mark()
        return token


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")



def _int(loader: Loader, node) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text, 10)


def _float(loader: Loader, node) -> float:
    text = loader.construct_scalar(node).lower()
    if text.endswith("inf"):
        return float("-inf") if text.startswith("-") else float("inf")
    if text.endswith("nan"):
        return float("nan")
    return float(text)


def _bool(loader: Loader, node) -> bool:
    return loader.construct_scalar(node).lower() == "true"




class _FastLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """The same schema through libyaml's scanner (several times faster on large files).  Its
    scanner splits ``001:db8::`` into a mapping ``{"001:db8:": null}`` (read back as the
    address here) or fails on it; a failure is retried with :class:`Loader`."""

    yaml_implicit_resolvers: dict = {}
    yaml_constructors = dict(yaml.SafeLoader.yaml_constructors)

    def construct_object(self, node, deep=False):
        if isinstance(node, yaml.MappingNode) and len(node.value) == 1:
            key, value = node.value[0]
            if (isinstance(key, yaml.ScalarNode) and not key.style and isinstance(value, yaml.ScalarNode)
                    and not value.style and value.value == "" and key.value.endswith(":")
                    and _is_ipv6(key.value + ":")):      # libyaml marks plain scalars with style ""
                return key.value + ":"
        return super().construct_object(node, deep)


for _cls in (Loader, _FastLoader):
    _cls.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
    _cls.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    _cls.add_implicit_resolver("tag:yaml.org,2002:null", _NULL, ["~", "n", "N", ""])
    _cls.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"])
    _cls.add_constructor("tag:yaml.org,2002:int", _int)
    _cls.add_constructor("tag:yaml.org,2002:float", _float)
    _cls.add_constructor("tag:yaml.org,2002:bool", _bool)


def load(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_FastLoader)
    except yaml.YAMLError:
        return yaml.load(text, Loader=Loader)       # the reference scanner: its answer or its error


def load_all(text: str) -> list[Any]:
    """Every document of ``text`` (a list: a syntax error is raised here, not while iterating)."""
    try:
        return list(yaml.load_all(text, Loader=_FastLoader))
    except yaml.YAMLError:
        return list(yaml.load_all(text, Loader=Loader))
