"""Control-plane metrics go to the registry passed in and pass promtool."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from controlplane.metrics import ISTIO_COUNTER_NAMES, ControlPlaneMetrics, exposition


def busy_control_plane() -> tuple[CollectorRegistry, ControlPlaneMetrics]:
    registry = CollectorRegistry()
    m = ControlPlaneMetrics(registry)
    m.proxy_connected(); m.proxy_connected(); m.proxy_disconnected()
    m.push_sent(); m.push_sent(); m.push_failed(); m.nack()
    m.converged(0.3); m.converged(4.0)
    m.api_request("PUT", "VirtualService", 200); m.api_request("PUT", "VirtualService", 400)
    m.rejected("VirtualService")
    m.registry_size(services=3, endpoints=9)
    return registry, m


def test_values_land_in_the_passed_registry_not_the_global_one():
    registry, _ = busy_control_plane()
    get = registry.get_sample_value
    assert get("pilot_xds") == 1
    assert get("pilot_xds_pushes_total", {"type": "snapshot"}) == 2
    assert get("pilot_xds_push_errors_total", {"type": "snapshot"}) == 1
    assert get("pilot_total_xds_rejects_total", {"type": "snapshot"}) == 1
    assert get("pilot_proxy_convergence_time_count") == 2
    assert get("pilot_proxy_convergence_time_bucket", {"le": "0.5"}) == 1
    assert get("meshproxy_cp_api_requests_total", {"method": "PUT", "kind": "VirtualService", "code": "400"}) == 1
    assert get("meshproxy_cp_validation_rejected_total", {"kind": "VirtualService"}) == 1
    assert (get("pilot_services"), get("meshproxy_cp_registry_endpoints")) == (3, 9)
    assert REGISTRY.get_sample_value("pilot_xds") is None


def test_control_plane_exposition_passes_promtool_but_for_istios_counter_names():
    registry, _ = busy_control_plane()
    served = exposition(registry)
    proc = subprocess.run(["promtool", "check", "metrics"], input=served, capture_output=True, timeout=30)
    # Istio's counters carry no _total suffix (its dashboards query pilot_xds_pushes): the only lint
    complaints = sorted((proc.stdout + proc.stderr).decode().splitlines())
    assert complaints == sorted(f'{n} counter metrics should have "_total" suffix' for n in ISTIO_COUNTER_NAMES)
    lines = served.decode().splitlines()
    assert "# TYPE pilot_xds_pushes counter" in lines
    assert [line for line in lines if line.startswith("pilot_xds_pushes{")] == [
        'pilot_xds_pushes{type="resources"} 0.0', 'pilot_xds_pushes{type="endpoints"} 0.0',
        'pilot_xds_pushes{type="snapshot"} 2.0']
    assert "pilot_xds_pushes_total" not in served.decode()


def test_control_plane_openmetrics_exposition_parses_strictly():
    registry, _ = busy_control_plane()
    names = {f.name for f in text_string_to_metric_families(generate_openmetrics(registry).decode())}
    assert {"pilot_xds_pushes", "pilot_proxy_convergence_time", "pilot_xds"} <= names
