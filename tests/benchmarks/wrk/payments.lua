-- POST /v1/payments with a unique Idempotency-Key per request (scenario d).
-- Arguments: a file of API keys (one per line, one per tenant; requests rotate over them) and a run
-- nonce, so keys never repeat across runs (a repeated key would be answered as a replay).
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

expected = 202

local tokens = {}
local nonce = ""
local counter = 0

function init(args)
   local file = assert(io.open(args[1], "r"))
   for line in file:lines() do
      if line ~= "" then
         tokens[#tokens + 1] = line
      end
   end
   file:close()
   assert(#tokens > 0, "no API keys in " .. args[1])
   nonce = args[2] or "run"
end

function request()
   counter = counter + 1
   local body = string.format(
      '{"amount":%d,"currency":"EUR","payment_method":"pm_card_visa","description":"Load test order %d"}',
      100 + counter % 5000,
      counter
   )
   return wrk.format("POST", "/v1/payments", {
      ["Authorization"] = "Bearer " .. tokens[(counter + tid) % #tokens + 1],
      ["Content-Type"] = "application/json",
      ["Idempotency-Key"] = string.format("%s-%d-%d", nonce, tid, counter),
   }, body)
end
