"""The Lua scripts the Redis backend runs: each one atomic, one round trip, on the server's
clock (`TIME`), so the sidecars' own clocks never matter, and each leaves only keys that
expire. Sent by SHA (EVALSHA), with EVAL as the fallback when the server answers NOSCRIPT
(a restarted or flushed server has forgotten them).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

__all__ = ["HEARTBEAT", "TAKE", "TRIP", "Script"]


@dataclass(frozen=True, slots=True)
class Script:
    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> Script:
        return cls(source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())


# Token bucket. KEYS[1]: a hash {tokens, ts}. ARGV: rps, burst, cost.
# tokens = min(burst, tokens + (now − ts) × rps); admit when tokens ≥ cost. The key expires
# once the bucket would be full again (burst / rps) plus a second: a missing key *is* a full
# bucket, so expiry changes nothing but memory. Returns {1|0, retry_after as a string}
# (Redis truncates Lua numbers to integers; a string keeps the fraction).
TAKE: Final = Script.of("""
local rps = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
local elapsed = now - ts
if elapsed < 0 then elapsed = 0 end
tokens = math.min(burst, tokens + elapsed * rps)
local allowed = 0
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait = (cost - tokens) / rps
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rps * 1000) + 1000)
return {allowed, tostring(wait)}
""")

# Heartbeat. KEYS[1]: a sorted set of sidecar ids scored by when each one's beat expires.
# ARGV: this sidecar's id, ttl seconds. Drops the expired, refreshes this one, and returns
# how many are alive (ZCARD). The set itself expires when nobody beats any more.
HEARTBEAT: Final = Script.of("""
local ttl = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000))
return redis.call('ZCARD', KEYS[1])
""")

# A breaker trip. KEYS[1]: a sorted set of [route, upstream] members scored by open-until
# (server time). ARGV: member, hold seconds, channel, message. Records the trip (keeping a
# later one already there), drops expired trips, sets the key to expire with the last one,
# and publishes the message. A sidecar that starts later reads the set; the others hear it.
TRIP: Final = Script.of("""
local hold = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local untl = now + hold
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local current = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if current == nil or current < untl then
  redis.call('ZADD', KEYS[1], untl, ARGV[1])
end
local last = redis.call('ZREVRANGE', KEYS[1], 0, 0, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], math.ceil(tonumber(last[2]) * 1000) + 1000)
return redis.call('PUBLISH', ARGV[3], ARGV[4])
""")
