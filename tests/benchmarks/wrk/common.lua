-- Shared by the Keel load scripts (tests/benchmarks/load.py), loaded with dofile by each of them.
--
-- wrk counts only statuses above 399 as errors; a scenario's script sets `expected` (200, or 202 for
-- POST /v1/payments) and every other status counts here, 3xx and other 2xx included. wrk runs the
-- script once per thread (its own Lua state) and once more on the main thread, where `done` sums the
-- threads' counters and prints one KEEL_RESULT line that load.py parses, latencies in microseconds.

expected = 200
unexpected = 0
sample = ""
tid = 0

local threads = {}

function setup(thread)
   -- Runs on the main state before each thread's init: gives the thread its number (request streams
   -- and idempotency keys differ per thread).
   thread:set("tid", #threads)
   table.insert(threads, thread)
end

function response(status, headers, body)
   if status ~= expected then
      unexpected = unexpected + 1
      if sample == "" then
         sample = status .. " " .. string.sub(body or "", 1, 300)
      end
   end
end

function done(summary, latency, requests)
   local total, samples = 0, {}
   for _, thread in ipairs(threads) do
      total = total + thread:get("unexpected")
      local s = thread:get("sample")
      if s ~= nil and s ~= "" then
         table.insert(samples, s)
      end
   end
   local e = summary.errors
   io.write(string.format(
      "KEEL_RESULT requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d status=%d timeout=%d "
         .. "unexpected=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d\n",
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
      total, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max
   ))
   for _, s in ipairs(samples) do
      io.write("KEEL_SAMPLE " .. (string.gsub(s, "%s+", " ")) .. "\n")
   end
end
