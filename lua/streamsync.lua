#!lua name=streamsync

--[[
streamsync Functions library: applies Debezium change events to Redis, idempotently.

Every row write carries the event's source position (digits in commit order: see
streamsync/positions.py). Each target key has a position record, a string key in the same hash
slot that holds the position of the last change applied to it. A change is applied only when its
position is strictly greater than the stored one; an equal or older position is a no-op reported
as stale. So duplicates, replays and out-of-order delivery never roll a key back.

Positions compare as digit strings, each number written with its length first: LSNs are 64-bit
and Lua numbers are doubles.

The worker calls streamsync_batch: per row, its rule's index key followed by the row kind's own
keys (target key, position record, placement record...: see each kind below), and
ARGV[1] = tombstone TTL in milliseconds followed by one segment per row, in KEYS order, each
starting with the row's kind and index member. (streamsync_apply and the per-operation functions
of library 1.0 take KEYS in pairs, target key and position record, and no index member.) Row
functions reply with an array holding one status per row:
  1 applied, 0 stale (position not newer), 2 skipped (an update with unchanged TOAST columns for a
  row that is not cached: the key stays absent so no partial row is cached), 3 dropped (the cached
  row could not be completed, so it was deleted: the next full change or read fills it again), or
  an error string when a Redis command failed for that row (the other rows still apply).
Every key the library touches arrives in KEYS; it never builds key names or scans the keyspace.
--]]

local VERSION = '1.2.0'

local APPLIED, STALE, SKIPPED, DROPPED = 1, 0, 2, 3

-- True while a 1.0 call (streamsync_apply) runs: it keeps no index, so the records it writes
-- must not claim the row is cached (and therefore indexed): no shape, no live mark.
local LEGACY = false

--[[ A position record holds "<position>" or "<position>|<shape>". The shape names the set of
fields the last full hash write left in the target; while it stays the same, a full write is a
plain HSET (every field it had is rewritten), and only a different shape needs the DEL that
removes fields the row no longer has. A JSON or string target's record holds "<position>|="
while its value is cached. A bare "<position>" is a tombstone, a row not cached, or a hash last
written partially.
--]]
local function stored(pos_key)
    local value = redis.call('GET', pos_key)
    if not value then
        return nil, nil
    end
    local bar = string.find(value, '|', 1, true)
    if bar then
        return string.sub(value, 1, bar - 1), string.sub(value, bar + 1)
    end
    return value, nil
end

-- The position record outlives a key with a TTL by the tombstone window, so a replay of an old
-- change arriving right after the key expired cannot resurrect it. A row left uncached (deleted,
-- skipped, dropped) keeps its position only for the tombstone window.
local function store_position(pos_key, value, status, ttl_ms, tombstone_ms)
    if status ~= APPLIED then
        redis.call('SET', pos_key, value, 'PX', tombstone_ms)
    elseif ttl_ms > 0 then
        redis.call('SET', pos_key, value, 'PX', ttl_ms + tombstone_ms)
    else
        redis.call('SET', pos_key, value)
    end
end

local function expire_target(target, ttl_ms)
    if ttl_ms > 0 then
        redis.call('PEXPIRE', target, ttl_ms)
    end
end

--[[ 'H' full hash row: position, ttl_ms (0 = none), shape, n, n field/value pairs.
The hash becomes exactly those fields (null columns are absent fields). --]]
local function hash_full(target, pos_key, argv, i, tombstone_ms)
    local pos, ttl_ms, shape, n = argv[i], tonumber(argv[i + 1]), argv[i + 2], tonumber(argv[i + 3])
    local current, current_shape = stored(pos_key)
    if current and current >= pos then
        return STALE
    end
    if current_shape ~= shape then
        redis.call('DEL', target)
    end
    if n > 0 then
        redis.call('HSET', target, unpack(argv, i + 4, i + 3 + 2 * n))
    end
    expire_target(target, ttl_ms)
    if LEGACY then
        store_position(pos_key, pos, APPLIED, ttl_ms, tombstone_ms)
        return APPLIED
    end
    store_position(pos_key, pos .. '|' .. shape, APPLIED, ttl_ms, tombstone_ms)
    -- a shape means the row was cached already, so it is in its rule's index
    return APPLIED, current_shape ~= nil
end

--[[ 'h' partial hash row (some columns are unchanged TOAST values, not sent): position, ttl_ms,
n_set, n_null, n_keep, n_set field/value pairs, n_null fields, n_keep fields. The set fields are
written, the null ones removed, and the kept ones must already be cached: otherwise the row cannot
be completed and is not cached. --]]
local function hash_partial(target, pos_key, argv, i, tombstone_ms)
    local pos, ttl_ms = argv[i], tonumber(argv[i + 1])
    local n_set, n_null, n_keep = tonumber(argv[i + 2]), tonumber(argv[i + 3]), tonumber(argv[i + 4])
    local first_set = i + 5
    local first_null = first_set + 2 * n_set
    local first_keep = first_null + n_null
    local current = stored(pos_key)
    if current and current >= pos then
        return STALE
    end
    local status = APPLIED
    local kind = redis.call('TYPE', target).ok
    if kind == 'none' then
        status = SKIPPED
    else
        local complete = kind == 'hash'
        for k = first_keep, first_keep + n_keep - 1 do
            if not complete then break end
            complete = redis.call('HEXISTS', target, argv[k]) == 1
        end
        if not complete then
            redis.call('DEL', target)
            status = DROPPED
        else
            if n_set > 0 then
                redis.call('HSET', target, unpack(argv, first_set, first_null - 1))
            end
            if n_null > 0 then
                redis.call('HDEL', target, unpack(argv, first_null, first_keep - 1))
            end
            expire_target(target, ttl_ms)
        end
    end
    -- no shape: the next full write replaces the hash whole
    store_position(pos_key, pos, status, ttl_ms, tombstone_ms)
    return status
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

-- A JSON or string target's position record ends with this mark while the value is cached.
local LIVE = '|='

local function set_document(target, doc, ttl_ms)
    if ttl_ms > 0 then
        redis.call('SET', target, doc, 'PX', ttl_ms)
    else
        redis.call('SET', target, doc)
    end
end

--[[ 'J' full JSON row: position, ttl_ms, the document. --]]
local function json_full(target, pos_key, argv, i, tombstone_ms)
    local pos, ttl_ms = argv[i], tonumber(argv[i + 1])
    local current, current_mark = stored(pos_key)
    if current and current >= pos then
        return STALE
    end
    set_document(target, argv[i + 2], ttl_ms)
    store_position(pos_key, LEGACY and pos or pos .. LIVE, APPLIED, ttl_ms, tombstone_ms)
    return APPLIED, current_mark == '='
end

--[[ 'j' partial JSON row: position, ttl_ms, n, then n member triples: name token (the JSON
string as written, e.g. "\"bio\""), kind ('v' value | 'k' keep the cached value), raw JSON value
('' for 'k'). The cached document supplies the kept members; without it the row is not cached. --]]
local function json_partial(target, pos_key, argv, i, tombstone_ms)
    local pos, ttl_ms, n = argv[i], tonumber(argv[i + 1]), tonumber(argv[i + 2])
    local current = stored(pos_key)
    if current and current >= pos then
        return STALE
    end
    local status = APPLIED
    local kind, cached = redis.call('TYPE', target).ok, nil
    if kind == 'none' then
        status = SKIPPED
    else
        if kind == 'string' then
            cached = json_members(redis.call('GET', target))
        end
        if not cached then
            status = DROPPED
        end
    end
    if status == APPLIED then
        local parts = {}
        for m = 0, n - 1 do
            local j = i + 3 + 3 * m
            local name, value = argv[j], argv[j + 2]
            if argv[j + 1] == 'k' then
                value = cached[name]
                if value == nil then
                    status = DROPPED
                    break
                end
            end
            parts[#parts + 1] = name .. ':' .. value
        end
        if status == APPLIED then
            set_document(target, '{' .. table.concat(parts, ',') .. '}', ttl_ms)
        end
    end
    if status == DROPPED then
        redis.call('DEL', target)
    end
    if status == APPLIED and not LEGACY then
        store_position(pos_key, pos .. LIVE, status, ttl_ms, tombstone_ms)
    else
        store_position(pos_key, pos, status, ttl_ms, tombstone_ms)
    end
    return status
end

--[[ 'D' delete and 'I' invalidate rows: position. The target is deleted and the position
remembered for the tombstone window, so a late replay of an older change cannot bring the row
back. --]]
local function remove(target, pos_key, argv, i, tombstone_ms)
    local pos = argv[i]
    local current = stored(pos_key)
    if current and current >= pos then
        return STALE
    end
    redis.call('DEL', target)
    redis.call('SET', pos_key, pos, 'PX', tombstone_ms)
    return APPLIED
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

-- Single-value rows (two KEYS: target, position record) as (status, placed).
local function single(fn, removes)
    return function(keys, k, argv, i, tombstone_ms)
        local status, was_cached = fn(keys[k], keys[k + 1], argv, i, tombstone_ms)
        if status == STALE then
            return status
        end
        if status ~= APPLIED or removes then
            return status, false
        end
        if was_cached then
            return status
        end
        return status, true
    end
end

-- row kinds: the function applying one, its number of KEYS, and the number of ARGV items it
-- spans (given the index of its first item after the kind)
local ROWS = {
    H = {single(hash_full), 2, function(argv, i) return 4 + 2 * tonumber(argv[i + 3]) end,
        hash_full},
    h = {single(hash_partial), 2, function(argv, i)
        return 5 + 2 * tonumber(argv[i + 2]) + tonumber(argv[i + 3]) + tonumber(argv[i + 4])
    end, hash_partial},
    J = {single(json_full), 2, function() return 3 end, json_full},
    j = {single(json_partial), 2, function(argv, i) return 3 + 3 * tonumber(argv[i + 2]) end,
        json_partial},
    D = {single(remove, true), 2, function() return 1 end, remove, true},
    I = {single(remove, true), 2, function() return 1 end, remove, true},
    T = {member_row('T'), 2, function() return 3 end},
    Z = {member_row('Z'), 2, function() return 4 end},
    L = {list_row, 4, function() return 6 end},
    X = {stream_row, 2, function(argv, i) return 3 + 2 * tonumber(argv[i + 2]) end},
    R = {remove_row, 1, function() return 2 end},
}

--[[ 'M' a single-value row whose key may move: KEYS placement record, target, its position
record; items: position, then an H, h, J or j row's kind and items. The row-level position decides
whether the change is new; the target's own position record then decides whether it may write
the key (another row may have taken the key over later: a unique column changing hands). The key
the row held before, if another, is deleted unless a newer change wrote it since. --]]
local function moving_row(keys, k, argv, i, tombstone_ms)
    local p_key, target, t_pos = keys[k], keys[k + 1], keys[k + 2]
    local pos, inner = argv[i], argv[i + 1]
    local current, old_kind, old = placement(p_key)
    if current and current >= pos then
        return STALE
    end
    local status = ROWS[inner][1](keys, k + 1, argv, i + 2, tombstone_ms)
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
    return 2 + ROWS[argv[i + 1]][3](argv, i + 2)
end}

local V1_KINDS = {H = true, h = true, J = true, j = true, D = true, I = true}

local function row_error(result)
    if type(result) == 'table' and result.err then
        return result.err
    end
    return tostring(result)
end

--[[ Apply rows of the given kinds (library 1.0 layout). KEYS: (target, position record) per row.
ARGV: tombstone_ms, then per row its kind and its items. One failing row (a Redis error) does
not stop the others: its reply is the error text. --]]
local function apply_rows(keys, argv, allowed)
    local tombstone_ms = tonumber(argv[1])
    local replies = {}
    LEGACY = true
    local i = 2
    for k = 1, #keys, 2 do
        local op = argv[i]
        local row = ROWS[op]
        if not V1_KINDS[op] or (allowed and not allowed[op]) then
            LEGACY = false
            return redis.error_reply('row ' .. (k + 1) / 2 .. ': unexpected row kind ' ..
                tostring(op))
        end
        local ok, result = pcall(row[1], keys, k, argv, i + 1, tombstone_ms)
        replies[#replies + 1] = ok and result or row_error(result)
        i = i + 1 + row[3](argv, i + 1)
    end
    LEGACY = false
    return replies
end

--[[ streamsync_apply: the batch entry point of library 1.0, rows of any 1.0 kind.
KEYS: target key, position record; repeated per row
ARGV: tombstone_ms, then per row: kind, items:
  H (full hash): position, ttl_ms, shape, n, n field/value pairs
  h (partial hash): position, ttl_ms, n_set, n_null, n_keep, pairs, null fields, kept fields
  J (full JSON or string value): position, ttl_ms, document
  j (partial JSON): position, ttl_ms, n, n triples (name token, 'v' | 'k', raw value)
  D (delete), I (invalidate): position
Reply: one status per row (see the header).
--]]
local function apply(keys, argv)
    return apply_rows(keys, argv, nil)
end

--[[ streamsync_batch: the batch entry point of library 1.1: rows of every kind, each kept in
its rule's index (the set of what the rule placed, so TRUNCATE and resync find every key derived
from a table without scanning the keyspace).
KEYS: per row, its rule's index, then the kind's KEYS (see each kind above and streamsync_apply)
ARGV: tombstone_ms, then per row: kind, index member ('' = the row is not indexed, '.' = its
first key after the index: the target of a single-value row), items.
An applied row that places a row not placed before adds the member to the index (a row already
cached is known to be there, which spares the common update an SADD); one that leaves the row
placed nowhere removes it.
Reply: one status per row (see the header).
--]]
local function batch(keys, argv)
    LEGACY = false
    local tombstone_ms = tonumber(argv[1])
    local replies = {}
    local i, k, n = 2, 1, 0
    while k <= #keys do
        local op = argv[i]
        local row = ROWS[op]
        n = n + 1
        if not row then
            return redis.error_reply('row ' .. n .. ': unexpected row kind ' .. tostring(op))
        end
        local member = argv[i + 1]
        local ok, status, placed
        local direct = row[4]
        if direct then
            -- the common single-value rows, called without the wrapper (the hot path)
            local was_cached
            ok, status, was_cached = pcall(direct, keys[k + 1], keys[k + 2], argv, i + 2,
                tombstone_ms)
            if ok and status ~= STALE then
                if status ~= APPLIED or row[5] then
                    placed = false
                elseif not was_cached then
                    placed = true
                end
            end
        else
            ok, status, placed = pcall(row[1], keys, k + 1, argv, i + 2, tombstone_ms)
        end
        if member == '.' then
            member = keys[k + 1]
        end
        if not ok then
            replies[n] = row_error(status)
        else
            replies[n] = status
            if member ~= '' then
                if placed == true then
                    redis.call('SADD', keys[k], member)
                elseif placed == false then
                    redis.call('SREM', keys[k], member)
                end
            end
        end
        i = i + 2 + row[3](argv, i + 2)
        k = k + 1 + row[2]
    end
    return replies
end

-- streamsync_write_hash, streamsync_write_json, streamsync_delete, streamsync_invalidate: the
-- same as streamsync_apply, restricted to the rows of one operation (H/h, J/j, D, I).
local function only(kinds)
    return function(keys, argv) return apply_rows(keys, argv, kinds) end
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
Reply: the mark of each pair's rule after the call, in ARGV order.
--]]
local function raise_hwm(keys, argv)
    local hwm = keys[1]
    if #argv % 2 ~= 0 then
        return redis.error_reply('streamsync_raise_hwm: ARGV must be rule, position pairs')
    end
    local marks, raised = {}, {}
    for i = 1, #argv, 2 do
        local rule, position = argv[i], argv[i + 1]
        if position == '' then
            return redis.error_reply('streamsync_raise_hwm: empty position for ' .. rule)
        end
        local mark = marks[rule]
        if mark == nil then
            mark = redis.call('HGET', hwm, rule)
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
redis.register_function('streamsync_apply', apply)
redis.register_function('streamsync_batch', batch)
redis.register_function('streamsync_write_hash', only({H = true, h = true}))
redis.register_function('streamsync_write_json', only({J = true, j = true}))
redis.register_function('streamsync_delete', only({D = true}))
redis.register_function('streamsync_invalidate', only({I = true}))
redis.register_function('streamsync_trim', trim)
redis.register_function('streamsync_mark_epoch', mark_epoch)
redis.register_function('streamsync_mark_snapshot', mark_snapshot)
redis.register_function('streamsync_prune_consumer', prune_consumer)
redis.register_function('streamsync_raise_hwm', raise_hwm)
