"""The proxy's push client: deltas applied to what it holds, a missed version forces a resync."""
from __future__ import annotations

import random

from meshproxy.config.remote import ApplyResult, RemoteConfigClient


class Acks:
    def __init__(self):
        self.posted: list[dict] = []

    async def post(self, path, body, timeout):
        self.posted.append(body)
        return 200


def client_with(recorder):
    client = RemoteConfigClient(["http://127.0.0.1:1"], "n1", {}, recorder, rng=random.Random(1))
    client._acks = Acks()
    return client


def item(key, address):
    return {"key": key, "version": f"v-{address}", "item": {"service": "a", "namespace": "default",
                                                            "address": address, "ports": {"http": 80}}}


def config(nonce, res, ep, resources=None, workloads=None):
    return {"type": "config", "version": f"{res}.{ep}", "nonce": nonce, "resources_version": res,
            "endpoints_version": ep, "resources": resources, "workloads": workloads}


async def test_deltas_build_on_the_held_version_and_a_missed_one_forces_a_resync():
    seen = []
    client = client_with(lambda r, w, v: seen.append((v, sorted(x["address"] for x in w))) or [])
    await client._handle("u", config("1", "R", "E1", {"base": "", "updated": [], "removed": []},
                                     {"base": "", "updated": [item("w1", "10.0.0.1"), item("w2", "10.0.0.2")],
                                      "removed": []}))
    await client._handle("u", config("2", "R", "E2", None,
                                     {"base": "E1", "updated": [item("w3", "10.0.0.3")], "removed": ["w1"]}))
    assert seen[-1] == ("R.E2", ["10.0.0.2", "10.0.0.3"])
    assert client.held_version("workloads") == "E2"
    # E3 never arrived: a delta from E3 is not applied, the client asks for whole parts
    await client._handle("u", config("3", "R", "E4", None, {"base": "E3", "updated": [], "removed": ["w2"]}))
    assert client._acks.posted[-1] == {"node_id": "n1", "nonce": "3", "resync": True}
    assert len(seen) == 2 and client.held_version("workloads") == "" and client.resyncs == 1
    await client._handle("u", config("4", "R", "E4", {"base": "", "updated": [], "removed": []},
                                     {"base": "", "updated": [item("w3", "10.0.0.3")], "removed": []}))
    assert seen[-1] == ("R.E4", ["10.0.0.3"])
    assert client._acks.posted[-1]["version"] == "R.E4" and client._acks.posted[-1]["errors"] == []


async def test_a_part_announced_as_held_but_not_held_forces_a_resync():
    client = client_with(lambda r, w, v: [])
    await client._handle("u", config("1", "R9", "E9"))          # both parts "already held": they are not
    assert client._acks.posted == [{"node_id": "n1", "nonce": "1", "resync": True}]


async def test_a_version_with_a_refused_resource_is_applied_and_the_nack_names_it():
    refused = {"VirtualService default/b": ["VirtualService default/b: spec.http[0]: bad"]}
    client = client_with(lambda r, w, v: ApplyResult(refused["VirtualService default/b"], refused, applied=True))
    await client._handle("u", config("1", "R", "E", {"base": "", "updated": [], "removed": []},
                                     {"base": "", "updated": [], "removed": []}))
    ack = client._acks.posted[-1]
    assert ack["errors"] and ack["rejected"] == refused and ack["applied"] is True
    assert client.status.version == "R.E" and client.held_version("resources") == "R"
    assert client.synced.is_set()
