-- wrk script: POST a two-message chat completion (max_tokens 128) with an api-key header.
--
-- Settings come from the environment (bench/run.py sets them):
--   BENCH_PATH         request path with query, e.g. /api/openai/deployments/bench/chat/completions?api-version=2024-10-21
--   BENCH_STREAM       "1": ask for a stream ("stream": true)
--   BENCH_MIX_PATH     when set, every other request goes here, streamed (a json/stream mix)
--   BENCH_KEY          the api-key header
--   BENCH_STOP_AFTER   stop after this many responses (0: run for wrk's duration); costs a
--                      Lua call per response, so only the memory runs use it
-- done() prints one line, "BENCH_RESULT {json}", with exact percentiles in microseconds.

local function body(stream)
  local tail = stream and ',"stream":true}' or '}'
  return '{"messages":[{"role":"system","content":"You are a helpful assistant."},'
    .. '{"role":"user","content":"Write one sentence about rivers."}],"max_tokens":128'
    .. tail
end

local function build(path, stream)
  local headers = {
    ["Content-Type"] = "application/json",
    ["api-key"] = os.getenv("BENCH_KEY") or "",
  }
  return wrk.format("POST", path, headers, body(stream))
end

local requests = {}
local next_index = 0
local stop_after = 0
local seen = 0

function init(args)
  local path = os.getenv("BENCH_PATH") or "/"
  requests[1] = build(path, os.getenv("BENCH_STREAM") == "1")
  local mix = os.getenv("BENCH_MIX_PATH")
  if mix and mix ~= "" then
    requests[2] = build(mix, true)
  end
  stop_after = tonumber(os.getenv("BENCH_STOP_AFTER") or "0") or 0
  if stop_after <= 0 then
    -- No response() at all: wrk then skips parsing headers and bodies into Lua.
    response = nil
  end
end

function request()
  next_index = next_index % #requests + 1
  return requests[next_index]
end

function response(status, headers, body)
  seen = seen + 1
  if seen == stop_after then
    -- wrk itself would wait out its duration; run.py sends SIGINT on this line.
    io.write("BENCH_STOPPED\n")
    io.flush()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"duration_us":%d,"requests":%d,"bytes":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
