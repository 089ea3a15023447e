-- Spreads requests over the tokens listed (one per line) in the file named by $TOKENS_FILE:
-- GET the path after the token on its line, else $BENCH_PATH (default
-- /instances?limit=10), or, with $BENCH_BODY, POST /instances with that JSON body.
local tokens, paths = {}, {}
for line in io.lines(os.getenv("TOKENS_FILE")) do
  local token, path = line:match("^(%S+)%s*(%S*)$")
  tokens[#tokens + 1] = token
  paths[#paths + 1] = path ~= "" and path or os.getenv("BENCH_PATH") or "/instances?limit=10"
end
local body = os.getenv("BENCH_BODY")
local n = 0
request = function()
  n = n + 1
  local at = (n % #tokens) + 1
  local token = tokens[at]
  if body then
    return wrk.format("POST", "/instances",
      { ["Authorization"] = "token " .. token, ["Content-Type"] = "application/json" }, body)
  end
  return wrk.format("GET", paths[at], { ["Authorization"] = "token " .. token })
end

-- The first answer that is not a 200, so a failed run says what went wrong.
local told = false
response = function(status, headers, body)
  if status ~= 200 and not told then
    told = true
    io.stderr:write("first non-200 answer: " .. status .. " " .. body .. "\n")
  end
end
