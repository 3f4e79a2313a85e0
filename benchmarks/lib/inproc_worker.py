import asyncio, sys, random
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "tests"))
import uvloop
from inproc import cluster, dest, snapshot
from meshproxy.bootstrap import Worker, WorkerOptions
from meshproxy.config.model import HttpRoute
from meshproxy.config.store import SnapshotStore
from meshproxy.proxy.observe import Telemetry
from meshproxy.telemetry import ProxyTracer

async def main(up_port, port, trace):
    snap = snapshot([HttpRoute(name="r", source="t", destinations=(dest("c"),))], [cluster("c", up_port)], domains=("bench.local",), port=port)
    tracer = ProxyTracer(None, sample_rate=0.01) if trace else None
    w = Worker(asyncio.get_running_loop(), SnapshotStore(snap), WorkerOptions(), Telemetry(tracer=tracer))
    await w.start()
    await asyncio.Event().wait()
uvloop.install()
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"))
