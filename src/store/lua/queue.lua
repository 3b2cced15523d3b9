-- The wait queue, shared by the scripts that hand out GPUs; mirrors src/queue.rs.
-- Layout as upstream: zset `canhazgpu:queue` (member = entry ID, score = enqueue time
-- in Unix nanoseconds) and one JSON string `canhazgpu:queue:entry:<id>` per entry.
-- A GPU collected for a waiting entry holds a partial reservation whose state has
-- `partial_queue_id` = the entry ID. Changes that may help a waiter (GPUs freed,
-- entries gone or served) are announced on the channel `canhazgpu:queue:wake`.

local QUEUE_KEY = PREFIX .. "queue"
local WAKE_CHANNEL = PREFIX .. "queue:wake"
-- Mirror queue::WAITER_HEARTBEAT_SECS, queue::WAITER_STALE_AFTER_SECS and
-- queue::LEGACY_WAITER_STALE_AFTER_SECS.
local WAITER_HEARTBEAT_SECS = 5
local WAITER_STALE_AFTER_SECS = 20
local LEGACY_WAITER_STALE_AFTER_SECS = 120

local function entry_key(id)
  return PREFIX .. "queue:entry:" .. id
end

local woken = false

-- Wakes the waiters once per script; they receive it after the script's writes.
local function wake()
  if not woken then
    redis.call("PUBLISH", WAKE_CHANNEL, "1")
    woken = true
  end
end

-- After a script freed GPUs: prune old history and wake the waiters.
local function after_freeing(freed, now, retention)
  if #freed > 0 then
    prune_history(now, retention)
    wake()
  end
end

-- A non-negative integer field, or nil when absent; false when invalid.
local function whole_number(doc, field)
  local value = doc[field]
  if value == nil or value == cjson.null then
    return nil
  end
  if type(value) ~= "number" or value < 0 or value ~= math.floor(value) then
    return false
  end
  return value
end

-- Reads one entry into a normalized table, or nil when it is missing or unreadable:
--   { id, doc (the decoded JSON), user, actual_user, type, count, ids (nil for a count),
--     duration, note, host, pid, pid_start_time (run owner), waiter_host, waiter_pid,
--     waiter_pid_start_time, enqueue_time, last_heartbeat }
-- Upstream entries have no waiter fields and keep the length of a manual
-- reservation in `expiry_duration` (nanoseconds); ours use `duration_seconds`.
local function read_entry(id)
  local raw = redis.call("GET", entry_key(id))
  if not raw then
    return nil
  end
  local ok, doc = pcall(cjson.decode, raw)
  if not ok or type(doc) ~= "table" or doc[1] ~= nil then
    return nil
  end
  local entry = { id = id, doc = doc }
  for _, field in ipairs({ "user", "actual_user", "reservation_type", "note", "host", "waiter_host" }) do
    local value = doc[field]
    if value ~= nil and value ~= cjson.null then
      if type(value) ~= "string" then
        return nil
      end
      if value ~= "" then
        entry[field] = value
      end
    end
  end
  entry.type = entry.reservation_type
  if not entry.user or (entry.type ~= "run" and entry.type ~= "manual") then
    return nil
  end
  entry.actual_user = entry.actual_user or entry.user
  for _, field in ipairs({ "requested_count", "pid", "pid_start_time", "waiter_pid",
    "waiter_pid_start_time", "duration_seconds", "expiry_duration" }) do
    local value = whole_number(doc, field)
    if value == false then
      return nil
    end
    entry[field] = value
  end
  local ids = doc.requested_ids
  if ids ~= nil and ids ~= cjson.null and type(ids) ~= "table" then
    return nil
  end
  if ids ~= nil and ids ~= cjson.null and next(ids) ~= nil then
    entry.ids = {}
    for i, gpu in ipairs(ids) do
      if type(gpu) ~= "number" or gpu < 0 or gpu ~= math.floor(gpu) then
        return nil
      end
      entry.ids[i] = gpu
    end
    entry.count = #entry.ids
  else
    entry.count = entry.requested_count
  end
  if not entry.count or entry.count < 1 then
    return nil
  end
  if entry.type == "manual" then
    entry.duration = entry.duration_seconds
    if not entry.duration and entry.expiry_duration then
      entry.duration = math.floor(entry.expiry_duration / 1e9)
    end
  end
  local parsed_enqueue, enqueue_time = parse_time(doc.enqueue_time)
  local parsed_heartbeat, last_heartbeat = parse_time(doc.last_heartbeat)
  if not (parsed_enqueue and parsed_heartbeat) then
    return nil
  end
  entry.last_heartbeat = last_heartbeat or enqueue_time
  entry.enqueue_time = enqueue_time or entry.last_heartbeat
  if not entry.last_heartbeat then
    return nil
  end
  if not (entry.host and entry.pid and entry.pid_start_time) then
    entry.host, entry.pid, entry.pid_start_time = nil, nil, nil
  end
  entry.waiter = entry.waiter_host ~= nil and entry.waiter_pid ~= nil
    and entry.waiter_pid_start_time ~= nil
  return entry
end

-- Mirrors QueueEntry::is_alive.
local function entry_alive(entry, now, dead_ids)
  local stale_after = LEGACY_WAITER_STALE_AFTER_SECS
  if entry.waiter then
    stale_after = WAITER_STALE_AFTER_SECS
  end
  return not dead_ids[entry.id] and now - entry.last_heartbeat <= stale_after
end

-- Writes an entry back with `allocated_gpus` = its collected GPUs (kept for upstream
-- readers; canhazgpu derives them from the GPU states). cjson writes an empty table
-- as `{}`, so the list is spliced in as text.
local function write_entry(entry)
  local doc = entry.doc
  doc.allocated_gpus = nil
  local rest = cjson.encode(doc)
  local list = '"allocated_gpus":[' .. table.concat(entry.collected, ",") .. "]"
  if rest == "{}" then
    rest = "{" .. list .. "}"
  else
    rest = "{" .. list .. "," .. string.sub(rest, 2)
  end
  redis.call("SET", entry_key(entry.id), rest)
end

local function remove_entry(id)
  redis.call("ZREM", QUEUE_KEY, id)
  redis.call("DEL", entry_key(id))
  wake()
end

-- Every slot of the pool, by GPU ID.
local function read_slots(count)
  local slots = {}
  for id = 0, count - 1 do
    slots[id] = read_slot(id)
  end
  return slots
end

-- Reads the queue in order, drops dead and unreadable entries, and ends the partial
-- reservations of entries that are gone (updating `slots`). Returns the live entries,
-- each with `collected` (ascending), and whether history was written.
local function settle(slots, count, now, dead_ids)
  local entries, live, last_seen = {}, {}, {}
  for _, id in ipairs(redis.call("ZRANGE", QUEUE_KEY, 0, -1)) do
    local entry = read_entry(id)
    if entry and entry_alive(entry, now, dead_ids) then
      entry.collected = {}
      entries[#entries + 1] = entry
      live[id] = entry
    else
      if entry then
        last_seen[id] = entry.last_heartbeat
      end
      remove_entry(id)
    end
  end
  local history_written = false
  for id = 0, count - 1 do
    local slot = slots[id]
    if slot.state == "held" and slot.partial_queue_id then
      local entry = live[slot.partial_queue_id]
      if entry then
        entry.collected[#entry.collected + 1] = id
      else
        -- What it collected was held until the waiter's last sign of life.
        local ended = math.max(math.min(last_seen[slot.partial_queue_id] or now, now), slot.start_time)
        free_held(id, slot, ended, now)
        slots[id] = { state = "free", last_released = now }
        history_written = true
        wake()
      end
    end
  end
  return entries, history_written
end

-- Mirrors alloc::validate_selection for an entry.
local function selection_fits(entry, count)
  if not entry.ids then
    return entry.count >= 1 and entry.count <= count
  end
  local seen = {}
  for _, id in ipairs(entry.ids) do
    if id >= count or seen[id] then
      return false
    end
    seen[id] = true
  end
  return true
end

local function contains(list, value)
  for _, item in ipairs(list) do
    if item == value then
      return true
    end
  end
  return false
end

-- The state of a partial reservation collected for `entry` at `now`.
local function partial_state(entry, now)
  local state = {
    user = entry.user,
    actual_user = entry.actual_user,
    type = entry.type,
    start_time = now,
    reservation_id = entry.id,
    partial_queue_id = entry.id,
    note = entry.note,
  }
  if entry.type == "run" then
    state.last_heartbeat = now
  end
  if entry.host then
    state.host, state.pid, state.pid_start_time = entry.host, entry.pid, entry.pid_start_time
  end
  return state
end

-- Mirrors queue::distribute: each live entry in order takes the free GPUs it can use,
-- up to what it lacks; writes the partial reservations and updates `slots` and each
-- entry's `collected`. `unreserved` is a set. Returns whether history was written.
local function distribute(slots, entries, count, unreserved, dead_ids, now)
  local free = {}
  for id = 0, count - 1 do
    local slot = slots[id]
    if not unreserved[id] then
      if slot.state == "free" then
        free[#free + 1] = { id = id, released = slot.last_released }
      elseif slot.state == "held" then
        local end_time = ended_at(slot, now, dead_ids)
        if end_time then
          free[#free + 1] = { id = id, released = end_time, ended = end_time }
        end
      end
    end
  end
  local history_written = false
  for _, entry in ipairs(entries) do
    if #free == 0 then
      break
    end
    if selection_fits(entry, count) then
      local wanted = {}
      if entry.ids then
        for _, id in ipairs(entry.ids) do
          if not contains(entry.collected, id) then
            wanted[#wanted + 1] = id
          end
        end
      else
        local ranked = {}
        for i, gpu in ipairs(free) do
          ranked[i] = gpu
        end
        rank_for_user(ranked, entry.actual_user)
        for i = 1, math.min(entry.count - #entry.collected, #ranked) do
          wanted[i] = ranked[i].id
        end
      end
      local granted = false
      for _, id in ipairs(wanted) do
        for i, gpu in ipairs(free) do
          if gpu.id == id then
            table.remove(free, i)
            if gpu.ended then
              end_reservation(id, slots[id], gpu.ended)
              history_written = true
            end
            redis.call("SET", gpu_key(id), cjson.encode(partial_state(entry, now)))
            redis.call("HSET", last_used_key(entry.actual_user), id, now)
            slots[id] = read_slot(id)
            entry.collected[#entry.collected + 1] = id
            granted = true
            break
          end
        end
      end
      if granted then
        sorted(entry.collected)
        write_entry(entry)
        wake()
      end
    end
  end
  return history_written
end

-- Turns an entry's partial reservations into its reservation and removes the entry:
-- manual reservations start their time now, run reservations get a fresh heartbeat.
local function serve(entry, now)
  for _, id in ipairs(entry.collected) do
    local state = cjson.decode(redis.call("GET", gpu_key(id)))
    state.partial_queue_id = nil
    if entry.type == "manual" then
      if entry.duration then
        state.expiry_time = now + entry.duration
      end
    else
      state.last_heartbeat = now
    end
    redis.call("SET", gpu_key(id), cjson.encode(state))
  end
  remove_entry(entry.id)
end
