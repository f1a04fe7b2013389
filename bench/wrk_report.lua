-- wrk's done() callback: print every figure the benchmark needs on one line,
-- as JSON, after the marker WRK_JSON.  wrk --latency stops at p99; this adds
-- p99.9 and p99.99, and the error counts (errors.status = responses with a
-- status > 399, which for these apps is every non-2xx response).
-- Only done() is defined: a response() callback would slow wrk down.
done = function(summary, latency, requests)
  local e = summary.errors
  local function p(q) return latency:percentile(q) end
  io.write(string.format(
    'WRK_JSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,' ..
    '"errors":{"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f},' ..
    '"latency_us":{"min":%.0f,"mean":%.1f,"stdev":%.1f,"max":%.0f,' ..
    '"p50":%.0f,"p75":%.0f,"p90":%.0f,"p99":%.0f,"p99_9":%.0f,"p99_99":%.0f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    p(50), p(75), p(90), p(99), p(99.9), p(99.99)))
end
