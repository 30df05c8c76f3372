-- lib.lua: prelude shared by every reference-governor script (prepended by
-- governor_ref/scripts.py). It holds key names, config defaults, the clock,
-- the decision writer and the lease reaper, so each script below it is only
-- its own gate logic.
--
-- Why one server-side step per decision: every gate reads state that other
-- governors change (open positions, leases, exit locks). Reading it in one
-- round trip and writing the reservation in another lets two governors both
-- see "3 of 4 slots used" and both permit: the 17-of-10 incident. Inside one
-- script no other command interleaves, so check and act are one step.
--
-- ARGV[1] is always the key prefix P. KEYS[1] is the config key, so that a
-- cluster client routes the call to the slot of the prefix's hash tag.

local P = ARGV[1]

-- Key templates: must match governor_ref/keys.py (tests/test_keys.py checks).
local K = {
  config = P .. ':governor:config',
  regime = P .. ':slots:regime',
  capital = P .. ':portfolio:capital',
  exposure = P .. ':portfolio:exposure_pct',
  plans = P .. ':stream:apply.plan',
  events = P .. ':stream:governor.events',
  results = P .. ':stream:apply.result',
  positions = P .. ':gov:positions',
  leases = P .. ':gov:leases',
  lease_expiry = P .. ':gov:lease_expiry',
  opening = P .. ':gov:opening',
  closing = P .. ':gov:closing',
  fence = P .. ':gov:fence',
  rotation_lock = P .. ':gov:rotation:lock',
  last_seen = P .. ':gov:last_seen',
}
local function k_allocation(sym) return P .. ':capital:allocation:' .. sym end
local function k_position(sym) return P .. ':position:' .. sym end
local function k_permit(id) return P .. ':permit:' .. id end
local function k_exit_lock(sym) return P .. ':exit:lock:' .. sym end
local function k_decision(id) return P .. ':gov:decision:' .. id end
local function k_result_seen(id) return P .. ':gov:result:' .. id end
local function k_closed(pid) return P .. ':gov:closed:' .. pid end

-- Config defaults: must match governor_ref/protocol.py GovernorConfig.
local DEFAULTS = {
  mode = 'testnet',
  slots_BASE = '4', slots_TREND_STRONG = '6', slots_CHOP = '3',
  max_positions = '10',
  max_notional_per_trade = '200',
  max_total_notional = '2000',
  enforce_allocation = '1',
  max_intent_age_ms = '30000',
  max_position_drift = '2',
  max_exposure_drift = '0.15',
  permit_ttl_ms = '60000',
  exit_lock_ttl_ms = '120000',
  rotation_lock_ttl_ms = '120000',
  capital_reservation_ttl_ms = '600000',
  decision_memory_ms = '604800000',
}
local NUMERIC = {
  'slots_BASE', 'slots_TREND_STRONG', 'slots_CHOP', 'max_positions',
  'max_notional_per_trade', 'max_total_notional', 'enforce_allocation',
  'max_intent_age_ms', 'max_position_drift', 'max_exposure_drift',
  'permit_ttl_ms', 'exit_lock_ttl_ms', 'rotation_lock_ttl_ms',
  'capital_reservation_ttl_ms', 'decision_memory_ms',
}

-- Returns the config table, or nil when a field is not a number: a governor
-- that cannot read its limits must not permit anything (fail closed).
local function load_config()
  local names = {'mode'}
  for _, n in ipairs(NUMERIC) do names[#names + 1] = n end
  local vals = redis.call('HMGET', K.config, unpack(names))
  local c = {}
  for i, n in ipairs(names) do
    local v = vals[i]
    if not v then v = DEFAULTS[n] end
    c[n] = v
  end
  for _, n in ipairs(NUMERIC) do
    local x = tonumber(c[n])
    if x == nil or x ~= x then return nil end
    c[n] = x
  end
  return c
end

-- Server clock: one clock for every governor, and the same one that stamps
-- the decision entry id the checkers use. A governor with a skewed clock
-- therefore cannot permit a stale plan.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fmt(n) return string.format('%d', n) end

-- Desired slots for the regime in force; an unknown or missing regime takes
-- the smallest configured value (conservative, but still live).
local function desired_slots(cfg)
  local regime = redis.call('GET', K.regime)
  local d = regime and cfg['slots_' .. regime]
  if type(d) ~= 'number' then
    d = math.min(cfg.slots_BASE, cfg.slots_TREND_STRONG, cfg.slots_CHOP)
  end
  return math.min(d, cfg.max_positions)
end

local function decode(raw)
  if not raw then return nil end
  local ok, v = pcall(cjson.decode, raw)
  if ok and type(v) == 'table' then return v end
  return nil
end

-- Adopt the mirror's position on sym into the governor's own open set.
local function adopt_from_mirror(sym)
  local m = redis.call('HMGET', k_position(sym), 'position_id', 'side', 'notional', 'opened_at_ms')
  if not m[1] then return nil end
  local pos = {position_id = m[1], symbol = sym, side = m[2] or '', notional = m[3] or '0',
               opened_at_ms = m[4] or '', plan_id = ''}
  redis.call('HSET', K.positions, sym, cjson.encode(pos))
  return pos
end

local function drop_lease(id, lease)
  redis.call('HDEL', K.leases, id)
  redis.call('ZREM', K.lease_expiry, id)
  if lease then
    local holder_key = (lease.kind == 'OPEN') and K.opening or K.closing
    if redis.call('HGET', holder_key, lease.symbol) == id then
      redis.call('HDEL', holder_key, lease.symbol)
    end
    if lease.kind == 'CLOSE' and redis.call('GET', k_exit_lock(lease.symbol)) == id then
      redis.call('DEL', k_exit_lock(lease.symbol))
    end
  end
  if redis.call('GET', K.rotation_lock) == id then redis.call('DEL', K.rotation_lock) end
end

-- Settle leases whose result never came. A lease expires at
-- issued + capital_reservation_ttl_ms; by the protocol's timing bound the
-- order has finished (or can no longer start: its permit is gone) by then,
-- and the exchange has rewritten the mirror. So the mirror, not the lapse of
-- time alone, says what happened:
--   OPEN lease:  mirror shows the symbol open -> the order ran, count it.
--   CLOSE lease: mirror no longer shows that position -> the close ran.
-- Expiry by time alone would free a slot for a position that is open, or let
-- a second close through for a position already closed.
-- Leases do not age while no script can run. Every reference process runs a
-- script at least once a second while it can reach Redis (reconcile), so a gap
-- longer than GAP_MS between two scripts means Redis was paused or unreachable
-- from every governor. Redis's clock runs on through such a gap, but the
-- executor could not write the mirror or a result in it either: reaping by
-- that clock would read a close that ran as "never ran" (the mirror not yet
-- rewritten) and permit a second close. So the gap is added to every lease
-- (at most one capital_reservation_ttl_ms), giving the executor its time back.
local GAP_MS = 2000
local function age_leases(now, cfg)
  local last = tonumber(redis.call('GET', K.last_seen))
  redis.call('SET', K.last_seen, fmt(now))
  if not last or now - last <= GAP_MS then return end
  local shift = math.min(now - last, cfg.capital_reservation_ttl_ms)
  local all = redis.call('ZRANGE', K.lease_expiry, 0, -1, 'WITHSCORES')
  for i = 1, #all, 2 do
    redis.call('ZADD', K.lease_expiry, tonumber(all[i + 1]) + shift, all[i])
  end
end

local function reap(now, cfg, limit)
  age_leases(now, cfg)
  local ids = redis.call('ZRANGEBYSCORE', K.lease_expiry, '-inf', now, 'LIMIT', 0, limit or 32)
  for _, id in ipairs(ids) do
    local lease = decode(redis.call('HGET', K.leases, id))
    drop_lease(id, lease)
    if lease then
      local sym = lease.symbol
      if lease.kind == 'OPEN' then
        if redis.call('HEXISTS', K.positions, sym) == 0 then adopt_from_mirror(sym) end
      else
        local pos = decode(redis.call('HGET', K.positions, sym))
        local mirror_pid = redis.call('HGET', k_position(sym), 'position_id')
        if pos and mirror_pid ~= pos.position_id then
          redis.call('HDEL', K.positions, sym)
          if pos.position_id and pos.position_id ~= '' then
            redis.call('SET', k_closed(pos.position_id), '1', 'PX', cfg.decision_memory_ms)
          end
        end
      end
    end
  end
end

-- The one decision a plan ever gets: idempotency record, decision event and
-- the acknowledgement of the plan entry, all in the same atomic step. A
-- governor killed after this script cannot leave a decided-but-unacked plan
-- that a second governor would decide differently: the record says DUP.
local function emit(plan, decision, reason, fence, now, cfg)
  redis.call('SET', k_decision(plan.plan_id), decision .. '|' .. reason, 'PX', cfg and cfg.decision_memory_ms or 604800000)
  local fields = {'plan_id', plan.plan_id, 'symbol', plan.symbol, 'action', plan.action,
                  'decision', decision, 'reason', reason, 'governor', plan.consumer,
                  'decided_at_ms', fmt(now)}
  if fence then
    fields[#fields + 1] = 'fence'
    fields[#fields + 1] = fence
  end
  redis.call('XADD', K.events, '*', unpack(fields))
  if plan.entry_id ~= '' then redis.call('XACK', K.plans, 'governor', plan.entry_id) end
  -- A blocked rotation plan must not hold the rotation lock until its TTL.
  if decision == 'BLOCK' and redis.call('GET', K.rotation_lock) == plan.plan_id then
    redis.call('DEL', K.rotation_lock)
  end
  return {decision, reason, fence or ''}
end

-- Already decided (redelivery, a reclaimed entry, a plan re-added with the
-- same id): acknowledge and answer with the first decision, emit nothing.
local function prior_decision(plan)
  local prior = redis.call('GET', k_decision(plan.plan_id))
  if prior then
    if plan.entry_id ~= '' then redis.call('XACK', K.plans, 'governor', plan.entry_id) end
    return {'DUP', prior, ''}
  end
  return nil
end

-- Gates common to OPEN and CLOSE: freshness and snapshot drift.
local function common_gates(plan, cfg, now)
  if now - tonumber(plan.created) > cfg.max_intent_age_ms then return 'intent_stale' end
  if plan.snap_count ~= '' then
    local open_count = redis.call('HLEN', K.positions)
    if math.abs(open_count - tonumber(plan.snap_count)) > cfg.max_position_drift then
      return 'state_drift_position_count'
    end
  end
  if plan.snap_exposure ~= '' then
    local cur = tonumber(redis.call('GET', K.exposure) or '')
    if cur == nil or math.abs(cur - tonumber(plan.snap_exposure)) > cfg.max_exposure_drift + 1e-12 then
      return 'state_drift_exposure'
    end
  end
  return nil
end

local function put_lease(id, lease, expires)
  redis.call('HSET', K.leases, id, cjson.encode(lease))
  redis.call('ZADD', K.lease_expiry, expires, id)
end

local function write_permit(plan, side, notional, fence, now, cfg)
  local permit = cjson.encode({plan_id = plan.plan_id, symbol = plan.symbol, action = plan.action,
                               side = side, notional = notional, fence = fence,
                               issued_at_ms = fmt(now)})
  redis.call('SET', k_permit(plan.plan_id), permit, 'PX', cfg.permit_ttl_ms)
end

-- ARGV layout of decide_open / decide_close / decide_block (scripts.py builds it).
local function read_plan()
  return {
    consumer = ARGV[2], entry_id = ARGV[3], plan_id = ARGV[4], symbol = ARGV[5],
    action = ARGV[6], side = ARGV[7], notional = ARGV[8], source = ARGV[9],
    created = ARGV[10], snap_count = ARGV[11], snap_exposure = ARGV[12],
    position_id = ARGV[13],
  }
end
