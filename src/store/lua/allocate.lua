-- Claims GPUs for one reservation, all or nothing, after the waiters of the queue
-- took what they can use: mirrors queue::distribute and then alloc::plan exactly.
-- ARGV[1]: {"now", "actual_user", "count" | "ids", "unreserved", "dead_ids", "join",
--           "history_retention"}
-- ARGV[2]: the GPU state JSON to store on each claimed GPU.
-- ARGV[3]: with "join", the queue entry JSON to add when the GPUs are not available yet.
-- Returns the claimed IDs, ascending; with "join": {1, ids...} when claimed, or
-- {0, position, collected ids...} when queued. Error replies: NOT_INITIALIZED,
-- BAD_SELECTION <gpu_count>, NOT_ENOUGH <requested> <available> <unreserved>,
-- UNRESERVED <id>, RESERVED <id> <user>, CORRUPT <id> <reason>. A refusal still keeps
-- what was done for the waiters.

-- Decides the claim on `slots` like alloc::plan. Returns claim, ended (GPU ID -> end
-- time), or nil and the error reply.
local function plan(slots, count, request, unreserved, dead_ids)
  local free, ended = {}, {}
  for id = 0, count - 1 do
    local slot = slots[id]
    if slot.state == "free" then
      free[#free + 1] = { id = id, released = slot.last_released }
    elseif slot.state == "held" then
      local end_time = ended_at(slot, request.now, dead_ids)
      if end_time then
        ended[id] = end_time
        free[#free + 1] = { id = id, released = end_time }
      end
    end
  end

  local claim = {}
  if request.ids then
    for _, id in ipairs(request.ids) do
      local slot = slots[id]
      if unreserved[id] then
        return nil, "UNRESERVED " .. id
      elseif slot.state == "corrupt" then
        return nil, "CORRUPT " .. id .. " " .. slot.reason
      elseif slot.state == "held" and not ended[id] then
        return nil, "RESERVED " .. id .. " " .. slot.user
      end
      claim[#claim + 1] = id
    end
  else
    local candidates = {}
    for _, gpu in ipairs(free) do
      if not unreserved[gpu.id] then
        candidates[#candidates + 1] = gpu
      end
    end
    if #candidates < request.count then
      return nil, "NOT_ENOUGH " .. request.count .. " " .. #candidates .. " " .. (#free - #candidates)
    end
    rank_for_user(candidates, request.actual_user)
    for i = 1, request.count do
      claim[i] = candidates[i].id
    end
  end
  return sorted(claim), ended
end

-- Whether waiting may help, as Error::is_retryable.
local function retryable(reply)
  local code = string.match(reply, "^(%S+)")
  return code == "NOT_ENOUGH" or code == "UNRESERVED" or code == "RESERVED"
end

return run(function()
  local request = cjson.decode(ARGV[1])
  local now = request.now
  local count = require_gpu_count()
  if request.ids then
    check_ids(request.ids, count)
  elseif request.count < 1 or request.count > count then
    fail("BAD_SELECTION " .. count)
  end
  local unreserved = set_of(request.unreserved)
  local dead_ids = set_of(request.dead_ids)

  local slots = read_slots(count)
  local entries, settled_history = settle(slots, count, now, dead_ids)
  local history_written = distribute(slots, entries, count, unreserved, dead_ids, now)
    or settled_history

  local claim, outcome = plan(slots, count, request, unreserved, dead_ids)
  local result
  if claim then
    for _, id in ipairs(claim) do
      if outcome[id] then
        end_reservation(id, slots[id], outcome[id])
        history_written = true
      end
      redis.call("SET", gpu_key(id), ARGV[2])
      redis.call("HSET", last_used_key(request.actual_user), id, now)
    end
    if request.join then
      result = { 1 }
      for _, id in ipairs(claim) do
        result[#result + 1] = id
      end
    else
      result = claim
    end
  elseif request.join and retryable(outcome) then
    -- Strictly after every entry: scores are enqueue times, made unique.
    local time = redis.call("TIME")
    local score = tonumber(time[1]) * 1e9 + tonumber(time[2]) * 1000
    local tail = redis.call("ZREVRANGE", QUEUE_KEY, 0, 0, "WITHSCORES")
    if tail[2] and tonumber(tail[2]) >= score then
      score = tonumber(tail[2]) + 1000
    end
    local entry_doc = cjson.decode(ARGV[3])
    redis.call("ZADD", QUEUE_KEY, string.format("%.0f", score), entry_doc.id)
    redis.call("SET", entry_key(entry_doc.id), ARGV[3])
    local entry = read_entry(entry_doc.id)
    entry.collected = {}
    entries[#entries + 1] = entry
    -- Only the new entry can find anything left.
    history_written = distribute(slots, entries, count, unreserved, dead_ids, now)
      or history_written
    result = { 0, #entries }
    for _, id in ipairs(entry.collected) do
      result[#result + 1] = id
    end
  end
  if history_written then
    prune_history(now, request.history_retention)
  end
  if not result then
    fail(outcome)
  end
  return result
end)
