-- Claims GPUs for one reservation, all or nothing: mirrors alloc::plan exactly.
-- ARGV[1]: {"now", "actual_user", "count" | "ids", "unreserved", "dead_ids"}
-- ARGV[2]: the GPU state JSON to store on each claimed GPU.
-- Returns the claimed IDs, ascending. Error replies: NOT_INITIALIZED,
-- BAD_SELECTION <gpu_count>, NOT_ENOUGH <requested> <available> <unreserved>,
-- UNRESERVED <id>, RESERVED <id> <user>, CORRUPT <id> <reason>.
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

  -- Free GPUs (including ones whose reservation is dead) with their release time.
  local slots, free, ended = {}, {}, {}
  for id = 0, count - 1 do
    local slot = read_slot(id)
    slots[id] = slot
    if slot.state == "free" then
      free[#free + 1] = { id = id, released = slot.last_released }
    elseif slot.state == "held" then
      local end_time = ended_at(slot, now, dead_ids)
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
        fail("UNRESERVED " .. id)
      elseif slot.state == "corrupt" then
        fail("CORRUPT " .. id .. " " .. slot.reason)
      elseif slot.state == "held" and not ended[id] then
        fail("RESERVED " .. id .. " " .. slot.user)
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
      fail("NOT_ENOUGH " .. request.count .. " " .. #candidates .. " " .. (#free - #candidates))
    end
    -- This user's most recently used first, then never used, then least recently
    -- released; ties by GPU ID.
    local last_used = {}
    local pairs_list = redis.call("HGETALL", last_used_key(request.actual_user))
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
    for i = 1, request.count do
      claim[i] = candidates[i].id
    end
  end
  sorted(claim)

  local history_written = false
  for _, id in ipairs(claim) do
    if ended[id] then
      end_reservation(id, slots[id], ended[id])
      history_written = true
    end
    redis.call("SET", gpu_key(id), ARGV[2])
    redis.call("HSET", last_used_key(request.actual_user), id, now)
  end
  if history_written then
    prune_history(now)
  end
  return claim
end)
