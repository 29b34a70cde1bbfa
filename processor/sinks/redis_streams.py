"""Redis sink: baseline hashes, the key set and the events stream, written in pipelines.

Events are queued in a bounded buffer and sent by one thread, in order. Baselines are not
queued: the sink keeps, per location key, a reference to the latest baseline submitted and
renders its hash only when it writes it, so a location that closes several windows while
Redis is slow or away is written once, with its latest figures, and pending baselines cost
a dict entry each, whatever the number of windows. Events go before baselines (a baseline
write adds its key to ``{prefix}:keys``, which must not precede the key's first_seen).
When Redis is unreachable the thread retries with backoff and keeps everything; when the
event buffer is full the oldest events are dropped and counted, never silently.

A batch is encoded in RESP here, not by redis-py's pipeline: its generic packing (an encoder
call and several isinstance checks per argument) cost most of the sink's CPU, which the
ingest pipeline shares (one GIL). The commands are the same ones the pipeline sent; the
connection comes from the client's pool, so URL, TLS, password and db all still apply.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import redis

from processor.events import Event
from processor.pipeline.memtrim import release_free_memory
from processor.sinks.versions import MERGE_LUA, MERGE_SHA, VersionLedger, field_name

log = logging.getLogger("backflow.redis")

# Adds the key to the set and, only if it was not there, appends the first_seen event:
# once per key ever, even with several processes sharing one Redis.
_FIRST_SEEN_LUA = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
  return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
end
return false
"""
_TRIM_AFTER_FIELDS = 20_000  # checkpoint fields (kilobytes each) written before a malloc_trim
_FIRST_SEEN_SHA = hashlib.sha1(_FIRST_SEEN_LUA.encode()).hexdigest()


@dataclass(frozen=True)
class _Write:
    kind: str            # "event", "first_seen", "baseline", "versions" or "state"
    key: str
    fields: dict[str, str] | None  # a baseline's hash; None for events (rendered from source)
    event_type: str = ""
    source: object = None  # the Event, the baseline object or the state blob (put back if the write fails)


def _template(args: list[bytes | None]) -> bytes:
    """A command in RESP with a ``%d``/``%b`` pair (length, bytes) for each None argument.

    Filled with ``template % (len(a), a, len(b), b, ...)``: one bytes formatting per command
    instead of packing every constant argument (the field names above all) again.
    """
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if a is None:
            out.append(b"$%d\r\n%b\r\n")
        else:
            out.append(b"$%d\r\n" % len(a) + a.replace(b"%", b"%%") + b"\r\n")
    return b"".join(out)


class RedisSink:
    def __init__(self, client: redis.Redis, prefix: str, events_maxlen: int, buffer_limit: int,
                 on_event_written: Callable[[str], None] = lambda t: None,
                 on_dropped: Callable[[int], None] = lambda n: None,
                 batch_size: int = 500, owners: Callable[[str], str] | None = None):
        self.r = client
        self.owners = owners  # code.file.path -> owners (processor/owners.py), if configured
        self.prefix = prefix
        self.events_key = f"{prefix}:events"
        self.keys_key = f"{prefix}:keys"
        self.maxlen = events_maxlen
        self.buffer: deque[_Write] = deque()
        self.baselines: dict[str, object] = {}  # key -> latest baseline not yet written
        self.state: dict[str, bytes] = {}       # checkpoint field -> latest blob not yet written
        self.state_key = f"{prefix}:state"
        self.versions = VersionLedger()  # per-version summaries (processor/sinks/versions.py)
        self._state_taken = 0  # checkpoint fields written since memory was last trimmed
        self.buffer_limit = buffer_limit
        self.batch_size = batch_size
        self.on_event_written = on_event_written
        self.on_dropped = on_dropped
        self.reachable = False
        self.ever_reached = False  # Redis answered once since start
        self.dropped = 0           # events dropped because the buffer was full
        self.summaries_dropped = 0  # version summaries Redis refused ({prefix}:versions:{key})
        self.last_error: Exception | None = None  # of the last failed ping()
        encoder = client.connection_pool.get_encoder()
        self._encoding, self._errors = encoder.encoding, encoder.encoding_errors
        self._sha = _FIRST_SEEN_SHA
        self._templates: dict[tuple, bytes] = {}  # (kind, field names) -> RESP template
        self._hash_prefix = self._encode(f"{prefix}:baseline:")
        self._sadd = _template([b"SADD", self._encode(self.keys_key), None])
        # Sent ahead of every batch with a first_seen, in the same write: the script is then
        # loaded (again, after a Redis restart or SCRIPT FLUSH) before any EVALSHA of the batch
        # runs, so first_seen events keep their place in the stream. (redis-py's pipeline
        # made a SCRIPT EXISTS round trip for the same purpose.)
        self._script_load = _template([b"SCRIPT", b"LOAD", self._encode(_FIRST_SEEN_LUA)])
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._inflight = 0

    # --- reading at start -------------------------------------------------------------------
    def ping(self) -> bool:
        try:
            self.r.ping()
            self.reachable = self.ever_reached = True
        except redis.RedisError as e:
            self.reachable = False
            self.last_error = e
        return self.reachable

    def known_keys(self) -> set[str]:
        """Keys already announced, so a restart does not announce them again."""
        try:
            return {k.decode() if isinstance(k, bytes) else k for k in self.r.smembers(self.keys_key)}
        except redis.RedisError as e:
            log.warning("could not read %s (%s); first_seen relies on the Redis script", self.keys_key, e)
            return set()

    def read_state(self, count: int = 1000) -> dict[str, bytes]:
        """Every checkpoint field of ``{prefix}:state`` (see processor/pipeline/checkpoint.py)."""
        out = {}
        for name, blob in self.r.hscan_iter(self.state_key, count=count):
            out[name.decode() if isinstance(name, bytes) else name] = blob
        return out

    # --- writing ----------------------------------------------------------------------------
    def submit_state(self, fields: dict[str, bytes]) -> None:
        """Note checkpoint fields; written after the events and baselines waiting, a newer
        blob of a field replacing one not yet written."""
        with self._cv:
            self.state.update(fields)
            self._cv.notify()

    def state_pending(self) -> int:
        with self._cv:
            return len(self.state)

    def submit(self, events: list[Event], baselines: list[tuple[str, object]], window=None) -> None:
        """Queue events; note baselines as (key, object with ``fields()`` or a fields dict),
        and the closed window's per-version figures (``{prefix}:versions:{key}``)."""
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
                self.dropped += over
                self.on_dropped(over)
                log.warning("Redis buffer full: dropped the %d oldest events", over)
            for key, source in baselines:
                self.baselines[key] = source
            if window is not None:
                self.versions.note(window)
            self._cv.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="redis-sink", daemon=True)
        self._thread.start()

    def pending(self) -> int:
        with self._cv:
            return len(self.buffer) + len(self.baselines) + len(self.versions) + len(self.state) + self._inflight

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
        if self.baselines:
            keys = list(itertools.islice(self.baselines, self.batch_size))
            sources = [self.baselines.pop(key) for key in keys]
            return [_Write("baseline", key, src if isinstance(src, dict) else src.fields(), source=src)
                    for key, src in zip(keys, sources)]
        if self.versions:  # after the baselines of the same windows, before the checkpoint
            return [_Write("versions", k[0], None, source=(k, p)) for k, p in self.versions.take(self.batch_size)]
        # Checkpoint fields last: a restart must not know of a window whose events and
        # baselines were not written yet. A few fields per write: they are kilobytes each.
        names = list(itertools.islice(self.state, max(1, self.batch_size // 10)))
        self._state_taken += len(names)
        return [_Write("state", name, None, source=self.state.pop(name)) for name in names]

    def _run(self) -> None:
        backoff = 0.1
        while True:
            with self._cv:
                while not self.buffer and not self.baselines and not self.versions and not self.state \
                        and not self._stop:
                    self._cv.wait(timeout=1.0)
                if self._stop and not self.buffer and not self.baselines and not self.versions and not self.state:
                    return
                batch = self._take()
                self._inflight = len(batch)
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
            except redis.RedisError as e:
                if self.reachable:
                    log.warning("Redis write failed (%s); retrying with backoff", e)
                self.reachable = False
                with self._cv:
                    # retry in the same order; a baseline submitted meanwhile is newer: it wins
                    self.buffer.extendleft(reversed([w for w in batch if w.kind in ("event", "first_seen")]))
                    for w in batch:
                        if w.kind == "baseline":
                            self.baselines.setdefault(w.key, w.source)
                        elif w.kind == "state":
                            self.state.setdefault(w.key, w.source)
                    self.versions.put_back([w.source for w in batch if w.kind == "versions"])
                    self._inflight = 0
                    if self._stop:
                        return
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _write(self, batch: list[_Write]) -> None:
        # Every command is rendered before a connection is taken: a bad value fails here.
        commands: list[bytes] = []
        events: list[tuple[_Write, int]] = []  # each event with the index of its reply
        state = [w for w in batch if w.kind == "state"]
        if state:  # one HSET for all the batch's fields
            args = [b"HSET", self.state_key]
            for w in state:
                args += (w.key, w.source)
            commands.append(self._command(args))
        versions = [w for w in batch if w.kind == "versions"]
        merges: list[tuple[_Write, int]] = []  # each version summary with the index of its reply
        if versions:  # the script is loaded (again) ahead of its calls, in the same write
            commands.append(self._command([b"SCRIPT", b"LOAD", MERGE_LUA]))
            for w in versions:
                (key, version, revision), p = w.source
                merges.append((w, len(commands)))
                commands.append(self._command([b"EVALSHA", MERGE_SHA, b"1", f"{self.prefix}:versions:{key}",
                                               *p.args(field_name(version, revision))]))
        for w in batch:
            if w.kind in ("state", "versions"):
                continue
            key = self._encode(w.key)
            if w.kind == "baseline":
                commands.append(self._render("baseline", self._hash_prefix + key, w.fields))
                commands.append(self._sadd % (len(key), key))
            else:
                events.append((w, len(commands)))
                if w.kind == "first_seen":
                    commands.append(self._render("first_seen", key, self._fields(w.source)))
                else:
                    commands.append(self._render("event", None, self._fields(w.source)))
        with_script = any(w.kind == "first_seen" for w, _ in events)
        replies = self._send(commands, with_script)

        # NOSCRIPT despite the SCRIPT LOAD ahead of the batch: a SCRIPT FLUSH ran in between
        # (rare). Those first_seen events, and only those (the rest of the batch is written),
        # go again with EVAL, which needs no cached script; they land after the batch's other
        # events, which is better than writing those twice by retrying the whole batch.
        again = [(w, i) for w, i in events if isinstance(replies[i], redis.exceptions.NoScriptError)]
        if again:
            evals = [self._render("first_seen_eval", self._encode(w.key), self._fields(w.source))
                     for w, _ in again]
            for (_, i), reply in zip(again, self._send(evals, False)):
                replies[i] = reply

        # A summary merge is not idempotent: retrying the batch would add the merges that
        # succeeded again, and one that fails for good (a key of another type, a field
        # another writer left) would block every later write. So a failed merge is dropped,
        # logged and counted; the summaries are best effort (at least once, not exactly).
        failed = [i for _, i in merges if isinstance(replies[i], redis.ResponseError)]
        for i in failed:
            log.warning("version summary not written (%s); dropped", replies[i])
            replies[i] = None
        self.summaries_dropped += len(failed)

        # Like the pipeline's execute(): an error reply raises (all replies were read, so the
        # connection is in sync) and nothing counts as written; _run retries the batch.
        for i, reply in enumerate(replies):
            if isinstance(reply, redis.ResponseError):
                reply.args = (f"command #{i + 1} of {len(replies)} in the batch failed: "
                              f"{reply.args[0] if reply.args else ''}",) + reply.args[1:]
                raise reply
        for w, i in events:
            if replies[i]:  # a stream id; nil from the script when the key was already known
                self.on_event_written(w.event_type)

    def _command(self, args: list) -> bytes:
        """One command in RESP, every argument encoded as redis-py would."""
        parts = [self._encode(a) for a in args]
        return b"".join([b"*%d\r\n" % len(parts)] + [b"$%d\r\n%b\r\n" % (len(a), a) for a in parts])

    def _fields(self, event: Event) -> dict[str, str]:
        owners = self.owners(event.location.file) if self.owners else ""
        return event.fields(owners)

    def _render(self, kind: str, key: bytes | None, fields: dict) -> bytes:
        """One command in RESP: the kind's constant arguments, ``key`` if given, the fields."""
        names = tuple(fields)
        template = self._templates.get((kind, names))
        if template is None:
            template = self._template(kind, names)
        args: list = [] if key is None else [len(key), key]
        encoding, errors = self._encoding, self._errors
        for v in fields.values():
            b = v.encode(encoding, errors) if v.__class__ is str else self._encode(v)
            args += (len(b), b)
        return template % tuple(args)

    def _template(self, kind: str, names: tuple) -> bytes:
        maxlen = str(self.maxlen).encode()
        events, keys = self._encode(self.events_key), self._encode(self.keys_key)
        head: list[bytes | None] = {
            "baseline": [b"HSET", None],
            "event": [b"XADD", events, b"MAXLEN", b"~", maxlen, b"*"],
            "first_seen": [b"EVALSHA", self._sha.encode(), b"2", keys, events, None, maxlen],
            "first_seen_eval": [b"EVAL", _FIRST_SEEN_LUA.encode(), b"2", keys, events, None, maxlen],
        }[kind]
        for name in names:
            head += [self._encode(name), None]
        if len(self._templates) >= 64:  # field names come from a few fixed sets; stay bounded
            self._templates.clear()
        template = self._templates[(kind, names)] = _template(head)
        return template

    def _encode(self, value) -> bytes:
        """An argument as redis-py's encoder would send it."""
        if isinstance(value, str):
            return value.encode(self._encoding, self._errors)
        if isinstance(value, (bytes, memoryview)):
            return bytes(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return repr(value).encode()
        raise redis.DataError(f"invalid value for a Redis argument: {type(value).__name__}")

    def _send(self, commands: list[bytes], with_script: bool) -> list:
        """Send the commands in one write on a pooled connection; their replies, in order.

        An error reply is returned as its ResponseError, not raised, so every reply is read.
        Connection failures are retried as the client's pipeline would (its Retry object);
        then they raise, with the connection disconnected, a redis.RedisError for _run.
        """
        payload = [b"".join([self._script_load, *commands] if with_script else commands)]
        count = len(commands) + with_script

        def exchange() -> list:
            conn.send_packed_command(payload)
            replies = []
            for _ in range(count):
                try:
                    # (not decoded: only an error or a reply's truth is looked at)
                    replies.append(conn.read_response(disable_decoding=True))
                except redis.ResponseError as e:
                    replies.append(e)
            return replies

        pool = self.r.connection_pool
        conn = pool.get_connection()
        try:
            replies = conn.retry.call_with_retry(exchange, lambda error: conn.disconnect())
        except redis.RedisError:
            conn.disconnect()
            raise
        except Exception as e:  # anything else leaves the connection in an unknown state too
            conn.disconnect()
            raise redis.ConnectionError(f"Redis write failed: {e!r}") from e
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        if with_script:
            if isinstance(replies[0], redis.ResponseError):
                raise replies[0]
            del replies[0]
        return replies
