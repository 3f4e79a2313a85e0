-- Loaded with `wrk -s`: prints one machine-readable line after wrk's own summary.
-- Percentiles come from wrk's own latency histogram (microseconds).
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d bytes=%d err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d lat_p50_us=%.1f lat_p99_us=%.1f lat_mean_us=%.1f lat_max_us=%.1f\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
