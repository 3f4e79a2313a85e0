"""Nothing silently ignored, by construction: every field the decoder accepts is in the field
registry (meshproxy/config/fields.py) with a status, and an Applied field names a test that
exists.  The decoder reads every mapping through a registry node (``_Reader.obj`` takes a
node name, not a list of keys), so the registry is the list of accepted fields; these tests
walk it and decode one document per field to show that each registered field is read, at
its path, through its node."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from meshproxy.config import decode as decode_module
from meshproxy.config.decode import decode_documents
from meshproxy.config.resources import Document
from meshproxy.config.fields import KIND_NODES, NODES, Applied, Inert, Refused, Warned, openapi_v3, walk

ROOT = Path(__file__).resolve().parents[2]
KINDS = sorted(KIND_NODES)


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def every_field():
    for node in NODES.values():
        for key, f in node.fields.items():
            yield node.name, key, f


def test_every_field_has_a_status_and_every_node_it_names_exists():
    for node, key, f in every_field():
        assert isinstance(f.status, (Applied, Warned, Refused, Inert)), (node, key)
        assert f.type in ("string", "integer", "number", "boolean", "duration", "object", "array", "map", "any")
        if f.type == "object":
            assert f.node in NODES, (node, key, f.node)
        if f.node:
            assert f.node in NODES, (node, key, f.node)
        text = getattr(f.status, "message", None) or getattr(f.status, "reason", None) or f.status.test
        assert text.strip(), (node, key)


def test_every_applied_field_names_a_test_that_exists():
    files: dict[str, set[str]] = {}
    missing = []
    for node, key, f in every_field():
        if not isinstance(f.status, Applied):
            continue
        path, _, name = f.status.test.partition("::")
        if path not in files:
            p = ROOT / path
            files[path] = _test_functions(p) if p.is_file() else set()
        if name not in files[path]:
            missing.append(f"{node}.{key}: {f.status.test}")
    assert missing == []


def test_every_node_is_reachable_from_a_kind():
    reached = {"Document", "ObjectMeta", "SecretDocument"}     # the top-level nodes (a Secret has no spec)
    for kind in KINDS:
        reached.add(KIND_NODES[kind])
        reached |= {f.node for _, f in walk(KIND_NODES[kind]) if f.node}
    assert reached == set(NODES)


def _value(f, depth: int):
    if f.type == "object":
        return _minimal(f.node, depth + 1)
    if f.type == "array":
        return [_minimal(f.node, depth + 1) if f.node else _scalar(f.items)]
    if f.type == "map":
        return {"8080": _minimal(f.node, depth + 1) if f.node else _scalar(f.items)}
    if f.enum:
        return f.enum[-1]
    return _scalar(f.type)


def _scalar(kind: str):
    return {"string": "x", "integer": 1, "number": 1.0, "boolean": True, "duration": "1s", "any": {"a": 1}}[kind]


def _minimal(node: str, depth: int) -> dict:
    return {}


# What a mapping of a node needs beside the field under test for the decoder to read on
# (a port-level setting without a port, a listener without a port, a mirror without a
# destination are refused before their other fields are looked at).
SEED = {
    "PortTrafficPolicy": {"port": {"number": 80}},
    "IstioIngressListener": {"port": {"number": 80, "protocol": "HTTP", "name": "h"}},
    "HTTPMirrorPolicy": {"destination": {"host": "a"}},
}
SEED_FOR_KEY = {("HTTPRoute", "mirrorPercentage"): {"mirror": {"host": "a"}},
                ("HTTPRoute", "mirrorPercent"): {"mirror": {"host": "a"}},
                ("ConsistentHashLB", "ringHash"): {"httpHeaderName": "x"},
                ("ConsistentHashLB", "maglev"): {"httpHeaderName": "x"},
                ("PeerAuthentication", "portLevelMtls"): {"selector": {"matchLabels": {"app": "a"}}}}


def _docs_for(kind: str):
    """One document per registered path of ``kind``: the path set to a value of its type,
    everything around it as small as possible."""
    for path, f in walk(KIND_NODES[kind]):
        spec: dict = {}
        cursor = spec
        parts = path.split(".")
        node = KIND_NODES[kind]
        ok = True
        for i, part in enumerate(parts):
            name = part.removesuffix("[]")
            if part == "*":
                continue
            field = NODES[node].fields[name]
            last = i == len(parts) - 1 or (i == len(parts) - 2 and parts[-1] == "*")
            if last:
                cursor[name] = _value(field, 0)
                for key, value in SEED_FOR_KEY.get((node, name), {}).items():
                    cursor.setdefault(key, value)
                break
            for key, value in SEED_FOR_KEY.get((node, name), {}).items():
                cursor.setdefault(key, value)
            child: dict = dict(SEED.get(field.node, {}))
            if field.type == "array":
                cursor[name] = [child]
            elif field.type == "map":
                cursor[name] = {"8080": child}       # a key that is a port, a header and a label
                if i + 1 < len(parts) and parts[i + 1] == "*":
                    pass
            else:
                cursor[name] = child
            cursor = child
            node = field.node
            if not node:
                ok = False
                break
        if ok:
            yield path, spec


def _recording_obj(seen: list):
    original = decode_module._Reader.obj

    def obj(self, value, path, node, required=()):
        seen.append((path, node))
        return original(self, value, path, node, required)
    return original, obj


@pytest.mark.parametrize("kind", KINDS)
def test_each_registered_field_is_read_by_the_decoder_at_its_path_through_its_node(kind, monkeypatch):
    seen: list[tuple[str, str]] = []
    _, obj = _recording_obj(seen)
    monkeypatch.setattr(decode_module._Reader, "obj", obj)
    unread = []
    count = 0
    for path, spec in _docs_for(kind):
        count += 1
        seen.clear()
        group = "security.istio.io" if kind in ("AuthorizationPolicy", "PeerAuthentication") else "networking.istio.io"
        body = {"apiVersion": f"{group}/v1", "kind": kind, "metadata": {"name": "r"}, "spec": spec}
        result = decode_documents([Document("t.yaml", 0, body)])
        unknown = [e for e in result.errors if "unknown field" in e]
        assert unknown == [], (path, unknown)
        # the leaf's parent mapping was read through the node that declares the leaf
        parts = path.split(".")
        leaf = parts[-1] if parts[-1] != "*" else parts[-2]
        owner = _owner(KIND_NODES[kind], parts)
        if not any(node == owner for _, node in seen):
            unread.append(f"{path} (node {owner})")
        assert leaf
    assert count >= 5
    assert unread == []


def _owner(root: str, parts: list[str]) -> str:
    node = root
    for part in parts[:-1]:
        if part == "*":
            continue
        f = NODES[node].fields[part.removesuffix("[]")]
        node = f.node or node
    if parts[-1] == "*":
        return _owner(root, parts[:-1])
    return node


def test_a_secret_is_read_through_its_own_top_level_node(monkeypatch):
    seen: list[tuple[str, str]] = []
    _, obj = _recording_obj(seen)
    monkeypatch.setattr(decode_module._Reader, "obj", obj)
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "type": "Opaque", "immutable": True,
            "stringData": {"ca.crt": "x"}, "data": {}}
    assert set(body) == set(NODES["SecretDocument"].fields)
    errors = decode_documents([Document("t.yaml", 0, body)]).errors
    assert ("document", "SecretDocument") in seen
    assert errors == ["Secret default/s: data.ca.crt: must hold PEM certificates (-----BEGIN CERTIFICATE-----)"]
    body["spec"] = {}
    assert "Secret default/s: spec: unknown field" in decode_documents([Document("t.yaml", 0, body)]).errors


def test_a_key_outside_the_registry_is_an_unknown_field_error_with_its_path():
    body = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "r"},
            "spec": {"host": "a", "trafficPolicy": {"connectionPool": {"tcp": {"maxConections": 1}}}}}
    errors = decode_documents([Document("t.yaml", 0, body)]).errors
    assert errors == ['DestinationRule default/r: spec.trafficPolicy.connectionPool.tcp.maxConections: unknown field '
                      '(did you mean "maxConnections"?)']


def test_the_registry_gives_an_openapi_v3_schema_with_each_fields_status():
    schema = openapi_v3("DestinationRule")
    tls = schema["properties"]["trafficPolicy"]["properties"]["tls"]["properties"]
    assert tls["mode"]["enum"] == ["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]
    assert tls["caCrl"]["description"].startswith("refused: certificate revocation lists are not checked")
    subsets = schema["properties"]["subsets"]
    assert subsets["type"] == "array" and subsets["items"]["properties"]["labels"]["additionalProperties"] == {
        "type": "string"}
    pool = schema["properties"]["trafficPolicy"]["properties"]["connectionPool"]["properties"]["tcp"]["properties"]
    assert pool["connectTimeout"] == {"type": "string", "format": "duration"}
