"""Service virtual IPs: what a Kubernetes ClusterIP is, for the mesh's services.

Every service the control plane knows (registered workloads' services, ServiceEntry hosts) gets
one stable virtual IP from a configurable range (default ``240.240.0.0/16``, Istio's range for
auto-allocated ServiceEntry addresses), unless the ServiceEntry names its own ``addresses``.
Sidecars answer DNS for the service's names with it and route connections to it
(``meshproxy run --capture``).

Allocation rules:

* sticky: once given, a service keeps its address for as long as it exists (an entry disappears
  only when the service is gone from both the registry and the ServiceEntries);
* an address is never handed to a second service while the first exists;
* the first choice of a service is a hash of its FQDN into the range, then the next free
  address: a control plane that restarts (or a second replica) computes the same addresses for
  the same services, except where two services collided and were allocated in another order
  (the allocation is not persisted in the store; see the README).

Pure and synchronous: :meth:`VipAllocator.assign` is called by the push engine with each new view
of the store and annotates what proxies receive: each workload gets ``vip``, each ServiceEntry
without addresses gets its allocated ``spec.addresses`` (one host) in the proxies' copy.
"""
from __future__ import annotations

import copy
import hashlib
import ipaddress
from typing import Iterable

from meshproxy.config.hosts import resolve_host

DEFAULT_RANGE = "240.240.0.0/16"
AUTOALLOCATE_LABEL = "networking.istio.io/enable-autoallocate-ip"


class VipRangeExhausted(Exception):
    pass


class VipAllocator:
    def __init__(self, cidr: str = DEFAULT_RANGE):
        self.network = ipaddress.ip_network(cidr, strict=False)
        if self.network.num_addresses < 4:
            raise ValueError(f"VIP range {cidr} is too small")
        self.assigned: dict[str, str] = {}          # FQDN -> address
        self._taken: dict[str, str] = {}            # address -> FQDN

    def _first_choice(self, fqdn: str) -> int:
        usable = self.network.num_addresses - 2     # neither the network nor the broadcast address
        digest = hashlib.sha256(fqdn.encode()).digest()
        return 1 + int.from_bytes(digest[:8], "big") % usable

    def assign(self, services: Iterable[str], reserved: Iterable[str] = ()) -> dict[str, str]:
        """Addresses for exactly ``services`` (FQDNs); released for services no longer present.
        ``reserved``: addresses the user gave (ServiceEntry ``addresses``), never allocated."""
        wanted = sorted(set(services))
        present = set(wanted)
        for fqdn in [f for f in self.assigned if f not in present]:
            self._taken.pop(self.assigned.pop(fqdn), None)
        blocked = set(reserved)
        for fqdn in wanted:
            if fqdn in self.assigned and self.assigned[fqdn] not in blocked:
                continue
            self._taken.pop(self.assigned.pop(fqdn, ""), None)
            usable = self.network.num_addresses - 2
            start = self._first_choice(fqdn)
            for step in range(usable):
                offset = 1 + (start - 1 + step) % usable
                address = str(self.network.network_address + offset)
                if address not in self._taken and address not in blocked:
                    break
            else:
                raise VipRangeExhausted(f"no free address left in {self.network} for {fqdn}")
            self.assigned[fqdn] = address
            self._taken[address] = fqdn
        return dict(self.assigned)

    def annotate(self, resources: list[dict], workloads: list[dict]) -> tuple[list[dict], list[dict]]:
        """The proxies' copies of ``resources`` and ``workloads`` with the allocated addresses."""
        reserved: list[str] = []
        entries: list[tuple[int, str]] = []          # (index, fqdn) of ServiceEntries to allocate for
        for i, obj in enumerate(resources):
            if obj.get("kind") != "ServiceEntry":
                continue
            spec = obj.get("spec") or {}
            if spec.get("addresses"):
                reserved += [str(a).split("/")[0] for a in spec["addresses"]]
                continue
            labels = (obj.get("metadata") or {}).get("labels") or {}
            hosts = spec.get("hosts") or []
            if labels.get(AUTOALLOCATE_LABEL) == "false" or len(hosts) != 1 or str(hosts[0]).startswith("*") \
                    or spec.get("resolution") == "NONE":
                continue
            namespace = (obj.get("metadata") or {}).get("namespace") or "default"
            entries.append((i, resolve_host(str(hosts[0]), namespace)))
        services = {resolve_host(w["service"], w.get("namespace") or "default") for w in workloads}
        assigned = self.assign(services | {fqdn for _, fqdn in entries}, reserved)
        out_resources = list(resources)
        for i, fqdn in entries:
            obj = copy.deepcopy(resources[i])
            obj["spec"]["addresses"] = [assigned[fqdn]]
            out_resources[i] = obj
        out_workloads = [dict(w, vip=assigned[resolve_host(w["service"], w.get("namespace") or "default")])
                         for w in workloads]
        return out_resources, out_workloads
