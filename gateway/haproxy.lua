-- Drop the headers a message's Connection header lists (RFC 9110 7.6.1), both ways.
-- HAProxy removes the fixed hop-by-hop names itself but not the ones listed here.
local function listed(headers)
    local names = {}
    local conn = headers["connection"]
    if conn == nil then return names end
    for _, value in pairs(conn) do
        for token in string.gmatch(value, "[^,%s]+") do
            names[#names + 1] = string.lower(token)
        end
    end
    return names
end

core.register_action("drop_listed_request", {"http-req"}, function(txn)
    for _, name in ipairs(listed(txn.http:req_get_headers())) do
        txn.http:req_del_header(name)
    end
    txn.http:req_del_header("connection")
end, 0)

core.register_action("drop_listed_response", {"http-res"}, function(txn)
    for _, name in ipairs(listed(txn.http:res_get_headers())) do
        txn.http:res_del_header(name)
    end
end, 0)

-- Limit request bodies that come without a Content-Length (chunked). The frontend answers
-- 413 from Content-Length before it reads any body; a chunked body has no size up front, so
-- it is counted as it streams through. HAProxy builds three Lua contexts for every stream a
-- Lua filter is attached to, so this filter sits only on the routes' twin backends that
-- take chunked requests (see haproxy_config.py), never on the common path.
--
-- Over the limit, nothing more goes upstream and the rest of the body is read and dropped;
-- at its end the filter fails the request, so the upstream connection is cut before it sees
-- a complete message, and the backend's `http-error` answers 413 (txn.body_error is set).
-- Reading the rest first matters: closing a socket with unread data makes the kernel send
-- a reset, which would destroy the 413 on its way to the client. A body still coming
-- <drain_s> seconds after the limit is cut, reset or not (nginx's lingering_time). Two HAProxy 2.8 details
-- shape this: a negative number returned from http_payload is read as "forward all" (it is
-- compared as unsigned), and txn:done() from a filter leaves the reply unsent; returning -1
-- from http_end, or raising an error, does fail the request.
local function now_s()
    local t = core.now()
    return t.sec + t.usec / 1e6
end

local BodyLimit = {id = "raygate body limit", flags = filter.FLT_CFG_FL_HTX}
BodyLimit.__index = BodyLimit

function BodyLimit:new()
    return setmetatable({seen = 0, limit = self.limit, drain_s = self.drain_s, over = false},
                        BodyLimit)
end

function BodyLimit:start_analyze(txn, chn)
    if not chn:is_resp() then filter.register_data_filter(self, chn) end
end

function BodyLimit:http_payload(txn, msg)
    local n = msg:input()
    self.seen = self.seen + n
    if not self.over then
        if self.seen <= self.limit then return n end
        self.over = now_s()
        txn:set_var("txn.body_error", string.format("request body over %d bytes", self.limit))
    end
    msg:remove(0, n)
    if msg:eom() then
        return msg:input()  -- the end-of-message marker: lets http_end run
    end
    if now_s() - self.over >= self.drain_s then
        error("request body still coming " .. self.drain_s .. " s past the limit: cut")
    end
    return 0
end

function BodyLimit:http_end(txn, msg)
    if self.over then return -1 end
    return filter.CONTINUE
end

core.register_filter("body_limit", BodyLimit, function(flt, args)
    flt.limit = tonumber(args[1])
    flt.drain_s = tonumber(args[2])
    return flt
end)
