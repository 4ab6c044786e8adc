-- POST the JSON body in $WRK_BODY to the URL given to wrk, and at the end print one line
--   WRK_JSON {...}
-- with exact figures (latencies in microseconds) for loadtest/overhead.py to read.
--
--   WRK_BODY='{"model":"chat","messages":[{"role":"user","content":"Hello"}]}' \
--     wrk -t1 -c16 -d10s --latency -s loadtest/wrk/post_json.lua http://127.0.0.1:8080/v1/chat/completions

wrk.method = "POST"
wrk.body = os.getenv("WRK_BODY") or error("set WRK_BODY to the JSON request body")
wrk.headers["Content-Type"] = "application/json"

-- $WRK_DELAY_MS paces each connection: it waits that long after an answer before sending
-- the next request (a baseline at a given load instead of flat out).
local delay_ms = tonumber(os.getenv("WRK_DELAY_MS") or "")
if delay_ms then
  function delay() return delay_ms end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
