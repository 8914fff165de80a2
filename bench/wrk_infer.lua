-- wrk script for bench/bench_serving_wrk.py: post pre-built V2 inference bodies in turn, print a JSON summary.
-- Usage: wrk -s bench/wrk_infer.lua URL -- BODY_DIR PATH
-- BODY_DIR/index.txt has one line per body: "<file> <content-type> <inference-header-length or ->".
-- Every request is formatted once in init(), so the load generator spends its CPU on sockets, not on Lua.

local prepared = {}
local next_index = 0

function init(args)
  local dir, path = args[1], args[2]
  for line in io.lines(dir .. "/index.txt") do
    local file, content_type, header_length = line:match("^(%S+) (%S+) (%S+)$")
    local f = assert(io.open(dir .. "/" .. file, "rb"))
    local body = f:read("*a")
    f:close()
    local headers = {["Content-Type"] = content_type}
    if header_length ~= "-" then headers["Inference-Header-Content-Length"] = header_length end
    prepared[#prepared + 1] = wrk.format("POST", path, headers, body)
  end
  next_index = math.random(#prepared) - 1  -- threads start at different images
end

function request()
  next_index = next_index % #prepared + 1
  return prepared[next_index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "status_errors": %d, "socket_errors": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
