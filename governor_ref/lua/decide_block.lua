-- decide_block.lua: BLOCK a plan the governor refuses before any gate
-- (invalid_plan), through the same once-only decision record, so a bad plan
-- redelivered gets no second decision either.
-- ARGV[14] is the reason.

local plan = read_plan()
local dup = prior_decision(plan)
if dup then return dup end
return emit(plan, 'BLOCK', ARGV[14], nil, now_ms(), load_config())
