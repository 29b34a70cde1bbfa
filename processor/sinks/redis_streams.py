"""Redis sink: baseline hashes, the key set and the events stream, written in pipelines.

Events are queued in a bounded buffer and sent by one thread, in order. Baselines are not
queued: the sink keeps, per location key, a reference to the latest baseline submitted and
renders its hash only when it writes it, so a location that closes several windows while
Redis is slow or away is written once, with its latest figures, and pending baselines cost
a dict entry each, whatever the number of windows. Events go before baselines (a baseline
write adds its key to ``{prefix}:keys``, which must not precede the key's first_seen).
When Redis is unreachable the thread retries with backoff and keeps everything; when the
event buffer is full the oldest events are dropped and counted, never silently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import redis

from processor.events import Event

log = logging.getLogger("backflow.redis")

# Adds the key to the set and, only if it was not there, appends the first_seen event:
# once per key ever, even with several processes sharing one Redis.
_FIRST_SEEN_LUA = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
  return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
end
return false
"""


@dataclass(frozen=True)
class _Write:
    kind: str            # "event", "first_seen" or "baseline"
    key: str
    fields: dict[str, str] | None  # a baseline's hash; None for events (rendered from source)
    event_type: str = ""
    source: object = None  # the Event, or the baseline object (put back if the write fails)


def _flat(fields: dict[str, str]) -> list[str]:
    out = []
    for k, v in fields.items():
        out += [k, v]
    return out


class RedisSink:
    def __init__(self, client: redis.Redis, prefix: str, events_maxlen: int, buffer_limit: int,
                 on_event_written: Callable[[str], None] = lambda t: None,
                 on_dropped: Callable[[int], None] = lambda n: None,
                 batch_size: int = 500):
        self.r = client
        self.prefix = prefix
        self.events_key = f"{prefix}:events"
        self.keys_key = f"{prefix}:keys"
        self.maxlen = events_maxlen
        self.buffer: deque[_Write] = deque()
        self.baselines: dict[str, object] = {}  # key -> latest baseline not yet written
        self.buffer_limit = buffer_limit
        self.batch_size = batch_size
        self.on_event_written = on_event_written
        self.on_dropped = on_dropped
        self.reachable = False
        self._first_seen = self.r.register_script(_FIRST_SEEN_LUA)
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._inflight = 0

    # --- reading at start -------------------------------------------------------------------
    def ping(self) -> bool:
        try:
            self.r.ping()
            self.reachable = True
        except redis.RedisError:
            self.reachable = False
        return self.reachable

    def known_keys(self) -> set[str]:
        """Keys already announced, so a restart does not announce them again."""
        try:
            return {k.decode() if isinstance(k, bytes) else k for k in self.r.smembers(self.keys_key)}
        except redis.RedisError as e:
            log.warning("could not read %s (%s); first_seen relies on the Redis script", self.keys_key, e)
            return set()

    # --- writing ----------------------------------------------------------------------------
    def submit(self, events: list[Event], baselines: list[tuple[str, object]]) -> None:
        """Queue events; note baselines as (key, object with ``fields()`` or a fields dict)."""
        # Events are rendered to their fields when written, not here: a window that closes
        # with a hundred thousand new locations must not hold a hundred thousand dicts.
        writes = [_Write("first_seen" if e.type == "first_seen" else "event", e.location.key,
                         None, e.type, e) for e in events]
        with self._cv:
            self.buffer.extend(writes)
            over = len(self.buffer) - self.buffer_limit
            if over > 0:
                for _ in range(over):
                    self.buffer.popleft()
                self.on_dropped(over)
                log.warning("Redis buffer full: dropped the %d oldest events", over)
            for key, source in baselines:
                self.baselines[key] = source
            self._cv.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="redis-sink", daemon=True)
        self._thread.start()

    def pending(self) -> int:
        with self._cv:
            return len(self.buffer) + len(self.baselines) + self._inflight

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
        if self._thread:
            self._thread.join(timeout=1.0)
        return ok

    def _take(self) -> list[_Write]:
        """The next writes: events first, baselines (rendered now) once no event waits."""
        if self.buffer:
            return [self.buffer.popleft() for _ in range(min(self.batch_size, len(self.buffer)))]
        # (events are rendered in _write, so a retried one is rendered again, identically)
        keys = []
        for key in self.baselines:
            keys.append(key)
            if len(keys) == self.batch_size:
                break
        sources = [self.baselines.pop(key) for key in keys]
        return [_Write("baseline", key, src if isinstance(src, dict) else src.fields(), source=src)
                for key, src in zip(keys, sources)]

    def _run(self) -> None:
        backoff = 0.1
        while True:
            with self._cv:
                while not self.buffer and not self.baselines and not self._stop:
                    self._cv.wait(timeout=1.0)
                if self._stop and not self.buffer and not self.baselines:
                    return
                batch = self._take()
                self._inflight = len(batch)
            try:
                self._write(batch)
                self.reachable = True
                backoff = 0.1
                with self._cv:
                    self._inflight = 0
            except redis.RedisError as e:
                if self.reachable:
                    log.warning("Redis write failed (%s); retrying with backoff", e)
                self.reachable = False
                with self._cv:
                    # retry in the same order; a baseline submitted meanwhile is newer: it wins
                    self.buffer.extendleft(reversed([w for w in batch if w.kind != "baseline"]))
                    for w in batch:
                        if w.kind == "baseline":
                            self.baselines.setdefault(w.key, w.source)
                    self._inflight = 0
                    if self._stop:
                        return
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _write(self, batch: list[_Write]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for w in batch:
            if w.kind == "baseline":
                pipe.hset(f"{self.prefix}:baseline:{w.key}", mapping=w.fields)
                pipe.sadd(self.keys_key, w.key)
            elif w.kind == "first_seen":
                self._first_seen(keys=[self.keys_key, self.events_key],
                                 args=[w.key, self.maxlen, *_flat(w.source.fields())], client=pipe)
            else:
                pipe.xadd(self.events_key, w.source.fields(), maxlen=self.maxlen, approximate=True)
        results = pipe.execute()
        i = 0
        for w in batch:
            if w.kind == "baseline":
                i += 2
                continue
            if results[i]:
                self.on_event_written(w.event_type)
            i += 1
