"""Reading ``{prefix}:events`` through a Redis consumer group, for ``tail`` and ``notify``.

A group keeps its own cursor in Redis, so a consumer that stops and starts again goes on
where the group stood. An entry is acknowledged (XACK) only once it was handled (shown,
posted) or filtered out; one that was delivered but not acknowledged (the consumer
crashed, or a webhook kept failing) stays in the group's pending list and is delivered
again first when a consumer of the same name starts. Consumer names default to the host
name so that a restarted consumer finds its own pending entries.

Entries trimmed from the stream while pending (``MAXLEN ~``) come back without fields;
they are acknowledged and skipped.

A consumer that never comes back (a pod restarted under a new name) leaves its pending
entries behind: every ``claim_interval_s`` a consumer claims the group's entries that were
idle for ``claim_idle_ms`` (XAUTOCLAIM) and handles them as its own.
"""

from __future__ import annotations

import fnmatch
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import redis

from processor.sinks.connect import TRANSIENT

log = logging.getLogger("backflow.consume")

Entry = tuple[str, dict[str, str]]  # (stream id, fields)


@dataclass(frozen=True)
class EventFilter:
    """Which events a consumer handles; an empty criterion lets everything through.

    >>> f = EventFilter(services=("shop",), paths=("shop/payments/*",), owner="@acme/payments")
    >>> f.matches({"service.name": "shop", "code.file.path": "shop/payments/charge.py",
    ...            "owners": "@acme/payments @alice", "type": "dormant"})
    True
    >>> f.matches({"service.name": "shop", "code.file.path": "shop/cart.py", "owners": ""})
    False
    """
    services: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()   # shell-style globs on code.file.path (* also crosses /)
    owner: str | None = None      # one owner, matched (case-insensitively) against owners

    def matches(self, fields: dict[str, str]) -> bool:
        if self.services and fields.get("service.name", "") not in self.services:
            return False
        if self.types and fields.get("type", "") not in self.types:
            return False
        if self.paths and not any(fnmatch.fnmatchcase(fields.get("code.file.path", ""), p)
                                  for p in self.paths):
            return False
        if self.owner is not None:
            owners = fields.get("owners", "").lower().split()
            if self.owner.lower() not in owners:
                return False
        return True


def default_consumer() -> str:
    return socket.gethostname() or "backflow"


@dataclass
class GroupReader:
    """One consumer of one consumer group on the events stream.

    ``start`` is where a new group begins: ``$`` (events that arrive from now on) or ``0``
    (the whole stream). An existing group keeps its own position.
    """
    client: redis.Redis
    stream: str
    group: str
    consumer: str = field(default_factory=default_consumer)
    start: str = "$"
    batch: int = 100
    claim_idle_ms: int = 300_000   # another consumer's entry pending this long is taken over
    claim_interval_s: float = 30.0
    _claimed_at: float = field(default=0.0, init=False)
    _pending: bool = field(default=True, init=False)  # still reading our own pending entries
    _ready: bool = field(default=False, init=False)

    def setup(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id=self.start, mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):  # the group exists: keep its position
                raise
        self._ready = True

    def read(self, block_ms: int | None) -> list[Entry]:
        """The next entries: this consumer's pending ones first, then new ones (waiting up to
        ``block_ms`` for them; None returns at once)."""
        if not self._ready:
            self.setup()
        try:
            if self._pending:
                entries = self._xreadgroup("0", None)
                if entries:
                    return entries
                self._pending = False
            now = time.monotonic()
            if self.claim_idle_ms > 0 and now - self._claimed_at >= self.claim_interval_s:
                self._claimed_at = now
                entries = self._claim()
                if entries:
                    return entries
            return self._xreadgroup(">", block_ms)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            # the stream or the group was deleted under us: make it again, from the start
            log.warning("consumer group %s on %s was gone; created it again", self.group, self.stream)
            self.start, self._ready, self._pending = "0", False, True
            return []

    def _xreadgroup(self, from_id: str, block_ms: int | None) -> list[Entry]:
        reply = self.client.xreadgroup(self.group, self.consumer, {self.stream: from_id},
                                       count=self.batch, block=block_ms)
        if not reply:
            return []
        # RESP2 gives [[stream, entries]], RESP3 {stream: [entries]}
        entries = next(iter(reply.values()))[0] if isinstance(reply, dict) else reply[0][1]
        return [(_text(i), {_text(k): _text(v) for k, v in (f or {}).items()}) for i, f in entries]

    def _claim(self) -> list[Entry]:
        """The group's entries pending for ``claim_idle_ms`` with any consumer, now ours."""
        out: list[Entry] = []
        start = "0-0"
        while True:
            reply = self.client.xautoclaim(self.stream, self.group, self.consumer, self.claim_idle_ms,
                                           start_id=start, count=self.batch)
            start, entries = _text(reply[0]), reply[1]
            out += [(_text(i), {_text(k): _text(v) for k, v in (f or {}).items()}) for i, f in entries]
            if start == "0-0" or len(out) >= self.batch:
                break
        if out:
            log.warning("claimed %d events left pending by other consumers of group %s", len(out), self.group)
        return out

    def times_delivered(self, entry_id: str) -> int:
        """How often the group delivered the entry (to any consumer), this time included."""
        rows = self.client.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
        return int(rows[0]["times_delivered"]) if rows else 0

    def ack(self, entry_id: str) -> None:
        self.client.xack(self.stream, self.group, entry_id)

    def pending_count(self) -> int:
        return int(self.client.xpending(self.stream, self.group)["pending"])

    def run(self, handle: Callable[[str, dict[str, str]], None], stop: threading.Event,
            follow: bool = True, limit: int | None = None, event_filter: EventFilter | None = None,
            block_ms: int = 1000) -> int:
        """Hand matching events to ``handle`` and acknowledge each once it returned (an
        exception from it propagates and leaves the entry pending). Returns how many were
        handled: after ``limit`` of them, when ``stop`` is set, or, without ``follow``, once
        nothing is waiting. Redis being away is waited out, with a warning, when following."""
        handled = 0
        backoff = 0.5
        while not stop.is_set():
            try:
                entries = self.read(block_ms if follow else None)
                backoff = 0.5
            except TRANSIENT as e:
                if not follow:
                    raise  # a one-off read: say so rather than wait
                log.warning("Redis unreachable (%s); retrying in %.1f s", e, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if not entries:
                if not follow and not self._pending:
                    return handled
                continue
            for entry_id, fields in entries:
                if fields and (event_filter is None or event_filter.matches(fields)):
                    handle(entry_id, fields)
                    handled += 1
                self.ack(entry_id)
                if limit is not None and handled >= limit:
                    return handled
                if stop.is_set():
                    break
        return handled


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

