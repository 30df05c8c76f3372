-- apply_result.lua: settle one apply.result entry, idempotently.
--
-- Interleavings this makes impossible:
--  * a redelivered result releasing a slot or lock twice: the first
--    application is recorded (SET NX) and later copies are no-ops;
--  * a late result releasing somebody else's exit lock: release is
--    compare-and-delete on the holder plan id;
--  * a late OPEN result resurrecting a position that has since closed: closed
--    position ids are remembered.
-- ARGV: P, entry_id, plan_id, symbol, action, status, position_id, notional,
--       executed_at_ms

local entry_id, id, sym, action, status = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local position_id, notional, executed_at = ARGV[7], ARGV[8], ARGV[9]

local cfg = load_config()
local memory = cfg and cfg.decision_memory_ms or 604800000
if entry_id ~= '' then redis.call('XACK', K.results, 'governor-results', entry_id) end
if not redis.call('SET', k_result_seen(id), status, 'NX', 'PX', memory) then
  return {'DUP'}
end

local lease = decode(redis.call('HGET', K.leases, id))
drop_lease(id, lease)
if lease then action = lease.kind end

if status == 'executed' then
  if action == 'OPEN' then
    if position_id == '' or redis.call('EXISTS', k_closed(position_id)) == 0 then
      local side = (lease and lease.side) or redis.call('HGET', k_position(sym), 'side') or ''
      redis.call('HSET', K.positions, sym, cjson.encode({
        position_id = position_id, symbol = sym, side = side,
        notional = (notional ~= '' and notional) or (lease and lease.notional) or '0',
        opened_at_ms = executed_at, plan_id = id}))
    end
  elseif action == 'CLOSE' then
    local pos = decode(redis.call('HGET', K.positions, sym))
    if pos and (position_id == '' or pos.position_id == position_id) then
      redis.call('HDEL', K.positions, sym)
    end
    local closed = (position_id ~= '' and position_id) or (pos and pos.position_id) or ''
    if closed ~= '' then redis.call('SET', k_closed(closed), '1', 'PX', memory) end
  end
end
return {'APPLIED', status}
