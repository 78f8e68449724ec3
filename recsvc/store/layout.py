"""The Redis key layout and the scripts that write it (format v2, ``docs/redis-format.md``).

This module is the only place that builds keys. All keys share the versioned
prefix ``recsvc:v2:`` and carry a Redis Cluster hash tag ``{t}``: users are
spread over ``SHARDS`` shards (``shard_of``), shard ``s`` has the tag
``shard_tag(s)``, chosen so that the shards' hash slots are evenly spaced over
the 16384 slots. Per user ``{u}`` (the external user id, verbatim) in shard tag ``t``:

* ``recsvc:v2:{t}:user:{u}:hist``   HASH  item id -> summed feedback weight (float text)
* ``recsvc:v2:{t}:user:{u}:recent`` ZSET  item id -> last event time (ms); caps the history
* ``recsvc:v2:{t}:user:{u}:events`` ZSET  event id -> receive time (ms); idempotency window
* ``recsvc:v2:{t}:user:{u}:meta``   HASH  ``updated_ms``, ``events`` (count); the cached
  generator state ``vec``/``vec_events``/``vec_model`` and (#11) the cached sequence
  state ``seq``/``seq_events``/``seq_model`` (:data:`SEQUENCE_STATE`). The sequence
  model reads the user's items in event order from ``recent``.

and one stream per shard, ``recsvc:v2:{t}:feedback``: the durable feedback log.
A user's keys and their shard's stream share one hash slot, so one script call
can update them all atomically on a Redis Cluster node too.

(#13) One stream ``recsvc:v2:impressions``: what each Recommend/Generate
response showed (see ``IMPRESSION_FIELD``), trimmed by age (MINID) and
length (MAXLEN ~). A single key, so it lives in one Redis Cluster slot and is
always passed to commands by name, never built inside a script.

Each event is applied by a Lua script, atomically: the duplicate check, the
history update and cap, the TTLs and the XADD to the log happen together or
not at all, so a crash can never leave an event half-applied.
"""

from __future__ import annotations

import functools
import zlib

from redis.crc import key_slot

PREFIX = "recsvc:v2:"
V1_PREFIX = "recsvc:v1:"  # format v1 (one Redis, unsharded): read by ``recsvc migrate``
SHARDS = 256  # part of the format: changing it moves users, so it needs a new prefix
CLUSTER_SLOTS = 16384
USER_KINDS = ("hist", "recent", "events", "meta")


def compute_tags() -> tuple[str, ...]:
    """Shard ``s``'s tag: the smallest decimal number whose hash slot is
    ``s * 16384 / SHARDS`` (the rule behind ``SHARD_TAGS``, ~60 ms to run)."""
    step = CLUSTER_SLOTS // SHARDS
    found: dict[int, str] = {}
    n = 0
    while len(found) < SHARDS:
        slot = key_slot(str(n).encode())
        if slot % step == 0 and slot // step not in found:
            found[slot // step] = str(n)
        n += 1
    return tuple(found[s] for s in range(SHARDS))


# compute_tags(), written out (tests/integration/test_store.py checks it)
SHARD_TAGS = tuple(str(n) for n in (
    3560, 11423, 40821, 41742, 2464, 10527, 5469, 12258, 1768, 16159, 3017, 7806, 69235, 40331,
    2113, 6902, 22069, 26878, 574, 1696, 56283, 49436, 18834, 19757, 20261, 4493, 8518, 29498,
    21365, 5597, 26368, 49141, 48576, 46382, 18617, 530, 27938, 15698, 19713, 12695, 18360, 16594,
    47996, 11599, 19264, 17490, 39599, 9458, 11467, 3524, 13318, 4529, 10563, 2420, 40602, 41961,
    41271, 68375, 7842, 3053, 17019, 13808, 6946, 2157, 4129, 13718, 3124, 7935, 69306, 40202, 2020,
    6831, 3453, 11510, 40912, 41671, 2557, 10414, 41816, 17419, 130, 18217, 46782, 48176, 12295,
    19313, 15298, 49072, 11199, 15988, 447, 12985, 9058, 39199, 17090, 13881, 1296, 174, 48132,
    22469, 19357, 21212, 49036, 56683, 29098, 8118, 4093, 403, 49541, 26768, 5197, 1986, 41342,
    68246, 7971, 3160, 1878, 5069, 6875, 2064, 8591, 3417, 16559, 1368, 9495, 42, 40731, 41852,
    8209, 29389, 712, 4382, 26479, 49650, 21474, 975, 265, 1187, 22778, 48223, 4892, 19046, 29899,
    8919, 3706, 2865, 1079, 5868, 2602, 3961, 69524, 40420, 45842, 41053, 3271, 11332, 5378, 12549,
    2375, 10236, 2821, 3742, 41560, 68464, 3925, 2646, 4928, 69560, 13409, 4238, 11376, 3235, 40113,
    44902, 10272, 2331, 48710, 11288, 18471, 756, 39288, 9349, 931, 17381, 17891, 221, 9859, 39998,
    16995, 12184, 11998, 15189, 356, 18071, 11688, 23928, 17781, 19175, 9749, 39688, 46093, 42882,
    621, 18506, 15589, 43986, 12584, 846, 45971, 41160, 3342, 11201, 44875, 17308, 2246, 10305,
    3635, 2956, 4638, 13009, 2731, 3852, 69417, 40513, 16248, 1479, 8280, 3306, 40020, 44831, 9384,
    2202, 2912, 3671, 41453, 68557, 3816, 2775, 12149, 5778, 4782, 312, 29789, 8609, 5686, 21074,
    22868, 26079, 48623, 22378, 1587, 665, 49727, 48844, 802, 21503
))  # fmt: skip
_STREAMS = tuple(f"{PREFIX}{{{tag}}}:feedback" for tag in SHARD_TAGS)


def shard_of(user_id: str) -> int:
    """The user's shard: CRC-32 of the UTF-8 id, modulo ``SHARDS``."""
    return zlib.crc32(user_id.encode()) % SHARDS


def shard_tag(shard: int) -> str:
    return SHARD_TAGS[shard]


def feedback_stream(shard: int) -> str:
    """Shard ``shard``'s feedback stream."""
    return _STREAMS[shard]


def feedback_streams() -> list[str]:
    """Every shard's feedback stream, in shard order."""
    return list(_STREAMS)


@functools.lru_cache(maxsize=1 << 16)  # active users: the write path asks per event
def user_keys(user_id: str) -> tuple[str, str, str, str]:
    """The four per-user keys: (hist, recent, events, meta)."""
    base = f"{PREFIX}{{{SHARD_TAGS[shard_of(user_id)]}}}:user:{user_id}:"
    return base + "hist", base + "recent", base + "events", base + "meta"


def user_of_key(key: bytes) -> str | None:
    """The user id a per-user key belongs to (None for other keys)."""
    if not key.startswith(PREFIX_BYTES):
        return None
    _, sep, rest = key.partition(b"}:user:")
    if not sep:
        return None
    return rest.rpartition(b":")[0].decode(errors="replace")


PREFIX_BYTES = PREFIX.encode()


def v1_user_keys(user_id: str) -> tuple[str, str, str, str]:
    """Format v1's per-user keys (hist, recent, events, meta)."""
    base = f"{V1_PREFIX}user:{user_id}:"
    return base + "hist", base + "recent", base + "events", base + "meta"


V1_FEEDBACK_STREAM = V1_PREFIX + "feedback"


# (#13) The impression log: one stream, ``recsvc:v2:impressions`` (a single key,
# so one Redis Cluster slot; always passed to commands by name, never built
# inside a script). Each entry has one field, ``d``: a JSON array
# [recommendation id, user, variant, strategy, model version, kind (recommend |
# generate), items (positions are the array's), teams (per position,
# interleaved lists only), ts_ms]. One field, not nine: Redis stores and the
# client packs a ninth of the arguments.
IMPRESSION_STREAM = PREFIX + "impressions"
V1_IMPRESSION_STREAM = V1_PREFIX + "impressions"
IMPRESSION_FIELD = "d"

# Appends impressions and trims the stream, in one call (one fsync under
# appendfsync always, one command for the client to pack: ~15x cheaper per
# impression than a pipeline of XADDs). KEYS[1]: the impression stream.
# ARGV: maxlen (approximate), min id (older entries are trimmed, approximately),
# then one JSON text per impression.
APPEND_IMPRESSIONS_LUA = """
local stream, maxlen = KEYS[1], ARGV[1]
for i = 3, #ARGV do
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'd', ARGV[i])
end
redis.call('XTRIM', stream, 'MINID', '~', ARGV[2])
return #ARGV - 2
"""
IMPRESSION_CHUNK = 200  # impressions per script call: bounds how long one blocks Redis


# Applies a chunk of events in order, each atomically (the script as a whole is).
# KEYS: every key the chunk touches: the feedback stream of each shard in it
# and the four keys (hist, recent, events, meta) of each user in it, each
# where the chunk first needs it; on Redis Cluster a chunk holds one shard
# (one hash slot), so KEYS is one stream and that shard's users.
# ARGV: now_ms, ttl_s, history_cap, dedup_window, stream_maxlen, then a JSON
# array of events, each [event_id, user_id, item_id, type, value, weight,
# ts_ms, recommendation_id, stream key index, index of the user's first key]
# (ids and numbers as strings, the indexes as numbers into KEYS). Returns per
# event {1, new_weight, events} when applied, or {0, current_weight, events}
# for a duplicate event id; ``events`` is the user's applied-event count after
# it (the version of their state). A duplicate refreshes the TTL of ``events``
# (a write): a ``WAIT`` after the call then covers the event's first
# application, made maybe on another connection whose ack was lost.
#
# The server validates events before they get here (recsvc.state.feedback);
# the first loop checks the numbers again before anything is written, so a bad
# event that slipped through fails its chunk whole (an error reply starting
# with "RECSVC_INVALID") instead of failing half-way: Redis does not roll back
# a script's earlier writes when a later command errors. One JSON argument
# keeps the client's packing cost per event tiny, which is where the time went
# with one call per event.
APPLY_EVENTS_LUA = """
local now_ms, ttl = ARGV[1], tonumber(ARGV[2])
local history_cap, dedup_window = tonumber(ARGV[3]), tonumber(ARGV[4])
local maxlen = tonumber(ARGV[5])
local events = cjson.decode(ARGV[6])
local function finite(text)
  local x = tonumber(text)
  return x ~= nil and x == x and x ~= math.huge and x ~= -math.huge
end
for n, ev in ipairs(events) do
  if not (finite(ev[5]) and finite(ev[6]) and finite(ev[7])) then
    return redis.error_reply('RECSVC_INVALID event ' .. n .. ' (id ' .. ev[1] ..
                             '): value, weight and timestamp must be finite numbers')
  end
end
local results = {}
for n, ev in ipairs(events) do
  local event_id, item = ev[1], ev[3]
  local stream, k = KEYS[ev[9]], ev[10]
  local hist, recent, seen, meta = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  if redis.call('ZSCORE', seen, event_id) then
    -- a write, so that a WAIT after this call covers the first application too
    redis.call('EXPIRE', seen, ttl)
    results[n] = {0, redis.call('HGET', hist, item) or '0',
                  redis.call('HGET', meta, 'events') or '0'}
  else
    redis.call('ZADD', seen, now_ms, event_id)
    local n_seen = redis.call('ZCARD', seen)
    if n_seen > dedup_window then
      redis.call('ZREMRANGEBYRANK', seen, 0, n_seen - dedup_window - 1)
    end
    local weight = redis.call('HINCRBYFLOAT', hist, item, ev[6])
    redis.call('ZADD', recent, 'GT', ev[7], item)
    local n_items = redis.call('ZCARD', recent)
    if n_items > history_cap then
      local dropped = redis.call('ZPOPMIN', recent, n_items - history_cap)
      for i = 1, #dropped, 2 do redis.call('HDEL', hist, dropped[i]) end
      redis.call('HDEL', meta, 'vec')  -- the cached vector no longer matches the history
    end
    redis.call('HSET', meta, 'updated_ms', now_ms)
    local events_now = redis.call('HINCRBY', meta, 'events', 1)
    redis.call('EXPIRE', hist, ttl)
    redis.call('EXPIRE', recent, ttl)
    redis.call('EXPIRE', seen, ttl)
    redis.call('EXPIRE', meta, ttl)
    local fields = {'event_id', event_id, 'user_id', ev[2], 'item_id', item, 'type', ev[4],
                    'value', ev[5], 'weight', ev[6], 'ts_ms', ev[7], 'recommendation_id', ev[8]}
    if maxlen > 0 then
      redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(fields))
    else
      redis.call('XADD', stream, '*', unpack(fields))
    end
    results[n] = {1, weight, events_now}
  end
end
return results
"""

# Stores a user's vector only if no event was applied since it was computed.
# KEYS[1]: meta. ARGV: events (the count the vector reflects), blob, model version.
PUT_VECTOR_LUA = """
if tonumber(redis.call('HGET', KEYS[1], 'events') or '0') ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'vec', ARGV[2], 'vec_events', ARGV[1], 'vec_model', ARGV[3])
return 1
"""

# #11: the meta fields of the cached sequence state, and a compare-and-set that
# stores any such cached state. KEYS[1]: meta. ARGV: events (the count the state
# reflects), blob, model version, field name (the others are name_events, name_model).
SEQUENCE_STATE = ("seq", "seq_events", "events", "seq_model")
PUT_STATE_LUA = """
if tonumber(redis.call('HGET', KEYS[1], 'events') or '0') ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[4], ARGV[2], ARGV[4] .. '_events', ARGV[1],
           ARGV[4] .. '_model', ARGV[3])
return 1
"""

# Events per script call: bounds how long one call blocks Redis (about 20 us
# per event), so Recommend reads are not stuck behind a large feedback batch.
SCRIPT_CHUNK = 100
