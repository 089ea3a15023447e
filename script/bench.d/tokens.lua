-- Spreads requests over the tokens listed (one per line) in the file named by $TOKENS_FILE:
-- GET the path after the token on its line, else $BENCH_PATH (default
-- /instances?limit=10), or, with $BENCH_BODY, POST /instances with that JSON body.
--
-- Each wrk thread formats its requests once, when it starts, and sends them in turn: the
-- load generator shares the machine's cores with the server and Postgres, so it does no
-- work per request beyond sending and reading (pgbench, the reference, formats nothing
-- either). There is no response hook, which would copy every answer into Lua: wrk counts
-- answers that are not 2xx ("Non-2xx or 3xx responses"), script/bench stops on any, and
-- cb_first_answer (script/lib.sh) shows one.
local requests = {}
local n = 0

init = function(args)
  local body = os.getenv("BENCH_BODY")
  for line in io.lines(os.getenv("TOKENS_FILE")) do
    local token, path = line:match("^(%S+)%s*(%S*)$")
    if body then
      requests[#requests + 1] = wrk.format("POST", "/instances",
        { ["Authorization"] = "token " .. token, ["Content-Type"] = "application/json" }, body)
    else
      path = path ~= "" and path or os.getenv("BENCH_PATH") or "/instances?limit=10"
      requests[#requests + 1] = wrk.format("GET", path, { ["Authorization"] = "token " .. token })
    end
  end
end

request = function()
  n = n + 1
  return requests[(n % #requests) + 1]
end
