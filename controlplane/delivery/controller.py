"""The delivery controller: drives every Canary in the store, one owned task per canary.

The life of one canary (``CanaryRun``), one *check* per ``analysis.interval``:

1. actions asked through the API (promote, abort, pause, resume) are taken first;
2. the references are checked (VirtualService route, DestinationRule subsets) and the driven
   route is compared with what the controller last wrote: a human edit pauses the canary with
   the reason, leaving the edited traffic alone (``resume`` re-applies the canary's weight);
3. ``Initializing``: sticky cookie hash on the DestinationRule if ``sessionAffinity``, route at
   canary weight 0, pre-rollout webhooks, then ``Progressing`` at the first step;
4. ``Progressing``: rollback webhooks (success = roll back), rollout webhooks (failure = failed
   check), then the window since the step started is read from the proxies and judged
   (:mod:`.policy`): not enough data keeps the step (bounded by ``progressDeadlineSeconds``), a
   failed check counts toward ``threshold``, a pass advances the step or, at the last step,
   asks confirm-promotion webhooks and promotes;
5. ``Promoting`` -> ``Succeeded`` (100% canary), or ``Failed`` (100% stable) on rollback;
   post-rollout webhooks after either.

Every route change is an ordinary ``store.put`` of the VirtualService (validated by the
proxies' decoder first, guarded by its resourceVersion): a revision in the history, pushed
make-before-break like a human apply, undoable with ``meshctl rollback``.  Status is saved
after every check (:mod:`.state`), so a restarted or newly elected controller continues from
it without touching the weights.
"""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from typing import Callable

from ..store import StoreError
from ..validation import validate_object
from . import hooks
from ..httpclient import HttpFailure, request
from .policy import (CONFIRMED, DONE, FAIL, INITIALIZING, NO_DATA, PROGRESSING, PROMOTE, PROMOTING,
                     RESTART, ROLLBACK, START, TERMINAL, WAIT, WAITING_PROMOTION, CustomCheck, Decision,
                     MetricResult, StepPlan, Window, builtin_checks, judge, next_phase)
from .routing import observed_weights, restore_load_balancer, rewrite_virtual_service, route_state, sticky_destination_rule
from .samples import Baseline, Selector, parse_versions
from .spec import KIND, CanarySpec, check_references, decode_canary, find_destination_rule, versions_of
from .state import Key, for_store

log = logging.getLogger("controlplane.delivery")

MAX_EVENTS = 100
MAX_CHECKS = 200
READ_CONCURRENCY = 32
ACTIONS = ("promote", "abort", "pause", "resume")


def _json(value):
    return json.loads(json.dumps(value))


def new_status() -> dict:
    return {"phase": INITIALIZING, "canaryWeight": 0, "iterations": 0, "failedChecks": 0, "passedChecks": 0,
            "message": "", "paused": None, "run": None, "stepStartedAt": None, "lastTransitionTime": None,
            "lastDecision": None, "checks": [], "weights": [], "events": [], "written": None,
            "savedLoadBalancer": None, "sticky": False}


class RefusedWrite(Exception):
    pass


def _loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host in ("::1", "[::1]")


def admin_address(admin: str, peer: str) -> str:
    """Where the control plane reads a proxy's counters, from the admin address the proxy named
    and the address its stream came from; "" when it cannot be reached from here.  A wildcard
    bind is reached at the peer's address; a loopback admin of a proxy on another host (a pod's
    sidecar) is that host's own loopback, never this one's: it is skipped rather than read from
    whatever listens on the control plane's loopback."""
    host, sep, port = admin.rpartition(":")
    if not sep or not port.isdigit():
        return ""
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = peer or "127.0.0.1"
    elif _loopback(host) and peer and not _loopback(peer):
        return ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DeliveryController:
    def __init__(self, store, push, *, state=None, leadership=None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, reconcile_interval: float = 0.5, read_timeout: float = 2.0):
        if state is None or leadership is None:
            default_state, default_leadership = for_store(store)
            state, leadership = state or default_state, leadership or default_leadership
        self.store = store
        self.push = push
        self.state = state
        self.leadership = leadership
        self.clock = clock
        self.wall = wall
        self.reconcile_interval = reconcile_interval
        self.read_timeout = read_timeout
        self.runs: dict[Key, CanaryRun] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._reads = asyncio.Semaphore(READ_CONCURRENCY)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.state.start()
        await self.leadership.start()
        self.store.subscribe(self._changed)
        self._task = asyncio.create_task(self._supervise(), name="delivery-controller")

    async def close(self) -> None:
        self.store.unsubscribe(self._changed)
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for run in list(self.runs.values()):
            await run.stop()
        self.runs.clear()
        await self.leadership.close()
        await self.state.close()

    def _changed(self, what: str) -> None:
        self._wake.set()

    async def _supervise(self) -> None:
        while True:
            try:
                await self._reconcile()
            except Exception:           # a bug here must not stop every canary for good
                log.exception("delivery controller: reconcile failed")
            try:
                async with asyncio.timeout(self.reconcile_interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def _reconcile(self) -> None:
        leader = self.leadership.is_leader
        wanted = {(ns, name) for (kind, ns, name) in self.store.resources() if kind == KIND} if leader else set()
        for key in [k for k in self.runs if k not in wanted]:
            run = self.runs.pop(key)
            await run.stop()
            if leader:                                  # the Canary was deleted: traffic back, status gone
                await run.abandon()
                await self.state.delete(key)
        for key in sorted(wanted - self.runs.keys()):
            status = await self.state.load(key)
            run = self.runs[key] = CanaryRun(self, key, status)
            run.start()

    # ------------------------------------------------------------ API side

    async def request_action(self, key: Key, action: str, who: str) -> None:
        await self.state.request_action(key, {"action": action, "by": who, "at": self.wall()})
        run = self.runs.get(key)
        if run is not None:
            run.wake.set()

    async def status_of(self, key: Key) -> dict | None:
        run = self.runs.get(key)
        if run is not None:
            return run.status
        return await self.state.load(key)

    # ------------------------------------------------------------ proxies' metrics

    def proxy_admins(self) -> dict[str, str]:
        """admin address -> node id, for every proxy connected to any replica whose admin
        listener this control plane can reach (see :func:`admin_address`)."""
        return self._proxies()[0]

    def _proxies(self) -> tuple[dict[str, str], list[str]]:
        """(admin address -> node id, "node (why)" for the proxies whose counters are out of reach)."""
        out: dict[str, str] = {}
        unreachable: list[str] = []
        items = [p.to_dict() for p in self.push.proxies.values()]
        remote = getattr(self.store, "remote_proxies", None)
        if remote is not None:
            items += remote()
        for p in items:
            named = p.get("admin") or ""
            admin = admin_address(named, p.get("peer") or "")
            if admin:
                out.setdefault(admin, p.get("node_id", admin))
            elif named:
                unreachable.append(f"{p.get('node_id')} (admin {named} is local to its host {p.get('peer')})")
        return out, unreachable

    async def read_proxies(self, selector: Selector, timeout: float | None = None) -> tuple[dict, tuple[str, ...]]:
        """Every proxy's cumulative reading for ``selector``, and the proxies that did not answer
        within ``timeout`` (default ``read_timeout``; a check passes its interval, at least 0.5 s)."""
        admins, unreachable = self._proxies()
        timeout = self.read_timeout if timeout is None else timeout

        async def one(address: str):
            async with self._reads:
                try:
                    status, body = await request("GET", f"http://{address}/stats/prometheus", timeout=timeout)
                except HttpFailure as exc:
                    return address, None, str(exc)
            if status != 200:
                return address, None, f"admin answered {status}"
            try:
                return address, parse_versions(body.decode(errors="replace"), selector), ""
            except ValueError as exc:
                return address, None, f"unreadable metrics: {exc}"

        results = await asyncio.gather(*(one(a) for a in sorted(admins)))
        readings = {addr: versions for addr, versions, _ in results if versions is not None}
        missing = tuple(f"{admins[addr]} ({err})" for addr, versions, err in results if versions is None)
        if not readings and unreachable:      # nothing to judge on: say why (else judged on what is read)
            missing += tuple(unreachable)
        return readings, missing


class CanaryRun:
    """One canary's loop; owns its task, its status and its metrics baseline."""

    def __init__(self, ctl: DeliveryController, key: Key, status: dict | None):
        self.ctl = ctl
        self.key = key
        self.status = status or new_status()
        self.adopting = status is not None     # a stored run: reconcile with the route once (see tick)
        if status is not None and status.get("phase") not in TERMINAL:
            self.event("Normal", f"controller on replica {ctl.leadership.holder or 'local'} continues at phase "
                                 f"{status.get('phase')}, weight {status.get('canaryWeight')}")
        self.wake = asyncio.Event()
        self.baseline: Baseline | None = None
        self.spec: CanarySpec | None = None        # as of the last tick (to undo the route if deleted)
        self.next_check = 0.0
        self._task: asyncio.Task | None = None
        self._saved = ""

    @property
    def ref(self) -> str:
        return f"{KIND} {self.key[0]}/{self.key[1]}"

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"canary-{self.key[0]}-{self.key[1]}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as exc:     # one canary's bug or outage: shown, retried next interval
                log.exception("%s: check failed", self.ref)
                self.status["message"] = f"controller error: {type(exc).__name__}: {exc}"
            await self._save()
            try:
                async with asyncio.timeout(max(0.05, self.next_check - self.ctl.clock())):
                    await self.wake.wait()
            except TimeoutError:
                pass
            self.wake.clear()

    async def _save(self) -> None:
        text = json.dumps(self.status, sort_keys=True)
        if text != self._saved:
            try:
                if await self.ctl.state.save(self.key, self.status):
                    self._saved = text
            except StoreError as exc:
                log.warning("%s: saving status failed: %s", self.ref, exc)

    # ------------------------------------------------------------ helpers

    def event(self, kind: str, message: str) -> None:
        events = self.status["events"]
        events.append({"at": self.ctl.wall(), "type": kind, "message": message})
        del events[:-MAX_EVENTS]
        (log.warning if kind == "Warning" else log.info)("%s: %s", self.ref, message)

    def transition(self, event: str) -> None:
        before = self.status["phase"]
        self.status["phase"] = next_phase(before, event)
        if self.status["phase"] != before:
            self.status["lastTransitionTime"] = self.ctl.wall()

    def set_weight(self, weight: int) -> None:
        self.status["canaryWeight"] = weight
        self.status["weights"].append({"at": self.ctl.wall(), "weight": weight})
        del self.status["weights"][:-MAX_CHECKS]

    def record_check(self, decision: Decision, window: Window | None) -> None:
        entry = {"at": self.ctl.wall(), "weight": self.status["canaryWeight"], **decision.to_dict()}
        if window is not None:
            entry["window"] = {"seconds": round(window.seconds, 3), "proxies": window.proxies,
                               "stable": {"requests": window.stable.requests, "errors": window.stable.errors},
                               "canary": {"requests": window.canary.requests, "errors": window.canary.errors}}
        self.status["lastDecision"] = entry
        if decision.verdict != NO_DATA:
            self.status["checks"].append(entry)
            del self.status["checks"][:-MAX_CHECKS]

    def pause(self, reason: str) -> None:
        if not self.status["paused"]:
            self.status["paused"] = {"reason": reason, "at": self.ctl.wall()}
            self.event("Warning", f"paused: {reason}")
        self.status["message"] = f"paused: {reason}"

    # ------------------------------------------------------------ the check

    async def tick(self) -> None:
        ctl = self.ctl
        obj = ctl.store.resources().get((KIND, *self.key))
        if obj is None:
            return
        decoded = decode_canary(obj)
        if decoded.spec is None:
            self.status["message"] = "invalid: " + "; ".join(decoded.errors)
            self.next_check = ctl.clock() + 5.0
            return
        spec = self.spec = decoded.spec
        interval = spec.analysis.interval
        run = {"stable": spec.stable, "canary": spec.canary}
        status = self.status
        if status["run"] != run:
            if status["run"] is not None:
                self.event("Normal", f"new canary {spec.canary} (was {status['run']['canary']}): starting a new run")
                self.transition(RESTART)
            keep = {k: status[k] for k in ("events", "weights", "checks")} if status["run"] else {}
            status.clear()
            status.update(new_status(), **keep, run=run)
            status["lastTransitionTime"] = ctl.wall()
            self.baseline = None
            self.event("Normal", f"canary {spec.stable} -> {spec.canary} initializing")
        await self.take_actions(spec)
        if status["phase"] in TERMINAL:
            self.next_check = ctl.clock() + interval
            return
        if status["paused"]:
            self.next_check = ctl.clock() + interval
            return
        problems = check_references(spec, ctl.store.resources())
        if problems:
            self.pause("; ".join(problems))
            self.next_check = ctl.clock() + interval
            return
        vs = ctl.store.resources()[("VirtualService", spec.namespace, spec.virtual_service)]
        if self.adopting:
            self.adopting = False
            self.adopt_route(spec, vs)
        if status["written"] is not None and _json(route_state(vs["spec"], spec)) != status["written"]:
            self.pause(f"VirtualService {spec.namespace}/{spec.virtual_service} was changed outside the canary "
                       f"(resourceVersion {vs['metadata']['resourceVersion']}); traffic is left as edited; "
                       f"`meshctl canary resume {spec.name}` re-applies weight {status['canaryWeight']}")
            self.next_check = ctl.clock() + interval
            return
        if ctl.clock() < self.next_check:
            return
        self.next_check = ctl.clock() + interval
        phase = status["phase"]
        if phase == INITIALIZING:
            await self.initialize(spec)
        elif phase in (PROGRESSING, WAITING_PROMOTION):
            await self.check(spec)
        elif phase == PROMOTING:
            await self.finish(spec)

    def adopt_route(self, spec: CanarySpec, vs: dict) -> None:
        """A controller that died between writing a step and saving its status leaves the route one
        step ahead of the status: a route this canary could have written (its two subsets at one of
        its weights) is taken as the current step instead of being treated as a human edit."""
        status = self.status
        if status["written"] is None or status["phase"] not in (PROGRESSING, WAITING_PROMOTION):
            return
        current = _json(route_state(vs["spec"], spec))
        if current == status["written"]:
            return
        weights = observed_weights(vs["spec"], spec) or {}
        canary = weights.get(spec.canary)
        if canary in StepPlan.of(spec).weights and weights == {spec.stable: 100 - canary, spec.canary: canary}:
            self.event("Normal", f"adopted weight {canary} found on the route (written before the last status save)")
            self.set_weight(canary)
            status["written"] = current

    async def abandon(self) -> None:
        """The Canary was deleted mid-run: its route goes back to 100% stable (never left split
        between two versions with nobody driving it) and the session affinity is removed."""
        spec = self.spec
        if spec is None or self.status["phase"] in TERMINAL or self.status["written"] is None:
            return
        try:
            await self.write_route(spec, 0, final="rolledback", reason="canary deleted")
            await self.unstick(spec)
            log.warning("%s: deleted while %s: route back to 100%% %s", self.ref, self.status["phase"], spec.stable)
        except (StoreError, RefusedWrite, ValueError) as exc:
            log.warning("%s: deleted mid-run; could not restore the route: %s", self.ref, exc)

    async def take_actions(self, spec: CanarySpec) -> None:
        action = await self.ctl.state.take_action(self.key)
        if not action:
            return
        what, who = action.get("action"), action.get("by", "?")
        status = self.status
        if status["phase"] in TERMINAL:
            self.event("Warning", f"{what} by {who} ignored: the canary is {status['phase']}")
            return
        if what == "pause":
            self.pause(f"paused by {who}")
        elif what == "resume":
            if status["paused"]:
                self.event("Normal", f"resumed by {who}")
            status["paused"] = None
            status["message"] = f"resumed by {who}"
            if status["phase"] in (PROGRESSING, WAITING_PROMOTION, PROMOTING):
                await self.write_route(spec, status["canaryWeight"], final="promoted" if status["phase"] == PROMOTING
                                       else None, reason=f"resumed by {who}: weight {status['canaryWeight']}")
            self.baseline = None
            self.next_check = 0.0
        elif what == "abort":
            status["paused"] = None
            await self.rollback(spec, f"aborted by {who}")
        elif what == "promote":
            status["paused"] = None
            await self.promote(spec, f"promoted by {who}")

    # ------------------------------------------------------------ phases

    async def initialize(self, spec: CanarySpec) -> None:
        status = self.status
        analysis = spec.analysis
        if analysis.session_affinity and not status["sticky"]:
            await self.make_sticky(spec)
        pre_rollout = analysis.hooks("pre-rollout")
        if pre_rollout:         # the route in a known state (canary at 0) while the hooks run
            await self.write_route(spec, 0, reason="initialized: weight 0")
        results = await hooks.call_webhooks(pre_rollout, spec, status["phase"])
        failed = [r for r in results if not r.ok]
        if failed:
            await self.failed_check(spec, Decision(FAIL, (), "pre-rollout webhook " +
                                                   "; ".join(f"{r.name}: {r.detail}" for r in failed)), None)
            return
        first = StepPlan.of(spec).first_weight()
        await self.write_route(spec, first, reason=f"weight {first}")      # the route first: status follows it
        self.transition(START)
        self.set_weight(first)
        status["stepStartedAt"] = self.ctl.wall()
        self.event("Normal", f"advance {spec.canary} canary weight {status['canaryWeight']}"
                   if analysis.strategy == "canary" else f"{analysis.strategy} analysis of {spec.canary} started")
        status["message"] = "collecting the first window"
        self.baseline = None
        await self.new_baseline(spec)

    async def check(self, spec: CanarySpec) -> None:
        status = self.status
        analysis = spec.analysis
        # rollback webhooks: a success asks for rollback (Flagger's manual gate)
        for result in await hooks.call_webhooks(analysis.hooks("rollback"), spec, status["phase"]):
            if result.ok:
                await self.rollback(spec, f"rollback webhook {result.name} asked for it ({result.detail})")
                return
        failed_hooks = [r for r in await hooks.call_webhooks(analysis.hooks("rollout"), spec, status["phase"])
                        if not r.ok]
        if failed_hooks:
            await self.failed_check(spec, Decision(FAIL, (), "rollout webhook " + "; ".join(
                f"{r.name}: {r.detail}" for r in failed_hooks)), None)
            return
        if self.baseline is None:
            await self.new_baseline(spec)
            status["message"] = "collecting a window (controller started or resumed)"
            return
        selector = self.selector(spec)
        if selector is None:
            self.pause("the subsets have no version labels")
            return
        readings, missing = await self.ctl.read_proxies(selector, self.read_timeout(spec))
        window = self.baseline.window(readings, self.ctl.wall(), missing)
        results: list[MetricResult] = [c.judge(window) for c in builtin_checks(analysis)]
        versions = versions_of(spec, self.ctl.store.resources())
        for metric in analysis.metrics:
            if metric.query is not None:
                query = hooks.render_query(metric, spec, versions[1] if versions else spec.canary, analysis.interval)
                results.append(CustomCheck(metric).judge_value(await hooks.query_prometheus(metric.provider_address,
                                                                                            query)))
        decision = judge(results, window, analysis.min_requests)
        self.record_check(decision, window)
        if decision.verdict == NO_DATA:
            waited = self.ctl.wall() - (status["stepStartedAt"] or self.ctl.wall())
            if waited > spec.progress_deadline:
                await self.rollback(spec, f"progress deadline exceeded: {waited:.0f}s > "
                                          f"{spec.progress_deadline:g}s at weight {status['canaryWeight']}; "
                                          f"{decision.reason}")
                return
            status["message"] = f"{decision.reason} (waiting; deadline in {spec.progress_deadline - waited:.0f}s)"
            return
        if decision.verdict == FAIL:
            await self.failed_check(spec, decision, window)
            return
        await self.passed_check(spec, decision)

    async def failed_check(self, spec: CanarySpec, decision: Decision, window: Window | None) -> None:
        status = self.status
        status["failedChecks"] += 1
        if window is None:
            self.record_check(decision, None)
        self.event("Warning", f"check failed ({status['failedChecks']}/{spec.analysis.threshold}): {decision.reason}")
        status["message"] = f"check failed: {decision.reason}"
        if status["phase"] != INITIALIZING:
            await self.new_baseline(spec)
            status["stepStartedAt"] = self.ctl.wall()
        if status["failedChecks"] >= spec.analysis.threshold:
            await self.rollback(spec, f"{status['failedChecks']} failed checks (threshold "
                                      f"{spec.analysis.threshold}): {decision.reason}")

    async def passed_check(self, spec: CanarySpec, decision: Decision) -> None:
        status = self.status
        status["passedChecks"] += 1
        action, weight, iterations = StepPlan.of(spec).after_pass(status["canaryWeight"], status["iterations"])
        status["iterations"] = iterations
        if action == "advance":
            if weight != status["canaryWeight"]:
                await self.write_route(spec, weight, reason=f"weight {weight}")
                self.set_weight(weight)
                self.event("Normal", f"advance {spec.canary} canary weight {weight}")
            else:
                self.event("Normal", f"iteration {iterations}/{spec.analysis.iterations} passed")
            status["message"] = f"check passed: {decision.reason}"
            status["stepStartedAt"] = self.ctl.wall()
            await self.new_baseline(spec)
            return
        results = await hooks.call_webhooks(spec.analysis.hooks("confirm-promotion"), spec, status["phase"])
        waiting = [r for r in results if not r.ok]
        if waiting:
            if status["phase"] == PROGRESSING:
                self.transition(WAIT)
                self.event("Normal", "waiting for promotion confirmation")
            status["message"] = "waiting for confirm-promotion: " + "; ".join(f"{r.name}: {r.detail}" for r in waiting)
            await self.new_baseline(spec)
            status["stepStartedAt"] = self.ctl.wall()
            return
        await self.promote(spec, "analysis passed")

    async def promote(self, spec: CanarySpec, why: str) -> None:
        status = self.status
        event = CONFIRMED if status["phase"] == WAITING_PROMOTION else PROMOTE
        next_phase(status["phase"], event)                 # legal here, before anything is written
        await self.write_route(spec, 100, final="promoted", reason=f"promoted ({why})")
        self.transition(event)
        self.set_weight(100)
        self.event("Normal", f"promotion of {spec.canary} ({why}): 100% {spec.canary}")
        status["message"] = f"promoting: {why}"

    async def finish(self, spec: CanarySpec) -> None:
        status = self.status
        await self.unstick(spec)
        self.transition(DONE)
        status["message"] = f"succeeded: 100% {spec.canary}"
        self.event("Normal", f"promotion completed: {spec.canary} serves 100%")
        await self.post_rollout(spec)

    async def rollback(self, spec: CanarySpec, reason: str) -> None:
        status = self.status
        if status["phase"] == PROMOTING:     # too late to roll back a finished copy: stay promoted
            self.event("Warning", f"rollback asked while promoting ignored: {reason}")
            return
        next_phase(status["phase"], ROLLBACK)              # legal here, before anything is written
        await self.write_route(spec, 0, final="rolledback", reason=f"rolled back ({reason[:120]})")
        await self.unstick(spec)
        self.transition(ROLLBACK)
        self.set_weight(0)
        status["message"] = f"rolled back: {reason}"
        self.event("Warning", f"rolling back {spec.canary}: {reason}")
        await self.post_rollout(spec)

    async def post_rollout(self, spec: CanarySpec) -> None:
        for r in await hooks.call_webhooks(spec.analysis.hooks("post-rollout"), spec, self.status["phase"]):
            self.event("Normal" if r.ok else "Warning", f"post-rollout webhook {r.name}: {r.detail}")

    # ------------------------------------------------------------ writes and reads

    def read_timeout(self, spec: CanarySpec) -> float:
        return min(self.ctl.read_timeout, max(0.5, spec.analysis.interval))

    def selector(self, spec: CanarySpec) -> Selector | None:
        versions = versions_of(spec, self.ctl.store.resources())
        if versions is None:
            return None
        reporter = "destination" if spec.analysis.strategy == "bluegreen" else "source"
        return Selector(spec.fqdn, versions[0], versions[1], reporter)

    async def new_baseline(self, spec: CanarySpec) -> None:
        selector = self.selector(spec)
        if selector is None:
            self.baseline = None
            return
        readings, _ = await self.ctl.read_proxies(selector, self.read_timeout(spec))
        self.baseline = Baseline(readings, self.ctl.wall())

    async def write_route(self, spec: CanarySpec, weight: int, *, final: str | None = None, reason: str) -> None:
        store = self.ctl.store
        vs = store.resources().get(("VirtualService", spec.namespace, spec.virtual_service))
        if vs is None:
            raise RefusedWrite(f"VirtualService {spec.namespace}/{spec.virtual_service} not found")
        a = spec.analysis
        new = rewrite_virtual_service(vs, spec, weight, final=final,
                                      ab_match=a.match if a.strategy == "ab" else (),
                                      mirror_weight=a.mirror_weight if a.strategy == "bluegreen" and a.mirror else 0)
        stored = await self._put(new, f"canary {spec.namespace}/{spec.name}: {reason}")
        self.status["written"] = _json(route_state(stored["spec"], spec))

    async def _put(self, obj: dict, origin: str) -> dict:
        md = obj["metadata"]
        body = {"apiVersion": obj["apiVersion"], "kind": obj["kind"],
                "metadata": {k: md[k] for k in ("name", "namespace", "labels", "annotations") if k in md},
                "spec": obj["spec"]}
        errors = validate_object(body, obj["kind"], md["namespace"], md["name"])
        if errors:        # never write what the proxies would refuse
            raise RefusedWrite("; ".join(errors))
        return await self.ctl.store.put(body, expect_version=md.get("resourceVersion"), origin=origin)

    async def make_sticky(self, spec: CanarySpec) -> None:
        dr = find_destination_rule(self.ctl.store.resources(), spec)
        affinity = spec.analysis.session_affinity
        saved = ((dr["spec"].get("trafficPolicy") or {}).get("loadBalancer"))
        await self._put(sticky_destination_rule(dr, affinity.cookie_name, affinity.max_age),
                        f"canary {spec.namespace}/{spec.name}: session affinity (cookie {affinity.cookie_name})")
        self.status["savedLoadBalancer"] = copy.deepcopy(saved)
        self.status["sticky"] = True

    async def unstick(self, spec: CanarySpec) -> None:
        if not self.status["sticky"]:
            return
        dr = find_destination_rule(self.ctl.store.resources(), spec)
        if dr is not None:
            await self._put(restore_load_balancer(dr, self.status["savedLoadBalancer"]),
                            f"canary {spec.namespace}/{spec.name}: session affinity removed")
        self.status["sticky"] = False
