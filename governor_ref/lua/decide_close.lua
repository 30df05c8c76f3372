-- decide_close.lua: the whole CLOSE decision as one atomic step.
--
-- Interleavings this makes impossible:
--  * harvest_brain, exit_monitor and kill_switch closing one position within
--    a few ms and two of them getting permits: the closing holder is checked
--    and set in the same step (no SETNX-then-EXPIRE gap either);
--  * a second CLOSE permit once a slow order outlives exit_lock_ttl_ms: the
--    closing state is not a TTL lock. It is released only by the close's own
--    result (compare-and-delete on the holder) or, as a backstop, after
--    capital_reservation_ttl_ms when the mirror shows what happened (reap in
--    lib.lua), which the protocol's timing bound makes safe;
--  * a close permitted on a flat symbol, or on a newer position than the one
--    the emitter meant (position_id given and different).
-- Each CLOSE permit carries a fencing token from one monotonic counter, so a
-- venue in fenced mode can refuse an order older than one it has seen.

local plan = read_plan()
local dup = prior_decision(plan)
if dup then return dup end

local now = now_ms()
local cfg = load_config()
if not cfg then return emit(plan, 'BLOCK', 'config_invalid', nil, now, nil) end
reap(now, cfg)

local why = common_gates(plan, cfg, now)
if why then return emit(plan, 'BLOCK', why, nil, now, cfg) end

local sym = plan.symbol
local pos = decode(redis.call('HGET', K.positions, sym))
if not pos and redis.call('HEXISTS', K.opening, sym) == 0 then
  -- A position the governor has not counted yet (opened before it started).
  pos = adopt_from_mirror(sym)
end
if not pos or (plan.position_id ~= '' and plan.position_id ~= pos.position_id) then
  return emit(plan, 'BLOCK', 'no_open_position', nil, now, cfg)
end
if redis.call('HEXISTS', K.closing, sym) == 1 then
  return emit(plan, 'BLOCK', 'exit_lock_busy_double_close_prevention', nil, now, cfg)
end

local fence = fmt(redis.call('INCR', K.fence))
local expires = now + cfg.capital_reservation_ttl_ms
put_lease(plan.plan_id, {kind = 'CLOSE', plan_id = plan.plan_id, symbol = sym,
                         position_id = pos.position_id or '', fence = fence,
                         notional = pos.notional or '0', issued_at_ms = fmt(now)}, expires)
redis.call('HSET', K.closing, sym, plan.plan_id)
-- Observability only (same name as the seed's lock); the gate is K.closing.
redis.call('SET', k_exit_lock(sym), plan.plan_id, 'PX', cfg.capital_reservation_ttl_ms)
write_permit(plan, pos.side or '', pos.notional or '0', fence, now, cfg)
return emit(plan, 'PERMIT', '', fence, now, cfg)
