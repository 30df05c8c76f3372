-- decide_open.lua: the whole OPEN decision as one atomic step.
--
-- Interleavings this makes impossible:
--  * two governors both reading "slots free" and both permitting (the seed's
--    17-of-10): the count and the reservation are in the same step;
--  * DECR-then-rollback drift: there is no counter; a slot is a lease keyed
--    by plan id, so releasing it twice (result redelivered, lease reaped and
--    then the late result) is a no-op;
--  * a permit whose capital was not reserved: lease, permit key and decision
--    event are written together, the permit before the event is visible;
--  * two opens of one symbol racing: the opening holder is set in the step.

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
local notional = tonumber(plan.notional)
if notional > cfg.max_notional_per_trade then
  return emit(plan, 'BLOCK', 'notional_cap_exceeded', nil, now, cfg)
end

if redis.call('HEXISTS', K.positions, sym) == 1 or redis.call('HEXISTS', K.opening, sym) == 1
   or redis.call('HEXISTS', K.closing, sym) == 1 or redis.call('EXISTS', k_position(sym)) == 1 then
  return emit(plan, 'BLOCK', 'duplicate_open', nil, now, cfg)
end

-- Slots: open positions plus opens permitted and not yet settled. Every outstanding
-- OPEN was permitted under the slots of its own regime, and may execute after this
-- one: a permit under a larger regime (a flip upwards) must not push an older permit
-- over the limit it was issued under. So the bound is the smallest of the regime in
-- force and of every outstanding OPEN lease's own.
local desired = desired_slots(cfg)
local occupied = redis.call('HLEN', K.positions) + redis.call('HLEN', K.opening)
local leases = {}
local lease_limit = desired
for _, raw in ipairs(redis.call('HVALS', K.leases)) do
  local l = decode(raw)
  if l and l.kind == 'OPEN' then
    leases[#leases + 1] = l
    local d = tonumber(l.desired)
    if d and d < lease_limit then lease_limit = d end
  end
end
if occupied >= lease_limit and occupied < desired then
  -- Only an older, smaller-regime permit binds: it settles soon, no rotation needed.
  return emit(plan, 'BLOCK', 'active_slots_waiting_rotation_close', nil, now, cfg)
end
if occupied >= desired then
  -- Rotation: one CLOSE of the weakest position at a time, under one lock.
  if redis.call('EXISTS', K.rotation_lock) == 0 then
    local best_sym, best_pnl, best_pid = nil, nil, nil
    local flat = redis.call('HGETALL', K.positions)
    for i = 1, #flat, 2 do
      local s = flat[i]
      if redis.call('HEXISTS', K.closing, s) == 0 then
        local pnl = tonumber(redis.call('HGET', k_position(s), 'pnl_pct') or '') or 0
        if best_pnl == nil or pnl < best_pnl or (pnl == best_pnl and s < best_sym) then
          local pos = decode(flat[i + 1]) or {}
          best_sym, best_pnl, best_pid = s, pnl, pos.position_id or ''
        end
      end
    end
    if best_sym then
      local rot_id = 'rot_' .. fmt(now) .. '_' .. fmt(redis.call('INCR', P .. ':gov:rotation:seq'))
      redis.call('SET', K.rotation_lock, rot_id, 'PX', cfg.rotation_lock_ttl_ms)
      redis.call('XADD', K.plans, '*', 'plan_id', rot_id, 'symbol', best_sym, 'action', 'CLOSE',
                 'source', 'rotation', 'intent_created_at_ms', fmt(now), 'position_id', best_pid)
    end
  end
  return emit(plan, 'BLOCK', 'active_slots_waiting_rotation_close', nil, now, cfg)
end

-- Capital: open notional plus permitted-not-yet-executed, against the caps.
local total, on_symbol = notional, 0
for _, raw in ipairs(redis.call('HVALS', K.positions)) do
  local pos = decode(raw)
  if pos then total = total + (tonumber(pos.notional) or 0) end
end
for _, l in ipairs(leases) do
  local n = tonumber(l.notional) or 0
  total = total + n
  if l.symbol == sym then on_symbol = on_symbol + n end
end
if total > cfg.max_total_notional + 1e-9 then
  return emit(plan, 'BLOCK', 'total_notional_cap_exceeded', nil, now, cfg)
end

if cfg.enforce_allocation ~= 0 or cfg.mode == 'production' then
  -- Fail closed: no allocation target or no capital figure means no permit.
  local alloc = decode(redis.call('GET', k_allocation(sym)))
  local pct = alloc and tonumber(alloc.allocation_pct)
  local capital = tonumber(redis.call('GET', K.capital) or '')
  if pct == nil or capital == nil or on_symbol + notional > capital * pct + 1e-9 then
    return emit(plan, 'BLOCK', 'capital_allocation_exceeded', nil, now, cfg)
  end
end

local expires = now + cfg.capital_reservation_ttl_ms
put_lease(plan.plan_id, {kind = 'OPEN', plan_id = plan.plan_id, symbol = sym, side = plan.side,
                         notional = plan.notional, issued_at_ms = fmt(now),
                         desired = desired}, expires)
redis.call('HSET', K.opening, sym, plan.plan_id)
write_permit(plan, plan.side, plan.notional, '', now, cfg)
return emit(plan, 'PERMIT', '', nil, now, cfg)
