"""The pod demo (``./scripts/pod-demo``): see that script.  Built on the test suite's pod fixture
(tests/netns.py, tests/meshpods.py): what the demo shows is what the tests check."""
from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from meshpods import REVIEWS_90_10, Mesh, add_reviews_and_client  # noqa: E402
from netns import PodNetwork, PodNetworkUnavailable  # noqa: E402

def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(pod, argv: list[str]) -> str:
    print(f"[{pod.name}]$ {shlex.join(argv)}", flush=True)
    out = pod.run(argv).stdout
    print(out.rstrip(), flush=True)
    return out


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="meshproxy-pod-demo-"))
    tmp.chmod(0o777)
    try:
        net = PodNetwork("demo")
    except PodNetworkUnavailable as err:
        print(f"pod-demo: {err}", file=sys.stderr)
        return 1
    with net:
        step(f"pods: network namespaces on a bridge (10.x addresses exist only inside them); logs in {tmp}")
        mesh = Mesh(net, tmp)
        print(f"control plane in pod istiod: {mesh.url}")
        client = add_reviews_and_client(mesh)          # the pods the capture tests use
        mesh.wait_all_ready()
        mesh.wait_endpoints("reviews", 2)
        step("the client pod's capture rules (meshproxy pod-init, nftables)")
        show(client.pod, ["nft", "list", "table", "inet", "meshproxy"])
        step("an unchanged application: curl by name; DNS, routing and both sidecars are transparent")
        for _ in range(4):
            show(client.pod, ["curl", "-s", "-w", "\\n", "http://reviews:9080/"])
        step("a 90/10 VirtualService through the control plane")
        mesh.apply(REVIEWS_90_10)
        client.wait_config(lambda dump: "default/reviews" in dump, "the VirtualService at the client")
        code = ("import urllib.request,collections\n"
                "print(dict(collections.Counter(urllib.request.urlopen('http://reviews:9080/').read().decode()"
                " for _ in range(100))))")
        print("[client]$ python: 100 x GET http://reviews:9080/")
        print(client.pod.python(code).stdout.strip())
        step("both sidecars report: reporter=source at the client, reporter=destination at reviews")
        for name in ("client", "reviews-v1"):
            for line in mesh.workloads[name].metrics().splitlines():
                if line.startswith("istio_requests_total{"):
                    labels = dict(kv.split("=", 1) for kv in line[line.index("{") + 1:line.index("}")].split(","))
                    print(f"  {name}: reporter={labels['reporter']} destination={labels['destination_service']} "
                          f"version={labels['destination_version']} code={labels['response_code']} "
                          f"-> {line.rsplit(' ', 1)[1]}")
        step("done: removing the pods")
    return 0


if __name__ == "__main__":
    sys.exit(main())
