#!lua name=streamsync

--[[
streamsync Functions library: applies Debezium change events to Redis, idempotently.

Every change carries its source position (streamsync/positions.py: digits only, ordered like the
database committed the changes). streamsync keeps one record per row: a change is applied only
when its position is strictly greater than the recorded one; an equal or older position is a
no-op reported as stale. So duplicates, replays and out-of-order delivery never roll a row back.
Positions compare as strings (the server's collation orders digit strings numerically).

Records (library 2.0, docs/bookkeeping.md) are fields of small hashes, the rule's buckets: the
worker computes a record's bucket (linear hashing over crc32 of the field) and names it in KEYS;
bucket 0 of each rule table holds the table's meta fields. Every key the library touches arrives
in KEYS, but for the keys a placement record says a row was in (see there); it never scans the
keyspace.

Row functions reply with one status per row:
  1 applied, 0 stale (position not newer), 2 skipped (an update with unchanged TOAST columns for a
  row that is not cached: the key stays absent so no partial row is cached), 3 dropped (the cached
  row could not be completed, so it was deleted: the next full change or read fills it again),
  4 rebucketed (the table's buckets were split since the worker addressed them: nothing done, the
  worker sends the row again), 5 unknown (the row's record was evicted and the worker named no
  floor: nothing done, the worker sends the row again with one), or an error string when a Redis
  command failed for that row (the other rows still apply).
--]]

local VERSION = '2.2.0'

local APPLIED, STALE, SKIPPED, DROPPED, REBUCKETED, UNKNOWN = 1, 0, 2, 3, 4, 5

-- Meta fields of a rule table's buckets. A record field starting with '#' is stored with a second
-- '#' in front (streamsync/buckets.py), so no record field can be one of these.
local META_COUNT = '#c'   -- in bucket 0: records held by the table
local META_BUCKETS = '#n' -- in bucket 0: the table's bucket count (absent: 1)
local META_SENTINEL = '#' -- in every other bucket: a bucket that exists is never empty
local META_FLOOR = '#f'   -- in a bucket rebuilt after an eviction: the position of its unknown rows
                          -- (in bucket 0 rebuilt: of the table's unknown rows, in every bucket)
local META_HIGH = '#h'    -- in bucket 0: no older than any position a call ever carried for the table
local META_PENDING = '#p' -- in bucket 0 found gone: the token its rebuild waits for (see below)
local META_LOSSY = '#l'   -- in bucket 0: records of the table were evicted (rows may be unrecorded)

-- A record value: '<position>' while its row is cached without a TTL, else
-- '<position>~<unix seconds after which the record may go>' (a placement record then says where
-- the row is). A position never holds '~' and never is a proper prefix of another, so comparing
-- the whole value with a position compares positions (an equal position with a suffix compares
-- greater: stale, as it should).
local EXPIRES = '~'

local function is_meta(field)
    return string.byte(field, 1) == 35 and string.byte(field, 2) ~= 35 -- '#', not '##'
end

local function expire_target(target, ttl_ms)
    if ttl_ms > 0 then
        redis.call('PEXPIRE', target, ttl_ms)
    end
end

--[[ Writing a single-value target (hash, JSON document, string). Each body writes the target and
returns APPLIED, SKIPPED or DROPPED; the caller has checked the position and records it. --]]

--[[ 'H' full hash: n, n field/value pairs. The hash becomes exactly those fields (null columns
are absent fields): a field the row no longer has (a column dropped or null now) is found by the
count, and the hash rewritten. --]]
local function hash_full(target, argv, i, ttl_ms)
    local n = tonumber(argv[i])
    if n == 0 then
        redis.call('DEL', target)
        return APPLIED
    end
    local last = i + 2 * n
    local written = redis.pcall('HSET', target, unpack(argv, i + 1, last))
    if type(written) == 'table' and written.err then
        -- the key holds another type: the rule owns it, so it is replaced
        redis.call('DEL', target)
        redis.call('HSET', target, unpack(argv, i + 1, last))
    elseif redis.call('HLEN', target) ~= n then
        redis.call('DEL', target)
        redis.call('HSET', target, unpack(argv, i + 1, last))
    end
    expire_target(target, ttl_ms)
    return APPLIED
end

--[[ 'h' partial hash (some columns are unchanged TOAST values, not sent): n_set, n_null, n_keep,
n_set field/value pairs, n_null fields, n_keep fields. The set fields are written, the null ones
removed, and the kept ones must already be cached (and nothing else): otherwise the row cannot be
completed and is not cached. --]]
local function hash_partial(target, argv, i, ttl_ms)
    local n_set, n_null, n_keep = tonumber(argv[i]), tonumber(argv[i + 1]), tonumber(argv[i + 2])
    local first_set = i + 3
    local first_null = first_set + 2 * n_set
    local first_keep = first_null + n_null
    local kind = redis.call('TYPE', target).ok
    if kind == 'none' then
        return SKIPPED
    end
    local complete = kind == 'hash'
    for k = first_keep, first_keep + n_keep - 1 do
        if not complete then break end
        complete = redis.call('HEXISTS', target, argv[k]) == 1
    end
    if complete then
        if n_set > 0 then
            redis.call('HSET', target, unpack(argv, first_set, first_null - 1))
        end
        if n_null > 0 then
            redis.call('HDEL', target, unpack(argv, first_null, first_keep - 1))
        end
        complete = redis.call('HLEN', target) == n_set + n_keep
    end
    if not complete then
        redis.call('DEL', target)
        return DROPPED
    end
    expire_target(target, ttl_ms)
    return APPLIED
end

--[[ Top-level members of a JSON object text, as {member name token -> raw value text}, and the
name tokens in the order they appear.
The name token is the member name exactly as written, quotes and escapes included: documents are
written by streamsync (orjson, canonical), so the same name always has the same token. Returns nil
when the text is not a JSON object. Values are sliced, never decoded, so numbers keep every digit
(cjson would turn a 64-bit integer into a double).
--]]
local function json_members(text)
    local members, names = {}, {}
    local pos = string.find(text, '%S')
    if not pos or string.sub(text, pos, pos) ~= '{' then
        return nil
    end
    pos = pos + 1
    local len = #text
    while pos <= len do
        local s = string.find(text, '%S', pos)
        if not s then return nil end
        local c = string.sub(text, s, s)
        if c == '}' then return members, names end
        if c == ',' then
            s = string.find(text, '%S', s + 1)
            if not s then return nil end
            c = string.sub(text, s, s)
        end
        if c ~= '"' then return nil end
        -- the member name: a string token, skipping escaped characters
        local e = s + 1
        while true do
            local q = string.find(text, '["\\]', e)
            if not q then return nil end
            if string.sub(text, q, q) == '\\' then
                e = q + 2
            else
                e = q
                break
            end
        end
        local name = string.sub(text, s, e)
        local colon = string.find(text, '%S', e + 1)
        if not colon or string.sub(text, colon, colon) ~= ':' then return nil end
        local v = string.find(text, '%S', colon + 1)
        if not v then return nil end
        -- the value: scan to the ',' or '}' that ends it at depth 0, outside strings
        local depth, k, in_string = 0, v, false
        while k <= len do
            local ch = string.sub(text, k, k)
            if in_string then
                if ch == '\\' then
                    k = k + 1
                elseif ch == '"' then
                    in_string = false
                end
            elseif ch == '"' then
                in_string = true
            elseif ch == '{' or ch == '[' then
                depth = depth + 1
            elseif ch == '}' or ch == ']' then
                if depth == 0 then break end
                depth = depth - 1
            elseif ch == ',' and depth == 0 then
                break
            end
            k = k + 1
        end
        if k > len then return nil end
        local value = string.gsub(string.sub(text, v, k - 1), '%s+$', '')
        if members[name] == nil then
            names[#names + 1] = name
        end
        members[name] = value
        pos = k
    end
    return nil
end

local function set_document(target, doc, ttl_ms)
    if ttl_ms > 0 then
        redis.call('SET', target, doc, 'PX', ttl_ms)
    else
        redis.call('SET', target, doc)
    end
end

--[[ 'J' full JSON document or string value: the text. --]]
local function json_full(target, argv, i, ttl_ms)
    set_document(target, argv[i], ttl_ms)
    return APPLIED
end

--[[ A partial JSON row: n, then n member triples: name token (the JSON string as written, e.g.
"\"bio\""), kind ('v' value | 'k' keep the cached value), raw JSON value ('' for 'k'). The cached
document's members (json_members) supply the kept ones. Returns the whole document's text, or nil
when a kept member is not cached. --]]
local function completed(cached, argv, i)
    local n = tonumber(argv[i])
    local parts = {}
    for m = 0, n - 1 do
        local j = i + 1 + 3 * m
        local name, value = argv[j], argv[j + 2]
        if argv[j + 1] == 'k' then
            value = cached and cached[name]
        end
        if value == nil then
            return nil
        end
        parts[#parts + 1] = name .. ':' .. value
    end
    return '{' .. table.concat(parts, ',') .. '}'
end

--[[ 'j' partial JSON text (see completed): without a cached document the row is not cached, and
one lacking a kept member is dropped. --]]
local function json_partial(target, argv, i, ttl_ms)
    local kind = redis.call('TYPE', target).ok
    if kind == 'none' then
        return SKIPPED
    end
    local doc = completed(kind == 'string' and json_members(redis.call('GET', target)), argv, i)
    if not doc then
        redis.call('DEL', target)
        return DROPPED
    end
    set_document(target, doc, ttl_ms)
    return APPLIED
end

--[[ RedisJSON documents ('N', 'n': as 'J', 'j', the module parsing the text). JSON.SET on an
existing document keeps its TTL, as HSET does. --]]
local REDISJSON_TYPE = 'ReJSON-RL'

local function set_redisjson(target, doc, ttl_ms)
    local done = redis.pcall('JSON.SET', target, '$', doc)
    if type(done) == 'table' and done.err then
        if redis.call('TYPE', target).ok == REDISJSON_TYPE then
            return error(done.err)
        end
        -- the key holds another type (a text document before the module was loaded): the rule
        -- owns it, so it is replaced
        redis.call('DEL', target)
        redis.call('JSON.SET', target, '$', doc)
    end
    expire_target(target, ttl_ms)
end

local function redisjson_full(target, argv, i, ttl_ms)
    set_redisjson(target, argv[i], ttl_ms)
    return APPLIED
end

local function redisjson_partial(target, argv, i, ttl_ms)
    local kind = redis.call('TYPE', target).ok
    if kind == 'none' then
        return SKIPPED
    end
    -- the cached document as the module writes it (compact, every digit of its numbers)
    local cached = kind == REDISJSON_TYPE and json_members(redis.call('JSON.GET', target))
    local doc = completed(cached, argv, i)
    if not doc then
        redis.call('DEL', target)
        return DROPPED
    end
    set_redisjson(target, doc, ttl_ms)
    return APPLIED
end

--[[ Parts: keys several rules write (merge). A rule merging into another rule's key, and the rule
owning that key, each write and remove only their own fields or members and keep the others'; the
key goes with its last part. The owning rule's part is every field no merging rule owns, so its
delete never removes a merged part newer than itself (a row of the owner's re-created row, whose
own changes may arrive after the delete). --]]

--[[ 'p' hash part: n_set, n_null, n_keep, n_set field/value pairs, n_null fields, n_keep fields
(unchanged TOAST columns, which must be cached). The set fields are written and the null ones
removed; the hash's other fields are left alone. A part that cannot be completed is removed (its
fields) and the row dropped. --]]
local function hash_part(target, argv, i, ttl_ms)
    local n_set, n_null, n_keep = tonumber(argv[i]), tonumber(argv[i + 1]), tonumber(argv[i + 2])
    local first_set = i + 3
    local first_null = first_set + 2 * n_set
    local first_keep = first_null + n_null
    local kind = redis.call('TYPE', target).ok
    if kind ~= 'hash' and kind ~= 'none' then
        -- the key holds another type: the rules writing it own it, so it is replaced
        redis.call('DEL', target)
        kind = 'none'
    end
    if n_keep > 0 then
        if kind == 'none' then
            return SKIPPED
        end
        for k = first_keep, first_keep + n_keep - 1 do
            if redis.call('HEXISTS', target, argv[k]) == 0 then
                local own = {}
                for j = first_set, first_null - 1, 2 do
                    own[#own + 1] = argv[j]
                end
                for j = first_null, first_keep + n_keep - 1 do
                    own[#own + 1] = argv[j]
                end
                redis.call('HDEL', target, unpack(own))
                return DROPPED
            end
        end
    end
    if n_set > 0 then
        redis.call('HSET', target, unpack(argv, first_set, first_null - 1))
    end
    if n_null > 0 then
        redis.call('HDEL', target, unpack(argv, first_null, first_keep - 1))
    end
    expire_target(target, ttl_ms)
    return APPLIED
end

-- 'q' hash part removed: n, n fields.
local function hash_part_removed(target, argv, i)
    local n = tonumber(argv[i])
    if n > 0 then
        redis.call('HDEL', target, unpack(argv, i + 1, i + n))
    end
    return APPLIED
end

-- 'k' hash owner's part removed: n, n fields merging rules own, which stay; the others go.
local function hash_owner_removed(target, argv, i)
    local kind = redis.call('TYPE', target).ok
    if kind ~= 'hash' then
        if kind ~= 'none' then
            redis.call('DEL', target)
        end
        return APPLIED
    end
    local merged = {}
    for j = i + 1, i + tonumber(argv[i]) do
        merged[argv[j]] = true
    end
    local gone = {}
    for _, field in ipairs(redis.call('HKEYS', target)) do
        if not merged[field] then
            gone[#gone + 1] = field
        end
    end
    if #gone > 0 then
        redis.call('HDEL', target, unpack(gone))
    end
    return APPLIED
end

-- A JSON document's members and their order, whether the key holds it as text or in RedisJSON
-- (a document of the other encoding is read too, and written back as the rule's), and whether
-- the key exists.
local function document_members(target)
    local kind = redis.call('TYPE', target).ok
    local text = nil
    if kind == REDISJSON_TYPE then
        text = redis.call('JSON.GET', target)
    elseif kind == 'string' then
        text = redis.call('GET', target)
    end
    if text then
        local members, names = json_members(text)
        if members then
            return members, names, true
        end
    end
    return {}, {}, kind ~= 'none'
end

-- The JSON object text of ``members`` (name token -> raw value) in ``names`` order (names
-- without a value left out); nil when none is left.
local function object_text(members, names)
    local parts = {}
    for _, name in ipairs(names) do
        local value = members[name]
        if value ~= nil then
            parts[#parts + 1] = name .. ':' .. value
        end
    end
    if #parts == 0 then
        return nil
    end
    return '{' .. table.concat(parts, ',') .. '}'
end

-- Writes a document of ``members`` in ``names`` order, or deletes it when none is left.
local function write_members(target, encoding, members, names, ttl_ms)
    local doc = object_text(members, names)
    if not doc then
        redis.call('DEL', target)
        return
    end
    if encoding == 'r' then
        set_redisjson(target, doc, ttl_ms)
    elseif ttl_ms > 0 then
        redis.call('SET', target, doc, 'PX', ttl_ms)
    else
        -- a part written by a rule without a TTL keeps the key's, as HSET and JSON.SET do
        redis.call('SET', target, doc, 'KEEPTTL')
    end
end

--[[ 'P' JSON part: the encoding ('t' text, 'r' RedisJSON), n, then n member triples as for 'j'
(a 'k' member keeps the cached value). The document's other members are kept; one lacking a kept
member cannot be completed: the part is removed and the row dropped. --]]
local function json_part(target, argv, i, ttl_ms)
    local encoding, n = argv[i], tonumber(argv[i + 1])
    local members, names, exists = document_members(target)
    local dropped = false
    for m = 0, n - 1 do
        local j = i + 2 + 3 * m
        local name = argv[j]
        if members[name] == nil then
            names[#names + 1] = name
        end
        if argv[j + 1] == 'k' then
            if members[name] == nil then
                dropped = true
            end
        else
            members[name] = argv[j + 2]
        end
    end
    if dropped then
        if not exists then
            return SKIPPED
        end
        for m = 0, n - 1 do
            members[argv[i + 2 + 3 * m]] = nil
        end
        write_members(target, encoding, members, names, 0)
        return DROPPED
    end
    write_members(target, encoding, members, names, ttl_ms)
    return APPLIED
end

--[[ 'Q' JSON part removed, 'K' JSON owner's part removed: the encoding, n, n member name
tokens: those members go ('Q'), or all but those, the merging rules' ('K'); the document goes
when no member is left. --]]
local function json_members_removed(keep_named)
    return function(target, argv, i)
        local encoding, n = argv[i], tonumber(argv[i + 1])
        local members, names, exists = document_members(target)
        if exists then
            local named = {}
            for m = 0, n - 1 do
                local name = argv[i + 2 + m]
                named[name] = members[name]
                members[name] = nil
            end
            write_members(target, encoding, keep_named and named or members, names, 0)
        end
        return APPLIED
    end
end

--[[ Leases for cache-aside fills (streamsync_lease_get, streamsync_lease_fill; README "Cache-aside
fills that cannot go stale"). An application that misses a key its invalidate rule deletes takes
a lease, reads the database, and fills the key only while the lease holds: an invalidation of the
key (an 'I' row) voids every outstanding lease, so a value read before a change committed is never
written after streamsync deleted the key for that change. The lease lives in a hash next to the
key, in its hash slot: <state_prefix><key with its hash tag>, or <state_prefix>{<key>} for a key
without braces: field 't' the outstanding lease's token, 'n' a counter making tokens unique.
A key whose braces are no hash tag takes no lease. --]]
local LEASE_TOKEN, LEASE_COUNT = 't', 'n'

local function lease_key(prefix, key)
    local open = string.find(key, '{', 1, true)
    if open then
        local close = string.find(key, '}', open + 1, true)
        if close and close > open + 1 then
            return prefix .. key
        end
        return nil
    end
    if key == '' or string.find(key, '}', 1, true) then
        return nil
    end
    return prefix .. '{' .. key .. '}'
end

-- Voids the outstanding lease of ``key``, if any (an invalidation of the key).
local function void_lease(prefix, key)
    local lease = lease_key(prefix, key)
    if lease then
        redis.call('HDEL', lease, LEASE_TOKEN)
    end
end

--[[ streamsync_lease_get
KEYS: the key
ARGV: the state prefix, the lease's time to live in milliseconds
Reply: {'hit', value} when the key holds a value; {'lease', token} when it does not and no lease is
outstanding: the caller reads the database and calls streamsync_lease_fill with the token;
{'wait', milliseconds} when another caller holds the lease (for at most that long): read again
soon, or read the database without filling.
--]]
local function lease_get(keys, argv)
    local key = keys[1]
    local value = redis.call('GET', key)
    if value then
        return {'hit', value}
    end
    local lease = lease_key(argv[1], key)
    if not lease then
        return redis.error_reply('streamsync_lease_get: ' .. key
            .. ' has braces that are no hash tag: it takes no lease')
    end
    if redis.call('HEXISTS', lease, LEASE_TOKEN) == 1 then
        return {'wait', redis.call('PTTL', lease)}
    end
    local time = redis.call('TIME')
    local token = redis.call('HINCRBY', lease, LEASE_COUNT, 1) .. '-' .. time[1] .. '.' .. time[2]
    redis.call('HSET', lease, LEASE_TOKEN, token)
    redis.call('PEXPIRE', lease, tonumber(argv[2]))
    return {'lease', token}
end

--[[ streamsync_lease_fill
KEYS: the key
ARGV: the state prefix, the lease's token, then the value and its time to live in milliseconds (0:
none), or nothing to give the lease up (the row does not exist)
Writes the value only if the lease is still outstanding: no invalidation voided it, it did not
expire. Reply: 1 written (or given up), 0 refused (the caller's value may be older than a change:
it is not cached).
--]]
local function lease_fill(keys, argv)
    local key = keys[1]
    local lease = lease_key(argv[1], key)
    if not lease or redis.call('HGET', lease, LEASE_TOKEN) ~= argv[2] then
        return 0
    end
    redis.call('HDEL', lease, LEASE_TOKEN)
    if argv[3] ~= nil then
        local ttl_ms = tonumber(argv[4]) or 0
        if ttl_ms > 0 then
            redis.call('SET', key, argv[3], 'PX', ttl_ms)
        else
            redis.call('SET', key, argv[3])
        end
    end
    return 1
end

-- 'D' delete: the target is deleted (its record stays, as a tombstone).
local function remove(target)
    redis.call('DEL', target)
    return APPLIED
end

-- 'I' invalidate: the state prefix. The target is deleted, and its outstanding lease voided.
local function invalidate(target, argv, i)
    redis.call('DEL', target)
    void_lease(argv[i], target)
    return APPLIED
end

-- row kinds writing a single-value target: the body, the number of ARGV items it spans (given the
-- index of its first item), and whether it removes the row
local SINGLE = {
    H = {hash_full, function(argv, i) return 1 + 2 * tonumber(argv[i]) end, false},
    h = {hash_partial, function(argv, i)
        return 3 + 2 * tonumber(argv[i]) + tonumber(argv[i + 1]) + tonumber(argv[i + 2])
    end, false},
    J = {json_full, function() return 1 end, false},
    j = {json_partial, function(argv, i) return 1 + 3 * tonumber(argv[i]) end, false},
    N = {redisjson_full, function() return 1 end, false},
    n = {redisjson_partial, function(argv, i) return 1 + 3 * tonumber(argv[i]) end, false},
    p = {hash_part, function(argv, i)
        return 3 + 2 * tonumber(argv[i]) + tonumber(argv[i + 1]) + tonumber(argv[i + 2])
    end, false},
    q = {hash_part_removed, function(argv, i) return 1 + tonumber(argv[i]) end, true},
    P = {json_part, function(argv, i) return 2 + 3 * tonumber(argv[i + 1]) end, false},
    Q = {json_members_removed(false), function(argv, i) return 2 + tonumber(argv[i + 1]) end, true},
    k = {hash_owner_removed, function(argv, i) return 1 + tonumber(argv[i]) end, true},
    K = {json_members_removed(true), function(argv, i) return 2 + tonumber(argv[i + 1]) end, true},
    D = {remove, function() return 0 end, true},
    I = {invalidate, function() return 1 end, true},
}

local function row_error(result)
    if type(result) == 'table' and result.err then
        return result.err
    end
    return tostring(result)
end

--[[ Guarded tables. On a cache Redis that may evict any key (a separate target with an allkeys
policy), a rule table's buckets can be evicted with their records: a row without a record may
then be new, or a row whose record is gone, last written at an unknown position. The worker names
each such table's guard in the call (docs/bookkeeping.md, "When Redis evicts"):
  'new'            it is the table's first writer ever: a missing bucket 0 is a new table;
  '?'              any other call;
  '<token>@<floor>' a retry after bucket 0 was found gone (below).
Bucket 0 keeps the table's high mark (META_HIGH): every call raises it to the newest position it
carries, in the same atomic call, so while bucket 0 lives the mark is no older than any change
ever applied to the table. A bucket found gone (a bucket that exists is never empty) is rebuilt
with the mark as its floor, and a row without a record in it is taken to be at the floor: a
change not newer leaves the row uncached (its target deleted), rather than risk writing a change
older than one already applied.
Bucket 0 found gone takes the mark with it, and the bucket count: it is replaced by a pending
token, and every row of the table replies 5 (unknown) with the token in the reply. The worker
then reads the table's high-water mark in the streams' Redis (raised before any batch is sent, so
no older than any change applied before the token was set) and sends the rows again with
'<token>@<mark>'. Bucket 0 is rebuilt only if the token is still there: nothing was applied to
the table since it was set (every row of it replied 5), so the mark covers every change ever
applied. The rebuilt bucket 0 holds the worker's bucket count and the mark as the table's floor,
for the rows of every bucket: a row whose record sits in a bucket the count no longer reaches
is taken to be at that floor too. A token found gone again means a mark read too early: the
rows reply 5 with a new token.
Returns the recorded position (or the floor), and whether it is the floor. --]]
local function recorded(bucket, field, guard, meta)
    if guard == 'lost' then
        return nil, false
    end
    local current = redis.call('HGET', bucket, field)
    if current or not guard then
        return current, false
    end
    if bucket ~= meta and redis.call('EXISTS', bucket) == 0 then
        redis.call('HSET', bucket, META_SENTINEL, '', META_FLOOR, guard.high)
        redis.call('HSET', meta, META_LOSSY, 1)
        return guard.high, true
    end
    local floor = guard.floor
    if bucket ~= meta then
        local own = redis.call('HGET', bucket, META_FLOOR)
        if own and (not floor or own > floor) then
            floor = own
        end
    end
    return floor, floor ~= false
end

--[[ A guarded table's state for a call: false (it is new: nothing of it can be lost), 'lost'
(bucket 0 is gone, its rebuild waits for the token set there) or {floor, high}. --]]
local function guard_of(meta_key, guard, meta, buckets)
    local pending = meta[5]
    if pending then
        local token, floor = string.match(guard, '^(.-)@(.+)$')
        if token ~= pending then
            return 'lost', pending
        end
        redis.call('HSET', meta_key, META_BUCKETS, buckets, META_COUNT, 0, META_FLOOR, floor,
            META_HIGH, floor, META_LOSSY, 1)
        redis.call('HDEL', meta_key, META_PENDING)
        meta[1], meta[2], meta[3], meta[4], meta[5] = buckets, 0, floor, floor, false
        return {floor = floor, high = floor}
    end
    if meta[4] then
        return {floor = meta[3], high = meta[4]}
    end
    if guard == 'new' and not meta[1] and not meta[2] then
        return false
    end
    local time = redis.call('TIME')
    local token = time[1] .. '.' .. time[2]
    redis.call('HSET', meta_key, META_PENDING, token)
    return 'lost', token
end

-- A single-value row against its record in a bucket: (status, whether the record is new).
local function single_row(body, removes, target, bucket, field, pos, argv, i, ttl_ms, now,
                          tombstone_s, guard, meta)
    local current, at_floor = recorded(bucket, field, guard, meta)
    if current == nil then
        return UNKNOWN, false
    end
    if current and current >= pos then
        if at_floor then
            -- maybe newer than what the evicted record held, maybe older: not cached
            redis.call('DEL', target)
            return DROPPED, false
        end
        return STALE, false
    end
    local status = body(target, argv, i, ttl_ms)
    local value = pos
    if status ~= APPLIED or removes then
        value = pos .. EXPIRES .. (now + tombstone_s)
    elseif ttl_ms > 0 then
        value = pos .. EXPIRES .. (now + math.ceil(ttl_ms / 1000) + tombstone_s)
    end
    redis.call('HSET', bucket, field, value)
    return status, not current or at_floor
end

--[[ Placement records. A rule whose structure gathers many rows (set, sorted set, list, stream),
or whose key may move when a non-key column changes ('M' below), keeps one record per source row
in its buckets: the field is the row identity, the value the row's position (and '~' with the
time it may go, as above), then where the row is placed, if anywhere:
  T set member, the member is the row    the key's middle
  S set member                           <n>:<the key's middle, n bytes><the member's middle>
  Z, Y sorted-set member                 as T, S
  L list entries                         <n>:<the key's middle><its entries' positions>
  M single-value key                     the key's middle
  E, F child nested in a JSON document   as T, S (the member is the child's key in the map)
  O the placement is too long for a bucket: it is in the table's overflow hash, under the field
A middle is a key or member without what its template fixes before and after it (the table's
shape, sent by the worker per table): 'plan:{plan}:users' keeps 'free', a member equal to the row
identity keeps nothing. A list's entries are the positions that placed them, oldest first, ','
between, and '' for the record's own position. Positions hold digits and 'e' only, so the first
'~' or capital letter ends one.
Events carry no before-image under PostgreSQL's default REPLICA IDENTITY, so this record is the
only way to learn where a row was: the old member, key or entry is removed when the row moves, is
deleted, or leaves the rule's filter, and only for a change newer than the record. The keys a
record names are not in KEYS (they cannot be known before reading it): they are put together from
the table's shape, which names them as streamsync.keys does. In a Redis Cluster such a rule pins
its keys, its buckets and its lists' companions to one slot with a hash tag.
--]]

-- A placement longer than this would make its bucket a hashtable (hash-max-listpack-value).
local VALUE_MAX = 64
local OVERFLOW = 'O'
-- the member of a T or Z placement is the row; S and Y name it
local NAMED = {T = 'S', Z = 'Y', E = 'F'}
local KIND_OF_NAMED = {S = 'T', Y = 'Z', F = 'E'}

-- A record value -> the position, and the placement's kind and data (nil: placed nowhere).
local function record_parts(value)
    local mark = string.find(value, '[~A-Z]')
    if not mark then
        return value, nil, nil
    end
    local pos = string.sub(value, 1, mark - 1)
    if string.byte(value, mark) == 126 then -- '~'
        mark = string.find(value, '%D', mark + 1)
        if not mark then
            return pos, nil, nil
        end
    end
    return pos, string.sub(value, mark, mark), string.sub(value, mark + 1)
end

-- The record of `field`: position, placement kind and data, and whether it overflowed.
local function read_record(ctx, bucket, field)
    local value = redis.call('HGET', bucket, field)
    if not value then
        return nil, nil, nil, false
    end
    local pos, kind, data = record_parts(value)
    if kind ~= OVERFLOW then
        return pos, kind, data, false
    end
    local placed = redis.call('HGET', ctx.overflow, field)
    if not placed then
        return pos, nil, nil, true
    end
    return pos, string.sub(placed, 1, 1), string.sub(placed, 2), true
end

-- Write the record of `field`: a row placed nowhere (placed nil) goes after the tombstone
-- window; a placed row of a rule with a TTL after its TTL and the window.
local function store(ctx, bucket, field, pos, placed, overflowed)
    local value = pos
    if not placed then
        value = pos .. EXPIRES .. (ctx.now + ctx.tombstone_s)
    elseif ctx.ttl_ms > 0 then
        value = pos .. EXPIRES .. (ctx.now + math.ceil(ctx.ttl_ms / 1000) + ctx.tombstone_s)
    end
    if placed then
        if #value + #placed > VALUE_MAX then
            redis.call('HSET', ctx.overflow, field, placed)
            placed, overflowed = OVERFLOW, false
        end
        value = value .. placed
    end
    if overflowed then
        redis.call('HDEL', ctx.overflow, field)
    end
    redis.call('HSET', bucket, field, value)
end

local function middle(text, before, after)
    return string.sub(text, #before + 1, #text - #after)
end

-- '<n>:<n bytes><rest>' -> the n bytes, the rest
local function sized(data)
    local colon = string.find(data, ':', 1, true)
    local n = tonumber(string.sub(data, 1, colon - 1))
    return string.sub(data, colon + 1, colon + n), string.sub(data, colon + n + 1)
end

--[[ Lists. A list rule keeps its entries ordered by source position, newest first, whatever the
delivery order, with an order record: a list of the entries' sort keys ("<position><row token>":
positions never are a prefix of one another, so these sort like the positions, then the rows),
in the same order as the list, then those of the reserve's entries. An entry is found by its sort
key (LPOS), and a new one's place by comparing sort keys (it is the head's most of the time).
Lists have no insert-at-index: the entry at the place is swapped for a marker to insert before.
A capped list (max_len) keeps the entries it trims in a reserve, up to max_len of them, newest
first: when an entry of the list is removed (a delete), the newest reserve entry takes the freed
place at the tail, so the list holds the newest max_len rows in any delivery order, as long as no
more than max_len of them are deleted.
--]]

-- A list entry being removed or inserted before is first overwritten with this value: removal
-- and insertion by index even when several entries hold the same text.
local REMOVED = '\0streamsync:removed\0'

-- entries sharing a position (one snapshot) sort by row: integers by value, not as text
local function sort_token(field)
    if string.find(field, '^%d+$') then
        return string.format('%02d', #field) .. field
    end
    return field
end

-- The lengths of the list and of its reserve, once they are consistent with the order record.
local function list_consistent(list, order, reserve)
    local listed, reserved = redis.call('LLEN', list), redis.call('LLEN', reserve)
    if redis.call('LLEN', order) ~= listed + reserved then
        -- edited or expired outside streamsync: its order is unknown, start it over
        redis.call('DEL', list, order, reserve)
        return 0, 0
    end
    return listed, reserved
end

-- How many sort keys of the order record are newer than `key`: the head first, then further
-- and further down, then by halves.
local function rank(order, key)
    local head = redis.call('LINDEX', order, 0)
    if not head or head < key then
        return 0
    end
    local above, below = 0, 1
    while true do
        local probe = redis.call('LINDEX', order, below)
        if not probe or probe < key then
            break
        end
        above, below = below, below * 2
    end
    while below - above > 1 do
        local mid = math.floor((above + below) / 2)
        local probe = redis.call('LINDEX', order, mid)
        if probe and probe > key then
            above = mid
        else
            below = mid
        end
    end
    return below
end

local function insert_at(list, index, value)
    if index == 0 then
        redis.call('LPUSH', list, value)
    elseif index >= redis.call('LLEN', list) then
        redis.call('RPUSH', list, value)
    else
        local there = redis.call('LINDEX', list, index)
        redis.call('LSET', list, index, REMOVED)
        redis.call('LINSERT', list, 'BEFORE', REMOVED, value)
        redis.call('LSET', list, index + 1, there)
    end
end

local function remove_at(list, index)
    redis.call('LSET', list, index, REMOVED)
    redis.call('LREM', list, 1, REMOVED)
end

-- Keep a capped list of `listed` entries at max_len, its reserve of `reserved` behind it at
-- max_len at most: the list's oldest entries become the reserve's newest, or the other way round
-- (the order record stays as it is); the reserve's oldest go. More than one entry moves only
-- when max_len was changed.
local function list_cap(list, order, reserve, max_len, listed, reserved)
    while listed > max_len do
        reserved = redis.call('LPUSH', reserve, redis.call('RPOP', list))
        listed = listed - 1
    end
    while listed < max_len and reserved > 0 do
        redis.call('RPUSH', list, redis.call('LPOP', reserve))
        listed, reserved = listed + 1, reserved - 1
    end
    if reserved > max_len then
        redis.call('RPOP', reserve, reserved - max_len)
        redis.call('RPOP', order, reserved - max_len)
    end
end

-- Insert an entry at the place of its sort key in a list of `listed` entries and a reserve of
-- `reserved` (into the reserve if it is older than all the list keeps). Returns false when it
-- is older than everything a capped list keeps.
local function list_insert(list, order, reserve, entry, max_len, listed, reserved)
    local key, value = entry[1], entry[2]
    local index = rank(order, key)
    local in_list = index <= listed and (max_len == 0 or index < max_len)
    if not in_list and index - listed >= max_len then
        return false
    end
    insert_at(order, index, key)
    if in_list then
        insert_at(list, index, value)
        listed = listed + 1
    else
        insert_at(reserve, index - listed, value)
        reserved = reserved + 1
    end
    if max_len > 0 then
        list_cap(list, order, reserve, max_len, listed, reserved)
    end
    return true
end

local function list_remove(list, order, reserve, sort_keys)
    for _, key in ipairs(sort_keys) do
        local index = redis.call('LPOS', order, key)
        if index then
            local listed = redis.call('LLEN', list)
            redis.call('LREM', order, 1, key)
            if index < listed then
                remove_at(list, index)
                local refill = redis.call('LPOP', reserve)
                if refill then
                    redis.call('RPUSH', list, refill)
                end
            else
                remove_at(reserve, index - listed)
            end
        end
    end
end

-- Rewrite an entry's value where it is (list or reserve); false when it is gone.
local function list_set(list, order, reserve, key, value)
    local index = redis.call('LPOS', order, key)
    if not index then
        return false
    end
    local listed = redis.call('LLEN', list)
    if index < listed then
        redis.call('LSET', list, index, value)
    else
        redis.call('LSET', reserve, index - listed, value)
    end
    return true
end

-- An L placement's entries, as positions (the record's own position for '').
local function entry_positions(listed, record_pos)
    local out = {}
    for p in string.gmatch(listed .. ',', '([^,]*),') do
        out[#out + 1] = p == '' and record_pos or p
    end
    return out
end

local function list_placement(key_mid, entries, record_pos)
    local listed = {}
    for n, p in ipairs(entries) do
        listed[n] = p == record_pos and '' or p
    end
    return 'L' .. #key_mid .. ':' .. key_mid .. table.concat(listed, ',')
end

local function list_keys(shape, key_mid)
    return shape[1] .. key_mid .. shape[2], shape[3] .. key_mid .. shape[4],
        shape[5] .. key_mid .. shape[6]
end

local function sort_keys(entries, field)
    local token, out = sort_token(field), {}
    for n, p in ipairs(entries) do
        out[n] = p .. token
    end
    return out
end

--[[ Single-value keys that move (kind 'M'): the moving table holds, beside each row's record
('r' + identity), each key's own record ('k' + the key's middle): the position of the last change
that wrote or removed the key, whichever row it came from. A row leaving a key deletes it only if
no newer change wrote it since (a unique value that changed hands), and leaves its own position
there. The worker cannot address the record of a key the row held before (it learns it only from
the row's record): the library finds its bucket as streamsync.buckets does, crc32 and linear
hashing over the table's bucket count, and names it from the bucket names' prefix in the shape.
--]]

-- built on first use: the bit library is not there while the library loads
local CRC_TABLE = nil

local function crc_table()
    local crcs = {}
    for n = 0, 255 do
        local c = n
        for _ = 1, 8 do
            if bit.band(c, 1) == 1 then
                c = bit.bxor(bit.rshift(c, 1), 0xEDB88320)
            else
                c = bit.rshift(c, 1)
            end
        end
        crcs[n] = c
    end
    return crcs
end

-- crc32 (zlib's) of text, as an unsigned number
local function crc32(text)
    CRC_TABLE = CRC_TABLE or crc_table()
    local crc = bit.bnot(0)
    for n = 1, #text do
        local low = bit.band(bit.bxor(crc, string.byte(text, n)), 255)
        crc = bit.bxor(bit.rshift(crc, 8), CRC_TABLE[low])
    end
    crc = bit.bnot(crc)
    if crc < 0 then
        crc = crc + 4294967296
    end
    return crc
end

-- streamsync.buckets.bucket_index
local function bucket_index(crc, n)
    local size = 1
    while size * 2 <= n do
        size = size * 2
    end
    local index = crc % (2 * size)
    if index >= n then
        index = crc % size
    end
    return index
end

local MOVING_KEY = 'k'

local function unplace_key(ctx, key_mid, placed_at)
    local field = MOVING_KEY .. key_mid
    local bucket = ctx.shape[3] .. bucket_index(crc32(field), ctx.n)
    local written = redis.call('HGET', bucket, field)
    if written then
        written = record_parts(written)
    end
    if not written or written <= placed_at then
        redis.call('DEL', ctx.shape[1] .. key_mid .. ctx.shape[2])
        redis.call('HSET', bucket, field, placed_at .. EXPIRES .. (ctx.now + ctx.tombstone_s))
        if not written then
            ctx.added = ctx.added + 1
        end
    end
end

-- Remove what a placement (made at position placed_at) says the row holds.
--[[ Nested children (nest): a child row is a member of a map inside its parent's JSON document,
under the member the table's shape names (shape[5], e.g. "items"); its key in the map is its
member template's value. The map goes when its last child does, and the document when nothing is
left in it (the parent's own part goes with the parent's delete, docs: README "Nest"). --]]

-- A text as a JSON string token, escaped as orjson and RedisJSON write it.
local function json_string(text)
    local escaped = string.gsub(text, '[%z\1-\031"\\]', function(c)
        if c == '"' then
            return '\\"'
        elseif c == '\\' then
            return '\\\\'
        elseif c == '\n' then
            return '\\n'
        elseif c == '\r' then
            return '\\r'
        elseif c == '\t' then
            return '\\t'
        elseif c == '\b' then
            return '\\b'
        elseif c == '\f' then
            return '\\f'
        end
        return string.format('\\u%04x', string.byte(c))
    end)
    return '"' .. escaped .. '"'
end

-- The children map under ``path`` in a document's members: {member token -> child text}, order.
local function children_of(members, path)
    local text = members[path]
    if text then
        local map, order = json_members(text)
        if map then
            return map, order
        end
    end
    return {}, {}
end

-- Puts the map back under ``path`` (removes the member when no child is left).
local function put_children(members, names, path, map, order)
    local text = object_text(map, order)
    if text and members[path] == nil then
        names[#names + 1] = path
    end
    members[path] = text
end

local function document_encoding(target)
    local kind = redis.call('TYPE', target).ok
    if kind == REDISJSON_TYPE then
        return 'r'
    end
    return 't'
end

-- Removes the child ``token`` from the map under ``path`` of the document ``target``.
local function remove_child(target, path, token)
    local members, names, exists = document_members(target)
    if not exists then
        return
    end
    local map, order = children_of(members, path)
    if map[token] == nil then
        return
    end
    map[token] = nil
    put_children(members, names, path, map, order)
    write_members(target, document_encoding(target), members, names, 0)
end

local function unplace(ctx, field, placed_at, kind, data)
    local shape = ctx.shape
    if kind == 'T' or kind == 'Z' or kind == 'S' or kind == 'Y' then
        local key_mid, member_mid = data, field
        if KIND_OF_NAMED[kind] then
            key_mid, member_mid = sized(data)
            kind = KIND_OF_NAMED[kind]
        end
        local key, member = shape[1] .. key_mid .. shape[2], shape[3] .. member_mid .. shape[4]
        if kind == 'T' then
            redis.call('SREM', key, member)
        else
            redis.call('ZREM', key, member)
        end
    elseif kind == 'E' or kind == 'F' then
        local key_mid, member_mid = data, field
        if kind == 'F' then
            key_mid, member_mid = sized(data)
        end
        remove_child(shape[1] .. key_mid .. shape[2], shape[5],
            json_string(shape[3] .. member_mid .. shape[4]))
    elseif kind == 'M' then
        unplace_key(ctx, data, placed_at)
    elseif kind == 'L' then
        local key_mid, listed = sized(data)
        local list, order, reserve = list_keys(shape, key_mid)
        list_consistent(list, order, reserve)
        list_remove(list, order, reserve, sort_keys(entry_positions(listed, placed_at), field))
    end
end

--[[ The placement row kinds. Each gets the table's context, KEYS from k and ARGV items from i,
and returns its status and whether it made a record.
'T' set member: KEYS set, bucket; items: field, position, member.
'Z' sorted-set member: KEYS sorted set, bucket; items: field, position, member, score.
The row's previous member (another key, or another member) is removed. --]]
local function member_row(kind)
    return function(ctx, keys, k, argv, i)
        local target, bucket = keys[k], keys[k + 1]
        local field, pos, member = argv[i], argv[i + 1], argv[i + 2]
        local current, old_kind, old, overflowed = read_record(ctx, bucket, field)
        if current and current >= pos then
            return STALE
        end
        local shape = ctx.shape
        local key_mid, member_mid = middle(target, shape[1], shape[2]), middle(member, shape[3],
            shape[4])
        local placed = kind .. key_mid
        if member_mid ~= field then
            placed = NAMED[kind] .. #key_mid .. ':' .. key_mid .. member_mid
        end
        if old_kind and old_kind .. old ~= placed then
            unplace(ctx, field, current, old_kind, old)
        end
        if kind == 'T' then
            redis.call('SADD', target, member)
        else
            redis.call('ZADD', target, argv[i + 3], member)
        end
        expire_target(target, ctx.ttl_ms)
        store(ctx, bucket, field, pos, placed, overflowed)
        return APPLIED, not current
    end
end

--[[ 'L' list entry: KEYS list, bucket, the list's order record, its reserve; items:
field, position, max_len (0 = unbounded), mode ('p' push one entry per change | 'r' replace the
row's entry in place), value. --]]
local function list_row(ctx, keys, k, argv, i)
    local list, bucket, order, reserve = keys[k], keys[k + 1], keys[k + 2], keys[k + 3]
    local field, pos, max_len = argv[i], argv[i + 1], tonumber(argv[i + 2])
    local mode, value = argv[i + 3], argv[i + 4]
    local current, old_kind, old, overflowed = read_record(ctx, bucket, field)
    if current and current >= pos then
        return STALE
    end
    local listed, reserved = list_consistent(list, order, reserve)
    if max_len == 0 and reserved > 0 then
        -- max_len was taken off: the reserve goes back into the list
        list_cap(list, order, reserve, math.huge, listed, reserved)
        listed, reserved = listed + reserved, 0
    end
    local key_mid = middle(list, ctx.shape[1], ctx.shape[2])
    local entries = {}
    if old_kind == 'L' then
        local old_mid, named = sized(old)
        if old_mid == key_mid then
            entries = entry_positions(named, current)
        else
            unplace(ctx, field, current, old_kind, old)
        end
    elseif old_kind then
        unplace(ctx, field, current, old_kind, old)
    end
    local token = sort_token(field)
    local replaced = false
    if mode == 'r' then
        -- the row's entry is rewritten where it stands (the first of them still there)
        local kept = {}
        for _, p in ipairs(entries) do
            if not replaced and list_set(list, order, reserve, p .. token, value) then
                replaced = true
                kept[1] = p
            elseif replaced then
                list_remove(list, order, reserve, {p .. token})
            end
        end
        entries = kept
    end
    local inserted = not replaced
        and list_insert(list, order, reserve, {pos .. token, value}, max_len, listed, reserved)
    if inserted then
        entries[#entries + 1] = pos
        if max_len > 0 and #entries > 2 * max_len then
            -- older than max_len newer entries of the row itself: trimmed for good
            table.remove(entries, 1)
        end
    end
    expire_target(list, ctx.ttl_ms)
    expire_target(order, ctx.ttl_ms)
    expire_target(reserve, ctx.ttl_ms)
    local placed = nil
    if #entries > 0 then
        placed = list_placement(key_mid, entries, pos)
    end
    store(ctx, bucket, field, pos, placed, overflowed)
    return APPLIED, not current
end

--[[ 'X' stream event: KEYS stream, bucket; items: field, position, max_len (0 = unbounded), n,
n field/value pairs. Published once per strictly newer position of the row: a replay within the
tombstone window publishes nothing. --]]
local function stream_row(ctx, keys, k, argv, i)
    local stream, bucket = keys[k], keys[k + 1]
    local field, pos = argv[i], argv[i + 1]
    local max_len, n = tonumber(argv[i + 2]), tonumber(argv[i + 3])
    local current = redis.call('HGET', bucket, field)
    if current and record_parts(current) >= pos then
        return STALE
    end
    if max_len > 0 then
        redis.call('XADD', stream, 'MAXLEN', max_len, '*', unpack(argv, i + 4, i + 3 + 2 * n))
    else
        redis.call('XADD', stream, '*', unpack(argv, i + 4, i + 3 + 2 * n))
    end
    redis.call('HSET', bucket, field, pos .. EXPIRES .. (ctx.now + ctx.tombstone_s))
    return APPLIED, not current
end

--[[ 'R' remove a row's placement (a delete, the row leaving the rule's filter, a TRUNCATE):
KEYS bucket; items: field, position, list entries ('1' removed | '0' kept: the record
keeps naming them, for a TRUNCATE or a resync to find). --]]
local function remove_row(ctx, keys, k, argv, i)
    local bucket = keys[k]
    local field, pos = argv[i], argv[i + 1]
    local current, old_kind, old, overflowed = read_record(ctx, bucket, field)
    if current and current >= pos then
        return STALE
    end
    local placed = nil
    if old_kind == 'L' and argv[i + 2] ~= '1' then
        local key_mid, listed = sized(old)
        placed = list_placement(key_mid, entry_positions(listed, current), pos)
    elseif old_kind then
        unplace(ctx, field, current, old_kind, old)
    end
    store(ctx, bucket, field, pos, placed, overflowed)
    return APPLIED, not current
end

--[[ 'M' a single-value row whose key may move: KEYS target, bucket, the bucket of the key's
record; items: field, position, the key's record field, then an H, h, J or j row's kind and
items. The row's record decides whether the change is new; the key's record then decides whether
it may write the key (another row may have written it later: a unique column changing hands).
The key the row held before, if another, is deleted unless a newer change wrote it since. --]]
local function moving_row(ctx, keys, k, argv, i)
    local target, bucket, key_bucket = keys[k], keys[k + 1], keys[k + 2]
    local field, pos, key_field, inner = argv[i], argv[i + 1], argv[i + 2], argv[i + 3]
    local current, old_kind, old, overflowed = read_record(ctx, bucket, field)
    if current and current >= pos then
        return STALE
    end
    local single = SINGLE[inner]
    local status, key_new = single_row(single[1], single[3], target, key_bucket, key_field, pos,
        argv, i + 4, ctx.ttl_ms, ctx.now, ctx.tombstone_s)
    if key_new then
        ctx.added = ctx.added + 1
    end
    local key_mid = string.sub(key_field, #MOVING_KEY + 1)
    if old_kind and not (old_kind == 'M' and old == key_mid) then
        unplace(ctx, field, current, old_kind, old)
    end
    local placed = nil
    if status == APPLIED then
        placed = 'M' .. key_mid
    end
    store(ctx, bucket, field, pos, placed, overflowed)
    return status, not current
end

-- placement row kinds: the function applying one, its number of KEYS, and the number of ARGV
-- items it spans (given the index of its first item)
--[[ 'E' nested child: KEYS the parent's document, the row's bucket; ARGV the record field, the
position, the child's member (its key in the map), the document's encoding ('t', 'r'), n, then n
member triples as for 'j' (a 'k' member keeps the cached child's). A child whose kept member is
not cached is left out of the map (dropped) until its next full change. --]]
local function nest_row(ctx, keys, k, argv, i)
    local target, bucket = keys[k], keys[k + 1]
    local field, pos, member, encoding = argv[i], argv[i + 1], argv[i + 2], argv[i + 3]
    local current, old_kind, old, overflowed = read_record(ctx, bucket, field)
    if current and current >= pos then
        return STALE
    end
    local shape = ctx.shape
    local key_mid, member_mid = middle(target, shape[1], shape[2]), middle(member, shape[3],
        shape[4])
    local placed = 'E' .. key_mid
    if member_mid ~= field then
        placed = 'F' .. #key_mid .. ':' .. key_mid .. member_mid
    end
    if old_kind and old_kind .. old ~= placed then
        unplace(ctx, field, current, old_kind, old)
    end
    local path, token = shape[5], json_string(member)
    local members, names = document_members(target)
    local map, order = children_of(members, path)
    local cached = map[token] and json_members(map[token])
    local parts = {}
    for m = 0, tonumber(argv[i + 4]) - 1 do
        local j = i + 5 + 3 * m
        local value = argv[j + 2]
        if argv[j + 1] == 'k' then
            value = cached and cached[argv[j]]
        end
        if value == nil then
            parts = nil
            break
        end
        parts[#parts + 1] = argv[j] .. ':' .. value
    end
    local status = APPLIED
    if parts then
        if map[token] == nil then
            order[#order + 1] = token
        end
        map[token] = '{' .. table.concat(parts, ',') .. '}'
    else
        map[token], placed, status = nil, nil, DROPPED
    end
    put_children(members, names, path, map, order)
    write_members(target, encoding, members, names, 0)
    store(ctx, bucket, field, pos, placed, overflowed)
    return status, not current
end

local PLACEMENTS = {
    T = {member_row('T'), 2, function() return 3 end},
    Z = {member_row('Z'), 2, function() return 4 end},
    L = {list_row, 4, function() return 5 end},
    X = {stream_row, 2, function(argv, i) return 4 + 2 * tonumber(argv[i + 3]) end},
    R = {remove_row, 1, function() return 3 end},
    M = {moving_row, 3, function(argv, i) return 4 + SINGLE[argv[i + 3]][2](argv, i + 4) end},
    E = {nest_row, 2, function(argv, i) return 5 + 3 * tonumber(argv[i + 4]) end},
}

--[[ streamsync_changes: the batch entry point (library 2.0).
KEYS: per rule table of the call, its bucket 0; per table, its overflow hash; then per row the
row's keys:
  single-value kinds (H h J j N n p q k P Q K D I): the target, the bucket holding the row's
  record;
  placement kinds (T Z L X R M E): the kind's keys (see above).
ARGV: tombstone_s, the number of tables, per table: its bucket count as the worker knows it, its
rule's ttl_ms (0 = none) and its guard ('' = the target does not evict its records; see "Guarded
tables" above); per table: the number of items of its shape, then those items (see the placement
records); then per row: its table (1-based), its kind, the record field, the position and the
kind's items.
A table whose bucket count is not the one the worker knows (another worker split a bucket) has
none of its rows applied: each replies 4 (rebucketed), for the worker to send again.
Reply: one status per row (see the header), then one array: per table, its bucket count, the
records it holds and the token its bucket 0's rebuild waits for ('' when none).
--]]
local function changes(keys, argv)
    local tombstone_s, ntables = tonumber(argv[1]), tonumber(argv[2])
    local now = tonumber(redis.call('TIME')[1])
    local current, ttls, guards, added, tables, highs, marks = {}, {}, {}, {}, {}, {}, {}
    local i = 3
    for t = 1, ntables do
        local meta = redis.call('HMGET', keys[t], META_BUCKETS, META_COUNT, META_FLOOR, META_HIGH,
            META_PENDING)
        local guard, token = false, ''
        if argv[i + 2] ~= '' then
            guard, token = guard_of(keys[t], argv[i + 2], meta, argv[i])
            token = token or ''
        end
        local n = tonumber(meta[1]) or 1
        if guard == 'lost' then
            -- its rows reply 5 whatever count the worker knows: it keeps it for the rebuild
            n = tonumber(argv[i])
        end
        current[t] = n == tonumber(argv[i])
        ttls[t] = tonumber(argv[i + 1])
        guards[t] = guard
        added[t] = 0
        highs[t], marks[t] = meta[4], meta[4]
        tables[3 * t - 2], tables[3 * t - 1], tables[3 * t] = n, tonumber(meta[2]) or 0, token
        i = i + 3
    end
    local contexts = {}
    for t = 1, ntables do
        local n = tonumber(argv[i])
        contexts[t] = {shape = {unpack(argv, i + 1, i + n)}, ttl_ms = ttls[t],
            n = tables[3 * t - 2], overflow = keys[ntables + t], now = now,
            tombstone_s = tombstone_s, added = 0}
        i = i + 1 + n
    end
    local replies = {}
    local k, r = 2 * ntables + 1, 0
    while k <= #keys do
        local t, kind = tonumber(argv[i]), argv[i + 1]
        r = r + 1
        local high = highs[t]
        if not high or argv[i + 3] > high then
            highs[t] = argv[i + 3]
        end
        local single = SINGLE[kind]
        if single then
            local span = single[2](argv, i + 4)
            if not current[t] then
                replies[r] = REBUCKETED
            else
                local ok, status, new = pcall(single_row, single[1], single[3], keys[k],
                    keys[k + 1], argv[i + 2], argv[i + 3], argv, i + 4, ttls[t], now, tombstone_s,
                    guards[t], keys[t])
                if ok then
                    replies[r] = status
                    if new then
                        added[t] = added[t] + 1
                    end
                else
                    replies[r] = row_error(status)
                end
            end
            i = i + 4 + span
            k = k + 2
        else
            local row = PLACEMENTS[kind]
            if not row then
                return redis.error_reply('row ' .. r .. ': unexpected row kind ' .. tostring(kind))
            end
            if not current[t] then
                replies[r] = REBUCKETED
            else
                local ok, status, new = pcall(row[1], contexts[t], keys, k, argv, i + 2)
                if ok then
                    replies[r] = status
                    if new then
                        added[t] = added[t] + 1
                    end
                else
                    replies[r] = row_error(status)
                end
            end
            i = i + 2 + row[3](argv, i + 2)
            k = k + row[2]
        end
    end
    for t = 1, ntables do
        if guards[t] ~= 'lost' then
            local more = added[t] + contexts[t].added
            if more > 0 then
                tables[3 * t - 1] = redis.call('HINCRBY', keys[t], META_COUNT, more)
            end
            -- raised for every row, applied or not: a mark too high only leaves rows uncached
            if highs[t] ~= marks[t] then
                redis.call('HSET', keys[t], META_HIGH, highs[t])
            end
        end
    end
    replies[r + 1] = tables
    return replies
end

--[[ streamsync_split: one step of linear hashing.
KEYS: the table's bucket 0, the bucket to split, the new bucket
ARGV: the table's bucket count N the worker knows, the number m of record fields it read from the
bucket to split, those m fields, then the fields that move to the new bucket (those whose crc32
has bit floor(log2 N) set: the worker computes it).
Moves them and makes the count N + 1, only if N is current and the bucket to split holds exactly
those m fields (a record written since the worker read it would otherwise be left behind).
Reply: the bucket count after (N + 1 when split, the current count otherwise).
--]]
local function split(keys, argv)
    local meta, src, dst = keys[1], keys[2], keys[3]
    local state = redis.call('HMGET', meta, META_BUCKETS, META_COUNT, META_HIGH, META_PENDING)
    if state[4] or not (state[1] or state[2] or state[3]) then
        -- bucket 0 is gone, with the count: the next change rebuilds it (guarded tables), unsplit
        return tonumber(argv[1])
    end
    local n = tonumber(state[1]) or 1
    if n ~= tonumber(argv[1]) then
        return n
    end
    local m = tonumber(argv[2])
    local read = {}
    for j = 3, 2 + m do
        read[argv[j]] = true
    end
    local held = 0
    for _, f in ipairs(redis.call('HKEYS', src)) do
        if not is_meta(f) then
            if not read[f] then
                return n
            end
            held = held + 1
        end
    end
    if held ~= m then
        return n
    end
    if m == 0 and src ~= meta and redis.call('EXISTS', src) == 0 then
        -- the bucket was evicted (one that exists is never empty): so is either half, rebuilt
        -- with the floor by the first row to find it gone; a new half that exists would take
        -- the rows whose records were lost for new rows
        redis.call('HSET', meta, META_BUCKETS, n + 1)
        return n + 1
    end
    local first, last = 3 + m, #argv
    if last >= first then
        local values = redis.call('HMGET', src, unpack(argv, first, last))
        local pairs_ = {}
        for j = first, last do
            pairs_[#pairs_ + 1] = argv[j]
            pairs_[#pairs_ + 1] = values[j - first + 1]
        end
        redis.call('HSET', dst, META_SENTINEL, '', unpack(pairs_))
        redis.call('HDEL', src, unpack(argv, first, last))
    else
        redis.call('HSET', dst, META_SENTINEL, '')
    end
    local floor = redis.call('HGET', src, META_FLOOR)
    if floor then
        -- rows without a record in the split bucket are at its floor, in either half
        redis.call('HSET', dst, META_FLOOR, floor)
    end
    redis.call('HSET', meta, META_BUCKETS, n + 1)
    return n + 1
end

--[[ streamsync_expire
KEYS: a table's bucket 0, its overflow hash, then buckets of that table
ARGV: none
Removes the records whose time has passed (tombstones past tombstone_s, rows of a rule with a TTL
unwritten for their TTL and the tombstone window). Reply: the number of records removed.
--]]
local function expire(keys, argv)
    local now = tonumber(redis.call('TIME')[1])
    local overflow = keys[2]
    local removed = 0
    for k = 3, #keys do
        local flat = redis.call('HGETALL', keys[k])
        local gone, spilled = {}, {}
        for j = 1, #flat, 2 do
            local field, value = flat[j], flat[j + 1]
            local mark = string.find(value, '[~A-Z]')
            if mark and string.byte(value, mark) == 126 and not is_meta(field) then
                local seconds, kind = string.match(value, '^(%d+)(.?)', mark + 1)
                if tonumber(seconds) < now then
                    gone[#gone + 1] = field
                    if kind == OVERFLOW then
                        spilled[#spilled + 1] = field
                    end
                end
            end
        end
        if #gone > 0 then
            redis.call('HDEL', keys[k], unpack(gone))
            removed = removed + #gone
        end
        if #spilled > 0 then
            redis.call('HDEL', overflow, unpack(spilled))
        end
    end
    if removed > 0 and redis.call('EXISTS', keys[1]) == 1 then
        -- a bucket 0 that is gone is not made again without its meta (guarded tables)
        redis.call('HINCRBY', keys[1], META_COUNT, -removed)
    end
    return removed
end

local TRIM_LIMIT = 10000

-- stream ids compare as (ms, seq) pairs of 64-bit integers: compare as digit strings
local function id_less(a, b)
    local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
    local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
    if #ams ~= #bms then return #ams < #bms end
    if ams ~= bms then return ams < bms end
    if #aseq ~= #bseq then return #aseq < #bseq end
    return aseq < bseq
end

local function field(flat, name)
    for k = 1, #flat, 2 do
        if flat[k] == name then return flat[k + 1] end
    end
    return nil
end

--[[ streamsync_trim
KEYS: a stream
ARGV: none
Removes the entries that every consumer group of the stream has acknowledged: those older than
the oldest pending entry of each group, and no newer than the last entry each group has read.
Never removes an unacknowledged entry, and trims nothing when the stream has no group. Removes
at most about TRIM_LIMIT entries per call: call it again while it replies TRIM_LIMIT or more.
Reply: the number of entries removed.
--]]
local function trim(keys, argv)
    local stream = keys[1]
    if redis.call('EXISTS', stream) == 0 then
        return 0
    end
    local groups = redis.call('XINFO', 'GROUPS', stream)
    local min_id = nil
    for _, g in ipairs(groups) do
        local name = field(g, 'name')
        local bound = field(g, 'last-delivered-id')
        if field(g, 'pending') > 0 then
            bound = redis.call('XPENDING', stream, name)[2]
        end
        if min_id == nil or id_less(bound, min_id) then
            min_id = bound
        end
    end
    if min_id == nil or min_id == '0-0' then
        return 0
    end
    -- whole radix-tree nodes first, at most TRIM_LIMIT entries, so one call stays short; then,
    -- unless that reached the bound, the few entries left in the first node (at most one node)
    local removed = redis.call('XTRIM', stream, 'MINID', '~', min_id, 'LIMIT', TRIM_LIMIT)
    if removed < TRIM_LIMIT then
        removed = removed + redis.call('XTRIM', stream, 'MINID', min_id)
    end
    return removed
end

--[[ streamsync_prune_consumer
KEYS: a stream
ARGV: group, consumer, min_idle_ms
Deletes the consumer from the group if it holds no pending entry and has been idle at least
min_idle_ms (a worker that went away). Checked and deleted atomically, so an entry is never lost
with it. Reply: 1 deleted, 0 kept.
--]]
local function prune_consumer(keys, argv)
    local stream, group, consumer, min_idle = keys[1], argv[1], argv[2], tonumber(argv[3])
    local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', stream, group)
    if not ok then
        return 0
    end
    for _, c in ipairs(consumers) do
        if field(c, 'name') == consumer then
            if field(c, 'pending') == 0 and field(c, 'idle') >= min_idle then
                redis.call('XGROUP', 'DELCONSUMER', stream, group, consumer)
                return 1
            end
            return 0
        end
    end
    return 0
end

--[[ streamsync_mark_epoch
KEYS: the epochs hash, a stream
ARGV: none
Starts a new resync epoch for the stream: entries added after its last entry belong to it.
Changes of a newer epoch compare newer than any change of an older one, so a re-snapshot of a
restored database (whose positions may be lower than those cached) overwrites what is cached.
The hash field is the stream's name; its value the JSON array of [epoch, first id after which it
applies], oldest first. Reply: {epoch, that id}.
--]]
local function mark_epoch(keys, argv)
    local epochs, stream = keys[1], keys[2]
    local last = '0-0'
    if redis.call('EXISTS', stream) == 1 then
        last = field(redis.call('XINFO', 'STREAM', stream), 'last-generated-id')
    end
    local current = redis.call('HGET', epochs, stream)
    local marks = {}
    if current then
        marks = cjson.decode(current)
    end
    local epoch = 1
    if #marks > 0 then
        epoch = marks[#marks][1] + 1
    end
    marks[#marks + 1] = {epoch, last}
    redis.call('HSET', epochs, stream, cjson.encode(marks))
    return {epoch, last}
end

--[[ streamsync_raise_hwm
KEYS: the high-water marks hash (<state_prefix>hwm, in the streams' Redis)
ARGV: rule name, position, rule name, position... (a rule may come more than once)
Raises each rule's mark (a field of the hash) to the position, unless it is there already or
above; positions compare as strings, like every position the library keeps. Atomic for every
pair. A worker raises the marks of a batch's rules before it sends the batch to a target Redis
that may evict (allkeys-*): a record evicted there is rebuilt with its rule's mark as the floor,
so no change older than one applied can be applied over it (docs/bookkeeping.md).
Reply: per pair, in ARGV order, the mark of its rule after the call, and before it ('' when the
rule had none: a table no batch was ever sent for).
--]]
local function raise_hwm(keys, argv)
    local hwm = keys[1]
    if #argv % 2 ~= 0 then
        return redis.error_reply('streamsync_raise_hwm: ARGV must be rule, position pairs')
    end
    local marks, raised, before = {}, {}, {}
    for i = 1, #argv, 2 do
        local rule, position = argv[i], argv[i + 1]
        if position == '' then
            return redis.error_reply('streamsync_raise_hwm: empty position for ' .. rule)
        end
        local mark = marks[rule]
        if mark == nil then
            mark = redis.call('HGET', hwm, rule)
            before[rule] = mark or ''
        end
        if not mark or mark < position then
            mark = position
            raised[rule] = true
        end
        marks[rule] = mark
    end
    local fields = {}
    for rule in pairs(raised) do
        fields[#fields + 1] = rule
        fields[#fields + 1] = marks[rule]
    end
    if #fields > 0 then
        redis.call('HSET', hwm, unpack(fields))
    end
    local reply = {}
    for i = 1, #argv, 2 do
        reply[#reply + 1] = marks[argv[i]]
        reply[#reply + 1] = before[argv[i]]
    end
    return reply
end

--[[ streamsync_mark_snapshot
KEYS: the snapshot marks hash
ARGV: a stream, the LSN of a snapshot (decimal digits), the id of an entry of the stream holding a
read of that snapshot
Records that the snapshot's reads start at or before that entry. The hash field is the stream's
name; its value the JSON array of ["<snapshot LSN>", "<first entry id of its reads>"], ordered
by entry id: a change streamed after the reads of a snapshot, and before those of the next, follows
that snapshot. A mark already at or before the entry for the same LSN is kept; the same snapshot's
next mark is moved back to the entry; otherwise a mark is added. At most MAX_SNAPSHOT_MARKS per
stream are kept, the oldest dropped. Reply: the stream's marks (the field's new value).
--]]
local MAX_SNAPSHOT_MARKS = 1000

local function mark_snapshot(keys, argv)
    local hash, stream, lsn, id = keys[1], argv[1], argv[2], argv[3]
    local current = redis.call('HGET', hash, stream)
    local marks = {}
    if current then
        marks = cjson.decode(current)
    end
    -- the first mark after the entry
    local at = #marks + 1
    for k = 1, #marks do
        if id_less(id, marks[k][2]) then
            at = k
            break
        end
    end
    if at > 1 and marks[at - 1][1] == lsn then
        return current
    end
    if at <= #marks and marks[at][1] == lsn then
        marks[at][2] = id
    else
        table.insert(marks, at, {lsn, id})
    end
    while #marks > MAX_SNAPSHOT_MARKS do
        table.remove(marks, 1)
    end
    local value = cjson.encode(marks)
    redis.call('HSET', hash, stream, value)
    return value
end

--[[ streamsync_import: records converted from library 1.x bookkeeping (`streamsync migrate`).
KEYS: a table's bucket 0, its overflow hash, then per record the bucket holding it
ARGV: the table's bucket count N the records were addressed with, then per record: its field, its
position, when it may go ('' never, else unix seconds), and where its row is (a placement's kind
and data, as streamsync_changes writes them; '' nowhere)
A record is written unless the table holds one of its field at a position as new or newer: a
second run of a migration (after a crash) changes nothing it wrote. A placement too long for a
bucket goes to the overflow hash. A table whose bucket count is not N writes nothing.
Reply: one status per record (1 written, 0 kept: one as new or newer is there, 4 rebucketed),
then {the table's bucket count, the records it holds}.
--]]
local function import(keys, argv)
    local meta, overflow = keys[1], keys[2]
    local state = redis.call('HMGET', meta, META_BUCKETS, META_COUNT, META_HIGH)
    local n, held, high = tonumber(state[1]) or 1, tonumber(state[2]) or 0, state[3]
    local addressed = n == tonumber(argv[1])
    local replies, added, r = {}, 0, 0
    for j = 2, #argv, 4 do
        r = r + 1
        local bucket, field, pos = keys[2 + r], argv[j], argv[j + 1]
        if not high or pos > high then
            high = pos
        end
        local old = addressed and redis.call('HGET', bucket, field)
        local old_pos, old_kind = nil, nil
        if old then
            old_pos, old_kind = record_parts(old)
        end
        if not addressed then
            replies[r] = REBUCKETED
        elseif old and old_pos >= pos then
            replies[r] = STALE
        else
            local value, placed = pos, argv[j + 3]
            if argv[j + 2] ~= '' then
                value = value .. EXPIRES .. argv[j + 2]
            end
            if placed ~= '' and #value + #placed > VALUE_MAX then
                redis.call('HSET', overflow, field, placed)
                placed = OVERFLOW
            elseif old_kind == OVERFLOW then
                redis.call('HDEL', overflow, field)
            end
            redis.call('HSET', bucket, field, value .. placed)
            if not old then
                added = added + 1
            end
            replies[r] = APPLIED
        end
    end
    if added > 0 then
        held = redis.call('HINCRBY', meta, META_COUNT, added)
    end
    if addressed and high and high ~= state[3] then
        redis.call('HSET', meta, META_HIGH, high)
    end
    replies[r + 1] = {n, held}
    return replies
end

-- RPUSH in slices: unpack() is bounded by the Lua stack
local function push_all(key, values, first, last)
    for s = first, last, 1000 do
        redis.call('RPUSH', key, unpack(values, s, math.min(last, s + 999)))
    end
end

--[[ streamsync_import_list: a list's order converted from library 1.x (`streamsync migrate`). 1.x
kept a sorted set of "<position>|<row>" members (score 0: the list's entries, -1: the reserve's)
and the reserve's values in a hash; 2.0 keeps the order record and the reserve as lists (see
"Lists" above).
KEYS: the list, its 1.x order sorted set, its 1.x reserve hash, its order record, its reserve (a
list whose key has a hash tag kept its companions' names: the last two are the middle two then)
ARGV: how many entries the list holds, its TTL and its order's (milliseconds, -1: none), then per
entry, the list's in its order, then the reserve's, newest first: its sort key, its value
Nothing is done when the 1.x order is not a sorted set (converted already, or gone). The entries
are put in the order of their sort keys, newest first, as this library compares them (converted
positions can order rows sharing one otherwise than 1.x did): the list keeps as many as it held,
rewritten only if its order changed, the reserve the rest; the TTLs stay.
Reply: {entries in the list, entries in the reserve}; {-1, -1} when there was nothing to convert.
--]]
local function import_list(keys, argv)
    local list, old_order, old_reserve, order, reserve = keys[1], keys[2], keys[3], keys[4], keys[5]
    if redis.call('TYPE', old_order).ok ~= 'zset' then
        return {-1, -1}
    end
    local listed, list_ttl, order_ttl = tonumber(argv[1]), tonumber(argv[2]), tonumber(argv[3])
    local entries, before = {}, {}
    for j = 4, #argv, 2 do
        entries[#entries + 1] = {argv[j], argv[j + 1]}
        before[#entries] = entries[#entries]
    end
    table.sort(entries, function(a, b) return a[1] > b[1] end)
    local sort_keys, values, moved = {}, {}, false
    for e, entry in ipairs(entries) do
        sort_keys[e], values[e] = entry[1], entry[2]
        moved = moved or (e <= listed and entry ~= before[e])
    end
    redis.call('DEL', old_order, old_reserve, order, reserve)
    if moved then
        redis.call('DEL', list)
        push_all(list, values, 1, listed)
        if list_ttl > 0 then
            redis.call('PEXPIRE', list, list_ttl)
        end
    end
    push_all(order, sort_keys, 1, #sort_keys)
    push_all(reserve, values, listed + 1, #values)
    if order_ttl > 0 then
        redis.call('PEXPIRE', order, order_ttl)
        redis.call('PEXPIRE', reserve, order_ttl)
    end
    return {listed, #entries - listed}
end

--[[ streamsync_version
KEYS: none; ARGV: none. Reply: the library version, "MAJOR.MINOR.PATCH". Read-only.
--]]
local function version()
    return VERSION
end

redis.register_function{function_name = 'streamsync_version', callback = version,
    flags = {'no-writes'}}
redis.register_function('streamsync_changes', changes)
redis.register_function('streamsync_split', split)
redis.register_function('streamsync_expire', expire)
redis.register_function('streamsync_trim', trim)
redis.register_function('streamsync_mark_epoch', mark_epoch)
redis.register_function('streamsync_mark_snapshot', mark_snapshot)
redis.register_function('streamsync_prune_consumer', prune_consumer)
redis.register_function('streamsync_raise_hwm', raise_hwm)
redis.register_function('streamsync_import', import)
redis.register_function('streamsync_import_list', import_list)
redis.register_function('streamsync_lease_get', lease_get)
redis.register_function('streamsync_lease_fill', lease_fill)
