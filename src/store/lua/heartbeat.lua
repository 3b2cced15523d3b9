-- Refreshes the heartbeat of one run reservation on the given GPUs.
-- ARGV[1]: {"now", "id", "gpus"}
-- Returns the GPUs the reservation still holds, ascending.
return run(function()
  local request = cjson.decode(ARGV[1])
  local held = {}
  if request.id == "" then
    return held
  end
  for _, id in ipairs(request.gpus) do
    local slot = read_slot(id)
    if slot.state == "held" and slot.type == "run" and slot.reservation_id == request.id then
      local state = cjson.decode(redis.call("GET", gpu_key(id)))
      state.last_heartbeat = request.now
      redis.call("SET", gpu_key(id), cjson.encode(state))
      held[#held + 1] = id
    end
  end
  return sorted(held)
end)
