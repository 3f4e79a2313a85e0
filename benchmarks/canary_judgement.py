"""How the canary judge decides, against Flagger's fixed threshold, on simulated traffic.

Monte Carlo over the real policy classes (controlplane/delivery/policy.py): each interval the
canary gets ``canary_rps * interval`` requests and stable ``stable_rps * interval``; every
request fails with its version's error rate (seeded RNG, so runs repeat exactly).  A run has
``steps`` steps; it ends in promotion, or in rollback after ``threshold`` failed checks.

* meshproxy: SuccessRateCheck (min 99%, confidence 0.99, minRequests) over the window since
  the step started; "not enough data" keeps accumulating, a judged check starts a new window.
* fixed: Flagger's rule, success rate of the interval >= 99% (no minimum sample; an interval
  without canary requests is a failed check, "no values found").
* fixed-min: the same threshold judged only once minRequests canary requests arrived (the
  fixed rule with meshproxy's sample requirement).

Reported per scenario: how often the release was rolled back, and the canary requests (and
errors users saw) before the decision.  Pure CPU, no sockets:

    .venv/bin/python benchmarks/canary_judgement.py [--runs 2000] [--confidence 0.99]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controlplane.delivery.policy import FAIL, NO_DATA, SuccessRateCheck, VersionSample, Window  # noqa: E402

SCENARIOS = [
    # name, stable error rate, canary error rate, canary requests per interval, stable per interval
    ("equal, 0.5% errors, 20 canary req/interval", 0.005, 0.005, 20, 180),
    ("equal, 0.5% errors, 200 canary req/interval", 0.005, 0.005, 200, 1800),
    ("canary 2% errors, 20 req/interval", 0.005, 0.02, 20, 180),
    ("canary 10% errors, 20 req/interval", 0.005, 0.10, 20, 180),
    ("canary 10% errors, 200 req/interval", 0.005, 0.10, 200, 1800),
]


def errors(rng: random.Random, n: int, p: float) -> int:
    return sum(1 for _ in range(n) if rng.random() < p)


def run_meshproxy(rng, p_s, p_c, n_c, n_s, steps, threshold, min_requests, confidence):
    check = SuccessRateCheck(99.0, 1 - confidence, min_requests)
    failed, step, served, seen = 0, 0, 0, 0
    window_c = window_s = errors_c = errors_s = 0
    for _ in range(steps * 50):                         # bounded: the progress deadline
        ec, es = errors(rng, n_c, p_c), errors(rng, n_s, p_s)
        served, seen = served + n_c, seen + ec
        window_c, window_s, errors_c, errors_s = window_c + n_c, window_s + n_s, errors_c + ec, errors_s + es
        verdict = check.judge(Window(VersionSample(window_s, errors_s), VersionSample(window_c, errors_c))).verdict
        if verdict == NO_DATA:
            continue
        window_c = window_s = errors_c = errors_s = 0
        if verdict == FAIL:
            failed += 1
            if failed >= threshold:
                return True, served, seen
        else:
            step += 1
            if step >= steps:
                return False, served, seen
    return True, served, seen


def run_fixed(rng, p_s, p_c, n_c, n_s, steps, threshold):
    failed, step, served, seen = 0, 0, 0, 0
    while True:
        ec = errors(rng, n_c, p_c)
        served, seen = served + n_c, seen + ec
        if n_c == 0 or 100.0 * (n_c - ec) / n_c < 99.0:
            failed += 1
            if failed >= threshold:
                return True, served, seen
        else:
            step += 1
            if step >= steps:
                return False, served, seen


def run_fixed_min(rng, p_s, p_c, n_c, n_s, steps, threshold, min_requests):
    """The fixed threshold made as safe as meshproxy's pass rule: judged once minRequests arrived."""
    failed, step, served, seen, window, window_errors = 0, 0, 0, 0, 0, 0
    while True:
        ec = errors(rng, n_c, p_c)
        served, seen, window, window_errors = served + n_c, seen + ec, window + n_c, window_errors + ec
        if window < min_requests:
            continue
        ok = 100.0 * (window - window_errors) / window >= 99.0
        window = window_errors = 0
        if not ok:
            failed += 1
            if failed >= threshold:
                return True, served, seen
        else:
            step += 1
            if step >= steps:
                return False, served, seen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threshold", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=100)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--confidence", type=float, default=0.99)
    args = parser.parse_args(argv)
    print(f"{args.runs} runs per scenario, {args.steps} steps, threshold {args.threshold}, "
          f"minRequests {args.min_requests}, confidence {args.confidence}, seed {args.seed}")
    print(f"{'scenario':48} {'judge':10} {'rolled back':>12} {'canary req':>11} {'errors seen':>12}")
    for name, p_s, p_c, n_c, n_s in SCENARIOS:
        for judge_name in ("meshproxy", "fixed", "fixed-min"):
            rng = random.Random(args.seed)
            outcomes = []
            for _ in range(args.runs):
                if judge_name == "meshproxy":
                    outcomes.append(run_meshproxy(rng, p_s, p_c, n_c, n_s, args.steps, args.threshold,
                                                  args.min_requests, args.confidence))
                elif judge_name == "fixed":
                    outcomes.append(run_fixed(rng, p_s, p_c, n_c, n_s, args.steps, args.threshold))
                else:
                    outcomes.append(run_fixed_min(rng, p_s, p_c, n_c, n_s, args.steps, args.threshold,
                                                  args.min_requests))
            rolled = sum(1 for r, _, _ in outcomes if r) / len(outcomes)
            served = sum(s for _, s, _ in outcomes) / len(outcomes)
            seen = sum(e for _, _, e in outcomes) / len(outcomes)
            print(f"{name:48} {judge_name:10} {100 * rolled:11.1f}% {served:11.0f} {seen:12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
