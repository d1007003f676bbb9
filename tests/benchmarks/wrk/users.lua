-- GET /v1/users/{id} over many ids, each with its tenant's API key (scenarios b, c and the ceiling a).
-- Argument: a file of "<token>\t<path>" lines written by load.py. Each request picks a line at random;
-- the requests are formatted once in init, so the load generator spends its time sending them.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

local requests = {}

function init(args)
   local file = assert(io.open(args[1], "r"))
   for line in file:lines() do
      local token, path = line:match("^(%S+)\t(%S+)$")
      if token then
         requests[#requests + 1] = wrk.format("GET", path, { ["Authorization"] = "Bearer " .. token })
      end
   end
   file:close()
   assert(#requests > 0, "no requests in " .. args[1])
   -- LuaJIT seeds every state alike: without this, all threads would send the same sequence.
   math.randomseed(7919 * (tid + 1))
end

function request()
   return requests[math.random(#requests)]
end
