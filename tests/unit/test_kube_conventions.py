"""Kubernetes API conventions in controlplane.kube: selectors, patches, field ownership, tables."""
from __future__ import annotations

import pytest

from controlplane import kube
from controlplane.resources import BY_KIND
from controlplane.store import BadRequest, Conflict


def obj(spec: dict, labels: dict | None = None, managed: list | None = None) -> dict:
    md = {"name": "r", "namespace": "default", "resourceVersion": "1"}
    if labels is not None:
        md["labels"] = labels
    if managed is not None:
        md["managedFields"] = managed
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": md, "spec": spec}


@pytest.mark.parametrize("selector, labels, expected", [
    ("app=web", {"app": "web"}, True),
    ("app==web", {"app": "api"}, False),
    ("app!=web", {}, True),                         # != matches objects without the key
    ("app in (web, api),tier", {"app": "api", "tier": "x"}, True),
    ("app in (web, api),tier", {"app": "api"}, False),
    ("app notin (web)", {}, True),
    ("!legacy", {"legacy": "yes"}, False),
    ("replicas>2", {"replicas": "3"}, True),
    ("replicas<2", {"replicas": "x"}, False),
    ("example.com/team=a", {"example.com/team": "a"}, True),
])
def test_label_selector_semantics(selector, labels, expected):
    assert all(r.matches(labels) for r in kube.parse_label_selector(selector)) is expected


def test_an_empty_label_value_is_valid():
    assert kube.parse_label_selector("app=")[0].matches({"app": ""})


@pytest.mark.parametrize("bad", ["app in web", "=web", "a b=c", "!app=web", "n>x"])
def test_malformed_label_selectors_are_bad_requests(bad):
    with pytest.raises(BadRequest):
        kube.parse_label_selector(bad)


def test_field_selectors_take_name_and_namespace_only():
    fields = kube.parse_field_selector("metadata.name=r,metadata.namespace!=prod")
    assert kube.selected(obj({}), (), fields)
    assert not kube.selected(obj({}), (), kube.parse_field_selector("metadata.name=other"))
    with pytest.raises(BadRequest, match="field label not supported: spec.hosts"):
        kube.parse_field_selector("spec.hosts=x")


def test_merge_patch_follows_rfc_7386():
    target = {"a": "b", "c": {"d": "e", "f": "g"}, "list": [1, 2]}
    patch = {"a": "z", "c": {"f": None}, "list": [3]}
    assert kube.merge_patch(target, patch) == {"a": "z", "c": {"d": "e"}, "list": [3]}
    assert target == {"a": "b", "c": {"d": "e", "f": "g"}, "list": [1, 2]}       # not mutated


def test_json_patch_operations_and_failed_test_changes_nothing():
    doc = {"spec": {"hosts": ["a"], "x": 1}}
    out = kube.json_patch(doc, [{"op": "add", "path": "/spec/hosts/-", "value": "b"},
                                {"op": "replace", "path": "/spec/x", "value": 2},
                                {"op": "copy", "from": "/spec/x", "path": "/spec/y"},
                                {"op": "move", "from": "/spec/y", "path": "/spec/z"},
                                {"op": "remove", "path": "/spec/hosts/0"},
                                {"op": "test", "path": "/spec/z", "value": 2}])
    assert out == {"spec": {"hosts": ["b"], "x": 2, "z": 2}}
    with pytest.raises(kube.Invalid):
        kube.json_patch(doc, [{"op": "replace", "path": "/spec/x", "value": 5}, {"op": "test", "path": "/spec/x", "value": 1}])
    with pytest.raises(BadRequest, match="does not exist"):
        kube.json_patch(doc, [{"op": "remove", "path": "/spec/nope"}])
    assert doc == {"spec": {"hosts": ["a"], "x": 1}}


def test_apply_conflicts_with_another_managers_different_value_unless_forced():
    live = kube.apply(None, obj({"hosts": ["a"], "gateways": ["g"]}), "alice", force=False)
    assert {e["manager"] for e in live["metadata"]["managedFields"]} == {"alice"}
    with pytest.raises(kube.ApplyConflict) as conflict:
        kube.apply(live, obj({"hosts": ["b"]}), "bob", force=False)
    assert conflict.value.causes == [{"reason": "FieldManagerConflict", "field": ".spec.hosts",
                                      "message": 'conflict with "alice" using networking.istio.io/v1'}]
    assert isinstance(conflict.value, Conflict)
    shared = kube.apply(live, obj({"hosts": ["a"]}), "bob", force=False)        # same value: co-owned
    assert shared["spec"] == {"hosts": ["a"], "gateways": ["g"]}
    forced = kube.apply(live, obj({"hosts": ["b"]}), "bob", force=True)
    owners = {e["manager"]: kube.paths_of(e["fieldsV1"]) for e in forced["metadata"]["managedFields"]}
    assert forced["spec"]["hosts"] == ["b"]
    assert owners == {"alice": {("spec", "gateways")}, "bob": {("spec", "hosts")}}


def test_apply_removes_fields_the_applier_stopped_sending_unless_someone_else_owns_them():
    live = kube.apply(None, obj({"hosts": ["a"], "gateways": ["g"], "exportTo": ["."]}, labels={"x": "1"}), "alice", False)
    live = kube.apply(live, obj({"hosts": ["a"], "exportTo": ["."]}), "bob", False)     # bob co-owns two
    after = kube.apply(live, obj({"hosts": ["a"]}), "alice", False)
    assert after["spec"] == {"hosts": ["a"], "exportTo": ["."]}                          # gateways gone; exportTo kept (bob)
    assert "labels" not in after["metadata"]


def test_updates_take_ownership_of_what_they_change():
    live = kube.apply(None, obj({"hosts": ["a"], "gateways": ["g"]}), "alice", False)
    new = obj({"hosts": ["b"], "gateways": ["g"]}, labels={"t": "1"})
    managed = kube.record_update(live, new, "kubectl-edit")
    owners = {e["manager"]: kube.paths_of(e["fieldsV1"]) for e in managed}
    assert owners == {"alice": {("spec", "gateways")},
                      "kubectl-edit": {("spec", "hosts"), ("metadata", "labels", "t")}}


def test_table_has_istio_columns_and_ages():
    vs = obj({"hosts": ["r"], "gateways": ["gw"]})
    vs["metadata"]["creationTimestamp"] = "2026-12-07T10:00:00Z"
    table = kube.table(BY_KIND["VirtualService"], [vs], {"resourceVersion": "1"},
                       now=kube.calendar.timegm((2026, 12, 7, 10, 5, 30, 0, 0, 0)))
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Gateways", "Hosts", "Age"]
    assert table["rows"][0]["cells"] == ["r", '["gw"]', '["r"]', "5m30s"]
    assert table["rows"][0]["object"]["kind"] == "PartialObjectMetadata"


@pytest.mark.parametrize("seconds, text", [(5, "5s"), (119, "119s"), (125, "2m5s"), (600, "10m"), (7200, "120m"),
                                           (7 * 3600 + 60, "7h1m"), (30 * 3600, "30h"), (3 * 86400, "3d"),
                                           (400 * 86400, "400d"), (3 * 365 * 86400, "3y")])
def test_ages_print_as_kubectl_prints_them(seconds, text):
    assert kube.human_duration(seconds) == text


def test_continue_tokens_page_through_in_order():
    items = [dict(obj({}), metadata={"name": n, "namespace": "default"}) for n in "abcde"]
    first, meta = kube.page(items, 2, None, "9")
    assert [o["metadata"]["name"] for o in first] == ["a", "b"] and meta["remainingItemCount"] == 3
    second, meta2 = kube.page(items, 2, meta["continue"], "12")
    assert [o["metadata"]["name"] for o in second] == ["c", "d"] and meta2["resourceVersion"] == "9"
    with pytest.raises(BadRequest):
        kube.page(items, 2, "garbage!", "9")
