"""Per-version summaries of each code location: ``{prefix}:versions:{key}``.

Baselines hold one latest state per location, mixed across versions; events appear only
when something changed. ``backflow report --since`` must show how a function behaved in
production before and after the version that shipped a change, so the Redis sink also
keeps, per location, one small record per version (``service.version`` and
``vcs.ref.head.revision``) that served it:

- hash ``{prefix}:versions:{key}``, field ``["<service.version>", "<vcs.ref.head.revision>"]``
  (a JSON array), value a JSON object: ``calls``, ``errors``, ``windows`` (closed windows in
  which the version served the location), ``seconds`` (their summed length), ``p50_ms``
  and ``p99_ms`` (the mean of those windows' quantiles, weighted by calls: not the quantile
  of all the version's spans, which would need a sketch per version), ``first`` and
  ``last`` (start of the first and end of the last such window, epoch ms).
- At most ``VERSIONS_KEPT`` versions per location: beyond it the version last seen longest
  ago is dropped.

The same merge keeps each location's trend (unless ``trend_period`` is 0): hash
``{prefix}:trend:{key}``, the same field per version holding its older points and that
field's name with ``+`` after it holding its newest (the bucket still filling, which most
windows merge into), 18 bytes a point, oldest first (``TREND_POINT``: bucket number, calls,
error share in 65535ths, p50 and p99 in ms as float32, little-endian), one per bucket of
``trend_period / trend_points`` seconds (an hour by default) in which the version served
the location, the figures merged as the summary's are; points older than ``trend_points`` buckets before the
newest go, at most ``TREND_VERSIONS`` versions are kept (the one seen longest ago goes),
and the key expires ``trend_period`` after its last write. Field ``bucket_s`` holds the bucket
length the points were written with: after a change of ``trend_period`` or ``trend_points``
a location's trend starts over. processor/report/trend.py reads it.

Records are merged in Redis by a Lua script (one EVALSHA for a batch of them), written
after the events and baselines of the same windows. While Redis is away the figures of
windows not yet written are summed per (location, version), so what waits is bounded by
locations times versions, not by windows. A batch of merges is sent with a token of its
own; one that was sent and failed is retried as it was, with its token, never summed with
newer figures: the script skips a batch whose token it has recorded
(``{prefix}:written:merge:``, processor/sinks/idempotency.py), so a batch Redis executed
but whose reply was lost is not counted twice.

>>> import numpy as np
>>> from processor.pipeline.location import Location
>>> from processor.pipeline.sketch import LogSketch
>>> from processor.pipeline.window import ClosedWindow, LocationWindow, VersionFigures
>>> loc = Location("prod", "shop", "shop.f")
>>> sk = LogSketch.from_values(np.full(4, 10_000_000))
>>> lw = LocationWindow(0, loc, 4, 1, sk, [VersionFigures(("shop", "1.0", "abc"), 4, 1, sk)])
>>> ledger = VersionLedger()
>>> ledger.note(ClosedWindow("shop", 0, 60_000_000_000, [lw], "prod"))
>>> p = ledger.pending[(loc.key, "1.0", "abc", 0)]
>>> (p.calls, p.errors, p.windows, p.seconds, round(p.p50_sum / p.calls), p.first, p.last)
(4, 1, 1, 60.0, 10, 0, 60000)
"""

from __future__ import annotations

import functools
import itertools
import json
import struct
from dataclasses import dataclass

from processor.pipeline.sketch import window_quantiles
from processor.pipeline.window import ClosedWindow, is_overflow
from processor.sinks.idempotency import Tokens

VERSIONS_KEPT = 50
TREND_VERSIONS = 4
TREND_POINT = struct.Struct("<IIHff")  # bucket, calls, error share * 65535, p50 ms, p99 ms

# Merges one row into a summaries hash: ``merge(key, A, mark)``, A the row (a JSON array,
# one argument, as the sink sends its scripts' fields: the field, calls, errors, windows,
# seconds, p50 and p99 sums, first, last, VERSIONS_KEPT, and the marker's TTL). ``mark``,
# if given, records the merge's marker after what can fail (a key of another type, a value
# that is not JSON), so a refused merge leaves none; it is false when the marker was there
# (an earlier attempt, whose reply was lost, merged it): 0, nothing changes.
_MERGE = """
-- A[12]: the trend's bucket, A[13]: buckets kept, A[14]: the key's TTL, A[15]: versions kept,
-- A[16]: the bucket's length in seconds
local function trend(key, A)
  local calls = tonumber(A[2])
  if calls <= 0 then return end
  local bucket, keep = tonumber(A[12]), tonumber(A[13])
  local errors, s50, s99 = tonumber(A[3]), tonumber(A[6]), tonumber(A[7])
  local function point(b, c, e, q50, q99)
    return struct.pack('<IIHff', b, math.min(c, 4294967295), math.floor(math.min(e / c, 1) * 65535 + 0.5),
                       q50 / c, q99 / c)
  end
  -- the version's newest point (its bucket still filling) in field A[1] .. '+', the older
  -- ones in field A[1]: most writes merge a window into the newest, 18 bytes, not all
  local head = A[1] .. '+'
  local cur = redis.call('HGET', key, head)
  local b, c, e, q50, q99 = -1, 0, 0, 0, 0
  if cur and #cur == 18 then b, c, e, q50, q99 = struct.unpack('<IIHff', cur, 1) end
  if b == bucket then
    redis.call('HSET', key, head, point(b, c + calls, e / 65535 * c + errors, q50 * c + s50, q99 * c + s99))
    return
  end
  -- (once a bucket, not every window: points of another bucket length, written before a
  -- change of trend_period or trend_points, are not this one's: the location starts over)
  local length = redis.call('HGET', key, 'bucket_s')
  if length ~= A[16] then
    if length then
      redis.call('DEL', key)
      b, cur = -1, nil
    end
    redis.call('HSET', key, 'bucket_s', A[16])
  end
  local blob = redis.call('HGET', key, A[1]) or ''
  if bucket > b then  -- a new bucket: the newest so far joins the older ones, the oldest go
    if b >= 0 then blob = blob .. cur end
    local from = 1
    while from < #blob and struct.unpack('<I', blob, from) <= bucket - keep do from = from + 18 end
    redis.call('HSET', key, A[1], string.sub(blob, from), head, point(bucket, calls, errors, s50, s99))
  elseif bucket > b - keep then  -- an older bucket (held back by an outage): merged in its place
    local pts, done = {}, false
    for pos = 1, #blob - 17, 18 do
      local pb, pc, pe, p50, p99 = struct.unpack('<IIHff', blob, pos)
      if pb == bucket then
        pts[#pts + 1] = {pb, point(pb, pc + calls, pe / 65535 * pc + errors, p50 * pc + s50, p99 * pc + s99)}
        done = true
      else
        pts[#pts + 1] = {pb, string.sub(blob, pos, pos + 17)}
      end
    end
    if not done then pts[#pts + 1] = {bucket, point(bucket, calls, errors, s50, s99)} end
    table.sort(pts, function(x, y) return x[1] < y[1] end)
    local out = {}
    for i, p in ipairs(pts) do out[i] = p[2] end
    redis.call('HSET', key, A[1], table.concat(out))
    return
  else
    return
  end
  -- (a new bucket: the TTL renewed and the versions counted, once a bucket, not every window)
  redis.call('EXPIRE', key, A[14])
  if redis.call('HLEN', key) > 2 * tonumber(A[15]) + 1 then  -- the version seen longest ago goes
    local all = redis.call('HGETALL', key)
    local oldest, at = nil, nil
    for i = 1, #all, 2 do
      local name, v = all[i], all[i + 1]
      if string.sub(name, -1) == '+' and name ~= head and #v == 18 then
        local vb = struct.unpack('<I', v, 1)
        if at == nil or vb < at then oldest, at = name, vb end
      end
    end
    if oldest then redis.call('HDEL', key, oldest, string.sub(oldest, 1, -2)) end
  end
end

local function merge(key, A, mark, tkey)
  local cur = redis.call('HGET', key, A[1])
  local first, last = tonumber(A[8]), tonumber(A[9])
  local v
  if cur then v = cjson.decode(cur) else
    v = {calls = 0, errors = 0, windows = 0, seconds = 0, p50_ms = 0, p99_ms = 0, first = first, last = last}
  end
  if mark and not mark() then return 0 end
  local c0, c = v.calls, tonumber(A[2])
  local total = c0 + c
  if total > 0 then
    v.p50_ms = (v.p50_ms * c0 + tonumber(A[6])) / total
    v.p99_ms = (v.p99_ms * c0 + tonumber(A[7])) / total
  end
  v.calls = total
  v.errors = v.errors + tonumber(A[3])
  v.windows = v.windows + tonumber(A[4])
  v.seconds = v.seconds + tonumber(A[5])
  v.first = math.min(v.first, first)
  v.last = math.max(v.last, last)
  redis.call('HSET', key, A[1], cjson.encode(v))
  if tkey and A[12] then trend(tkey, A) end
  if redis.call('HLEN', key) > tonumber(A[10]) then
    local all = redis.call('HGETALL', key)
    local oldest, at = nil, nil
    for i = 1, #all, 2 do
      local r = cjson.decode(all[i + 1])
      if at == nil or r.last < at then oldest, at = all[i], r.last end
    end
    redis.call('HDEL', key, oldest)
  end
  return 1
end
"""
# One merge (what a spool written before MERGES_LUA holds). KEYS: the summaries hash, the
# merge's marker (processor/sinks/idempotency.py). ARGV[1]: the row.
MERGE_LUA = _MERGE + """
local A = cjson.decode(ARGV[1])
return merge(KEYS[1], A, function() return redis.call('SET', KEYS[2], '1', 'NX', 'EX', A[11]) end)
"""
# A batch of merges in one call, under one marker. KEYS: the marker, then each row's
# summaries hash, then (when the rows have a trend bucket) each row's trend hash. ARGV[1]:
# the rows, as one JSON array; ARGV[2]: the marker's TTL. The
# rows are decoded before the marker is set, and each is merged under pcall: past the
# marker nothing can stop the script (Redis does not roll a script back, and runs it to
# its end), so a marker there means every row was merged. A row Redis refuses (a key of
# another type) is left out and the others merged. Reply: "<row number> <error>" per
# refused row.
MERGES_LUA = _MERGE + """
local rows = cjson.decode(ARGV[1])
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then return {} end
local refused = {}
local n = #rows
for i, A in ipairs(rows) do
  local ok, err = pcall(merge, KEYS[i + 1], A, nil, KEYS[n + i + 1])
  if not ok then
    if type(err) == 'table' then err = err.err end
    refused[#refused + 1] = i .. ' ' .. tostring(err)
  end
end
return refused
"""


@dataclass
class Pending:
    """Figures of one (location, version, trend bucket) not yet written."""
    calls: int = 0
    errors: int = 0
    windows: int = 0
    seconds: float = 0.0
    p50_sum: float = 0.0  # sum over windows of p50_ms * calls
    p99_sum: float = 0.0
    first: int = 0
    last: int = 0

    def args(self, field: str, ttl: int, trend: tuple | None = None) -> list:
        """The merge's row; ``trend``: (bucket, buckets kept, TTL, bucket length) for the
        trend's point."""
        row = [field, self.calls, self.errors, self.windows, self.seconds,
               self.p50_sum, self.p99_sum, self.first, self.last, VERSIONS_KEPT, ttl]
        return row + [*trend[:3], TREND_VERSIONS, str(trend[3])] if trend is not None else row


Item = tuple[tuple[str, str, str, int], Pending]  # ((location key, version, revision, bucket), figures)
Group = tuple[str, list[Item]]  # merges sent together, under one token (their marker's)


class VersionLedger:
    """What the sink still has to merge into ``{prefix}:versions:{key}``: figures of windows
    not yet sent, summed per (location, version), and merges sent whose outcome is unknown,
    kept apart as they were sent."""

    def __init__(self, trend_period_s: float = 0.0, trend_points: int = 1):
        self.pending: dict[tuple[str, str, str, int], Pending] = {}
        self.retry: list[Group] = []
        self._tokens = Tokens()
        # the trend's buckets (0: no trend): windows are summed per bucket, not across them
        self.bucket_ms = int(trend_period_s * 1000 // trend_points) if trend_period_s > 0 else 0
        self.trend_points, self.trend_ttl = trend_points, int(trend_period_s)

    def trend(self, bucket: int) -> tuple | None:
        """A row's trend arguments: (bucket, buckets kept, the key's TTL, the bucket's length
        in seconds), or None."""
        return (bucket, self.trend_points, self.trend_ttl, self.bucket_ms // 1000) if self.bucket_ms else None

    def note(self, window: ClosedWindow) -> None:
        seconds = (window.end_ns - window.start_ns) / 1e9
        start_ms, end_ms = window.start_ns // 1_000_000, window.end_ns // 1_000_000
        rows = [(lw, vf) for lw in window.locations if not is_overflow(lw.location) for vf in lw.versions if vf.count]
        if not rows:
            return
        quantiles = (window_quantiles([vf.sketch for _, vf in rows], (0.5, 0.99)) / 1e6).tolist()
        bucket = start_ms // self.bucket_ms if self.bucket_ms else 0
        for (lw, vf), (p50, p99) in zip(rows, quantiles):
            k = (lw.location.key, vf.version[1], vf.version[2], bucket)
            p = self.pending.get(k)
            if p is None:
                p = self.pending[k] = Pending(first=start_ms, last=end_ms)
            p.calls += int(vf.count)
            p.errors += int(vf.errors)
            p.windows += 1
            p.seconds += seconds
            p.p50_sum += p50 * vf.count
            p.p99_sum += p99 * vf.count
            p.first, p.last = min(p.first, start_ms), max(p.last, end_ms)

    def take(self, n: int) -> Group:
        """The next merges to send, with their token: a group to retry, whole, else up to
        ``n`` new ones under a new token."""
        if self.retry:
            return self.retry.pop(0)
        keys = list(itertools.islice(self.pending, n))
        return self._tokens.next(), [(k, self.pending.pop(k)) for k in keys]

    def put_back(self, group: Group) -> None:
        """After a failed write: retried first, as it was sent (Redis may have merged it
        already; its token tells)."""
        self.retry.insert(0, group)

    def __len__(self) -> int:
        return len(self.pending) + sum(len(items) for _, items in self.retry)


@functools.lru_cache(maxsize=4096)  # (a few versions serve many locations each window)
def field_name(version: str, revision: str) -> str:
    return json.dumps([version, revision])
