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
