"""Progressive delivery inside the control plane: the ``Canary`` resource and its controller.

  spec.py        the Canary resource: decode (every error with its path) and references
  routing.py     pure rewrites of the driven VirtualService / DestinationRule
  samples.py     per-version counts and latency histograms read from the proxies
  stats.py       exact one-sided tests (Fisher, binomial), histogram quantiles
  policy.py      metric checks, the judge, the step plan, the phase table (all pure)
  hooks.py       webhooks and custom PromQL metrics (every call bounded)
  state.py       status beside the store (SQLite table / etcd keys) and leader election
  controller.py  one owned task per canary: the check loop
  api.py         /apis/delivery.meshproxy.io/v1/... and the console's JSON (/ui)
"""
