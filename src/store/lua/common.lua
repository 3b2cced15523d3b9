-- Shared by every canhazgpu script; the Rust side prepends it to each script.
-- Key layout and JSON formats are those of upstream canhazgpu v1.1.x.

local PREFIX = "canhazgpu:"
local GPU_COUNT_KEY = PREFIX .. "gpu_count"
local PROVIDER_KEY = PREFIX .. "provider"
local HISTORY_KEY = PREFIX .. "usage_history_sorted"
-- Mirrors store::HISTORY_PRUNE_BATCH.
local HISTORY_PRUNE_BATCH = 100
-- Mirrors state::RUN_STALE_AFTER_SECS and state::LEGACY_RUN_STALE_AFTER_SECS.
local RUN_STALE_AFTER_SECS = 60
local LEGACY_RUN_STALE_AFTER_SECS = 300

-- Aborts the script with an error reply `CODE details` for the Rust side to map.
-- Every script checks before its first write, so a failure changes nothing.
local function fail(reply)
  error({ canhazgpu_error = reply })
end

-- Runs a script body, turning `fail` into a plain error reply (a raised error would
-- get the script's SHA appended).
local function run(body)
  local ok, result = pcall(body)
  if ok then
    return result
  end
  if type(result) == "table" and result.canhazgpu_error then
    return redis.error_reply(result.canhazgpu_error)
  end
  error(result, 0)
end

local function gpu_key(id)
  return PREFIX .. "gpu:" .. id
end

local function last_used_key(user)
  return PREFIX .. "user_last_used:" .. user
end

-- The pool size, or nil before `admin` ran (a non-numeric value is a store error).
local function gpu_count()
  local raw = redis.call("GET", GPU_COUNT_KEY)
  if not raw then
    return nil
  end
  local count = tonumber(raw)
  if not count or count < 0 or count ~= math.floor(count) then
    error("invalid " .. GPU_COUNT_KEY .. ": " .. raw)
  end
  return count
end

local function require_gpu_count()
  local count = gpu_count()
  if not count then
    fail("NOT_INITIALIZED GPU pool not initialized")
  end
  return count
end

-- Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
local function days_from_civil(y, m, d)
  if m <= 2 then
    y = y - 1
  end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- RFC 3339 with any offset and optional fractional seconds (truncated), as Go writes it.
local function parse_rfc3339(text)
  local y, mo, d, h, mi, s, rest =
    string.match(text, "^(%d%d%d%d)%-(%d%d)%-(%d%d)[Tt ](%d%d):(%d%d):(%d%d)(.*)$")
  if not y then
    return nil
  end
  y, mo, d, h, mi, s = tonumber(y), tonumber(mo), tonumber(d), tonumber(h), tonumber(mi), tonumber(s)
  if mo < 1 or mo > 12 or d < 1 or d > 31 or h > 23 or mi > 59 or s > 60 then
    return nil
  end
  rest = string.gsub(rest, "^%.%d+", "", 1)
  local offset
  if rest == "Z" or rest == "z" then
    offset = 0
  else
    local sign, oh, om = string.match(rest, "^([%+%-])(%d%d):(%d%d)$")
    if not sign then
      return nil
    end
    offset = (tonumber(oh) * 60 + tonumber(om)) * 60
    if sign == "-" then
      offset = -offset
    end
  end
  return days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s - offset
end

local function truncate(n)
  if n < 0 then
    return math.ceil(n)
  end
  return math.floor(n)
end

-- A stored time: JSON number (seconds, fraction truncated), numeric string, RFC 3339
-- string, or null/absent. Returns ok, seconds-or-nil.
local function parse_time(value)
  if value == nil or value == cjson.null then
    return true, nil
  end
  if type(value) == "number" then
    return true, truncate(value)
  end
  if type(value) ~= "string" then
    return false
  end
  if value == "" then
    return true, nil
  end
  if string.match(value, "^%-?%d+%.?%d*$") then
    return true, truncate(tonumber(value))
  end
  local seconds = parse_rfc3339(value)
  if seconds then
    return true, seconds
  end
  return false
end

-- `partial_queue_id` (upstream's name) marks a partial reservation: a GPU collected for
-- a queue entry that is still waiting for more.
local STRING_FIELDS =
  { "user", "actual_user", "type", "note", "reservation_id", "host", "partial_queue_id" }
local TIME_FIELDS = { "start_time", "last_heartbeat", "expiry_time", "last_released" }
-- Upper bounds: a u32 PID, and 14 digits, the most cjson writes back exactly.
local COUNT_FIELDS = { pid = 4294967295, pid_start_time = 99999999999999 }

local function corrupt(id, why)
  return { state = "corrupt", reason = "corrupted GPU state for GPU " .. id .. ": " .. why }
end

-- Reads one GPU key into a normalized slot:
--   { state = "free", last_released = n|nil }
--   { state = "held", reservation_id, user, actual_user, type, start_time, last_heartbeat,
--     expiry_time, note, host, pid, pid_start_time, partial_queue_id }   (absent fields are nil)
--   { state = "corrupt", reason }
-- `host` is set only together with `pid` and `pid_start_time` (the run owner).
local function read_slot(id)
  local raw = redis.call("GET", gpu_key(id))
  if not raw then
    return { state = "free" }
  end
  local ok, doc = pcall(cjson.decode, raw)
  if not ok then
    return corrupt(id, "invalid JSON")
  end
  -- cjson decodes arrays to tables too; a non-empty one has element 1.
  if type(doc) ~= "table" or doc[1] ~= nil then
    return corrupt(id, "not a JSON object")
  end
  local slot = {}
  for _, field in ipairs(STRING_FIELDS) do
    local value = doc[field]
    if value ~= nil and value ~= cjson.null then
      if type(value) ~= "string" then
        return corrupt(id, "field '" .. field .. "' is not a string")
      end
      if value ~= "" then
        slot[field] = value
      end
    end
  end
  for _, field in ipairs(TIME_FIELDS) do
    local parsed, seconds = parse_time(doc[field])
    if not parsed then
      return corrupt(id, "field '" .. field .. "' is not a time")
    end
    slot[field] = seconds
  end
  for field, max in pairs(COUNT_FIELDS) do
    local value = doc[field]
    if value ~= nil and value ~= cjson.null then
      if type(value) ~= "number" or value < 0 or value > max or value ~= math.floor(value) then
        return corrupt(id, "field '" .. field .. "' is not a non-negative integer")
      end
      slot[field] = value
    end
  end

  if not slot.user then
    return { state = "free", last_released = slot.last_released }
  end
  if slot.type ~= "run" and slot.type ~= "manual" then
    return corrupt(id, "unknown reservation type '" .. (slot.type or "") .. "'")
  end
  if not slot.start_time then
    return corrupt(id, "reservation without start_time")
  end
  if slot.host and not (slot.pid and slot.pid_start_time) then
    return corrupt(id, "run owner without pid and pid_start_time")
  end
  if not slot.host then
    slot.pid = nil
    slot.pid_start_time = nil
  end
  slot.state = "held"
  slot.reservation_id = slot.reservation_id or ""
  slot.actual_user = slot.actual_user or ""
  slot.last_released = nil
  return slot
end

-- The Unix account behind a reservation; upstream states may lack `actual_user`.
local function owner_of(slot)
  if slot.actual_user ~= "" then
    return slot.actual_user
  end
  return slot.user
end

-- Mirrors state::Reservation::liveness: nil while active, else when it ended.
local function ended_at(slot, now, dead_ids)
  if slot.type == "manual" then
    if slot.expiry_time and now >= slot.expiry_time then
      return slot.expiry_time
    end
    return nil
  end
  local last = slot.last_heartbeat or slot.start_time
  if slot.reservation_id ~= "" and dead_ids[slot.reservation_id] then
    -- Its last sign of life, not the moment somebody noticed (as state.rs).
    return math.max(last, slot.start_time)
  end
  local stale_after = LEGACY_RUN_STALE_AFTER_SECS
  if slot.host then
    stale_after = RUN_STALE_AFTER_SECS
  end
  if now - last > stale_after then
    return math.max(last, slot.start_time)
  end
  return nil
end

-- Records one finished reservation of one GPU and remembers the GPU as recently used
-- by its owner. The caller rewrites the GPU key and prunes history.
local function end_reservation(id, slot, end_time)
  local record = cjson.encode({
    user = slot.user,
    actual_user = owner_of(slot),
    gpu_id = id,
    start_time = slot.start_time,
    end_time = end_time,
    duration_seconds = math.max(0, end_time - slot.start_time),
    reservation_type = slot.type,
    -- Makes each record a distinct member of the set: two short runs on one GPU can
    -- share their start and end second.
    reservation_id = slot.reservation_id ~= "" and slot.reservation_id or nil,
  })
  redis.call("ZADD", HISTORY_KEY, end_time, record)
  redis.call("HSET", last_used_key(owner_of(slot)), id, end_time)
end

-- Keeps history bounded: drops a batch of the records that ended more than
-- `retention` seconds ago. Every write that records history runs it, so pruning is
-- continuous and no script ever deletes a large backlog at once.
local function prune_history(now, retention)
  local expired = redis.call("ZCOUNT", HISTORY_KEY, "-inf", "(" .. (now - retention))
  if expired > 0 then
    redis.call("ZREMRANGEBYRANK", HISTORY_KEY, 0, math.min(expired, HISTORY_PRUNE_BATCH) - 1)
  end
end

local function released_state(now)
  return cjson.encode({ last_released = now })
end

-- Ends the reservation held on GPU `id` (its history record ends at `end_time`) and
-- frees the GPU.
local function free_held(id, slot, end_time, now)
  end_reservation(id, slot, end_time)
  redis.call("SET", gpu_key(id), released_state(now))
end

-- A set (table of true) from a JSON array of strings or numbers.
local function set_of(list)
  local set = {}
  for _, value in ipairs(list or {}) do
    set[value] = true
  end
  return set
end

-- Validates GPU IDs against the pool like alloc::validate_selection; the Rust side
-- turns BAD_SELECTION into the exact message.
local function check_ids(ids, count)
  local seen = {}
  if #ids == 0 then
    fail("BAD_SELECTION " .. count)
  end
  for _, id in ipairs(ids) do
    if id < 0 or id >= count or seen[id] then
      fail("BAD_SELECTION " .. count)
    end
    seen[id] = true
  end
end

local function sorted(list)
  table.sort(list)
  return list
end

-- Orders free GPUs ({ id, released }) like alloc::rank: this user's most recently
-- used first, then never used, then least recently released; ties by GPU ID.
local function rank_for_user(candidates, actual_user)
  local last_used = {}
  local pairs_list = redis.call("HGETALL", last_used_key(actual_user))
  for i = 1, #pairs_list, 2 do
    last_used[tonumber(pairs_list[i])] = tonumber(pairs_list[i + 1])
  end
  local function rank(gpu)
    local used = last_used[gpu.id]
    if used then
      return 0, -used
    elseif gpu.released == nil then
      return 1, 0
    end
    return 2, gpu.released
  end
  table.sort(candidates, function(a, b)
    local a_class, a_value = rank(a)
    local b_class, b_value = rank(b)
    if a_class ~= b_class then
      return a_class < b_class
    elseif a_value ~= b_value then
      return a_value < b_value
    end
    return a.id < b.id
  end)
  return candidates
end

