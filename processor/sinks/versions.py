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
>>> p = ledger.pending[(loc.key, "1.0", "abc")]
>>> (p.calls, p.errors, p.windows, p.seconds, round(p.p50_sum / p.calls), p.first, p.last)
(4, 1, 1, 60.0, 10, 0, 60000)
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass

from processor.pipeline.sketch import window_quantiles
from processor.pipeline.window import ClosedWindow, is_overflow
from processor.sinks.idempotency import Tokens

VERSIONS_KEPT = 50

# Merges one row into a summaries hash: ``merge(key, A, mark)``, A the row (a JSON array,
# one argument, as the sink sends its scripts' fields: the field, calls, errors, windows,
# seconds, p50 and p99 sums, first, last, VERSIONS_KEPT, and the marker's TTL). ``mark``,
# if given, records the merge's marker after what can fail (a key of another type, a value
# that is not JSON), so a refused merge leaves none; it is false when the marker was there
# (an earlier attempt, whose reply was lost, merged it): 0, nothing changes.
_MERGE = """
local function merge(key, A, mark)
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
# summaries hash. ARGV[1]: the rows, as one JSON array; ARGV[2]: the marker's TTL. The
# rows are decoded before the marker is set, and each is merged under pcall: past the
# marker nothing can stop the script (Redis does not roll a script back, and runs it to
# its end), so a marker there means every row was merged. A row Redis refuses (a key of
# another type) is left out and the others merged. Reply: "<row number> <error>" per
# refused row.
MERGES_LUA = _MERGE + """
local rows = cjson.decode(ARGV[1])
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then return {} end
local refused = {}
for i, A in ipairs(rows) do
  local ok, err = pcall(merge, KEYS[i + 1], A)
  if not ok then
    if type(err) == 'table' then err = err.err end
    refused[#refused + 1] = i .. ' ' .. tostring(err)
  end
end
return refused
"""


@dataclass
class Pending:
    """Figures of one (location, version) not yet written."""
    calls: int = 0
    errors: int = 0
    windows: int = 0
    seconds: float = 0.0
    p50_sum: float = 0.0  # sum over windows of p50_ms * calls
    p99_sum: float = 0.0
    first: int = 0
    last: int = 0

    def args(self, field: str, ttl: int) -> list:
        return [field, self.calls, self.errors, self.windows, self.seconds,
                self.p50_sum, self.p99_sum, self.first, self.last, VERSIONS_KEPT, ttl]


Item = tuple[tuple[str, str, str], Pending]  # ((location key, version, revision), figures)
Group = tuple[str, list[Item]]  # merges sent together, under one token (their marker's)


class VersionLedger:
    """What the sink still has to merge into ``{prefix}:versions:{key}``: figures of windows
    not yet sent, summed per (location, version), and merges sent whose outcome is unknown,
    kept apart as they were sent."""

    def __init__(self):
        self.pending: dict[tuple[str, str, str], Pending] = {}
        self.retry: list[Group] = []
        self._tokens = Tokens()

    def note(self, window: ClosedWindow) -> None:
        seconds = (window.end_ns - window.start_ns) / 1e9
        start_ms, end_ms = window.start_ns // 1_000_000, window.end_ns // 1_000_000
        rows = [(lw, vf) for lw in window.locations if not is_overflow(lw.location) for vf in lw.versions if vf.count]
        if not rows:
            return
        quantiles = (window_quantiles([vf.sketch for _, vf in rows], (0.5, 0.99)) / 1e6).tolist()
        for (lw, vf), (p50, p99) in zip(rows, quantiles):
            k = (lw.location.key, vf.version[1], vf.version[2])
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
