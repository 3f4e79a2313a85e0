"""Istio YAML is read as Kubernetes reads it (YAML 1.2 core schema), not as YAML 1.1."""
from __future__ import annotations

import pytest

from meshproxy.config import yaml12
from meshproxy.config.decode import decode_documents
from meshproxy.config.load import load


@pytest.mark.parametrize("text,value", [
    ("on", "on"), ("off", "off"), ("yes", "yes"), ("no", "no"), ("y", "y"), ("On", "On"),
    ("true", True), ("False", False), ("TRUE", True),
    ("0777", 777), ("0o777", 511), ("0x1F", 31), ("-3", -3), ("1_000", "1_000"), ("1:20", "1:20"),
    ("1.5", 1.5), ("1e3", 1000.0), (".inf", float("inf")), ("2024-01-01", "2024-01-01"),
    ("~", None), ("null", None), ("", None), ("2001:db8::1", "2001:db8::1"), ("001:db8::", "001:db8::"),
])
def test_plain_scalars_follow_the_yaml_1_2_core_schema(text, value):
    assert yaml12.load(f"a: {text}\n") == {"a": value}
    assert yaml12.load(f"a: [{text}]\n") == {"a": [value]} or text == ""


def test_an_ipv6_address_ending_in_a_double_colon_is_a_string_in_block_and_flow_lists():
    assert yaml12.load("addresses:\n- 1.2.3.4\n- 001:db8::\n") == {"addresses": ["1.2.3.4", "001:db8::"]}
    assert yaml12.load("addresses: [1.2.3.4, 001:db8::]") == {"addresses": ["1.2.3.4", "001:db8::"]}
    assert yaml12.load("a:\n  key:\n") == {"a": {"key": None}}          # an ordinary empty value stays a mapping


def test_service_entry_with_an_ipv6_address_and_yaml_1_1_lookalikes_loads_and_decodes(tmp_path):
    f = tmp_path / "se.yaml"
    f.write_text("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
                 "metadata: {name: v6, namespace: default, labels: {enabled: on, mode: 0777}}\n"
                 "spec:\n  hosts: [v6.example.com]\n  addresses:\n  - 1.2.3.4\n  - 001:db8::\n"
                 "  ports: [{number: 80, name: http, protocol: HTTP}]\n  location: MESH_EXTERNAL\n"
                 "  resolution: NONE\n")
    loaded = load([str(f)])
    assert loaded.errors == []
    result = decode_documents(loaded.documents)
    assert result.errors == [f"ServiceEntry default/v6: metadata.labels.mode: must be a string, got integer"]
    f.write_text(f.read_text().replace("mode: 0777", "mode: '0777'"))
    result = decode_documents(load([str(f)]).documents)
    assert result.errors == []
    (se,) = result.resources
    assert se.spec.addresses == ("1.2.3.4", "001:db8::") and se.labels == {"enabled": "on", "mode": "0777"}
