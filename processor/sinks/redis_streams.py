"""Redis sink: baseline hashes, the key set, the events stream, version summaries and the
checkpoint, written in pipelines on redis-py's public API (docs/sinks.md).

Events are queued in a bounded buffer and sent by one thread, in order. Baselines are not
queued: the sink keeps, per location key, a reference to the latest baseline submitted and
renders its hash only when it writes it, so a location that closes several windows while
Redis is slow or away is written once, with its latest figures, and pending baselines cost
a dict entry each, whatever the number of windows. Events go before baselines (a baseline
write adds its key to ``{prefix}:keys``, which must not precede the key's first_seen).
When Redis is unreachable the thread retries with backoff and keeps everything; when the
event buffer is full during such an outage the oldest events are dropped and counted, never
silently. While Redis answers, a full buffer is a burst, not an outage: ``submit`` waits for
room (the pipeline then stops taking batches and the receivers push back at the senders).

Every write can be sent twice without effect (a batch whose replies were lost is sent
again, by redis-py's retry or by this thread's): hashes and the key set take the same
values again, and stream entries and summary merges go through scripts that record a
marker and skip what was recorded (processor/sinks/idempotency.py).

Batches are redis-py pipelines (no transaction) of EVALSHA, HSET and UNLINK. A baseline
or an event goes to its script with its fields as one JSON array, not as one argument
each: redis-py packs every argument in Python (about 0.8 us each, and a baseline has 36),
which the ingest pipeline would pay for under the same GIL; ``json.dumps`` packs the lot
in C, and Redis unpacks it with ``cjson``. A baseline's HSET and its SADD to the key set
are then one script too.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import msgpack
import redis
from redis.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from processor.sinks.connect import REDIS_ERRORS
from processor.events import Event
from processor.pipeline.memtrim import release_free_memory
from processor.sinks.idempotency import (EVENT_LUA, WRITTEN, WRITTEN_BEFORE_BY_US, WRITTEN_TTL, Tokens,
                                         event_marker, merge_marker)
from processor.sinks.spool import Spool
from processor.sinks.versions import MERGE_LUA, MERGES_LUA, VersionLedger, field_name

log = logging.getLogger("backflow.redis")

WRITE_TIMEOUT_S = 1.0  # with a spool: a write not answered by then is spooled (see __init__)
WAIT_MS = 2000  # how long a batch waits for its replicas (redis_wait_replicas)
_TRIM_AFTER_FIELDS = 20_000  # checkpoint fields (kilobytes each) written before a malloc_trim

# KEYS: the baseline hash, the key set. ARGV: the location key, the fields as a JSON array.
_BASELINE_LUA = """
redis.call('HSET', KEYS[1], unpack(cjson.decode(ARGV[2])))
return redis.call('SADD', KEYS[2], ARGV[1])
"""
# A batch's baselines in one call. KEYS: {prefix}:keys, then each baseline's hash. ARGV[1]:
# JSON rows, one per hash in KEYS order: [location key, "1", field, value, ...] when the row
# holds every field, or [location key, "", version, revision, field, value, ...] when it
# holds the figures only (its identity was written before, under that version). One
# command per batch instead of one per location: the client packs and reads one, and
# Redis parses one. A row of figures is written only over a hash of its version: one that
# is gone (deleted, evicted, Redis lost it) or holds another version (Redis lost a later
# write, a restart from a checkpoint behind it) is not written, its row number is in the
# reply, and the sink sends it whole. A hash Redis refuses (a key of another type) does
# not stop the others; the first refusal is the reply, so the batch is sent again (its key
# left out of {prefix}:keys until then).
_BASELINES_LUA = """
local rows = cjson.decode(ARGV[1])
local names, refused, missing = {}, nil, {}
for i, row in ipairs(rows) do
  local name = table.remove(row, 1)
  local write = table.remove(row, 1) == '1'
  if not write then
    local version, revision = table.remove(row, 1), table.remove(row, 1)
    local have = redis.pcall('HMGET', KEYS[i + 1], 'service.version', 'vcs.ref.head.revision')
    if type(have) == 'table' and have.err then
      refused = refused or have.err
    elseif have[1] == version and have[2] == revision then
      write = true
    else
      missing[#missing + 1] = i
    end
  end
  if write then
    local r = redis.pcall('HSET', KEYS[i + 1], unpack(row))
    if type(r) == 'table' and r.err then
      refused = refused or r.err
    else
      names[#names + 1] = name
    end
  end
  if #names == 500 then
    redis.call('SADD', KEYS[1], unpack(names))
    names = {}
  end
end
if #names > 0 then
  redis.call('SADD', KEYS[1], unpack(names))
end
if refused then
  return redis.error_reply(refused)
end
return missing
"""
_STR = {str}
_pairs = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


# KEYS: the checkpoint hash. ARGV[1]: its fields and values, alternating, as one MessagePack
# array (bytes as raw strings: Redis's cmsgpack does not take bin types). One argument: as
# many of a few kilobytes each, redis-py copies them into chunks and sends each on its own.
# (Lua's unpack takes up to about 8,000 values: a batch holds batch_size // 10 fields.)
_STATE_LUA = """
return redis.call('HSET', KEYS[1], unpack(cmsgpack.unpack(ARGV[1])))
"""


# KEYS: the checkpoint hash. ARGV: pairs of (field, event time in ns of the newest window the
# process folded into what it forgot). The field goes unless it holds a later time (its
# baseline's updated_ns, its service's max_end): then another process wrote it since (the
# service moved there) and it stays. The time is read from the MessagePack bytes (Redis's
# cmsgpack does not take bin types); 1 ms of slack covers Lua's doubles.
_FORGET_LUA = """
local function at(v, name)
  local i = string.find(v, name, 1, true)
  if not i then return nil end
  local j = i + #name
  local t = string.byte(v, j)
  if t == nil then return nil end
  if t < 128 then return t end
  local n
  if t == 204 then n = 1 elseif t == 205 then n = 2 elseif t == 206 then n = 4
  elseif t == 207 or t == 211 then n = 8 else return nil end
  local x = 0
  for k = 1, n do x = x * 256 + (string.byte(v, j + k) or 0) end
  return x
end
local n = 0
for i = 1, #ARGV, 2 do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v then
    local t = at(v, '\170updated_ns') or at(v, '\167max_end')
    if t == nil or t <= tonumber(ARGV[i + 1]) + 1e6 then
      n = n + redis.call('HDEL', KEYS[1], ARGV[i])
    end
  end
end
return n
"""


def _fields_json(fields: dict) -> str:
    """``{"a": "1", "b": 2.5}`` -> ``'["a","1","b","2.5"]'``: one argument for a script.

    Values go as text, as redis-py would send them (a number as its repr, bytes as UTF-8):
    a JSON number would reach HSET as Lua prints it.
    """
    return _pairs(_texts([x for kv in fields.items() for x in kv]))


def _rows_json(rows) -> str:
    """Rows of text -> one JSON array of arrays."""
    return _pairs(list(rows))


def _texts(values: list) -> list[str]:
    """``values`` as text (``_text``), the list itself when it is all text already."""
    return values if set(map(type, values)) == _STR else [_text(x) for x in values]


def _whole(source) -> bool:
    """Whether a baseline (an object with ``row``, or a fields dict) is to be written whole."""
    return True if isinstance(source, dict) else source.whole


def _make_whole(source) -> None:
    if not isinstance(source, dict):
        source.whole = True


def _row(source, whole: bool | None = None) -> list:
    """A baseline's hash as [field, value, ...]: whole, or as its ``whole`` says."""
    if isinstance(source, dict):
        return _texts([x for kv in source.items() for x in kv])
    return source.row(source.whole if whole is None else whole)  # (text already)


def _text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, memoryview)):
        return bytes(value).decode()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    raise redis.DataError(f"invalid value for a Redis argument: {type(value).__name__}")


MAX_EDGES = 100  # callees published per caller and window, the most called first


def verdict_key(prefix: str, environment: str, service: str) -> str:
    """The hash of a service's rollouts' verdicts (docs/sinks.md)."""
    return f"{prefix}:verdicts:{environment}:{service}"



def edge_commands(prefix: str, loc, graph, end_ns: int) -> list[tuple]:
    """The HSETs of one caller's window: ``{prefix}:edges:{key}`` (the caller's figures, and
    per callee key its figures as JSON) and, per callee, the caller's field of
    ``{prefix}:callers:{callee key}`` (docs/sinks.md)."""
    n, updated = graph.calls, str(end_ns // 1_000_000)
    total = graph.ns or 1
    versions = {v: c for v, c in graph.versions.items() if c}
    fields = ["function", loc.function, "service.name", loc.service, "calls", str(n),
              "ms_per_call", _ms(graph.ns / n), "self_ms_per_call", _ms(graph.self_ns / n), "updated", updated]
    cmds = []
    children = sorted(graph.children.items(), key=lambda cf: (-cf[1].calls, cf[0].key))[:MAX_EDGES]
    for child, f in children:
        per_version = {v[1] or "(none)": round(c / versions[v], 4) for v, c in sorted(f.by_version.items())
                       if versions.get(v)}
        fields += [child.key, json.dumps({
            "function": child.function, "service.name": child.service, "code.file.path": child.file,
            "code.line.number": child.line, "calls": f.calls, "calls_per_call": round(f.calls / n, 4),
            "ms_per_call": round(f.ns / n / 1e6, 6), "time_share": round(f.ns / total, 4),
            "versions": per_version, "updated": int(updated)}, sort_keys=True)]
        cmds.append(("HSET", f"{prefix}:callers:{child.key}", loc.key, json.dumps({
            "function": loc.function, "service.name": loc.service, "calls_per_call": round(f.calls / n, 4),
            "time_share": round(f.ns / total, 4), "calls": n, "updated": int(updated)}, sort_keys=True)))
    # (the caller's hash holds its latest window only: callees it no longer calls go)
    return [("DEL", f"{prefix}:edges:{loc.key}"), ("HSET", f"{prefix}:edges:{loc.key}", *fields)] + cmds


def _ms(ns: float) -> str:
    return repr(round(ns / 1e6, 6))


@dataclass(slots=True)  # (not frozen: its __init__ would cost a microsecond a write)
class _Write:
    kind: str            # "event", "first_seen", "baseline", "edges", "verdicts", "versions" or "state"
    key: str
    fields: list[str] | None  # a baseline's hash as [field, value, ...]; None for events (rendered from source)
    event_type: str = ""
    source: object = None  # the Event, the baseline object or the state blob (put back if the write fails)
    token: str = ""      # an event's: names this write in its marker, the same on every retry


class RedisSink:
    def __init__(self, client: redis.Redis, prefix: str, events_maxlen: int, buffer_limit: int,
                 on_event_written: Callable[[str], None] = lambda t: None,
                 on_dropped: Callable[[int], None] = lambda n: None,
                 on_waited: Callable[[float], None] = lambda s: None,
                 batch_size: int = 500, owners: Callable[[str], str] | None = None,
                 written_ttl: int = WRITTEN_TTL, spool: Spool | None = None,
                 trend_period: float = 0.0, trend_points: int = 1, wait_replicas: int = 0):
        self.r = client
        # a batch counts as written once this many replicas have it (WAIT): a master's
        # failover then loses nothing acknowledged
        self.wait_replicas = wait_replicas
        # With a spool, a write (or a replay of the spool) Redis has not answered within
        # WRITE_TIMEOUT_S fails, and the batch goes to the spool (and what waits behind it): a
        # stalled Redis must not keep closed windows in memory only, where kill -9 would lose
        # them. Written twice is harmless: every write is idempotent. No retries in the
        # client: _run has its own.
        self.w = client
        if spool is not None and not isinstance(client, RedisCluster):  # (a cluster's: its own timeouts)
            pool = client.connection_pool
            timeout = WRITE_TIMEOUT_S + (WAIT_MS / 1000 if wait_replicas else 0)  # (a WAIT's time on top)
            self.w = redis.Redis(connection_pool=type(pool)(
                connection_class=pool.connection_class,
                **{**pool.connection_kwargs, "socket_timeout": timeout,
                   "socket_connect_timeout": WRITE_TIMEOUT_S, "retry": Retry(NoBackoff(), 0)}))
        self.owners = owners  # code.file.path -> owners (processor/owners.py), if configured
        self.spool = spool    # batches Redis could not take, on disk (processor/sinks/spool.py)
        self.prefix = prefix
        self.events_key = f"{prefix}:events"
        self.keys_key = f"{prefix}:keys"
        # This process's field in {prefix}:instances, set (HSETNX) by every batch: set anew
        # after the first, it was gone, and so was what Redis held (a restart without data).
        self.instances_key = f"{prefix}:instances"
        self.instance = secrets.token_hex(8)
        self._registered = False
        self._wiped_unseen = False  # a loss of Redis's data take_wiped() has not reported yet
        self.maxlen = events_maxlen
        self.written_ttl = written_ttl  # seconds a {prefix}:written:* marker lives
        self.buffer: deque[_Write] = deque()
        self.baselines: dict[str, object] = {}  # key -> latest baseline not yet written
        self.edges: dict[str, tuple] = {}  # caller key -> (location, LocationGraph, window end) not yet written
        self.verdicts: dict[tuple[str, str], str] = {}  # (hash, field) -> a rollout's state (JSON) not yet written
        self.state: dict[str, bytes | int] = {}  # checkpoint field -> latest blob (or deletion) not yet written
        self.state_key = f"{prefix}:state"
        # per-version summaries and trends (processor/sinks/versions.py)
        self.versions = VersionLedger(trend_period, trend_points)
        self._state_taken = 0  # checkpoint fields written since memory was last trimmed
        self.buffer_limit = buffer_limit
        self.batch_size = batch_size
        self.on_event_written = on_event_written
        self.on_dropped = on_dropped
        self.on_waited = on_waited  # seconds submit() waited for room while Redis answered
        self.reachable = False
        self.ever_reached = False  # Redis answered once since start
        self.dropped = 0           # events dropped because the buffer was full
        self.summaries_dropped = 0  # version summaries Redis refused ({prefix}:versions:{key})
        self.last_error: Exception | None = None  # of the last failed ping()
        # Called by their SHA; loaded before the first batch and whenever Redis answers NOSCRIPT.
        self._scripts = [client.register_script(lua)
                         for lua in (EVENT_LUA, _BASELINE_LUA, MERGE_LUA, _FORGET_LUA, _BASELINES_LUA, MERGES_LUA,
                                     _STATE_LUA)]
        (self._event_sha, self._baseline_sha, self._merge_sha, self._forget_sha, self._baselines_sha,
         self._merges_sha, self._state_sha) = (s.sha for s in self._scripts)
        # The spool names scripts rather than SHAs: a restart into a newer version sends its own.
        # Baselines are spooled one call each of "baseline", which every version knows.
        self._sha_of = {"event": self._event_sha, "baseline": self._baseline_sha, "merge": self._merge_sha,
                        "forget": self._forget_sha}
        self._name_of = {sha: name for name, sha in self._sha_of.items()}
        self._loaded = False
        self._tokens = Tokens()
        # Markers of writes whose replies were read: no retry of them can follow, so they
        # are deleted with the next batch (see _write).
        self._unlink: list[str] = []
        lock = threading.Lock()
        self._cv = threading.Condition(lock)    # the writer thread waits for work
        self._room = threading.Condition(lock)  # submit() waits for room in the buffer
        self._stop = False
        self._thread: threading.Thread | None = None
        self._inflight = 0

    def _wait(self, pipe) -> None:
        """End ``pipe`` with WAIT for ``wait_replicas`` replicas, on the connection that wrote
        (WAIT covers its own connection's writes): a cluster's, the node of the prefix's slot."""
        if self.wait_replicas:
            pipe.execute_command("WAIT", self.wait_replicas, WAIT_MS, **(
                {"target_nodes": self.w.get_node_from_key(self.events_key)} if isinstance(self.w, RedisCluster) else {}))

    def use(self, client) -> None:
        """Talk to Redis through ``client`` from now on (a cluster client, once the server
        was found to be a cluster node: processor/sinks/connect.py)."""
        with self._cv:
            self.r = self.w = client
            self._loaded = False  # (its scripts are loaded again, on every primary)

    # --- reading at start -------------------------------------------------------------------
    def ping(self) -> bool:
        try:
            self.r.ping()
            self.reachable = self.ever_reached = True
        except REDIS_ERRORS as e:
            self.reachable = False
            self.last_error = e
        return self.reachable

    def known_keys(self) -> set[str]:
        """Keys already announced, so a restart does not announce them again."""
        try:
            return {k.decode() if isinstance(k, bytes) else k for k in self.r.smembers(self.keys_key)}
        except REDIS_ERRORS as e:
            log.warning("could not read %s (%s); first_seen relies on the Redis script", self.keys_key, e)
            return set()

    def read_state(self, count: int = 1000) -> dict[str, bytes]:
        """Every checkpoint field of ``{prefix}:state`` (see processor/pipeline/checkpoint.py)."""
        out = {}
        for name, blob in self.r.hscan_iter(self.state_key, count=count):
            out[name.decode() if isinstance(name, bytes) else name] = blob
        return out

    # --- writing ----------------------------------------------------------------------------
    def submit_state(self, fields: dict[str, bytes | int]) -> None:
        """Note checkpoint fields: a blob to write, or, for what the engine forgot, the event
        time (ns) of its newest window, to delete the field unless a later one is there
        (``_FORGET_LUA``); written after the events and baselines waiting, a newer value of a
        field replacing one not yet written."""
        with self._cv:
            self.state.update(fields)
            self._cv.notify()

    def take_wiped(self) -> bool:
        """Whether Redis was found empty since the last call (see ``instances_key``)."""
        with self._cv:
            wiped, self._wiped_unseen = self._wiped_unseen, False
        return wiped

    def state_pending(self) -> int:
        with self._cv:
            return len(self.state)

    def submit(self, events: list[Event], baselines: list[tuple[str, object]], window=None,
               edges: list | None = None, verdicts: list | None = None) -> None:
        """Queue events; note baselines as (key, object with ``fields()`` or a fields dict),
        the closed window's per-version figures (``{prefix}:versions:{key}``), its call
        graph's callers with their figures (``edges``: (Location, LocationGraph) pairs, for
        ``{prefix}:edges:{key}`` and ``{prefix}:callers:{key}``) and its rollouts' verdicts
        (``verdicts``: ``Rollouts.state_of`` dicts, for ``{prefix}:verdicts:{environment}:
        {service}``)."""
        # Events are rendered to their fields when written, not here: a window that closes
        # with a hundred thousand new locations must not hold a hundred thousand dicts.
        token = self._tokens.next
        writes = [_Write("first_seen" if e.type == "first_seen" else "event", e.location.key,
                         None, e.type, e, token()) for e in events]
        with self._cv:
            waited, i = 0.0, 0
            while i < len(writes):
                room = self.buffer_limit - len(self.buffer)
                if room <= 0 and (self.reachable or self.spool is not None) and not self._stop:
                    # Behind, not away: wait for the writer, which takes a batch at a time.
                    t0 = time.monotonic()
                    self._cv.notify()
                    self._room.wait(timeout=0.5)
                    waited += time.monotonic() - t0
                    continue
                take = room if room > 0 else len(writes) - i  # (Redis away: all, the oldest dropped below)
                self.buffer.extend(itertools.islice(writes, i, i + take))
                i += take
                self._cv.notify()
            over = len(self.buffer) - self.buffer_limit
            if over > 0:  # Redis away: an outage longer than the buffer
                for _ in range(over):
                    self.buffer.popleft()
                self.dropped += over
                self.on_dropped(over)
                log.warning("Redis buffer full while Redis is away: dropped the %d oldest events", over)
            pending = self.baselines
            for key, source in baselines:
                prev = pending.get(key)
                if prev is not None and _whole(prev):  # (not written yet: its identity neither)
                    _make_whole(source)
                pending[key] = source
            if window is not None:
                self.versions.note(window)
                for loc, graph in edges or ():
                    self.edges[loc.key] = (loc, graph, window.end_ns)
            for v in verdicts or ():  # (None: the field goes, the rollout is no longer kept)
                self.verdicts[(verdict_key(self.prefix, v["environment"], v["service"]),
                               field_name(v["version"], v["revision"]))] = (  # (as in versions)
                    None if v.get("deleted") else json.dumps(v, sort_keys=True))
            self._cv.notify()
        if waited:
            self.on_waited(waited)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="redis-sink", daemon=True)
        self._thread.start()

    def pending(self) -> int:
        with self._cv:
            return (len(self.buffer) + len(self.baselines) + len(self.edges) + len(self.verdicts) + len(self.versions)
                    + len(self.state)
                    + self._inflight + (1 if self._unlink else 0))  # (markers to delete: one write)

    def flush(self, timeout: float) -> bool:
        """Wait until everything submitted so far is written; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.pending():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self, timeout: float) -> bool:
        ok = self.flush(timeout)
        with self._cv:
            self._stop = True
            self._cv.notify()
            self._room.notify_all()
        if self._thread:
            self._thread.join(timeout=1.0)
        return ok

    def _take(self) -> list[_Write]:
        """The next writes: events first, baselines (rendered now) once no event waits."""
        if self.buffer:
            return [self.buffer.popleft() for _ in range(min(self.batch_size, len(self.buffer)))]
        # (events are rendered in _write, so a retried one is rendered again, identically)
        if self.baselines:
            keys = list(itertools.islice(self.baselines, self.batch_size))
            sources = [self.baselines.pop(key) for key in keys]
            return [_Write("baseline", key, _row(src), source=src) for key, src in zip(keys, sources)]
        if self.edges:
            keys = list(itertools.islice(self.edges, self.batch_size))
            return [_Write("edges", key, None, source=self.edges.pop(key)) for key in keys]
        if self.verdicts:  # (after the rollout events they follow, before the checkpoint)
            keys = list(itertools.islice(self.verdicts, self.batch_size))
            return [_Write("verdicts", key[0], None, source=(key, self.verdicts.pop(key))) for key in keys]
        if self.versions:  # after the baselines of the same windows, before the checkpoint
            return [_Write("versions", "", None, source=self.versions.take(self.batch_size))]
        # Checkpoint fields last: a restart must not know of a window whose events and
        # baselines were not written yet. A few fields per write: they are kilobytes each.
        names = list(itertools.islice(self.state, max(1, self.batch_size // 10)))
        self._state_taken += len(names)
        return [_Write("state", name, None, source=self.state.pop(name)) for name in names]

    def _idle(self) -> bool:
        return not (self.buffer or self.baselines or self.edges or self.verdicts or self.versions or self.state
                    or self._unlink)

    def _spool_waiting(self) -> bool:
        return self.spool is not None and self.spool.size > 0

    def _run(self) -> None:
        backoff = 0.1
        next_try = 0.0  # when Redis is tried again while batches go to the spool
        while True:
            with self._cv:
                while (self._idle() and not self._stop
                       and not (self._spool_waiting() and time.monotonic() >= next_try)):
                    self._cv.wait(timeout=0.5)
                if self._stop and self._idle():
                    return  # (what is in the spool stays there for the next start)
            if self._spool_waiting() and time.monotonic() >= next_try:
                try:
                    self.replay_spool()
                    self.reachable = self.ever_reached = True
                    backoff = 0.1
                except REDIS_ERRORS:
                    self.reachable = False
                    next_try = time.monotonic() + backoff
                    backoff = min(backoff * 2, 5.0)
            with self._cv:
                if self._idle():
                    continue
                batch = self._take()  # ([] when only markers are left to delete)
                self._inflight = len(batch)
                self._room.notify_all()
            if self._spool_waiting():
                # The spool holds earlier batches: this one goes after them, on disk or, with
                # the spool full, back into memory until the spool was sent (submit() pushes back).
                if self.spool.full or not self._to_spool(batch):
                    self._put_back(batch)
                    time.sleep(min(backoff, 1.0))
                continue
            try:
                self._write(batch)
                self.reachable = self.ever_reached = True
                if not self.state and self._state_taken >= _TRIM_AFTER_FIELDS:
                    # a big checkpoint was written: its freed blobs go back to the system
                    self._state_taken = 0
                    release_free_memory()
                backoff = 0.1
                with self._cv:
                    self._inflight = 0
            except REDIS_ERRORS as e:
                if self.reachable:
                    log.warning("Redis write failed (%s); %s", e, "keeping what waits in the spool"
                                if self.spool is not None else "retrying with backoff")
                self.reachable = False
                if self.spool is not None and not self.spool.full and self._to_spool(batch):
                    next_try = time.monotonic() + backoff
                    continue
                self._put_back(batch)
                if self._stop:
                    return
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _put_back(self, batch: list[_Write]) -> None:
        with self._cv:
            self._room.notify_all()  # a waiting submit() now buffers, and drops if it must
            # retry in the same order; a baseline submitted meanwhile is newer: it wins
            self.buffer.extendleft(reversed([w for w in batch if w.kind in ("event", "first_seen")]))
            for w in batch:
                if w.kind == "baseline":
                    if self.baselines.setdefault(w.key, w.source) is not w.source and _whole(w.source):
                        _make_whole(self.baselines[w.key])  # (a newer one: written whole instead)
                elif w.kind == "state":
                    self.state.setdefault(w.key, w.source)
                elif w.kind == "edges":
                    self.edges.setdefault(w.key, w.source)
                elif w.kind == "verdicts":  # (a newer state submitted meanwhile wins)
                    self.verdicts.setdefault(*w.source)
            for w in batch:
                if w.kind == "versions":
                    self.versions.put_back(w.source)
            self._inflight = 0

    def _to_spool(self, batch: list[_Write]) -> bool:
        """Keep a batch Redis cannot take now on disk, as its commands, and forget it; False
        (the batch still to be put back) when the disk refused it."""
        cmds = [["SCRIPT", self._name_of[c[1]], *c[2:]] if c[0] == "EVALSHA" else list(c)
                for c in self._commands(batch, spooled=True)[0]]
        try:
            if cmds:
                self.spool.append(cmds)
        except OSError as e:
            log.error("cannot write the spool %s (%s); writes wait in memory and the receivers "
                      "push back", self.spool.path, e)
            return False
        with self._cv:
            self._unlink = []  # markers of acknowledged writes: left to expire (written_ttl)
            self._inflight = 0
            self._room.notify_all()
        return True

    def replay_spool(self) -> None:
        """Send the spooled batches in order, then empty the spool. Raises redis.RedisError
        when Redis does not take them, the spool kept: sending it again is harmless. Only a
        summary merge Redis refuses for good (a key of another type) is dropped, as _write does."""
        if not self._spool_waiting():
            return
        self._load_scripts()
        n = 0
        for record in self.spool.records():
            cmds = [("EVALSHA", self._sha_of[c[1]], *c[2:]) if c[0] == "SCRIPT" else tuple(c) for c in record]
            for attempt in (1, 2):
                pipe = self.w.pipeline(transaction=False)
                for c in cmds:
                    pipe.execute_command(*c)
                self._wait(pipe)
                replies = pipe.execute(raise_on_error=False)
                if attempt == 1 and any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
                    self._load_scripts()  # Redis restarted meanwhile
                    continue
                break
            if self.wait_replicas and isinstance(replies[-1], int) and replies[-1] < self.wait_replicas:
                raise redis.ConnectionError(f"a spooled batch reached {replies[-1]} of {self.wait_replicas} "
                                            f"replicas (redis_wait_replicas): the spool is sent again")
            for c, r in zip(cmds, replies):
                if c[0] == "EVAL" and c[1] == MERGES_LUA and isinstance(r, list) and r:
                    self._refused_merges(r)
                if isinstance(r, Exception) and not isinstance(r, redis.ResponseError):
                    raise r  # (a cluster pipeline hands a command's connection error back as its reply)
                if isinstance(r, redis.ResponseError):
                    # (a one-merge record of a spool written before merges were batched: a key of
                    # another type, or a value the script cannot read, would fail every replay)
                    if c[0] == "EVALSHA" and c[1] == self._merge_sha and (
                            "WRONGTYPE" in str(r) or "user_script" in str(r)):
                        log.warning("a spooled version summary was refused (%s); dropped", r)
                        self.summaries_dropped += 1
                        continue
                    raise r  # (OOM, READONLY, MISCONF...: the spool is kept and sent again)
            n += 1
        self.spool.clear()
        log.info("sent %d batches kept in the spool while Redis was away", n)

    def _write(self, batch: list[_Write], again: bool = True) -> None:
        """Send one batch in a pipeline; return once every reply was read and none failed.

        Raises redis.RedisError otherwise, and _run sends the same batch again: what Redis
        executed of it is then skipped or written over with the same values.
        """
        if not self._loaded:  # once, rather than a batch answered NOSCRIPT and sent again
            self._load_scripts()
        cmds, merges, events, partial = self._commands(batch)
        pipe = self.w.pipeline(transaction=False)
        pipe.hsetnx(self.instances_key, self.instance, int(time.time()))  # reply 0: see __init__
        unlink = self._unlink[:]
        if unlink:  # markers of the writes acknowledged last time (module docstring)
            pipe.execute_command("UNLINK", *unlink)  # (as a command: a cluster pipeline splits no multi-key call)
        base = len(pipe)
        merges = [(base + i, m) for i, m in merges]
        partial = partial and (base + partial[0], partial[1])
        events = [(base + i, w, m) for i, w, m in events]
        for c in cmds:
            pipe.execute_command(*c)
        self._wait(pipe)
        replies = pipe.execute(raise_on_error=False)
        if self.wait_replicas and isinstance(replies[-1], int) and replies[-1] < self.wait_replicas:
            raise redis.ConnectionError(f"the batch reached {replies[-1]} of {self.wait_replicas} replicas within "
                                        f"{WAIT_MS} ms (redis_wait_replicas): sent again")
        if replies[0] == 1:
            if self._registered:
                with self._cv:
                    self._wiped_unseen = True
                log.warning("Redis lost what it held (a restart without its data?): what this "
                            "process holds is published again")
            self._registered = True
        if any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
            if not again:
                raise next(r for r in replies if isinstance(r, redis.exceptions.NoScriptError))
            # Redis restarted, or its script cache was flushed: load the scripts and send the
            # batch again; what ran of it is skipped or written over with the same values.
            self._load_scripts()
            return self._write(batch, again=False)

        # A merge Redis refuses (a key of another type, a field another writer left) would
        # fail every retry and block every later write: the script left it out; logged and
        # counted here.
        for i, _ in merges:
            if isinstance(replies[i], list):
                self._refused_merges(replies[i])
        # Like execute()'s raise_on_error: every reply was read (the connection is in sync)
        # and nothing counts as written; _run sends the batch again. (A cluster pipeline
        # hands back a command's connection error as its reply, after sending it alone.)
        for i, reply in enumerate(replies):
            if isinstance(reply, Exception):
                reply.args = (f"command #{i + 1} of {len(replies)} in the batch failed: "
                              f"{reply.args[0] if reply.args else ''}",) + reply.args[1:]
                raise reply
        # Acknowledged: the markers of merges and first_seen events go with the next batch
        # (a retry can no longer follow; {prefix}:keys keeps first_seen once per key).
        # Other events keep theirs until it expires, against the same event judged again.
        self._unlink = [m for _, m in merges]
        if partial and replies[partial[0]]:  # rows of figures whose hash was gone: sent whole
            with self._cv:
                for row in replies[partial[0]]:
                    w = partial[1][int(row) - 1]
                    _make_whole(self.baselines.setdefault(w.key, w.source))
        for i, w, marker in events:
            if replies[i] in (WRITTEN, WRITTEN_BEFORE_BY_US):  # now, or by its lost first attempt
                if w.kind == "first_seen":
                    self._unlink.append(marker)
                self.on_event_written(w.event_type)

    def _commands(self, batch: list[_Write], spooled: bool = False
                  ) -> tuple[list[tuple], list[tuple[int, str]], list[tuple], tuple | None]:
        """The Redis commands of a batch; with the index of each merge (and its marker) and of
        each event (its write and marker) among them, and of the baselines' call (with its
        writes, in row order). ``spooled``: for the spool, baselines one call each of the
        one-baseline script, which every version knows (a spool may be replayed by the
        version rolled back to), written whole."""
        cmds: list[tuple] = []
        state = [w for w in batch if w.kind == "state" and isinstance(w.source, bytes)]
        if state:  # one HSET for all the batch's fields (in the spool as HSET itself)
            pairs = list(itertools.chain.from_iterable((w.key, w.source) for w in state))
            cmds.append(("HSET", self.state_key, *pairs) if spooled else
                        ("EVALSHA", self._state_sha, 1, self.state_key, msgpack.packb(pairs, use_bin_type=False)))
        gone = [w for w in batch if w.kind == "state" and not isinstance(w.source, bytes)]
        if gone:  # fields of what the engine forgot (an event time: see _FORGET_LUA)
            cmds.append(("EVALSHA", self._forget_sha, 1, self.state_key,
                         *itertools.chain.from_iterable((w.key, w.source) for w in gone)))
        merges: list[tuple[int, str]] = []
        events: list[tuple[int, _Write, str]] = []
        partial = None
        ttl = self.written_ttl
        baselines = [w for w in batch if w.kind == "baseline"]
        if baselines and spooled:  # (whole: the one-baseline script writes what it is given)
            cmds += [("EVALSHA", self._baseline_sha, 2, f"{self.prefix}:baseline:{w.key}", self.keys_key,
                      w.key, _pairs(w.fields if _whole(w.source) else _row(w.source, whole=True)))
                     for w in baselines]
        elif baselines:
            partial = (len(cmds), baselines)
            cmds.append(("EVALSHA", self._baselines_sha, 1 + len(baselines), self.keys_key,
                         *[f"{self.prefix}:baseline:{w.key}" for w in baselines],
                         _rows_json([w.key, "1", *w.fields] if _whole(w.source) else
                                    [w.key, "", w.source.version[1], w.source.version[2], *w.fields]
                                    for w in baselines)))
        for w in batch:
            if w.kind == "edges":  # hashes: written again with the same values is harmless
                cmds += edge_commands(self.prefix, *w.source)
            elif w.kind == "verdicts":
                (key, name), value = w.source
                cmds.append(("HSET", key, name, value) if value is not None else ("HDEL", key, name))
        for w in batch:
            if w.kind == "versions":  # one call for the batch's merges, under its token's marker
                token, items = w.source
                marker = merge_marker(self.prefix, token)
                keys = [f"{self.prefix}:versions:{key}" for (key, _, _, _), _ in items]
                trend = self.versions.bucket_ms > 0
                if trend:
                    keys += [f"{self.prefix}:trend:{key}" for (key, _, _, _), _ in items]
                rows = _pairs([p.args(field_name(version, revision), ttl, self.versions.trend(bucket))
                               for (_, version, revision, bucket), p in items])
                merges.append((len(cmds), marker))
                # (spooled: the script itself, which a version rolled back to can run too)
                script = ("EVAL", MERGES_LUA) if spooled else ("EVALSHA", self._merges_sha)
                cmds.append((*script, 1 + len(keys), marker, *keys, rows, ttl))
        for w in batch:
            if w.kind in ("event", "first_seen"):
                fields = self._fields(w.source)
                entry = _fields_json(fields)
                marker = event_marker(self.prefix, fields["id"], entry)
                events.append((len(cmds), w, marker))
                cmds.append(("EVALSHA", self._event_sha, 3, marker, self.events_key, self.keys_key, w.token, ttl,
                             self.maxlen, w.key if w.kind == "first_seen" else "", entry))
        return cmds, merges, events, partial

    def _refused_merges(self, reply: list) -> None:
        """Log and count the merges a merge call left out (its reply: "<row> <error>" each)."""
        for r in reply:
            log.warning("version summary not written (%s); dropped",
                        (r.decode() if isinstance(r, bytes) else r).partition(" ")[2])
        self.summaries_dropped += len(reply)

    def _load_scripts(self) -> None:
        for script in self._scripts:
            self.w.script_load(script.script)
        self._loaded = True

    def _fields(self, event: Event) -> dict[str, str]:
        owners = self.owners(event.location.file) if self.owners else ""
        return event.fields(owners)
