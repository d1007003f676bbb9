-- GET /healthz (scenario e): the URL's path is the request; this script only adds the status count.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")
