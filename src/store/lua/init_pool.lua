-- Creates (or with force, recreates) the GPU pool.
-- ARGV[1]: {"now", "gpu_count", "provider", "force"}
-- Returns {previous gpu_count or -1, reservations ended}.
-- Error reply: ALREADY_INITIALIZED <gpu_count>.
return run(function()
  local request = cjson.decode(ARGV[1])
  local now = request.now
  local previous = gpu_count()
  if previous and not request.force then
    fail("ALREADY_INITIALIZED " .. previous)
  end

  local cleared = 0
  if previous then
    -- Every reservation ends now (or when it already ended); no GPU key of the old
    -- or the new range survives, so the new pool starts never used.
    for id = 0, math.max(previous, request.gpu_count) - 1 do
      local slot = read_slot(id)
      if slot.state == "held" then
        end_reservation(id, slot, ended_at(slot, now, {}) or now)
        cleared = cleared + 1
      end
      redis.call("DEL", gpu_key(id))
    end
    if cleared > 0 then
      prune_history(now, request.history_retention)
    end
    -- Nobody waits for the old pool: waiters find their entry gone and stop.
    for _, id in ipairs(redis.call("ZRANGE", QUEUE_KEY, 0, -1)) do
      redis.call("DEL", entry_key(id))
    end
    redis.call("DEL", QUEUE_KEY)
    wake()
  end
  redis.call("SET", GPU_COUNT_KEY, request.gpu_count)
  redis.call("SET", PROVIDER_KEY, request.provider)
  return { previous or -1, cleared }
end)
