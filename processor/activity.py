"""What ``serve`` says while it works, at info: so that its log shows it is alive and why.

- every event in one line (at most ``EVENT_LINES`` a second; the rest counted in one line);
- when a service's first code location leaves its warm-up: regressions can come from then on;
- a summary every ``interval`` seconds: spans accepted and processed, windows closed,
  locations held, events by type since the last summary (an aggregate replica: the data
  points it sent on instead);
- refused and late spans as warnings with their reasons, at most one of each per interval.

The figures come from the process's Prometheus counters, so that the log and ``/metrics``
never disagree (with ``--workers`` the receiver processes' counts are relayed into them).
"""

from __future__ import annotations

import logging
import time
from collections import Counter

log = logging.getLogger("backflow.activity")

EVENT_LINES = 20  # event lines a second; beyond, one line counts the rest


def _by_label(metric, label: str | None = None) -> Counter:
    """A counter's totals, by one label's value ("" for all)."""
    out: Counter = Counter()
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                out[sample.labels.get(label, "") if label else ""] += sample.value
    return out


class Activity:
    """Called by the pipeline thread: ``event`` for each event, ``detection_started`` when
    a service leaves its warm-up, ``tick`` about once a second.

    >>> from prometheus_client import CollectorRegistry
    >>> from processor.sinks.prometheus import Metrics
    >>> m = Metrics(CollectorRegistry())
    >>> a = Activity(m, interval=60.0, clock=lambda: 0.0)
    >>> m.late.inc(5)
    >>> a.tick(1.0)  # the first late spans are said at once (a warning), then once a minute
    >>> int(a.late_said)
    5
    """

    def __init__(self, metrics, interval: float = 60.0, lateness_s: float = 10.0, clock=time.monotonic,
                 role: str = "both"):
        self.metrics, self.interval, self.lateness_s, self.role = metrics, interval, lateness_s, role
        now = clock()
        self._next_summary = now + interval
        self._second, self._lines, self._held = int(now), 0, Counter()
        self._last = self._totals()
        self._refused_at = self._late_at = -float("inf")
        self._refused_said = _by_label(metrics.refused, "reason")
        self.late_said = _by_label(metrics.late)[""]

    def _totals(self) -> dict:
        m = self.metrics
        return {"accepted": _by_label(m.accepted)[""], "processed": _by_label(m.processed)[""],
                "windows": _by_label(m.windows)[""], "events": _by_label(m.events, "type"),
                "sent": _by_label(m.forward_points, "outcome")["sent"] if self.role == "aggregate" else 0}

    def event(self, e, now: float) -> None:
        self._new_second(now)
        if self._lines >= EVENT_LINES:
            self._held[e.type] += 1
            return
        self._lines += 1
        v = e.version
        where = f"{e.location.service}@{v[1]}" if v[1] else e.location.service
        log.info("event %s %s %s: %s (id %s)", e.type, e.severity, where, e.summary, e.id)

    def _new_second(self, now: float) -> None:
        """A new second: the events held back in the last one are counted in a line."""
        if int(now) != self._second:
            self._flush_held()
            self._second, self._lines = int(now), 0

    def _flush_held(self) -> None:
        if self._held:
            log.info("and %d more events that second (%s)", sum(self._held.values()),
                     ", ".join(f"{n} {t}" for t, n in self._held.most_common()))
            self._held.clear()

    def detection_started(self, environment: str, service: str, warmup_windows: int) -> None:
        log.info("service %s%s: past its warm-up; regressions of its code locations can be reported "
                 "from now on (a location first seen later is watched for its own %d windows first)",
                 service, f" ({environment})" if environment else "", warmup_windows)

    def tick(self, now: float) -> None:
        self._new_second(now)
        self._warn_refused(now)
        self._warn_late(now)
        if now >= self._next_summary:
            self._next_summary = now + self.interval
            self._summary()

    def _summary(self) -> None:
        totals = self._totals()
        last, self._last = self._last, totals
        events = totals["events"] - last["events"]
        head = (f"last {self.interval:g}s: {totals['accepted'] - last['accepted']:.0f} spans accepted, "
                f"{totals['processed'] - last['processed']:.0f} processed, {totals['windows'] - last['windows']:.0f} "
                f"windows closed, {self.metrics.active_keys._value.get():.0f} code locations held")
        if self.role == "aggregate":  # (it detects nothing: what it sent on instead)
            log.info("%s, %d data points of partials taken by the detect replicas, %d requests wait", head,
                     totals["sent"] - last["sent"], self.metrics.forward_pending._value.get())
            return
        log.info("%s, events: %s", head, ", ".join(f"{n:.0f} {t}" for t, n in sorted(events.items()) if n) or "none")

    def _warn_refused(self, now: float) -> None:
        if now - self._refused_at < self.interval:
            return
        refused = _by_label(self.metrics.refused, "reason")
        new = refused - self._refused_said
        if new:
            self._refused_at, self._refused_said = now, refused
            log.warning("refused %d spans since the last such line: %s (backflow_receiver_refused_spans_total)",
                        sum(new.values()), ", ".join(f"{n:.0f} {why}" for why, n in new.most_common()))

    def _warn_late(self, now: float) -> None:
        if now - self._late_at < self.interval:
            return
        late = _by_label(self.metrics.late)[""]
        if late > self.late_said:
            self._late_at = now
            tiers = ("; or, from aggregate replicas, their figures came after the replicas had reported past "
                     "the window: --replica-wait, --replica-timeout") if self.role == "detect" else ""
            log.warning("dropped %d late spans since the last such line: their windows had closed "
                        "(--allowed-lateness %g s after their service's newest span%s; backflow_late_spans_total)",
                        late - self.late_said, self.lateness_s, tiers)
            self.late_said = late
