-- Ends the reservations in one release scope, recording one history record each.
-- ARGV[1]: {"now", "scope", "actual_user"?, "ids"?, "id"?} where scope is one of
--   own_manual (manual reservations of actual_user), own_ids (these GPUs where
--   actual_user holds them), any_ids (these GPUs, whoever holds them; also resets
--   unreadable state), reservation (every GPU of reservation `id`).
-- Returns the freed IDs, ascending, and wakes the waiters when there are any.
-- Error replies: NOT_INITIALIZED, BAD_SELECTION <n>.
return run(function()
  local request = cjson.decode(ARGV[1])
  local now = request.now
  local scope = request.scope
  local count = require_gpu_count()

  local candidates = {}
  if scope == "own_ids" or scope == "any_ids" then
    check_ids(request.ids, count)
    candidates = request.ids
  else
    for id = 0, count - 1 do
      candidates[#candidates + 1] = id
    end
  end

  local function in_scope(slot)
    if scope == "own_manual" then
      return slot.type == "manual" and owner_of(slot) == request.actual_user
    elseif scope == "own_ids" then
      return owner_of(slot) == request.actual_user
    elseif scope == "any_ids" then
      return true
    elseif scope == "reservation" then
      return request.id ~= "" and slot.reservation_id == request.id
    end
    error("unknown release scope " .. tostring(scope))
  end

  local freed = {}
  for _, id in ipairs(candidates) do
    local slot = read_slot(id)
    if slot.state == "held" and in_scope(slot) then
      -- A reservation that had already expired (or gone stale) ended back then.
      free_held(id, slot, ended_at(slot, now, {}) or now, now)
      freed[#freed + 1] = id
    elseif slot.state == "corrupt" and scope == "any_ids" then
      redis.call("SET", gpu_key(id), released_state(now))
      freed[#freed + 1] = id
    end
  end
  after_freeing(freed, now, request.history_retention)
  return sorted(freed)
end)
