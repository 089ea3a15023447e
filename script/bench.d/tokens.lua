-- Spreads requests over the tokens listed (one per line) in the file named by $TOKENS_FILE:
-- GET $BENCH_PATH (default /instances?limit=10), or, with $BENCH_BODY, POST /instances
-- with that JSON body.
local tokens = {}
for line in io.lines(os.getenv("TOKENS_FILE")) do
  tokens[#tokens + 1] = line
end
local body = os.getenv("BENCH_BODY")
local n = 0
request = function()
  n = n + 1
  local token = tokens[(n % #tokens) + 1]
  if body then
    return wrk.format("POST", "/instances",
      { ["Authorization"] = "token " .. token, ["Content-Type"] = "application/json" }, body)
  end
  return wrk.format("GET", os.getenv("BENCH_PATH") or "/instances?limit=10",
    { ["Authorization"] = "token " .. token })
end

-- The first answer that is not a 200, so a failed run says what went wrong.
local told = false
response = function(status, headers, body)
  if status ~= 200 and not told then
    told = true
    io.stderr:write("first non-200 answer: " .. status .. " " .. body .. "\n")
  end
end
