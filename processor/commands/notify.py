"""``backflow notify --webhook URL``: post each event to a chat webhook (Slack-compatible).

Every event becomes one message, ``{"text": ..., "blocks": [...]}`` as Slack's incoming
webhooks take it (Mattermost, Rocket.Chat and Teams' Slack-compatible endpoints read
``text``). Delivery is at least once: an event is acknowledged in the consumer group only
after the webhook answered 2xx, so one lost to a crash or to a webhook that kept failing is
posted again when notify restarts; the message carries the event's id for receivers that
deduplicate. 429 and 5xx answers and connection errors are retried with exponential
backoff (1 s doubling to 60 s), after ``Retry-After`` seconds when the answer gives them;
other answers (a wrong URL's 404, say) are not retried. When an event cannot be posted,
notify exits with status 1 and the event stays pending, to be tried again by the next run;
once the group has delivered it ``--max-attempts`` times it goes to the dead-letter stream
``{prefix}:events:dead`` (its fields, plus why, its entry id and the attempts), is
acknowledged, and notify goes on. A token bucket keeps the pace under
``--rate-per-minute`` (Slack takes about one message per second per webhook).
"""

from __future__ import annotations

import argparse
import email.utils
import json
import logging
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Callable
from urllib.parse import urlsplit

import redis

from processor.commands import common
from processor.config import ConfigError
from processor.commands.consume import GroupReader

log = logging.getLogger("backflow.notify")

_MAX_BACKOFF = 60.0
_MAX_RETRY_AFTER = 300.0
_ICONS = {"critical": ":rotating_light:", "warning": ":warning:", "info": ":information_source:"}


class NotDelivered(Exception):
    """The webhook did not take a message (after the retries, or for good)."""


class Stopped(Exception):
    """SIGTERM or SIGINT arrived while waiting: the event is left pending."""


class TokenBucket:
    """At most ``burst`` messages at once, refilled at ``per_minute`` a minute.

    >>> now = [0.0]
    >>> bucket = TokenBucket(per_minute=60, burst=2, clock=lambda: now[0])
    >>> bucket.take(), bucket.take(), bucket.take()
    (0.0, 0.0, 1.0)
    >>> now[0] = 0.5; bucket.take()   # the token of second 1 is promised already
    1.5
    """

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.clock = clock
        self.tokens = float(burst)
        self.last = clock()

    def take(self) -> float:
        """Take a token; how long to wait before using it (0 when one was there)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date.

    >>> retry_after("3"), retry_after(None), retry_after("soon")
    (3.0, None, None)
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Webhook:
    def __init__(self, url: str, timeout: float, retries: int, stop: threading.Event):
        self.url, self.timeout, self.retries, self.stop = url, timeout, retries, stop

    def post(self, payload: dict) -> None:
        body = json.dumps(payload).encode()
        backoff = 1.0
        for attempt in range(self.retries + 1):
            wait, problem = self._attempt(body)
            if problem is None:
                return
            if wait is None or attempt == self.retries:
                raise NotDelivered(problem if wait is None else f"{problem}; gave up after {attempt + 1} attempts")
            delay = min(wait if wait > 0 else backoff, _MAX_RETRY_AFTER)
            log.warning("webhook: %s; trying again in %.1f s", problem, delay)
            if self.stop.wait(delay):
                raise Stopped()
            backoff = min(backoff * 2, _MAX_BACKOFF)

    def _attempt(self, body: bytes) -> tuple[float | None, str | None]:
        """(None, None) when taken; else (seconds to wait or 0 for the backoff, or None
        when retrying cannot help; what went wrong)."""
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                answer.read()
            return None, None
        except urllib.error.HTTPError as e:
            problem = f"HTTP {e.code} from {shown_url(self.url)}"
            if e.code == 429 or e.code >= 500:
                return retry_after(e.headers.get("Retry-After")) or 0.0, problem
            return None, problem
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            return 0.0, f"cannot reach {shown_url(self.url)}: {reason}"


def shown_url(url: str) -> str:
    """Scheme and host only: a webhook URL's path is its secret (Slack's are)."""
    u = urlsplit(url)
    return f"{u.scheme}://{u.netloc.rpartition('@')[2]}/..."


_SECTION_MAX = 3000  # Block Kit: a section's text is at most 3,000 characters


def _escape(text: str) -> str:
    """Slack's mrkdwn reserves &, < and >."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def message(fields: dict[str, str]) -> dict:
    """The Slack-compatible message of one event.

    >>> m = message({"id": "e1", "type": "dormant", "severity": "info", "service.name": "shop",
    ...              "code.function.name": "shop.f", "summary": "shop.f is no longer called"})
    >>> m["text"]
    '[info] dormant shop shop.f is no longer called'
    """
    severity, type_ = fields.get("severity", ""), fields.get("type", "")
    summary, owners = fields.get("summary", ""), fields.get("owners", "")
    text = f"[{severity}] {type_} {common.what_happened(fields)}"
    if owners:
        text += f" (owners {owners})"
    context = [f"*where* `{_escape(common.where(fields) or '-')}`",
               f"*window end* {common.event_time(fields)}", f"*event* `{_escape(fields.get('id', ''))}`"]
    if owners:
        context.insert(1, f"*owners* {_escape(owners)}")
    section = (f"{_ICONS.get(severity, '')} *{_escape(type_)}* in *{_escape(common.service_at_version(fields))}*"
               f"\n{_escape(summary)}")
    if len(section) > _SECTION_MAX:  # Slack refuses the whole message (400) beyond it
        section = section[:_SECTION_MAX - 1] + "\u2026"
    blocks = [
        {"type": "section", "text": {"type": "mrkdwn", "text": section}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": c} for c in context]},
    ]
    return {"text": _escape(text), "blocks": blocks}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("notify", help="post each event to a chat webhook (Slack-compatible)",
                       description="Post every event of {prefix}:events to a Slack-compatible webhook, "
                                   "through a consumer group: acknowledged only once posted.")
    p.add_argument("--webhook", metavar="URL", default=None,
                   help="incoming-webhook URL, http:// or https:// (env BACKFLOW_NOTIFY_WEBHOOK, "
                        "better than the flag: the URL is a secret)")
    p.add_argument("--rate-per-minute", type=float, default=20.0, metavar="N",
                   help="most messages a minute, on average (default 20)")
    p.add_argument("--burst", type=int, default=5, metavar="N",
                   help="messages that may go at once before the rate applies (default 5)")
    p.add_argument("--retries", type=int, default=6, metavar="N",
                   help="retries of a message after 429, 5xx or a connection error (default 6)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="seconds to wait for the webhook's answer (default 10)")
    p.add_argument("--max-attempts", type=int, default=5, metavar="N",
                   help="runs that may fail to post an event before it goes to the dead-letter stream "
                        "{prefix}:events:dead and notify goes on (default 5)")
    common.add_redis_arguments(p)
    common.add_filter_arguments(p, "post")
    common.add_group_arguments(p, "backflow-notify")
    p.add_argument("--no-follow", dest="follow", action="store_false",
                   help="post what is waiting, then exit")
    p.set_defaults(run=run)
    return p


def _settings(args: argparse.Namespace) -> str:
    url = args.webhook or os.environ.get("BACKFLOW_NOTIFY_WEBHOOK")
    where = "--webhook" if args.webhook else "BACKFLOW_NOTIFY_WEBHOOK"
    if not url:
        raise ConfigError("invalid setting webhook: give --webhook URL or BACKFLOW_NOTIFY_WEBHOOK")
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ConfigError(f"invalid setting webhook ({where}): expected an http:// or https:// URL "
                          f"with a host, got {u.scheme or 'no'} scheme")
    for name, value, low in (("rate_per_minute", args.rate_per_minute, 0), ("timeout", args.timeout, 0)):
        if not value > low or value != value:
            raise ConfigError(f"invalid setting {name} (--{name.replace('_', '-')}): must be > 0, got {value}")
    if args.burst < 1:
        raise ConfigError(f"invalid setting burst (--burst): must be >= 1, got {args.burst}")
    if args.retries < 0:
        raise ConfigError(f"invalid setting retries (--retries): must be >= 0, got {args.retries}")
    if args.max_attempts < 1:
        raise ConfigError(f"invalid setting max_attempts (--max-attempts): must be >= 1, got {args.max_attempts}")
    return url


def run(args: argparse.Namespace) -> int:
    url = _settings(args)
    redis_url, prefix = common.redis_settings(args)
    event_filter = common.event_filter(args)
    stop = common.stop_on_signals()
    webhook = Webhook(url, args.timeout, args.retries, stop)
    bucket = TokenBucket(args.rate_per_minute, args.burst)

    def post(entry_id: str, fields: dict[str, str]) -> None:
        if stop.wait(bucket.take()):
            raise Stopped()
        try:
            webhook.post(message(fields))
        except NotDelivered as e:
            attempts = reader.times_delivered(entry_id)
            if attempts < args.max_attempts:
                raise
            # Given up on: kept where an operator can find it, and the stream goes on.
            reader.client.xadd(dead, {**fields, "dead.reason": str(e), "dead.entry_id": entry_id,
                                      "dead.attempts": str(attempts)}, maxlen=10_000, approximate=True)
            print(f"dead-lettered after {attempts} attempts ({e}): {common.format_event(fields)}",
                  file=sys.stderr, flush=True)
            return
        print(f"posted: {common.format_event(fields)}", flush=True)

    dead = f"{prefix}:events:dead"
    reader = GroupReader(common.connect(redis_url), f"{prefix}:events", **common.group_options(args))
    try:
        reader.run(post, stop, follow=args.follow, event_filter=event_filter)
    except Stopped:
        return 0
    except NotDelivered as e:
        print(f"backflow notify: could not post an event ({e}); it stays pending and is posted "
              "when notify runs again", file=sys.stderr)
        return 1
    except redis.RedisError as e:
        print(f"backflow notify: {e}", file=sys.stderr)
        return 1
    return 0
