"""Every field the decoder accepts, its type, and what this proxy does with it.

The decoder (:mod:`meshproxy.config.decode`) reads each mapping through a :class:`Node` of
this registry: a key that is not a field of the node is an "unknown field" error, and a key
that is present (with a value other than its proto3 zero value and other than the values
listed in ``ok``) gets what its status says, with its path, without further code:

- :class:`Applied`: the proxy acts on it; ``test`` names the test that shows it acting
  (``tests/...py::test_name``; tests/unit/test_field_registry.py checks that it exists);
- :class:`Warned`: accepted (real Istio YAML decodes unchanged) but not acted on; one
  warning per occurrence, shown by ``meshproxy validate``, the control plane's ``Warning``
  response headers and the proxy's ``/config_dump``;
- :class:`Refused`: an error naming the path: the resource is rejected (security settings
  that are not applied are always refused, never warned);
- :class:`Inert`: nothing for this proxy to do, with the reason (Kubernetes bookkeeping
  such as ``metadata.uid``, or a field whose only effect is one the proxy has no way of
  doing differently).

Types follow OpenAPI (``string``, ``integer``, ``number``, ``boolean``, ``object`` with a
node, ``array`` and ``map`` with an item type or node); ``duration`` is a string in Go
duration syntax.  :func:`openapi_v3` turns a node into an OpenAPI v3 schema, so the API's
published schemas and the decoder cannot disagree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Union


# ---------------------------------------------------------------- statuses


@dataclass(frozen=True, slots=True)
class Applied:
    test: str                       # "tests/unit/test_x.py::test_name"
    note: str = ""


@dataclass(frozen=True, slots=True)
class Warned:
    message: str                    # what is not done, e.g. "not applied by this proxy: ..."
    ok: tuple = ()                  # values that need no warning (the proxy's behaviour already)


@dataclass(frozen=True, slots=True)
class Refused:
    message: str                    # why, e.g. "TLS origination is not supported yet"
    ok: tuple = ()                  # values that are accepted (e.g. tls.mode DISABLE)


@dataclass(frozen=True, slots=True)
class Inert:
    reason: str


Status = Union[Applied, Warned, Refused, Inert]


@dataclass(frozen=True, slots=True)
class Field:
    type: str                       # string|integer|number|boolean|duration|object|array|map|any
    status: Status
    node: str = ""                  # object: the node; array/map: the node of the items (if objects)
    items: str = ""                 # array/map of scalars: the item type
    enum: tuple[str, ...] = ()
    doc: str = ""


@dataclass(frozen=True, slots=True)
class Node:
    name: str                       # Istio's message name where there is one
    fields: Mapping[str, Field] = field(default_factory=lambda: MappingProxyType({}))

    def __contains__(self, key: object) -> bool:
        return key in self.fields


def is_zero(value: Any) -> bool:
    """proto3's "not set": null, false, 0, "", [] and {}."""
    return value is None or value is False or (not isinstance(value, bool) and value in (0, "", [], {}))


# ---------------------------------------------------------------- test names

T_DECODE = "tests/unit/test_decode_validation.py::"
T_SAMPLES = "tests/unit/test_decode_samples.py::"
T_SNAP = "tests/unit/test_compile_snapshot.py::"
T_LIST = "tests/unit/test_compile_listeners.py::"
T_MATCH = "tests/unit/test_router_match.py::"
T_INPROC = "tests/integration/test_pipeline_inproc.py::"
T_HTTP = "tests/integration/test_proxy_http.py::"
T_BAL = "tests/unit/test_cluster_balancing.py::"
T_RES = "tests/unit/test_cluster_resilience.py::"
T_SPLIT = "tests/unit/test_split_weights.py::"
T_XFORM = "tests/unit/test_transform.py::"
T_RETRY = "tests/unit/test_router_retry.py::"
T_PUSH = "tests/unit/test_cp_push.py::"
T_GW = "tests/integration/test_gateway_e2e.py::"
T_TCPL = "tests/integration/test_tcp_listener_e2e.py::"
T_APPLY = "tests/integration/test_applied_fields_e2e.py::"
T_GWTLS = "tests/integration/test_gateway_tls_options.py::"
_T_PASS = "tests/integration/test_gateway_passthrough.py::test_passthrough_routes_on_sni_without_terminating"
T_GWTCP = "tests/integration/test_gateway_tls_tcp.py::"


def A(test: str, note: str = "") -> Applied:
    return Applied(test, note)


# ---------------------------------------------------------------- the registry

_NODES: dict[str, Node] = {}


def node(node_name: str, /, **fields: Field) -> None:
    if node_name in _NODES:
        raise ValueError(f"node {node_name} defined twice")
    _NODES[node_name] = Node(node_name, MappingProxyType(dict(fields)))


def obj(status: Status, node_name: str, doc: str = "") -> Field:
    return Field("object", status, node=node_name, doc=doc)


def arr(status: Status, of: str, doc: str = "") -> Field:
    """An array of ``of``: a scalar type name, or a node name (capitalised)."""
    if of[:1].isupper():
        return Field("array", status, node=of, doc=doc)
    return Field("array", status, items=of, doc=doc)


def mapping(status: Status, of: str = "string", doc: str = "") -> Field:
    if of[:1].isupper():
        return Field("map", status, node=of, doc=doc)
    return Field("map", status, items=of, doc=doc)


def s(status: Status, enum: tuple[str, ...] = (), doc: str = "") -> Field:
    return Field("string", status, enum=enum, doc=doc)


def i(status: Status, doc: str = "") -> Field:
    return Field("integer", status, doc=doc)


def n(status: Status, doc: str = "") -> Field:
    return Field("number", status, doc=doc)


def b(status: Status, doc: str = "") -> Field:
    return Field("boolean", status, doc=doc)


def d(status: Status, doc: str = "") -> Field:
    return Field("duration", status, doc=doc)


def anything(status: Status, doc: str = "") -> Field:
    return Field("any", status, doc=doc)


K8S = Inert("Kubernetes object bookkeeping: no routing behaviour in Istio either")
SECURITY_LATER = "not supported yet; refused rather than ignored"
_T_SIMPLE_TLS = "tests/integration/test_tls_origination.py::test_simple_verifies_the_server_and_sends_the_sni"

# -- documents and metadata

node("Document",
     apiVersion=s(A(T_SAMPLES + "test_all_api_versions_are_accepted")),
     kind=s(A(T_SAMPLES + "test_kinds_decode_to_their_types")),
     metadata=obj(A(T_DECODE + "test_metadata_name_is_required_and_unknown_kind_is_unsupported"), "ObjectMeta"),
     spec=anything(A(T_SAMPLES + "test_kinds_decode_to_their_types")),
     status=anything(Inert("written by controllers; Istio ignores it on input too")))
node("ObjectMeta",
     name=s(A(T_DECODE + "test_metadata_name_is_required_and_unknown_kind_is_unsupported")),
     namespace=s(A(T_PUSH + "test_export_to_dot_hides_a_resource_from_other_namespaces")),
     creationTimestamp=s(A(T_SNAP + "test_oldest_virtual_service_wins_a_host_on_sidecars_with_a_warning")),
     labels=mapping(K8S),
     annotations=mapping(A(T_INPROC + "test_post_is_not_retried_unless_the_route_allows_it",
                           "meshproxy.io/retry-non-idempotent; other annotations are bookkeeping")),
     resourceVersion=anything(K8S), generation=anything(K8S), uid=anything(K8S), managedFields=anything(K8S),
     finalizers=anything(K8S), ownerReferences=anything(K8S), generateName=anything(K8S), selfLink=anything(K8S),
     deletionTimestamp=anything(K8S), deletionGracePeriodSeconds=anything(K8S))

# -- core v1 Secret (TLS credentials for Gateway credentialName; decode.py _decode_secret)

T_CRED = "tests/unit/test_gateway_credentials.py::"
_T_SECRET = T_CRED + "test_a_tls_secret_decodes_to_its_pem_and_bad_ones_are_refused_by_key"
node("SecretDocument",
     apiVersion=s(A(_T_SECRET)),
     kind=s(A(_T_SECRET)),
     metadata=obj(A(_T_SECRET), "ObjectMeta"),
     type=s(A(_T_SECRET), ("kubernetes.io/tls", "Opaque")),
     data=mapping(A(T_CRED + "test_credential_name_resolves_in_the_gateway_proxys_namespace_with_its_cacert")),
     stringData=mapping(A(_T_SECRET)),
     immutable=b(Inert("an API-server write guard; no effect on how the credential is served")))

# -- shared pieces

node("StringMatch",
     exact=s(A(T_MATCH + "test_uri_match_kinds")),
     prefix=s(A(T_MATCH + "test_uri_match_kinds")),
     regex=s(A(T_MATCH + "test_uri_match_kinds")))
node("Headers",
     request=obj(A(T_INPROC + "test_header_operations_on_request_and_response"), "HeaderOperations"),
     response=obj(A(T_INPROC + "test_header_operations_on_request_and_response"), "HeaderOperations"))
node("HeaderOperations",
     set=mapping(A(T_XFORM + "test_header_operations_set_replaces_add_appends_remove_deletes")),
     add=mapping(A(T_XFORM + "test_header_operations_set_replaces_add_appends_remove_deletes")),
     remove=arr(A(T_XFORM + "test_header_operations_set_replaces_add_appends_remove_deletes"), "string"))
node("Destination",
     host=s(A(T_HTTP + "test_request_reaches_the_service_entry_endpoint_by_host")),
     subset=s(A(T_SNAP + "test_clusters_are_named_istio_style_and_filtered_by_subset_labels")),
     port=obj(A(T_SNAP + "test_registered_workloads_merge_into_service_entry_endpoints_by_port_name"),
              "PortSelector"))
node("PortSelector",
     number=i(A(T_SNAP + "test_registered_workloads_merge_into_service_entry_endpoints_by_port_name")))
node("Percent", value=n(A(T_XFORM + "test_fault_percentages_follow_the_rng")))
node("WorkloadSelector", labels=mapping(A(T_LIST + "test_sidecar_ingress_and_http_egress_listeners_from_the_istio_sample")))
node("Port",
     number=i(A(T_LIST + "test_sidecar_ingress_and_http_egress_listeners_from_the_istio_sample")),
     protocol=s(A(T_LIST + "test_sidecar_tcp_egress_listener_forwards_to_the_single_service_in_scope")),
     name=s(A(T_SNAP + "test_registered_workloads_merge_into_service_entry_endpoints_by_port_name")),
     targetPort=i(A(T_SNAP + "test_clusters_are_named_istio_style_and_filtered_by_subset_labels")))

# -- VirtualService

node("VirtualService",
     hosts=arr(A(T_SNAP + "test_all_kubernetes_host_aliases_reach_the_same_virtual_host"), "string"),
     gateways=arr(A(T_SNAP + "test_gateway_merges_virtual_services_for_one_host_with_catch_alls_last"), "string"),
     http=arr(A(T_INPROC + "test_inprocess_worker_forwards_a_request"), "HTTPRoute"),
     tls=arr(A(_T_PASS, "Gateway PASSTHROUGH servers, and TLS servers that terminate (routed on the "
                        "handshake's SNI: " + T_GWTCP + "test_simple_terminates_with_the_sni_certificate_and_routes_"
                        "by_sni); on sidecars the compiler warns that they are not applied"),
             "TLSRoute"),
     tcp=arr(A(T_TCPL + "test_sidecar_egress_tcp_listener_relays_bytes_and_propagates_half_close"), "TCPRoute"),
     exportTo=arr(A(T_PUSH + "test_export_to_dot_hides_a_resource_from_other_namespaces"), "string"))
node("HTTPRoute",
     name=s(A(T_MATCH + "test_first_matching_route_wins_even_if_a_later_one_is_more_specific")),
     match=arr(A(T_MATCH + "test_match_blocks_are_ored_and_the_matching_block_is_returned"), "HTTPMatchRequest"),
     route=arr(A(T_INPROC + "test_weighted_split_is_exact_within_one_and_zero_weight_gets_nothing"),
               "HTTPRouteDestination"),
     redirect=obj(A(T_INPROC + "test_redirect_and_direct_response_are_answered_by_the_proxy"), "HTTPRedirect"),
     directResponse=obj(A(T_INPROC + "test_redirect_and_direct_response_are_answered_by_the_proxy"),
                        "HTTPDirectResponse"),
     delegate=obj(Warned("VirtualService delegation is not supported by this proxy; the route is ignored"),
                  "Delegate"),
     rewrite=obj(A(T_XFORM + "test_prefix_rewrite_replaces_only_the_matched_prefix_and_keeps_the_query"),
                 "HTTPRewrite"),
     timeout=d(A(T_INPROC + "test_route_timeout_gives_504_for_a_slow_upstream")),
     retries=obj(A(T_INPROC + "test_retry_on_5xx_goes_to_another_attempt_and_succeeds"), "HTTPRetry"),
     fault=obj(A(T_INPROC + "test_fault_abort_and_delay"), "HTTPFaultInjection"),
     mirror=obj(A(T_INPROC + "test_mirror_sends_a_copy_with_shadow_host_and_never_changes_the_response"),
                "Destination"),
     mirrors=arr(A(T_INPROC + "test_mirror_sends_a_copy_with_shadow_host_and_never_changes_the_response"),
                 "HTTPMirrorPolicy"),
     mirrorPercent=i(A(T_INPROC + "test_mirror_percentage_is_followed")),
     mirrorPercentage=obj(A(T_INPROC + "test_mirror_percentage_is_followed"), "Percent"),
     corsPolicy=obj(A(T_XFORM + "test_a_matching_preflight_is_answered_with_the_policy_and_responses_get_cors_fields"),
                    "CorsPolicy"),
     headers=obj(A(T_INPROC + "test_header_operations_on_request_and_response"), "Headers"),
     websocketUpgrade=b(Warned("removed from Istio's API: WebSocket upgrades are always proxied, so false is not "
                               "applied", ok=(True,))))
node("HTTPMatchRequest",
     name=s(A(T_MATCH + "test_match_blocks_are_ored_and_the_matching_block_is_returned")),
     uri=obj(A(T_MATCH + "test_uri_match_kinds"), "StringMatch"),
     scheme=obj(A(T_MATCH + "test_method_authority_scheme_and_port_matches"), "StringMatch"),
     method=obj(A(T_MATCH + "test_method_authority_scheme_and_port_matches"), "StringMatch"),
     authority=obj(A(T_MATCH + "test_method_authority_scheme_and_port_matches"), "StringMatch"),
     headers=mapping(A(T_MATCH + "test_header_match_kinds_and_presence"), "StringMatch"),
     port=i(A(T_MATCH + "test_method_authority_scheme_and_port_matches")),
     sourceLabels=mapping(A(T_SNAP + "test_source_labels_select_matches_for_this_proxy_only")),
     gateways=arr(A(T_SNAP + "test_gateway_merges_virtual_services_for_one_host_with_catch_alls_last"), "string"),
     queryParams=mapping(A(T_MATCH + "test_query_params_exact_regex_empty_value_and_absence"), "StringMatch"),
     ignoreUriCase=b(A(T_MATCH + "test_uri_match_kinds")),
     withoutHeaders=mapping(A(T_MATCH + "test_without_headers_fails_the_block_if_any_of_them_matches"), "StringMatch"),
     sourceNamespace=s(A(T_SNAP + "test_source_labels_select_matches_for_this_proxy_only")),
     statPrefix=s(Warned("per-route stats prefixes are not supported by this proxy; ignored")))
node("HTTPRouteDestination",
     destination=obj(A(T_INPROC + "test_inprocess_worker_forwards_a_request"), "Destination"),
     weight=i(A(T_INPROC + "test_weighted_split_is_exact_within_one_and_zero_weight_gets_nothing")),
     headers=obj(A(T_INPROC + "test_header_operations_on_request_and_response"), "Headers"))
node("RouteDestination",
     destination=obj(A(T_TCPL + "test_sidecar_egress_tcp_listener_relays_bytes_and_propagates_half_close"),
                     "Destination"),
     weight=i(A(T_SPLIT + "test_weights_70_30_0_over_500_picks_are_exact_within_one_and_zero_weight_gets_none")))
node("Delegate", name=s(Warned("delegation is not supported")), namespace=s(Warned("delegation is not supported")))
node("HTTPRedirect",
     uri=s(A(T_XFORM + "test_redirect_builds_location_with_scheme_authority_and_code")),
     authority=s(A(T_XFORM + "test_redirect_builds_location_with_scheme_authority_and_code")),
     port=i(A(T_XFORM + "test_redirect_builds_location_with_scheme_authority_and_code")),
     derivePort=s(A(T_XFORM + "test_redirect_builds_location_with_scheme_authority_and_code"),
                  ("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT")),
     scheme=s(A(T_XFORM + "test_redirect_builds_location_with_scheme_authority_and_code")),
     redirectCode=i(A(T_XFORM + "test_redirect_builds_location_with_scheme_authority_and_code")),
     prefixRewrite=s(A(T_XFORM + "test_redirect_builds_location_with_scheme_authority_and_code")))
node("HTTPDirectResponse",
     status=i(A(T_XFORM + "test_direct_response_and_abort_fault")),
     body=obj(A(T_XFORM + "test_direct_response_and_abort_fault"), "HTTPBody"))
node("HTTPBody",
     string=s(A(T_XFORM + "test_direct_response_and_abort_fault")),
     bytes=s(A(T_XFORM + "test_direct_response_and_abort_fault")))
node("HTTPRewrite",
     uri=s(A(T_XFORM + "test_prefix_rewrite_replaces_only_the_matched_prefix_and_keeps_the_query")),
     authority=s(A(T_XFORM + "test_prefix_rewrite_replaces_only_the_matched_prefix_and_keeps_the_query")),
     uriRegexRewrite=obj(A(T_XFORM + "test_regex_rewrite"), "RegexRewrite"))
node("RegexRewrite", match=s(A(T_XFORM + "test_regex_rewrite")), rewrite=s(A(T_XFORM + "test_regex_rewrite")))
node("HTTPRetry",
     attempts=i(A(T_RETRY + "test_retries_stop_after_the_configured_number")),
     perTryTimeout=d(A(T_INPROC + "test_per_try_timeout_retries_then_succeeds")),
     retryOn=s(A(T_RETRY + "test_each_condition_retries_exactly_its_outcomes")),
     retryRemoteLocalities=b(Warned("locality-aware retries are not supported: retries go to any endpoint",
                                    ok=(False,))),
     retryIgnorePreviousHosts=b(A("tests/integration/test_retry_and_pool_fields_e2e.py::"
                                  "test_retry_ignore_previous_hosts_false_may_retry_the_failed_endpoint")),
     backoff=d(A(T_RETRY + "test_backoff_is_jittered_exponential_from_25ms_capped_at_10x")))
node("HTTPFaultInjection",
     delay=obj(A(T_INPROC + "test_fault_abort_and_delay"), "Delay"),
     abort=obj(A(T_INPROC + "test_fault_abort_and_delay"), "Abort"))
node("Delay",
     fixedDelay=d(A(T_INPROC + "test_fault_abort_and_delay")),
     exponentialDelay=d(Refused("exponentialDelay is not supported (Istio does not support it either)")),
     percentage=obj(A(T_XFORM + "test_fault_percentages_follow_the_rng"), "Percent"),
     percent=i(A(T_XFORM + "test_fault_percentages_follow_the_rng")))
node("Abort",
     httpStatus=i(A(T_XFORM + "test_direct_response_and_abort_fault")),
     grpcStatus=s(Warned("gRPC aborts are not supported by this proxy; ignored")),
     http2Error=s(Refused("HTTP/2 error aborts are not supported")),
     percentage=obj(A(T_XFORM + "test_fault_percentages_follow_the_rng"), "Percent"))
node("HTTPMirrorPolicy",
     destination=obj(A(T_INPROC + "test_mirror_sends_a_copy_with_shadow_host_and_never_changes_the_response"),
                     "Destination"),
     percentage=obj(A(T_INPROC + "test_mirror_percentage_is_followed"), "Percent"))
_T_CORS = T_XFORM + "test_a_matching_preflight_is_answered_with_the_policy_and_responses_get_cors_fields"
node("CorsPolicy",
     allowOrigins=arr(A(_T_CORS), "StringMatch"),
     allowOrigin=arr(A(_T_CORS), "string"),
     allowMethods=arr(A(_T_CORS), "string"),
     allowHeaders=arr(A(_T_CORS), "string"),
     exposeHeaders=arr(A(_T_CORS), "string"),
     maxAge=d(A(_T_CORS)),
     allowCredentials=b(A(_T_CORS)),
     unmatchedPreflights=s(A(T_XFORM + "test_a_preflight_the_policy_does_not_match_is_forwarded_unless_ignored"),
                           ("UNSPECIFIED", "FORWARD", "IGNORE")))
node("TCPRoute",
     match=arr(A(T_TCPL + "test_sidecar_egress_tcp_listener_relays_bytes_and_propagates_half_close"),
               "L4MatchAttributes"),
     route=arr(A(T_TCPL + "test_sidecar_egress_tcp_listener_relays_bytes_and_propagates_half_close"),
               "RouteDestination"))
node("L4MatchAttributes",
     destinationSubnets=arr(A(T_APPLY + "test_tcp_routes_match_destination_and_source_subnets_per_connection"),
                            "string"),
     port=i(A(T_LIST + "test_sidecar_tcp_egress_listener_forwards_to_the_single_service_in_scope")),
     sourceLabels=mapping(A(T_SNAP + "test_source_labels_select_matches_for_this_proxy_only")),
     gateways=arr(A(T_SNAP + "test_gateway_merges_virtual_services_for_one_host_with_catch_alls_last"), "string"),
     sourceNamespace=s(A(T_SNAP + "test_source_labels_select_matches_for_this_proxy_only")),
     sourceSubnet=s(A(T_APPLY + "test_tcp_routes_match_destination_and_source_subnets_per_connection")))
node("TLSRoute",
     match=arr(A(_T_PASS), "TLSMatchAttributes"),
     route=arr(A(_T_PASS), "RouteDestination"))
_TLS_MATCH_LATER = Warned("not applied to TLS routes yet: the route takes connections whatever this says")
node("TLSMatchAttributes",
     sniHosts=arr(A(_T_PASS), "string"),
     destinationSubnets=arr(_TLS_MATCH_LATER, "string"),
     port=i(A(_T_PASS)),
     sourceLabels=mapping(_TLS_MATCH_LATER),
     gateways=arr(A(_T_PASS), "string"),
     sourceNamespace=s(_TLS_MATCH_LATER))

# -- DestinationRule

node("DestinationRule",
     host=s(A(T_SNAP + "test_destination_rules_for_one_host_merge_first_policy_and_unique_subsets")),
     trafficPolicy=obj(A(T_SNAP + "test_policy_override_order_top_then_port_level_then_subset_then_subset_port_level"),
                       "TrafficPolicy"),
     subsets=arr(A(T_SNAP + "test_clusters_are_named_istio_style_and_filtered_by_subset_labels"), "Subset"),
     exportTo=arr(A(T_PUSH + "test_export_to_dot_hides_a_resource_from_other_namespaces"), "string"),
     workloadSelector=obj(A(T_SNAP + "test_destination_rule_workload_selector_applies_to_matching_proxies_only"),
                          "DRWorkloadSelector"))
node("DRWorkloadSelector",
     matchLabels=mapping(A(T_SNAP + "test_destination_rule_workload_selector_applies_to_matching_proxies_only")))
node("Subset",
     name=s(A(T_SNAP + "test_clusters_are_named_istio_style_and_filtered_by_subset_labels")),
     labels=mapping(A(T_SNAP + "test_clusters_are_named_istio_style_and_filtered_by_subset_labels")),
     trafficPolicy=obj(A(T_SNAP + "test_policy_override_order_top_then_port_level_then_subset_then_subset_port_level"),
                       "TrafficPolicy"))
_T_POLICY = T_SNAP + "test_policy_override_order_top_then_port_level_then_subset_then_subset_port_level"
node("TrafficPolicy",
     loadBalancer=obj(A(_T_POLICY), "LoadBalancerSettings"),
     connectionPool=obj(A(_T_POLICY), "ConnectionPoolSettings"),
     outlierDetection=obj(A(T_INPROC + "test_outlier_detection_ejects_a_failing_endpoint"), "OutlierDetection"),
     tls=obj(A(_T_SIMPLE_TLS), "ClientTLSSettings"),
     portLevelSettings=arr(A(_T_POLICY), "PortTrafficPolicy"),
     tunnel=anything(Warned("HTTP CONNECT tunnelling is not supported by this proxy; ignored")),
     proxyProtocol=anything(Warned("PROXY protocol to upstreams is not supported by this proxy; ignored")),
     retryBudget=anything(Warned("per-cluster retry budgets are not configurable in this proxy (the mesh "
                                 "default of 20% applies); ignored")))
node("PortTrafficPolicy",
     port=obj(A(_T_POLICY), "PortSelector"),
     loadBalancer=obj(A(_T_POLICY), "LoadBalancerSettings"),
     connectionPool=obj(A(_T_POLICY), "ConnectionPoolSettings"),
     outlierDetection=obj(A(_T_POLICY), "OutlierDetection"),
     tls=obj(A(_T_SIMPLE_TLS), "ClientTLSSettings"))
node("LoadBalancerSettings",
     simple=s(A(T_BAL + "test_round_robin_visits_every_endpoint_in_turn"),
              ("UNSPECIFIED", "LEAST_CONN", "LEAST_REQUEST", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN")),
     consistentHash=obj(A(T_BAL + "test_ring_hash_same_key_same_endpoint_and_keys_spread"), "ConsistentHashLB"),
     localityLbSetting=obj(Warned("locality-weighted load balancing is not supported; endpoints are picked "
                                  "regardless of locality"), "LocalityLoadBalancerSetting"),
     warmupDurationSecs=d(A(T_BAL + "test_slow_start_gives_a_new_endpoint_a_linearly_ramping_share")),
     warmup=obj(A(T_BAL + "test_slow_start_gives_a_new_endpoint_a_linearly_ramping_share"), "WarmupConfiguration"))
node("WarmupConfiguration",
     duration=d(A(T_BAL + "test_slow_start_gives_a_new_endpoint_a_linearly_ramping_share")),
     minimumPercent=n(Warned("slow start always begins at 0% of the traffic share in this proxy")),
     aggression=n(Warned("slow start always ramps linearly in this proxy", ok=(1, 1.0))))
_LOCALITY = Warned("locality load balancing is not supported")
node("LocalityLoadBalancerSetting",
     distribute=arr(_LOCALITY, "LocalityDistribute"), failover=arr(_LOCALITY, "LocalityFailover"),
     failoverPriority=arr(_LOCALITY, "string"), enabled=b(_LOCALITY))
node("LocalityDistribute", **{"from": s(_LOCALITY), "to": mapping(_LOCALITY, "integer")})
node("LocalityFailover", **{"from": s(_LOCALITY), "to": s(_LOCALITY)})
_T_HASH = T_SPLIT + "test_hash_policy_comes_from_the_destination_cluster_and_keys_come_from_the_request"
node("ConsistentHashLB",
     httpHeaderName=s(A(_T_HASH)),
     httpCookie=obj(A(T_INPROC + "test_sticky_canary_keeps_each_user_on_one_version"), "HTTPCookie"),
     useSourceIp=b(A(T_APPLY + "test_use_source_ip_false_does_not_stick_a_client_to_one_endpoint")),
     httpQueryParameterName=s(A(_T_HASH)),
     ringHash=obj(A(T_BAL + "test_ring_hash_same_key_same_endpoint_and_keys_spread"), "RingHash"),
     maglev=obj(A(T_BAL + "test_maglev_is_sticky_balanced_and_mostly_stable_on_removal"), "MagLev"),
     minimumRingSize=i(A(T_BAL + "test_ring_hash_same_key_same_endpoint_and_keys_spread")))
node("RingHash", minimumRingSize=i(A(T_BAL + "test_ring_hash_same_key_same_endpoint_and_keys_spread")))
node("MagLev", tableSize=i(A(T_BAL + "test_maglev_is_sticky_balanced_and_mostly_stable_on_removal")))
node("HTTPCookie",
     name=s(A(T_INPROC + "test_sticky_canary_keeps_each_user_on_one_version")),
     path=s(A(T_INPROC + "test_sticky_canary_keeps_each_user_on_one_version")),
     ttl=d(A(T_INPROC + "test_sticky_canary_keeps_each_user_on_one_version")),
     attributes=arr(Warned("extra cookie attributes are not written by this proxy"), "CookieAttribute"))
node("CookieAttribute", name=s(Warned("cookie attributes are not written")),
     value=s(Warned("cookie attributes are not written")))
_T_CB = T_SNAP + "test_circuit_breaker_thresholds_map_like_istiod_and_zero_means_unset"
_T_TCPPOOL = T_APPLY + "test_tcp_keepalive_idle_timeout_and_max_connection_duration_apply_to_tcp_connections"
_TCP_ONLY = ("applied to TCP proxy connections; on HTTP clusters the compiler warns: HTTP upstream connections "
             "close after connectionPool.http.idleTimeout, as in Istio")
_T_HTTPDUR = ("tests/integration/test_retry_and_pool_fields_e2e.py::"
              "test_max_connection_duration_retires_http_upstream_connections")
_T_HTTPKA = ("tests/integration/test_retry_and_pool_fields_e2e.py::"
             "test_tcp_keepalive_is_set_on_http_upstream_connections")
node("ConnectionPoolSettings",
     tcp=obj(A(_T_CB), "TCPSettings"),
     http=obj(A(_T_CB), "HTTPSettings"))
node("TCPSettings",
     maxConnections=i(A(T_RES + "test_connections_overflow_at_max_connections")),
     connectTimeout=d(A(T_SNAP + "test_routes_carry_istio_defaults_and_compiled_values")),
     tcpKeepalive=obj(A(_T_HTTPKA, "HTTP upstream connections; TCP proxy connections: " + _T_TCPPOOL),
                      "TcpKeepalive"),
     maxConnectionDuration=d(A(_T_HTTPDUR, "HTTP upstream connections; TCP proxy connections: " + _T_TCPPOOL)),
     idleTimeout=d(A(_T_TCPPOOL, _TCP_ONLY)))
node("TcpKeepalive", probes=i(A(_T_TCPPOOL)), time=d(A(_T_TCPPOOL)), interval=d(A(_T_TCPPOOL)))
_H2 = "this proxy speaks HTTP/1.1 to upstreams; HTTP/2 settings do not apply"
node("HTTPSettings",
     http1MaxPendingRequests=i(A(T_RES + "test_pending_requests_overflow_at_the_limit_and_free_on_release")),
     http2MaxRequests=i(A(T_INPROC + "test_http2_max_requests_caps_requests_in_flight_on_the_cluster")),
     maxRequestsPerConnection=i(A(T_INPROC + "test_circuit_breaker_queues_at_max_connections_and_overflows_past_pending")),
     maxRetries=i(A(T_RES + "test_max_retries_caps_concurrent_retries")),
     idleTimeout=d(A(T_SNAP + "test_circuit_breaker_thresholds_map_like_istiod_and_zero_means_unset")),
     h2UpgradePolicy=s(Warned(_H2, ok=("DEFAULT", "DO_NOT_UPGRADE")), ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")),
     useClientProtocol=b(Warned(_H2)),
     maxConcurrentStreams=i(Warned(_H2)),
     http2KeepAlive=obj(Warned(_H2), "HTTP2KeepAlive"))
node("HTTP2KeepAlive", interval=d(Warned(_H2)), timeout=d(Warned(_H2)))
node("OutlierDetection",
     consecutiveErrors=i(A(T_RES + "test_endpoint_is_ejected_after_n_consecutive_5xx_and_not_before")),
     consecutive5xxErrors=i(A(T_RES + "test_endpoint_is_ejected_after_n_consecutive_5xx_and_not_before")),
     consecutiveGatewayErrors=i(A(T_RES + "test_gateway_errors_eject_on_their_own_threshold_and_500_resets_that_count")),
     consecutiveLocalOriginFailures=i(A(T_APPLY + "test_outlier_local_origin_failures_eject_on_their_own_threshold_when_split")),
     splitExternalLocalOriginErrors=b(A(T_APPLY + "test_outlier_local_origin_failures_eject_on_their_own_threshold_when_split")),
     interval=d(A(T_RES + "test_times_ejected_decays_by_one_per_healthy_interval")),
     baseEjectionTime=d(A(T_RES + "test_endpoint_returns_when_the_ejection_time_passes_and_the_time_grows_with_each_ejection")),
     maxEjectionPercent=i(A(T_RES + "test_max_ejection_percent_caps_how_many_endpoints_are_ejected")),
     minHealthPercent=i(A(T_RES + "test_panic_mode_uses_all_endpoints_when_healthy_share_is_below_min_health")),
     outlierDetectionHttpErrorCodes=arr(A(T_APPLY + "test_outlier_http_error_codes_count_listed_statuses_as_errors"),
                                        "integer"))
T_ORIG = "tests/integration/test_tls_origination.py::"
T_UPTLS = "tests/unit/test_upstream_tls_config.py::"
_T_SIMPLE = T_ORIG + "test_simple_verifies_the_server_and_sends_the_sni"
_T_REFUSE = T_ORIG + "test_simple_refuses_a_server_it_cannot_verify_never_plaintext"
node("ClientTLSSettings",
     mode=s(A(_T_SIMPLE, "SIMPLE, MUTUAL and ISTIO_MUTUAL originate TLS; DISABLE turns auto mTLS off"),
            ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")),
     clientCertificate=s(A(T_ORIG + "test_mutual_presents_the_client_certificate_files")),
     privateKey=s(A(T_ORIG + "test_mutual_presents_the_client_certificate_files")),
     caCertificates=s(A(_T_SIMPLE)),
     credentialName=s(A(T_ORIG + "test_credential_name_gives_a_gateway_the_client_certificate_from_a_secret",
                        "a Secret in the proxy's namespace (client certificate, key, CA; or <name>-cacert); on "
                        "gateways, and on sidecars only from a DestinationRule with a workloadSelector (Istio): "
                        "elsewhere, or missing, the compiler warns and connections are refused")),
     subjectAltNames=arr(A(_T_REFUSE), "string"),
     sni=s(A(_T_REFUSE)),
     insecureSkipVerify=b(A(_T_REFUSE)),
     caCrl=s(Refused("certificate revocation lists are not checked by this proxy; refused")))

# -- ServiceEntry

node("ServiceEntry",
     hosts=arr(A(T_HTTP + "test_request_reaches_the_service_entry_endpoint_by_host"), "string"),
     addresses=arr(Warned("VIP addresses are not captured by this proxy yet; traffic is routed by host name"),
                   "string"),
     ports=arr(A(T_HTTP + "test_request_reaches_the_service_entry_endpoint_by_host"), "ServicePort"),
     location=s(Inert("no routing effect; auto mTLS follows each endpoint's security.istio.io/tlsMode label "
                      "(as Istio's does), not the location"),
                ("MESH_EXTERNAL", "MESH_INTERNAL")),
     resolution=s(A(T_HTTP + "test_dns_service_entry_endpoints_are_resolved_by_the_proxy"),
                  ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS")),
     endpoints=arr(A(T_HTTP + "test_request_reaches_the_service_entry_endpoint_by_host"), "WorkloadEntry"),
     workloadSelector=obj(Warned("selecting workloads is not supported; register endpoints through the "
                                 "control plane"), "WorkloadSelector"),
     exportTo=arr(A(T_PUSH + "test_export_to_dot_hides_a_resource_from_other_namespaces"), "string"),
     subjectAltNames=arr(A(T_UPTLS + "test_auto_mtls_only_for_endpoints_with_a_sidecar_and_checks_the_services_identities"),
                         "string"))
node("ServicePort",
     number=i(A(T_HTTP + "test_request_reaches_the_service_entry_endpoint_by_host")),
     protocol=s(A(T_LIST + "test_sidecar_tcp_egress_listener_forwards_to_the_single_service_in_scope")),
     name=s(A(T_SNAP + "test_registered_workloads_merge_into_service_entry_endpoints_by_port_name")),
     targetPort=i(A(T_SNAP + "test_clusters_are_named_istio_style_and_filtered_by_subset_labels")))
node("WorkloadEntry",
     address=s(A(T_HTTP + "test_request_reaches_the_service_entry_endpoint_by_host")),
     ports=mapping(A(T_SNAP + "test_registered_workloads_merge_into_service_entry_endpoints_by_port_name"), "integer"),
     labels=mapping(A(T_SNAP + "test_clusters_are_named_istio_style_and_filtered_by_subset_labels")),
     network=s(Warned("multi-network meshes are not supported; the endpoint is reached directly")),
     locality=s(Inert("only used by locality load balancing, which is warned about where it is set")),
     weight=i(A(T_BAL + "test_round_robin_with_weights_follows_the_weights_exactly")),
     serviceAccount=s(A(T_UPTLS + "test_auto_mtls_only_for_endpoints_with_a_sidecar_and_checks_the_services_identities")))

# -- Gateway

node("Gateway",
     selector=mapping(A(T_SNAP + "test_gateway_with_non_matching_selector_makes_no_listener")),
     servers=arr(A(T_GW + "test_https_gateway_picks_the_certificate_by_sni_and_routes_by_host"), "Server"))
node("Server",
     port=obj(A(T_GW + "test_https_gateway_picks_the_certificate_by_sni_and_routes_by_host"), "Port"),
     bind=s(A(T_LIST + "test_https_gateway_server_gets_tls_settings_and_http_server_redirects")),
     hosts=arr(A(T_GW + "test_https_gateway_picks_the_certificate_by_sni_and_routes_by_host"), "string"),
     tls=obj(A(T_GW + "test_https_gateway_picks_the_certificate_by_sni_and_routes_by_host"), "ServerTLSSettings"),
     defaultEndpoint=s(Warned("gateway servers forward by route, not to a default endpoint; ignored")),
     name=s(Inert("a label for the server in Istio's status and stats")))
_T_GWTLS = T_GW + "test_https_gateway_picks_the_certificate_by_sni_and_routes_by_host"
T_GWM = "tests/integration/test_gateway_mutual_tls.py::"
_T_MUTUAL = T_GWM + "test_mutual_requires_a_client_certificate_from_the_ca_certificates"
_T_PINS = T_GWM + "test_subject_alt_names_and_certificate_pins_refuse_other_clients"
node("ServerTLSSettings",
     httpsRedirect=b(A(T_LIST + "test_https_gateway_server_gets_tls_settings_and_http_server_redirects")),
     mode=s(Warned("AUTO_PASSTHROUGH (SNI-encoded cluster names of multi-network east-west gateways) is not "
                   "supported; the server is not served",
                   ok=("SIMPLE", "PASSTHROUGH", "MUTUAL", "OPTIONAL_MUTUAL", "ISTIO_MUTUAL")),
            ("PASSTHROUGH", "SIMPLE", "MUTUAL", "AUTO_PASSTHROUGH", "ISTIO_MUTUAL", "OPTIONAL_MUTUAL"),
            doc="SIMPLE, MUTUAL, OPTIONAL_MUTUAL, ISTIO_MUTUAL terminate (" + _T_MUTUAL + ", "
                + T_GWM + "test_istio_mutual_terminates_with_the_workload_certificate_and_wants_a_mesh_client); "
                "on TLS servers the stream is then routed as TCP ("
                + T_GWTCP + "test_mutual_refuses_clients_without_a_certificate_or_from_another_ca); "
                "PASSTHROUGH routes on SNI"),
     serverCertificate=s(A(_T_GWTLS)),
     privateKey=s(A(_T_GWTLS)),
     caCertificates=s(A(_T_MUTUAL, "the MUTUAL modes; with SIMPLE the decoder warns that it is not used")),
     caCrl=s(Refused("certificate revocation lists are " + SECURITY_LATER)),
     credentialName=s(A(T_CRED + "test_credential_name_resolves_in_the_gateway_proxys_namespace_with_its_cacert",
                         "a Secret in the gateway proxy's namespace (pushed by the control plane, or a Secret "
                         "document in the proxy's config files); missing: the server is not served, with a warning")),
     credentialNames=arr(Refused("credentialNames (several certificates per server) is not supported; use "
                                 "credentialName"), "string"),
     subjectAltNames=arr(A(_T_PINS, "the client certificate must carry one of them (any SAN type, exact)"),
                         "string"),
     verifyCertificateSpki=arr(A(_T_PINS), "string"),
     verifyCertificateHash=arr(A(_T_PINS), "string"),
     minProtocolVersion=s(A(T_GWTLS + "test_min_protocol_version_refuses_older_clients"),
                          ("TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3")),
     maxProtocolVersion=s(A(T_GWTLS + "test_max_protocol_version_caps_the_negotiated_version"),
                          ("TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3")),
     cipherSuites=arr(A(T_GWTLS + "test_cipher_suites_limit_what_a_tls12_client_may_use"), "string"),
     tlsCertificates=anything(Refused("tlsCertificates is not supported: use serverCertificate and privateKey, "
                                      "or credentialName")))

# -- Sidecar

_T_SIDECAR = T_LIST + "test_sidecar_ingress_and_http_egress_listeners_from_the_istio_sample"
node("Sidecar",
     workloadSelector=obj(A(T_PUSH + "test_proxies_differing_only_in_labels_share_one_target_unless_a_sidecar_selects_by_label"),
                          "WorkloadSelector"),
     ingress=arr(A(_T_SIDECAR), "IstioIngressListener"),
     egress=arr(A(T_LIST + "test_sidecar_egress_hosts_scope_the_default_route_table"), "IstioEgressListener"),
     inboundConnectionPool=obj(Warned("inbound connection pools are not supported; ignored"),
                               "ConnectionPoolSettings"),
     outboundTrafficPolicy=obj(A(T_LIST + "test_sidecar_egress_hosts_scope_the_default_route_table"),
                               "OutboundTrafficPolicy"))
node("IstioIngressListener",
     port=obj(A(_T_SIDECAR), "Port"),
     bind=s(A(_T_SIDECAR)),
     captureMode=s(Warned("traffic capture is not configured by this proxy yet", ok=("DEFAULT",)),
                   ("DEFAULT", "IPTABLES", "NONE")),
     defaultEndpoint=s(A(_T_SIDECAR)),
     tls=obj(Refused("TLS termination on sidecar ingress is " + SECURITY_LATER), "ServerTLSSettings"),
     connectionPool=obj(Warned("inbound connection pools are not supported; ignored"), "ConnectionPoolSettings"))
node("IstioEgressListener",
     port=obj(A(T_LIST + "test_sidecar_tcp_egress_listener_forwards_to_the_single_service_in_scope"), "Port"),
     bind=s(A(_T_SIDECAR)),
     captureMode=s(Warned("traffic capture is not configured by this proxy yet", ok=("DEFAULT",)),
                   ("DEFAULT", "IPTABLES", "NONE")),
     hosts=arr(A(T_LIST + "test_sidecar_egress_hosts_scope_the_default_route_table"), "string"))
node("OutboundTrafficPolicy",
     mode=s(A(T_APPLY + "test_outbound_traffic_policy_on_an_egress_listener_passes_unknown_hosts_only_with_allow_any",
              "explicit HTTP egress listeners; captured traffic arrives with the sidecar work"),
            ("REGISTRY_ONLY", "ALLOW_ANY")),
     egressProxy=obj(Warned("egress proxies are not supported; ignored"), "Destination"))

# -- security.istio.io (decoded in decode_security.py)

T_SEC = "tests/unit/test_security_policy.py::"
_T_MATRIX = T_SEC + "test_istio_task_http_traffic_matrix"
_T_DENY = T_SEC + "test_istio_task_deny_matrix_with_not_values_and_ip_blocks"
_T_STRINGS = T_SEC + "test_strings_paths_hosts_headers_and_ports"
_T_SCOPE = T_SEC + "test_scope_root_namespace_selector_and_gateway_target_refs"
_T_SA = T_SEC + "test_service_accounts_and_namespaces_read_the_principal"
_JWT = Refused("JWT authentication (RequestAuthentication) is not supported by this mesh; refused")
node("AuthorizationPolicy",
     selector=obj(A(_T_SCOPE), "SecurityWorkloadSelector"),
     targetRef=obj(A(_T_SCOPE), "PolicyTargetReference"),
     targetRefs=arr(A(_T_SCOPE), "PolicyTargetReference"),
     rules=arr(A(_T_MATRIX), "Rule"),
     action=s(A(T_SEC + "test_deny_wins_over_allow_and_audit_never_decides"), ("ALLOW", "DENY", "AUDIT", "CUSTOM")),
     provider=anything(Refused("only valid with action CUSTOM, which is not supported")))
node("SecurityWorkloadSelector", matchLabels=mapping(A(_T_SCOPE)))
node("PolicyTargetReference", group=s(A(_T_SCOPE)), kind=s(A(_T_SCOPE)), name=s(A(_T_SCOPE)),
     namespace=s(A(_T_SCOPE)))
node("Rule", **{"from": arr(A(_T_MATRIX), "RuleFrom"), "to": arr(A(_T_MATRIX), "RuleTo"),
                "when": arr(A(_T_DENY), "Condition")})
node("RuleFrom", source=obj(A(_T_MATRIX), "Source"))
node("RuleTo", operation=obj(A(_T_MATRIX), "Operation"))
node("Source",
     principals=arr(A(_T_SA), "string"), notPrincipals=arr(A(_T_SA), "string"),
     namespaces=arr(A(_T_SA), "string"), notNamespaces=arr(A(_T_SA), "string"),
     ipBlocks=arr(A(_T_DENY), "string"), notIpBlocks=arr(A(_T_DENY), "string"),
     remoteIpBlocks=arr(A(_T_DENY), "string"), notRemoteIpBlocks=arr(A(_T_DENY), "string"),
     serviceAccounts=arr(A(_T_SA), "string"), notServiceAccounts=arr(A(_T_SA), "string"),
     requestPrincipals=arr(_JWT, "string"), notRequestPrincipals=arr(_JWT, "string"))
node("Operation",
     hosts=arr(A(_T_STRINGS), "string"), notHosts=arr(A(_T_STRINGS), "string"),
     ports=arr(A(_T_STRINGS), "string"), notPorts=arr(A(_T_STRINGS), "string"),
     methods=arr(A(_T_MATRIX), "string"), notMethods=arr(A(_T_DENY), "string"),
     paths=arr(A(_T_STRINGS), "string"), notPaths=arr(A(_T_STRINGS), "string"))
node("Condition", key=s(A(_T_DENY)), values=arr(A(_T_DENY), "string"), notValues=arr(A(_T_DENY), "string"))
_T_PEER = T_SEC + "test_peer_authentication_permissive_reaches_the_inbound_listener"
node("PeerAuthentication",
     selector=obj(A(T_SEC + "test_peer_authentication_precedence_workload_over_namespace_over_mesh"),
                  "SecurityWorkloadSelector"),
     mtls=obj(A(_T_PEER), "PeerAuthenticationMTLS"),
     portLevelMtls=mapping(A(T_SEC + "test_peer_authentication_precedence_workload_over_namespace_over_mesh"),
                           "PeerAuthenticationMTLS"))
node("PeerAuthenticationMTLS", mode=s(A(_T_PEER), ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")))


NODES: Mapping[str, Node] = MappingProxyType(_NODES)
KIND_NODES: Mapping[str, str] = MappingProxyType({
    "VirtualService": "VirtualService", "DestinationRule": "DestinationRule", "ServiceEntry": "ServiceEntry",
    "Gateway": "Gateway", "Sidecar": "Sidecar", "AuthorizationPolicy": "AuthorizationPolicy",
    "PeerAuthentication": "PeerAuthentication"})


def walk(root: str, prefix: str = ""):
    """Every (path, Field) reachable from node ``root``, depth first; a node met again on the
    way down (recursion) is not entered twice.  Paths read like ``http[].retries.attempts``."""
    seen: set[str] = set()

    def visit(name: str, path: str):
        if name in seen:
            return
        seen.add(name)
        for key, f in NODES[name].fields.items():
            here = f"{path}.{key}" if path else key
            if f.type == "array":
                here += "[]"
            elif f.type == "map":
                here += ".*"
            yield here, f
            if f.node:
                yield from visit(f.node, here)
        seen.discard(name)

    yield from visit(root, prefix)


_SCALARS = {"string": {"type": "string"}, "integer": {"type": "integer"}, "number": {"type": "number"},
            "boolean": {"type": "boolean"}, "duration": {"type": "string", "format": "duration"},
            "any": {"x-kubernetes-preserve-unknown-fields": True}}


def openapi_v3(root: str) -> dict:
    """The OpenAPI v3 schema of node ``root`` (as a Kubernetes CRD's ``openAPIV3Schema``
    would hold it): types, enums, descriptions with each field's status."""
    def describe(f: Field) -> str:
        st = f.status
        note = {Applied: "", Warned: "accepted, not applied: ", Refused: "refused: ", Inert: ""}[type(st)]
        text = getattr(st, "message", "") if isinstance(st, (Warned, Refused)) else ""
        return (f.doc + (" " if f.doc and note else "") + note + text).strip()

    def of(f: Field, depth: int) -> dict:
        if f.node:
            item = schema(f.node, depth + 1)
        else:
            item = dict(_SCALARS.get(f.items or f.type, {"type": "string"}))
        if f.type == "array":
            out = {"type": "array", "items": item}
        elif f.type == "map":
            out = {"type": "object", "additionalProperties": item}
        else:
            out = item if f.node else dict(_SCALARS[f.type])
        if f.enum:
            out["enum"] = list(f.enum)
        text = describe(f)
        if text:
            out["description"] = text
        return out

    def schema(name: str, depth: int) -> dict:
        if depth > 12:
            return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        return {"type": "object", "properties": {k: of(f, depth) for k, f in NODES[name].fields.items()}}

    return schema(root, 0)


def openapi_spec_schema(kind: str) -> dict | None:
    """The ``spec`` schema of ``kind`` (None for a kind the registry does not describe)."""
    return openapi_v3(KIND_NODES[kind]) if kind in KIND_NODES else None
