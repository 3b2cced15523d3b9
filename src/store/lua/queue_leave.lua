-- Removes one entry from the queue and ends the partial reservations it collected.
-- ARGV[1]: {"now", "id", "history_retention"}
-- Returns the freed IDs, ascending. Error reply: NOT_INITIALIZED.
return run(function()
  local request = cjson.decode(ARGV[1])
  local now = request.now
  local count = require_gpu_count()
  if redis.call("ZREM", QUEUE_KEY, request.id) + redis.call("DEL", entry_key(request.id)) > 0 then
    wake()
  end
  local freed = {}
  for id = 0, count - 1 do
    local slot = read_slot(id)
    if slot.state == "held" and slot.partial_queue_id == request.id then
      free_held(id, slot, now, now)
      freed[#freed + 1] = id
    end
  end
  after_freeing(freed, now, request.history_retention)
  return freed
end)
