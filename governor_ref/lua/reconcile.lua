-- reconcile.lua: line the governor's open set up with the exchange's mirror
-- (at start-up and periodically) without touching anything an in-flight plan
-- holds. ARGV[2..] are candidate symbols from a SCAN of P:position:*; each is
-- re-checked here, inside the atomic step, so a position opened or closed
-- between the SCAN and this call is judged on the state of now.
--  * adopt: mirror shows a position, the governor counts none, and no OPEN or
--    CLOSE of that symbol is in flight (the lease already counts it);
--  * drop: the governor counts a position the mirror no longer shows and
--    nothing is in flight on it (it was closed outside the governor).

local now = now_ms()
local cfg = load_config()
if not cfg then return {0, 0} end
reap(now, cfg, 256)
local adopted, dropped = 0, 0
for i = 2, #ARGV do
  local sym = ARGV[i]
  if redis.call('HEXISTS', K.positions, sym) == 0 and redis.call('HEXISTS', K.opening, sym) == 0
     and redis.call('HEXISTS', K.closing, sym) == 0 and redis.call('EXISTS', k_position(sym)) == 1 then
    adopt_from_mirror(sym)
    adopted = adopted + 1
  end
end
local syms = redis.call('HKEYS', K.positions)
for _, sym in ipairs(syms) do
  if redis.call('EXISTS', k_position(sym)) == 0 and redis.call('HEXISTS', K.opening, sym) == 0
     and redis.call('HEXISTS', K.closing, sym) == 0 then
    redis.call('HDEL', K.positions, sym)
    dropped = dropped + 1
  end
end
return {adopted, dropped}
