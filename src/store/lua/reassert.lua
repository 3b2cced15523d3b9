-- Puts a run reservation back where the store lost it (see Store::reassert).
-- ARGV[1]: {"now", "id", "gpus", "gpu_count", "provider", "history_retention"}; the pool is recreated
--   from gpu_count and provider when it is missing.
-- ARGV[2]: the GPU state JSON to store on each GPU the reservation holds.
-- Returns one {id, ""} per GPU that holds the reservation, and one {id, slot JSON}
-- per GPU that another live reservation holds (or whose state is unreadable).
return run(function()
  local request = cjson.decode(ARGV[1])
  local now = request.now
  local count = gpu_count()
  if not count then
    count = request.gpu_count
    redis.call("SET", GPU_COUNT_KEY, count)
    redis.call("SET", PROVIDER_KEY, request.provider)
  end
  local outcome, ended_any = {}, false
  for _, id in ipairs(request.gpus) do
    if id >= 0 and id < count then
      local slot = read_slot(id)
      local claim = slot.state == "free"
        or (slot.state == "held" and request.id ~= "" and slot.reservation_id == request.id)
      if not claim and slot.state == "held" then
        local end_time = ended_at(slot, now, {})
        if end_time then
          end_reservation(id, slot, end_time)
          ended_any = true
          claim = true
        end
      end
      if claim then
        redis.call("SET", gpu_key(id), ARGV[2])
        outcome[#outcome + 1] = { id, "" }
      else
        outcome[#outcome + 1] = { id, cjson.encode(slot) }
      end
    end
  end
  if ended_any then
    prune_history(now, request.history_retention)
  end
  return outcome
end)
