-- Reads every GPU of the pool in one consistent snapshot.
-- Returns one normalized slot JSON per GPU (see read_slot in common.lua).
-- Error reply: NOT_INITIALIZED.
return run(function()
  local count = require_gpu_count()
  local slots = {}
  for id = 0, count - 1 do
    slots[id + 1] = cjson.encode(read_slot(id))
  end
  return slots
end)
