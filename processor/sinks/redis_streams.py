"""Redis sink: baseline hashes, the key set and the events stream, written in pipelines.

Writes are queued in a bounded buffer and sent by one thread, in order. When Redis is
unreachable the thread retries with backoff and keeps the buffer; when the buffer is full
the oldest writes are dropped and counted, never silently.
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
    fields: dict[str, str]
    event_type: str = ""


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
    def submit(self, events: list[Event], baselines: list[tuple[str, dict[str, str]]]) -> None:
        writes = [_Write("first_seen" if e.type == "first_seen" else "event", e.location.key,
                         e.fields(), e.type) for e in events]
        writes += [_Write("baseline", key, fields) for key, fields in baselines]
        with self._cv:
            self.buffer.extend(writes)
            over = len(self.buffer) - self.buffer_limit
            if over > 0:
                for _ in range(over):
                    self.buffer.popleft()
                self.on_dropped(over)
                log.warning("Redis buffer full: dropped the %d oldest writes", over)
            self._cv.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="redis-sink", daemon=True)
        self._thread.start()

    def pending(self) -> int:
        with self._cv:
            return len(self.buffer) + self._inflight

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

    def _run(self) -> None:
        backoff = 0.1
        while True:
            with self._cv:
                while not self.buffer and not self._stop:
                    self._cv.wait(timeout=1.0)
                if self._stop and not self.buffer:
                    return
                batch = [self.buffer.popleft() for _ in range(min(self.batch_size, len(self.buffer)))]
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
                    self.buffer.extendleft(reversed(batch))  # retry in the same order
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
                                 args=[w.key, self.maxlen, *_flat(w.fields)], client=pipe)
            else:
                pipe.xadd(self.events_key, w.fields, maxlen=self.maxlen, approximate=True)
        results = pipe.execute()
        i = 0
        for w in batch:
            if w.kind == "baseline":
                i += 2
                continue
            if results[i]:
                self.on_event_written(w.event_type)
            i += 1
