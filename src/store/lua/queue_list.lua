-- Reads the queue in order without changing it; unreadable entries are skipped.
-- Returns one normalized entry JSON per entry: the fields of read_entry without `doc`,
-- plus `collected`, the GPUs holding its partial reservations, as "0,3".
-- Error reply: NOT_INITIALIZED.
return run(function()
  local count = require_gpu_count()
  local collected = {}
  for id = 0, count - 1 do
    local slot = read_slot(id)
    if slot.state == "held" and slot.partial_queue_id then
      local list = collected[slot.partial_queue_id] or {}
      list[#list + 1] = id
      collected[slot.partial_queue_id] = list
    end
  end
  local result = {}
  for _, id in ipairs(redis.call("ZRANGE", QUEUE_KEY, 0, -1)) do
    local entry = read_entry(id)
    if entry then
      entry.doc = nil
      entry.collected = table.concat(collected[id] or {}, ",")
      result[#result + 1] = cjson.encode(entry)
    end
  end
  return result
end)
