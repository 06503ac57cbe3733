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
in KEYS; it never builds key names or scans the keyspace.

Row functions reply with one status per row:
  1 applied, 0 stale (position not newer), 2 skipped (an update with unchanged TOAST columns for a
  row that is not cached: the key stays absent so no partial row is cached), 3 dropped (the cached
  row could not be completed, so it was deleted: the next full change or read fills it again),
  4 rebucketed (the table's buckets were split since the worker addressed them: nothing done, the
  worker sends the row again), 5 unknown (the row's record was evicted and the worker named no
  floor: nothing done, the worker sends the row again with one), or an error string when a Redis
  command failed for that row (the other rows still apply).
--]]

local VERSION = '2.0.0'

local APPLIED, STALE, SKIPPED, DROPPED, REBUCKETED, UNKNOWN = 1, 0, 2, 3, 4, 5

-- Meta fields of a rule table's buckets. A record field starting with '#' is stored with a second
-- '#' in front (streamsync/buckets.py), so no record field can be one of these.
local META_COUNT = '#c'   -- in bucket 0: records held by the table
local META_BUCKETS = '#n' -- in bucket 0: the table's bucket count (absent: 1)
local META_SENTINEL = '#' -- in every other bucket: a bucket that exists is never empty
local META_FLOOR = '#f'   -- in a bucket rebuilt after an eviction: the position of its unknown rows
local META_LOSSY = '#l'   -- in bucket 0: records of the table were evicted (rows may be unrecorded)

-- A record value: '<position>' while its row is cached without a TTL, else
-- '<position>~<unix seconds after which the record may go>'. A position never holds '~' and never
-- is a proper prefix of another, so comparing the whole value with a position compares positions
-- (an equal position with a suffix compares greater: stale, as it should).
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

--[[ Top-level members of a JSON object text, as {member name token -> raw value text}.
The name token is the member name exactly as written, quotes and escapes included: documents are
written by streamsync (orjson, canonical), so the same name always has the same token. Returns nil
when the text is not a JSON object. Values are sliced, never decoded, so numbers keep every digit
(cjson would turn a 64-bit integer into a double).
--]]
local function json_members(text)
    local members = {}
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
        if c == '}' then return members end
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

--[[ 'j' partial JSON: n, then n member triples: name token (the JSON string as written, e.g.
"\"bio\""), kind ('v' value | 'k' keep the cached value), raw JSON value ('' for 'k'). The cached
document supplies the kept members; without it the row is not cached. --]]
local function json_partial(target, argv, i, ttl_ms)
    local n = tonumber(argv[i])
    local kind = redis.call('TYPE', target).ok
    if kind == 'none' then
        return SKIPPED
    end
    local cached = kind == 'string' and json_members(redis.call('GET', target))
    local parts = {}
    for m = 0, n - 1 do
        local j = i + 1 + 3 * m
        local name, value = argv[j], argv[j + 2]
        if argv[j + 1] == 'k' then
            value = cached and cached[name]
        end
        if value == nil then
            redis.call('DEL', target)
            return DROPPED
        end
        parts[#parts + 1] = name .. ':' .. value
    end
    set_document(target, '{' .. table.concat(parts, ',') .. '}', ttl_ms)
    return APPLIED
end

-- 'D' delete and 'I' invalidate: the target is deleted (its record stays, as a tombstone).
local function remove(target)
    redis.call('DEL', target)
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
    D = {remove, function() return 0 end, true},
    I = {remove, function() return 0 end, true},
}

--[[ A position record kept as a string key of its own (library 1.x layout, still used by the
rows of single-value rules whose key may move: kind 'M' below, until placements move to
buckets). Its value is the position; it expires with the row (PX). --]]
local function stored(pos_key)
    local value = redis.call('GET', pos_key)
    if not value then
        return nil
    end
    local bar = string.find(value, '|', 1, true)
    if bar then
        return string.sub(value, 1, bar - 1)
    end
    return value
end

-- the 1.x row function of a single-value kind: KEYS target, position record; items: position,
-- ttl_ms, then the kind's items
local function single_v1(kind)
    local body, span, removes = SINGLE[kind][1], SINGLE[kind][2], SINGLE[kind][3]
    return function(keys, k, argv, i, tombstone_ms)
        local target, pos_key = keys[k], keys[k + 1]
        local pos, ttl_ms = argv[i], tonumber(argv[i + 1])
        local current = stored(pos_key)
        if current and current >= pos then
            return STALE
        end
        local status = body(target, argv, i + 2, ttl_ms)
        if status ~= APPLIED or removes then
            redis.call('SET', pos_key, pos, 'PX', tombstone_ms)
            return status, false
        elseif ttl_ms > 0 then
            redis.call('SET', pos_key, pos, 'PX', ttl_ms + tombstone_ms)
        else
            redis.call('SET', pos_key, pos)
        end
        return status, true
    end, function(argv, i) return 2 + span(argv, i + 2) end
end

--[[ Placement records (library 1.1). A rule whose structure gathers many rows (set, sorted set,
list, stream), or whose key may move when a non-key column changes, keeps one record per (rule,
source row): "<position>|" for a row placed nowhere (a tombstone, kept for the tombstone window),
or "<position>|<kind><msgpack array>" saying where the row is, by kind:
  T set member        {key, member}
  Z sorted-set member {key, member}
  M single-value key  {key, its position record}
  L list entries      {key, order key, reserve key, {entry order members...}}
Events carry no before-image under PostgreSQL's default REPLICA IDENTITY, so this record is the
only way to learn where a row was: the old member or key is removed when the row moves, is
deleted, or leaves the rule's filter. It carries the row's position, so placement changes are
exactly as idempotent and order-safe as plain writes. The keys named inside a record are not in
KEYS (they cannot be known before reading it); in a Redis Cluster a rule whose keys can move must
pin them to one slot with a hash tag.
--]]
local function placement(p_key)
    local value = redis.call('GET', p_key)
    if not value then
        return nil, nil, nil
    end
    local bar = string.find(value, '|', 1, true)
    local pos = string.sub(value, 1, bar - 1)
    if bar == #value then
        return pos, nil, nil
    end
    return pos, string.sub(value, bar + 1, bar + 1), cmsgpack.unpack(string.sub(value, bar + 2))
end

local function store_placement(p_key, pos, kind, data, ttl_ms, tombstone_ms)
    if not kind then
        redis.call('SET', p_key, pos .. '|', 'PX', tombstone_ms)
    elseif ttl_ms > 0 then
        redis.call('SET', p_key, pos .. '|' .. kind .. cmsgpack.pack(data), 'PX', ttl_ms + tombstone_ms)
    else
        redis.call('SET', p_key, pos .. '|' .. kind .. cmsgpack.pack(data))
    end
end

-- A list entry being removed is first overwritten with this value, then LREM'd: removal by index
-- even when several entries hold the same text.
local REMOVED = '\0streamsync:removed\0'

--[[ A list rule keeps its entries ordered by source position, newest first, whatever the
delivery order: the order key, a sorted set whose members "<position>|<row>" sort like the
entries, gives each entry's index (ZREVRANK among the score-0 members). Lists have no
insert-at-index, so an entry that belongs below the head pops the newer entries above it and
pushes them back; out-of-order entries land near the head, so this stays short.
A capped list (max_len) keeps the entries it trims in a reserve, up to max_len of them: order
members with score -1, their values in the reserve hash. When an entry of the list is removed
(a delete), the newest reserve entry takes the freed place at the tail, so the list holds the
newest max_len rows in any delivery order, as long as no more than max_len of them are deleted.
--]]
local IN_LIST, IN_RESERVE = 0, -1

local function list_consistent(list, order, reserve)
    if redis.call('LLEN', list) ~= redis.call('ZCOUNT', order, IN_LIST, IN_LIST) then
        -- edited or expired outside streamsync: its order is unknown, start it over
        redis.call('DEL', list, order, reserve)
    end
end

local function reserve_add(order, reserve, entry, value, max_len)
    redis.call('ZADD', order, IN_RESERVE, entry)
    redis.call('HSET', reserve, entry, value)
    local excess = redis.call('ZCOUNT', order, IN_RESERVE, IN_RESERVE) - max_len
    if excess > 0 then
        local oldest = redis.call('ZRANGE', order, IN_RESERVE, IN_RESERVE, 'BYSCORE', 'LIMIT', 0,
            excess)
        redis.call('ZREM', order, unpack(oldest))
        redis.call('HDEL', reserve, unpack(oldest))
    end
end

-- Move the newest reserve entries to the tail while the list has room.
local function list_refill(list, order, reserve, room)
    for _ = 1, room do
        local newest = redis.call('ZRANGE', order, IN_RESERVE, IN_RESERVE, 'BYSCORE', 'REV',
            'LIMIT', 0, 1)[1]
        if not newest then
            return
        end
        redis.call('RPUSH', list, redis.call('HGET', reserve, newest))
        redis.call('HDEL', reserve, newest)
        redis.call('ZADD', order, IN_LIST, newest)
    end
end

local function list_remove(list, order, reserve, entries)
    list_consistent(list, order, reserve)
    local removed = 0
    for _, entry in ipairs(entries) do
        local score = redis.call('ZSCORE', order, entry)
        if score and tonumber(score) == IN_LIST then
            redis.call('LSET', list, redis.call('ZREVRANK', order, entry), REMOVED)
            redis.call('ZREM', order, entry)
            removed = removed + 1
        elseif score then
            redis.call('ZREM', order, entry)
            redis.call('HDEL', reserve, entry)
        end
    end
    if removed > 0 then
        redis.call('LREM', list, removed, REMOVED)
        list_refill(list, order, reserve, removed)
    end
end

-- Insert value at the place of its order member (into the reserve if a full list keeps only
-- newer entries).
local function list_insert(list, order, reserve, entry, value, max_len)
    redis.call('ZADD', order, IN_LIST, entry)
    local index = redis.call('ZREVRANK', order, entry)
    if max_len > 0 and index >= max_len then
        reserve_add(order, reserve, entry, value, max_len)
        return
    end
    if index == 0 then
        redis.call('LPUSH', list, value)
    else
        local above = redis.call('LPOP', list, index)
        redis.call('LPUSH', list, value)
        local back = {}
        for n = #above, 1, -1 do
            back[#back + 1] = above[n]
        end
        redis.call('LPUSH', list, unpack(back))
    end
    if max_len > 0 then
        local excess = redis.call('LLEN', list) - max_len
        if excess > 0 then
            local oldest = redis.call('ZRANGE', order, IN_LIST, IN_LIST, 'BYSCORE', 'LIMIT', 0,
                excess)
            local values = redis.call('RPOP', list, excess)
            for n = 1, excess do
                reserve_add(order, reserve, oldest[n], values[n], max_len)
            end
        end
    end
end

-- Rewrite an entry's value where it is (list or reserve).
local function list_set(list, order, reserve, entry, value)
    local score = tonumber(redis.call('ZSCORE', order, entry))
    if score == IN_LIST then
        redis.call('LSET', list, redis.call('ZREVRANK', order, entry), value)
    else
        redis.call('HSET', reserve, entry, value)
    end
end

-- Remove what a placement record (made at position placed_at) says the row holds. A
-- single-value key is deleted only if no other row wrote it since (a unique value that changed
-- hands); its tombstone keeps the row's own position, so the new holder's write, newer than
-- that, still applies whatever the order.
local function unplace(kind, data, placed_at, tombstone_ms, list_entries)
    if kind == 'T' then
        redis.call('SREM', data[1], data[2])
    elseif kind == 'Z' then
        redis.call('ZREM', data[1], data[2])
    elseif kind == 'M' then
        local written = stored(data[2])
        if not written or written <= placed_at then
            redis.call('DEL', data[1])
            redis.call('SET', data[2], placed_at, 'PX', tombstone_ms)
        end
    elseif kind == 'L' and list_entries then
        list_remove(data[1], data[2], data[3], data[4])
    end
end

--[[ 'T' set member: KEYS placement record, set; items: position, ttl_ms, member.
     'Z' sorted-set member: KEYS placement record, sorted set; items: position, ttl_ms, member,
score. The row's previous member (another key, or another member) is removed. --]]
local function member_row(kind)
    return function(keys, k, argv, i, tombstone_ms)
        local p_key, target = keys[k], keys[k + 1]
        local pos, ttl_ms, member = argv[i], tonumber(argv[i + 1]), argv[i + 2]
        local current, old_kind, old = placement(p_key)
        if current and current >= pos then
            return STALE
        end
        if old and (old_kind ~= kind or old[1] ~= target or old[2] ~= member) then
            unplace(old_kind, old, current, tombstone_ms, true)
        end
        if kind == 'T' then
            redis.call('SADD', target, member)
        else
            redis.call('ZADD', target, argv[i + 3], member)
        end
        expire_target(target, ttl_ms)
        store_placement(p_key, pos, kind, {target, member}, ttl_ms, tombstone_ms)
        if old then
            return APPLIED
        end
        return APPLIED, true
    end
end

--[[ 'L' list entry: KEYS placement record, list, its order key, its reserve; items: position,
ttl_ms, max_len (0 = unbounded), mode ('p' push one entry per change | 'r' replace the row's entry
in place), order member ("<position>|<row>"), value. --]]
local function list_row(keys, k, argv, i, tombstone_ms)
    local p_key, list, order, reserve = keys[k], keys[k + 1], keys[k + 2], keys[k + 3]
    local pos, ttl_ms, max_len = argv[i], tonumber(argv[i + 1]), tonumber(argv[i + 2])
    local mode, entry, value = argv[i + 3], argv[i + 4], argv[i + 5]
    local current, old_kind, old = placement(p_key)
    if current and current >= pos then
        return STALE
    end
    list_consistent(list, order, reserve)
    local entries = {}
    if old and old_kind == 'L' and old[1] == list then
        -- entries dropped from the reserve since are forgotten
        for _, e in ipairs(old[4]) do
            if redis.call('ZSCORE', order, e) then
                entries[#entries + 1] = e
            end
        end
    elseif old then
        unplace(old_kind, old, current, tombstone_ms, true)
    end
    if mode == 'r' and #entries > 0 then
        list_set(list, order, reserve, entries[1], value)
        if #entries > 1 then
            list_remove(list, order, reserve, {unpack(entries, 2)})
        end
        entries = {entries[1]}
    else
        list_insert(list, order, reserve, entry, value, max_len)
        if redis.call('ZSCORE', order, entry) then
            entries[#entries + 1] = entry
        end
        if max_len > 0 and #entries > 2 * max_len then
            table.remove(entries, 1)
        end
    end
    expire_target(list, ttl_ms)
    expire_target(order, ttl_ms)
    expire_target(reserve, ttl_ms)
    if #entries == 0 then
        store_placement(p_key, pos, nil, nil, ttl_ms, tombstone_ms)
        return APPLIED, false
    end
    store_placement(p_key, pos, 'L', {list, order, reserve, entries}, ttl_ms, tombstone_ms)
    if old then
        return APPLIED
    end
    return APPLIED, true
end

--[[ 'X' stream event: KEYS the row's record, stream; items: position, max_len (0 = unbounded),
n, n field/value pairs. Published once per strictly newer position of the row: a replay within the
tombstone window publishes nothing. --]]
local function stream_row(keys, k, argv, i, tombstone_ms)
    local p_key, stream = keys[k], keys[k + 1]
    local pos, max_len, n = argv[i], tonumber(argv[i + 1]), tonumber(argv[i + 2])
    local current = placement(p_key)
    if current and current >= pos then
        return STALE
    end
    if max_len > 0 then
        redis.call('XADD', stream, 'MAXLEN', max_len, '*', unpack(argv, i + 3, i + 2 + 2 * n))
    else
        redis.call('XADD', stream, '*', unpack(argv, i + 3, i + 2 + 2 * n))
    end
    store_placement(p_key, pos, nil, nil, 0, tombstone_ms)
    return APPLIED
end

--[[ 'R' remove a row's placement (a delete, the row leaving the rule's filter, a TRUNCATE):
KEYS placement record; items: position, list entries ('1' removed | '0' kept). --]]
local function remove_row(keys, k, argv, i, tombstone_ms)
    local p_key, pos = keys[k], argv[i]
    local current, old_kind, old = placement(p_key)
    if current and current >= pos then
        return STALE
    end
    if old and old_kind == 'L' and argv[i + 1] ~= '1' then
        -- on_delete ignore: the entries stay, and so does the record of them (and the row in
        -- its index), for a TRUNCATE or a resync to find
        store_placement(p_key, pos, 'L', old, 0, tombstone_ms)
        return APPLIED
    end
    if old then
        unplace(old_kind, old, current, tombstone_ms, true)
    end
    store_placement(p_key, pos, nil, nil, 0, tombstone_ms)
    return APPLIED, false
end

-- The 1.x row functions a moving row ('M') calls for its target: see single_v1.
local INNER = {}
local function inner(kind)
    local fn, span = single_v1(kind)
    INNER[kind] = {fn, span}
end
inner('H')
inner('h')
inner('J')
inner('j')

-- placement row kinds (1.x layout): the function applying one, its number of KEYS after the
-- rule's index, and the number of ARGV items it spans (given the index of its first item)
local ROWS = {
    T = {member_row('T'), 2, function() return 3 end},
    Z = {member_row('Z'), 2, function() return 4 end},
    L = {list_row, 4, function() return 6 end},
    X = {stream_row, 2, function(argv, i) return 3 + 2 * tonumber(argv[i + 2]) end},
    R = {remove_row, 1, function() return 2 end},
}

--[[ 'M' a single-value row whose key may move: KEYS placement record, target, its position
record; items: position, then an H, h, J or j row's kind and items (position, ttl_ms, the kind's
items). The row-level position decides whether the change is new; the target's own position record
then decides whether it may write the key (another row may have taken the key over later: a
unique column changing hands). The key the row held before, if another, is deleted unless a newer
change wrote it since. --]]
local function moving_row(keys, k, argv, i, tombstone_ms)
    local p_key, target, t_pos = keys[k], keys[k + 1], keys[k + 2]
    local pos, inner = argv[i], argv[i + 1]
    local current, old_kind, old = placement(p_key)
    if current and current >= pos then
        return STALE
    end
    local status = INNER[inner][1](keys, k + 1, argv, i + 2, tombstone_ms)
    if old and (old_kind ~= 'M' or old[1] ~= target) then
        unplace(old_kind, old, current, tombstone_ms, true)
    end
    local ttl_ms = tonumber(argv[i + 3])
    if status == APPLIED then
        store_placement(p_key, pos, 'M', {target, t_pos}, ttl_ms, tombstone_ms)
        if old then
            return APPLIED
        end
        return APPLIED, true
    end
    store_placement(p_key, pos, nil, nil, ttl_ms, tombstone_ms)
    return status, false
end
ROWS.M = {moving_row, 3, function(argv, i)
    return 2 + INNER[argv[i + 1]][2](argv, i + 2)
end}

local function row_error(result)
    if type(result) == 'table' and result.err then
        return result.err
    end
    return tostring(result)
end

--[[ Guarded tables. On a cache Redis that may evict any key (a separate target with an allkeys
policy), a rule table's buckets can be evicted with their records: a row without a record may
then be new, or a row whose record is gone, last written at an unknown position. The worker names
each such table's guard in the call: 'new' (it is the table's first writer: a missing bucket 0 is
a new table), '?' (a lost record is unknown: the row replies 5, for the worker to learn the floor)
or a floor: a position no older than any change ever applied to the table (the worker's
high-water mark, raised before each batch is applied). A bucket found gone (a bucket that exists
is never empty) is rebuilt with that floor, and a row without a record in it is taken to be at
the floor: a change not newer leaves the row uncached (its target deleted), rather than risk
writing a change older than one already applied.
Returns the recorded position (or the floor), and whether it is the floor. --]]
local function recorded(bucket, field, guard, meta)
    if guard == 'lost' then
        -- bucket 0 and the table's meta were evicted, the floor is not known yet
        return nil, false
    end
    local current = redis.call('HGET', bucket, field)
    if current or not guard then
        return current, false
    end
    if bucket ~= meta and redis.call('EXISTS', bucket) == 0 then
        if guard == '?' then
            return nil, false
        end
        redis.call('HSET', bucket, META_SENTINEL, '', META_FLOOR, guard)
        redis.call('HSET', meta, META_LOSSY, 1)
        return guard, true
    end
    local floor = redis.call('HGET', bucket, META_FLOOR)
    return floor, floor ~= false
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

-- A placement row (1.x layout): its rule's index first, the index member, then the kind's keys
-- and items. An applied row that places a row not placed before adds it to the index; one that
-- leaves the row placed nowhere removes it.
local function placement_row(row, keys, k, argv, i, tombstone_ms)
    local ok, status, placed = pcall(row[1], keys, k + 1, argv, i + 1, tombstone_ms)
    if not ok then
        return row_error(status)
    end
    local member = argv[i]
    if member ~= '' then
        if placed == true then
            redis.call('SADD', keys[k], member)
        elseif placed == false then
            redis.call('SREM', keys[k], member)
        end
    end
    return status
end

--[[ streamsync_changes: the batch entry point (library 2.0).
KEYS: per rule table of the call, its bucket 0; then per row the row's keys:
  single-value kinds (H h J j D I): the target, the bucket holding the row's record;
  placement kinds (T Z L X R M, 1.x layout): the rule's index, then the kind's keys (see above).
ARGV: tombstone_s, the number of tables, per table: its bucket count as the worker knows it, its
rule's ttl_ms (0 = none) and its guard ('' = the target does not evict its records; see
"Guarded tables" above); then per row: its table (1-based; 0 for placement rows), its kind,
then for a single-value kind the record field, the position and the kind's items; for a
placement kind the index member ('' = not indexed) and the kind's items (position first).
A table whose bucket count is not the one the worker knows (another worker split a bucket) has
none of its rows applied: each replies 4 (rebucketed), for the worker to send again.
Reply: one status per row (see the header), then one array: per table, its bucket count and the
records it holds.
--]]
local function changes(keys, argv)
    local tombstone_s, ntables = tonumber(argv[1]), tonumber(argv[2])
    local tombstone_ms = tombstone_s * 1000
    local now = tonumber(redis.call('TIME')[1])
    local current, ttls, guards, added, tables = {}, {}, {}, {}, {}
    local i = 3
    for t = 1, ntables do
        local guard = argv[i + 2]
        local meta = redis.call('HMGET', keys[t], META_BUCKETS, META_COUNT)
        if guard == '' or guard == 'new' then
            guard = false
        elseif not meta[1] and not meta[2] and guard == '?' then
            guard = 'lost'
        elseif not meta[1] and not meta[2] then
            -- bucket 0, and the table's meta with it, was evicted: rebuilt with the worker's
            -- bucket count and the floor
            redis.call('HSET', keys[t], META_BUCKETS, argv[i], META_COUNT, 0, META_FLOOR, guard,
                META_LOSSY, 1)
            meta = {argv[i], 0}
        end
        local n = tonumber(meta[1]) or 1
        current[t] = n == tonumber(argv[i])
        ttls[t] = tonumber(argv[i + 1])
        guards[t] = guard
        added[t] = 0
        tables[2 * t - 1], tables[2 * t] = n, tonumber(meta[2]) or 0
        i = i + 3
    end
    local replies = {}
    local k, r = ntables + 1, 0
    while k <= #keys do
        local t, kind = tonumber(argv[i]), argv[i + 1]
        r = r + 1
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
            local row = ROWS[kind]
            if not row then
                return redis.error_reply('row ' .. r .. ': unexpected row kind ' .. tostring(kind))
            end
            replies[r] = placement_row(row, keys, k, argv, i + 2, tombstone_ms)
            i = i + 3 + row[3](argv, i + 3)
            k = k + 1 + row[2]
        end
    end
    for t = 1, ntables do
        if added[t] > 0 then
            tables[2 * t] = redis.call('HINCRBY', keys[t], META_COUNT, added[t])
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
    local n = tonumber(redis.call('HGET', meta, META_BUCKETS)) or 1
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
KEYS: a table's bucket 0, then buckets of that table
ARGV: none
Removes the records whose time has passed (tombstones past tombstone_s, rows of a rule with a TTL
unwritten for their TTL and the tombstone window). Reply: the number of records removed.
--]]
local function expire(keys, argv)
    local now = tonumber(redis.call('TIME')[1])
    local removed = 0
    for k = 2, #keys do
        local flat = redis.call('HGETALL', keys[k])
        local gone = {}
        for j = 1, #flat, 2 do
            local value = flat[j + 1]
            local mark = string.find(value, EXPIRES, 1, true)
            if mark and tonumber(string.sub(value, mark + 1)) < now and not is_meta(flat[j]) then
                gone[#gone + 1] = flat[j]
            end
        end
        if #gone > 0 then
            redis.call('HDEL', keys[k], unpack(gone))
            removed = removed + #gone
        end
    end
    if removed > 0 then
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
