"""Every hand-written Istio sample decodes unchanged, with no errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from meshproxy.config.decode import decode_documents
from meshproxy.config.load import load, load_documents
from meshproxy.config.resources import DestinationRule, Gateway, ServiceEntry, Sidecar, VirtualService

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "istio"
SAMPLES = sorted(FIXTURES.glob("*.yaml"))


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_istio_sample_decodes_without_errors(path):
    docs, errors = load_documents([str(path)])
    assert errors == []
    result = decode_documents(docs)
    assert result.errors == []
    assert len(result.resources) == len(docs) > 0


def test_reviews_80_20_keeps_weights_subsets_and_short_host_as_written():
    docs, _ = load_documents([str(FIXTURES / "virtual-service-reviews-80-20.yaml")])
    (vs,) = decode_documents(docs).resources
    assert (vs.kind, vs.namespace, vs.name) == ("VirtualService", "default", "reviews")
    spec = vs.spec
    assert isinstance(spec, VirtualService) and spec.hosts == ("reviews",)
    route = spec.http[0].route
    assert [(d.destination.host, d.destination.subset, d.weight) for d in route] == [
        ("reviews", "v1", 80), ("reviews", "v2", 20)]


def test_jason_header_match_and_fault_delay_are_typed():
    docs, _ = load_documents([str(FIXTURES / "virtual-service-ratings-test-delay.yaml")])
    (vs,) = decode_documents(docs).resources
    first = vs.spec.http[0]
    header = first.match[0].match.headers[0]
    assert (header.name, header.match.kind, header.match.value) == ("end-user", "exact", "jason")
    assert first.fault.delay == 7.0 and first.fault.delay_percentage == 100.0


def test_retries_sample_has_conditions_status_codes_and_per_try_timeout():
    docs, _ = load_documents([str(FIXTURES / "virtual-service-details-retries.yaml")])
    (vs,) = decode_documents(docs).resources
    retries = vs.spec.http[0].retries
    assert retries.attempts == 3 and retries.per_try_timeout == 2.0
    assert retries.retriable_status_codes == {503}
    assert {"gateway-error", "connect-failure", "refused-stream", "retriable-status-codes"} <= retries.retry_on


def test_kinds_decode_to_their_types():
    result = decode_documents(load_documents([str(FIXTURES)])[0])
    kinds = {type(r.spec) for r in result.resources}
    assert kinds == {VirtualService, DestinationRule, ServiceEntry, Gateway, Sidecar}


def test_circuit_breaker_sample_maps_to_connection_pool_and_outlier_policy():
    docs, _ = load_documents([str(FIXTURES / "destination-rule-circuit-breaker.yaml")])
    (dr,) = decode_documents(docs).resources
    parts = dr.spec.traffic_policy.parts
    assert parts.connection_pool.max_connections == 1
    assert parts.connection_pool.max_pending_requests == 1
    assert parts.connection_pool.max_requests_per_connection == 1
    assert parts.outlier.consecutive_5xx == 1 and parts.outlier.interval == 1.0
    assert parts.outlier.base_ejection_time == 180.0 and parts.outlier.max_ejection_percent == 100


def test_kubernetes_documents_in_the_same_file_are_notes_not_errors(tmp_path):
    f = tmp_path / "app.yaml"
    f.write_text((FIXTURES / "virtual-service-reviews-v3.yaml").read_text()
                 + "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: reviews-v3}\nspec: {}\n")
    result = load([str(f)])
    assert result.errors == [] and len(result.documents) == 1
    assert result.notes == [f"{f} document 1: Deployment (apps/v1) is not networking.istio.io or security.istio.io, ignored"]


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x\n")
    docs, errors = load_documents([str(tmp_path)])
    assert docs == []
    assert len(errors) == 1 and errors[0].startswith(f"{f}:") and "YAML syntax error" in errors[0]


def test_all_api_versions_are_accepted():
    from meshproxy.config.resources import Document
    body = {"kind": "DestinationRule", "metadata": {"name": "r"}, "spec": {"host": "reviews"}}
    for version in ("v1", "v1beta1", "v1alpha3"):
        result = decode_documents([Document("t", 0, {**body, "apiVersion": f"networking.istio.io/{version}"})])
        assert result.errors == [] and result.resources[0].api_version == f"networking.istio.io/{version}"
