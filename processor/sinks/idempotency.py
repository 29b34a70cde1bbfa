"""What makes the Redis sink's writes safe to send twice: ``{prefix}:written:*`` markers.

A batch whose replies are lost (a dropped connection, a socket timeout while Redis was
stalled) may have been executed anyway; the sink cannot tell, so it sends the batch again.
Hashes (baselines, checkpoint fields) and the key set take a repeated write as the same
value. A stream entry and a version-summary merge would be applied twice, so each is
written by a script that first records a marker and skips the write when the marker is
already there (docs/sinks.md):

- an event: ``{prefix}:written:event:{id}:{digest}``, ``id`` the event's own (location,
  type, window) and ``digest`` 16 hex of blake2b over its entry, so two events that share
  an id (two new exception types of one location in one window) are both written. The
  value is the token of the write that recorded it: a retry that finds its own token
  knows its first attempt went through and counts the event then (once);
- a merge: ``{prefix}:written:merge:{token}``, the token being the merge's own, given
  when the sink first takes it and kept through its retries.

Markers expire after ``WRITTEN_TTL`` (7 days), an outage's worth and more. The sink
deletes the markers of merges and of ``first_seen`` events once it has read their
replies (no retry of them can follow; ``first_seen`` is kept to once per key by
``{prefix}:keys`` anyway), so only other events' markers stay: a few per regression.

>>> t = Tokens()
>>> a, b = t.next(), t.next()
>>> a != b and a.split(".")[0] == b.split(".")[0]
True
>>> event_marker("bf", "0123abcd", '["id","0123abcd","type","dormant"]')
'bf:written:event:0123abcd:15c55a8cf568e7d3'
"""

from __future__ import annotations

import hashlib
import itertools
import secrets

WRITTEN_TTL = 7 * 24 * 3600  # seconds a marker lives (longer than any outage a retry spans)

# Replies of EVENT_LUA.
WRITTEN, WRITTEN_BEFORE_BY_US, DUPLICATE, KNOWN_KEY = 1, 2, 0, -1

# KEYS: marker, events stream, key set. ARGV: token, marker TTL (s), MAXLEN, the location
# key for a first_seen ('' for any other event), the entry's fields as a JSON array of
# names and values (processor/sinks/redis_streams.py says why JSON). Replies: 1 written,
# 2 written by an earlier attempt of this very write (its token), 0 written by another
# write of the same entry, -1 a first_seen of a key already in the set (nothing written).
# The marker is set after the XADD, in the same script: never a marker without its entry.
EVENT_LUA = """
local prev = redis.call('GET', KEYS[1])
if prev then
  if prev == ARGV[1] then return 2 end
  return 0
end
if ARGV[4] ~= '' and redis.call('SADD', KEYS[3], ARGV[4]) == 0 then
  return -1
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(cjson.decode(ARGV[5])))
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


class Tokens:
    """Tokens naming one write each: 16 random hex (this process) and a counter."""

    def __init__(self):
        self._nonce = secrets.token_hex(8)
        self._count = itertools.count(1)

    def next(self) -> str:
        return f"{self._nonce}.{next(self._count):x}"


def event_marker(prefix: str, event_id: str, entry: str) -> str:
    """The marker of the stream entry ``entry`` (its fields, as the sink sends them)."""
    digest = hashlib.blake2b(entry.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"{prefix}:written:event:{event_id}:{digest}"


def merge_marker(prefix: str, token: str) -> str:
    return f"{prefix}:written:merge:{token}"
