-- One turn of a waiter: refreshes its entry when due (and the heartbeat of its partial
-- run reservations), hands free GPUs to the waiters, and serves the entry when it holds
-- everything. Mirrors the `step` of the SQLite store.
-- ARGV[1]: {"now", "id", "unreserved" (absent: usage not checked, hand out nothing),
--           "dead_ids", "history_retention"}
-- Returns {1, ids...} when served, {0, position, collected ids...} while waiting.
-- Error replies: NOT_INITIALIZED, QUEUE_GONE <id> (the entry is no longer queued).
return run(function()
  local request = cjson.decode(ARGV[1])
  local now = request.now
  local count = require_gpu_count()
  local dead_ids = set_of(request.dead_ids)
  local slots = read_slots(count)
  local entries, history_written = settle(slots, count, now, dead_ids)
  local position, entry
  for i, candidate in ipairs(entries) do
    if candidate.id == request.id then
      position, entry = i, candidate
    end
  end
  if not entry then
    if history_written then
      prune_history(now, request.history_retention)
    end
    fail("QUEUE_GONE " .. request.id)
  end

  -- Mirrors QueueEntry::heartbeat_due.
  if now - entry.last_heartbeat >= WAITER_HEARTBEAT_SECS then
    entry.doc.last_heartbeat = now
    write_entry(entry)
    for _, id in ipairs(entry.collected) do
      if slots[id].type == "run" then
        local state = cjson.decode(redis.call("GET", gpu_key(id)))
        state.last_heartbeat = now
        redis.call("SET", gpu_key(id), cjson.encode(state))
      end
    end
  end
  if request.unreserved then
    history_written = distribute(slots, entries, count, set_of(request.unreserved), dead_ids, now)
      or history_written
  end
  if history_written then
    prune_history(now, request.history_retention)
  end

  if #entry.collected < entry.count then
    local result = { 0, position }
    for _, id in ipairs(entry.collected) do
      result[#result + 1] = id
    end
    return result
  end
  serve(entry, now)
  local result = { 1 }
  for _, id in ipairs(entry.collected) do
    result[#result + 1] = id
  end
  return result
end)
