"""The real Prometheus (Debian's /usr/bin/prometheus) for tests: scrapes the given targets (every
200 ms unless told) into a throw-away TSDB and answers instant queries."""
from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from controlplane.testing import free_ports


class PrometheusServer:
    def __init__(self, workdir: Path, jobs: dict[str, tuple[str, str]], scrape_interval: str = "200ms"):
        """``jobs``: job name -> (host:port, metrics path)."""
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        scrape = "".join(f"""
- job_name: {name}
  metrics_path: {path}
  static_configs: [{{targets: ["{target}"]}}]""" for name, (target, path) in jobs.items())
        config.write_text(f"global: {{scrape_interval: {scrape_interval}, evaluation_interval: 1s}}\n"
                          f"scrape_configs:{scrape}\n")
        self._log = open(workdir / "prometheus.log", "ab")
        self.proc = subprocess.Popen(["/usr/bin/prometheus", f"--config.file={config}",
                                      f"--storage.tsdb.path={workdir / 'tsdb'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + 20
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"prometheus did not become ready; see {workdir / 'prometheus.log'}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def query(self, promql: str) -> list[dict]:
        """An instant query's vector result: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": " ".join(promql.split())})
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def targets_up(self) -> dict[str, str]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=5) as resp:
            active = json.load(resp)["data"]["activeTargets"]
        return {t["labels"]["job"]: t["health"] for t in active}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()
