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

Rollouts read as threads where the target has them: a rollout's first event (a ``rollout``
event, processor/detect/rollout.py) starts a thread, and its later milestones and the
events of its version while it is active are replies in it, so that a channel reads one
thread per rollout rather than a message per location-event. Slack's Web API
(``--slack-token``, ``--slack-channel``: ``chat.postMessage`` answers the message's ``ts``,
replies name it as ``thread_ts``) and Google Chat webhooks (``threadKey``) have threads;
a Slack-compatible incoming webhook has none, and gets every event as its own message.
The threads notify started are kept in ``{prefix}:notify:threads:{group}``, so a restart
goes on replying in them.
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
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

from processor.sinks.connect import REDIS_ERRORS
from processor.commands import common
from processor.config import ConfigError
from processor.commands.consume import GroupReader
from processor.report import trend

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
    """A Slack-compatible incoming webhook: one message per event, no threads."""

    threads = False

    def __init__(self, url: str, timeout: float, retries: int, stop: threading.Event):
        self.url, self.timeout, self.retries, self.stop = url, timeout, retries, stop
        self.headers = {"Content-Type": "application/json"}

    def send(self, fields: dict[str, str], thread: str | None = None, root: str | None = None,
             trends: dict | None = None) -> str | None:
        """Post an event's message, as a reply in ``thread`` if given, or as the first
        message of a new thread named ``root``, with the trends of a rollout's locations
        (key -> ``trend.read``); the thread of what was posted, if any."""
        self.post(message(fields, trends))
        return None

    def post(self, payload: dict, url: str | None = None) -> bytes:
        """The answer's body once taken; NotDelivered after the retries (or at once when
        retrying cannot help), Stopped when asked to stop while waiting."""
        body = json.dumps(payload).encode()
        backoff = 1.0
        for attempt in range(self.retries + 1):
            wait, problem, answer = self._attempt(body, url or self.url)
            if problem is None:
                return answer
            if wait is None or attempt == self.retries:
                raise NotDelivered(problem if wait is None else f"{problem}; gave up after {attempt + 1} attempts")
            delay = min(wait if wait > 0 else backoff, _MAX_RETRY_AFTER)
            log.warning("webhook: %s; trying again in %.1f s", problem, delay)
            if self.stop.wait(delay):
                raise Stopped()
            backoff = min(backoff * 2, _MAX_BACKOFF)
        raise AssertionError("unreachable")

    def _attempt(self, body: bytes, url: str) -> tuple[float | None, str | None, bytes]:
        """(None, None, the answer) when taken; else (seconds to wait or 0 for the backoff,
        or None when retrying cannot help; what went wrong; b"")."""
        request = urllib.request.Request(url, data=body, method="POST", headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                return None, None, answer.read()
        except urllib.error.HTTPError as e:
            problem = f"HTTP {e.code} from {shown_url(url)}"
            if e.code == 429 or e.code >= 500:
                return retry_after(e.headers.get("Retry-After")) or 0.0, problem, b""
            return None, problem, b""
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            return 0.0, f"cannot reach {shown_url(url)}: {reason}", b""


class SlackApi(Webhook):
    """Slack's Web API, ``chat.postMessage`` with a bot token: threads by ``thread_ts``."""

    threads = True

    def __init__(self, api_url: str, token: str, channel: str, timeout: float, retries: int, stop: threading.Event):
        super().__init__(api_url.rstrip("/") + "/chat.postMessage", timeout, retries, stop)
        self.channel = channel
        self.headers = {"Content-Type": "application/json; charset=utf-8", "Authorization": f"Bearer {token}"}

    def send(self, fields: dict[str, str], thread: str | None = None, root: str | None = None,
             trends: dict | None = None) -> str | None:
        payload = {**message(fields, trends), "channel": self.channel, "unfurl_links": False}
        if thread:
            payload["thread_ts"] = thread
        try:
            answer = json.loads(self.post(payload) or b"{}")
        except ValueError:
            raise NotDelivered(f"{shown_url(self.url)} did not answer JSON") from None
        if not answer.get("ok"):  # (Slack answers 200 with ok false: a bad token, channel...)
            raise NotDelivered(f"Slack refused the message: {answer.get('error', 'no reason given')}")
        return thread or answer.get("ts")


class GoogleChat(Webhook):
    """A Google Chat space's incoming webhook: threads by ``threadKey``, named by notify."""

    threads = True

    def send(self, fields: dict[str, str], thread: str | None = None, root: str | None = None,
             trends: dict | None = None) -> str | None:
        key = thread or root
        payload: dict = {"text": chat_text(fields, trends)}
        url = self.url
        if key:
            payload["thread"] = {"threadKey": key}
            url += ("&" if "?" in url else "?") + "messageReplyOption=REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD"
        self.post(payload, url)
        return key


def chat_text(fields: dict[str, str], trends: dict | None = None) -> str:
    """An event as Google Chat's text (``*bold*``, no blocks): the line, then a rollout's
    reasons and figures, or the event's place.

    >>> chat_text({"type": "dormant", "severity": "info", "service.name": "shop",
    ...            "code.function.name": "shop.f", "summary": "shop.f is no longer called", "id": "e1"})
    '*dormant* in *shop*: shop.f is no longer called\\nwhere `shop.f` · event `e1`'
    """
    head = (f"*{fields.get('type', '')}* in *{common.service_at_version(fields)}*: "
            f"{fields.get('summary', '')}")
    lines = rollout_lines(fields, trends=trends) if fields.get("type") == "rollout" else [
        f"where `{common.where(fields) or '-'}` · event `{fields.get('id', '')}`"]
    return "\n".join([head] + lines)


def shown_url(url: str) -> str:
    """Scheme and host only: a webhook URL's path is its secret (Slack's are)."""
    u = urlsplit(url)
    return f"{u.scheme}://{u.netloc.rpartition('@')[2]}/..."


_SECTION_MAX = 3000  # Block Kit: a section's text is at most 3,000 characters


def _escape(text: str) -> str:
    """Slack's mrkdwn reserves &, < and >."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def rollout_lines(fields: dict[str, str], most: int = 5, trends: dict | None = None) -> list[str]:
    """A rollout event's reasons (or what it misses) and its busiest locations, before and
    after, as lines of text; with ``trends`` (key -> ``trend.read``), each location's trend
    of p50 over its latest buckets too.

    >>> d = {"verdict": "fail", "reasons": ["p50 of shop.f 2x"], "missing": [],
    ...      "locations": [{"function": "shop.f", "calls": {"new": 10, "previous": 90},
    ...                     "p50_ms": {"new": 8.0, "previous": 4.0}, "p99_ms": {"new": 9.0, "previous": 5.0},
    ...                     "error_share": {"new": 0.0, "previous": 0.0}}], "entry_points": []}
    >>> rollout_lines({"detail": json.dumps(d)})
    ['- p50 of shop.f 2x', '`shop.f` p50 4 → 8 ms, p99 5 → 9 ms, errors 0.0% → 0.0% (90 → 10 calls)']
    """
    try:
        d = json.loads(fields.get("detail") or "{}")
    except ValueError:
        return []
    lines = [f"- {r}" for r in (d.get("reasons") or [])[:most]]
    lines += [f"- needs {m}" for m in d.get("missing") or []]
    for row in ((d.get("entry_points") or []) + (d.get("locations") or []))[:most]:
        def pair(name, unit="ms", pct=False):
            a, b = (row.get(name) or {}).get("previous"), (row.get(name) or {}).get("new")
            if a is None or b is None:
                return None
            return f"{a:.1%} → {b:.1%}" if pct else f"{a:.3g} → {b:.3g} {unit}"
        parts = [f"{q} {v}" for q, v in (("p50", pair("p50_ms")), ("p99", pair("p99_ms")),
                                        ("errors", pair("error_share", pct=True))) if v]
        calls = row.get("calls") or {}
        lines.append(f"`{row.get('function', '')}` " + ", ".join(parts)
                     + f" ({calls.get('previous', 0):,} → {calls.get('new', 0):,} calls)")
        shown = trend.summary((trends or {}).get(row.get("key"), {}), TREND_WIDTH)
        if shown:
            lines.append(f"    trend {shown}")
    return lines


def message(fields: dict[str, str], trends: dict | None = None) -> dict:
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
    if type_ == "rollout":  # its reasons and figures, before the context
        shown = _escape("\n".join(rollout_lines(fields, trends=trends)))
        if shown:
            blocks.insert(1, {"type": "section", "text": {"type": "mrkdwn", "text": shown[:_SECTION_MAX]}})
    return {"text": _escape(text), "blocks": blocks}


TREND_WIDTH = 24  # buckets of a location's trend in a rollout's message (a day of hours by default)


def rollout_trends(client: redis.Redis, prefix: str, fields: dict[str, str]) -> dict:
    """The trends of the locations a rollout event shows (key -> ``trend.read``)."""
    try:
        d = json.loads(fields.get("detail") or "{}")
    except ValueError:
        return {}
    keys = [row["key"] for row in (d.get("entry_points") or []) + (d.get("locations") or []) if row.get("key")]
    try:
        return trend.read_many(client, prefix, keys) if keys else {}
    except (ValueError, TypeError) as e:  # (a trend that does not parse: the message goes without it)
        log.warning("trends of a rollout not shown: %s", e)
        return {}


class Threads:
    """The rollouts notify has started threads for: rollout -> its thread (a Slack ``ts``,
    a Google Chat ``threadKey``) and whether it is still active, in a Redis hash so that a
    restart goes on where it stood. A rollout is named by environment, service, version and
    revision; the events of that version in that service go to its thread while it is active.
    """

    ENDED = ("previous_gone", "rolled_back", "superseded")

    def __init__(self, client: redis.Redis, key: str):
        self.client, self.key = client, key

    @staticmethod
    def rollout_of(fields: dict[str, str]) -> str:
        return json.dumps([fields.get(k, "") for k in ("deployment.environment.name", "service.name",
                                                         "service.version", "vcs.ref.head.revision")])

    def thread_of(self, fields: dict[str, str]) -> str | None:
        """The thread an event goes to: its rollout's, while that is active (a rollout's
        own events: while it is known at all)."""
        raw = self.client.hget(self.key, self.rollout_of(fields))
        try:
            state = json.loads(raw) if raw is not None else None
            return state["thread"] if state["active"] or fields.get("type") == "rollout" else None
        except (ValueError, TypeError, KeyError):  # (none, or not notify's: a new thread)
            return None

    def note(self, fields: dict[str, str], thread: str | None) -> None:
        """After a rollout event was posted: its thread, and whether the rollout goes on."""
        if thread is None or fields.get("type") != "rollout":
            return
        try:
            milestone = json.loads(fields.get("detail") or "{}").get("milestone", "")
        except ValueError:
            milestone = ""
        if milestone in self.ENDED:  # (over: a later rollout of the same version gets a thread of its own)
            self.client.hdel(self.key, self.rollout_of(fields))
        else:
            self.client.hset(self.key, self.rollout_of(fields), json.dumps({"thread": thread, "active": True}))


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("notify", help="post each event to a chat webhook (Slack-compatible)",
                       description="Post every event of {prefix}:events to a Slack-compatible webhook, "
                                   "through a consumer group: acknowledged only once posted.")
    p.add_argument("--webhook", metavar="URL", default=None,
                   help="incoming-webhook URL, http:// or https:// (env BACKFLOW_NOTIFY_WEBHOOK, "
                        "better than the flag: the URL is a secret)")
    p.add_argument("--format", choices=("slack", "google-chat"), default=None,
                   help="what the webhook takes: a Slack-compatible message (default) or Google Chat's, "
                        "with a thread per rollout (the default for chat.googleapis.com)")
    p.add_argument("--slack-channel", metavar="CHANNEL", default=None,
                   help="post with Slack's Web API (chat.postMessage) to this channel instead of a webhook, "
                        "a thread per rollout; the bot token from env BACKFLOW_NOTIFY_SLACK_TOKEN")
    p.add_argument("--slack-api", metavar="URL", default="https://slack.com/api",
                   help="Slack's Web API base URL (default https://slack.com/api)")
    p.add_argument("--no-threads", dest="threads", action="store_false",
                   help="one message per event even where the target has threads")
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
    if args.slack_channel is not None:
        if not os.environ.get("BACKFLOW_NOTIFY_SLACK_TOKEN"):
            raise ConfigError("invalid setting slack_channel (--slack-channel): give the bot token in "
                              "BACKFLOW_NOTIFY_SLACK_TOKEN")
        if not args.slack_channel.strip():
            raise ConfigError("invalid setting slack_channel (--slack-channel): empty")
        url, where = args.slack_api, "--slack-api"
    else:
        url = args.webhook or os.environ.get("BACKFLOW_NOTIFY_WEBHOOK")
        where = "--webhook" if args.webhook else "BACKFLOW_NOTIFY_WEBHOOK"
    if not url:
        raise ConfigError("invalid setting webhook: give --webhook URL or BACKFLOW_NOTIFY_WEBHOOK "
                          "(or --slack-channel)")
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        name = "slack_api" if where == "--slack-api" else "webhook"
        raise ConfigError(f"invalid setting {name} ({where}): expected an http:// or https:// URL with a host, "
                          f"got {u.scheme or 'no'} scheme")
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
    if args.slack_channel is not None:
        target: Webhook = SlackApi(url, os.environ["BACKFLOW_NOTIFY_SLACK_TOKEN"], args.slack_channel,
                                   args.timeout, args.retries, stop)
    elif args.format == "google-chat" or (args.format is None and urlsplit(url).hostname == "chat.googleapis.com"):
        target = GoogleChat(url, args.timeout, args.retries, stop)
    else:
        target = Webhook(url, args.timeout, args.retries, stop)
    bucket = TokenBucket(args.rate_per_minute, args.burst)
    group = common.group_options(args)
    threads = Threads(common.connect(redis_url), f"{prefix}:notify:threads:{group['group']}") \
        if target.threads and args.threads else None

    def post(entry_id: str, fields: dict[str, str]) -> None:
        if stop.wait(bucket.take()):
            raise Stopped()
        try:
            thread = threads.thread_of(fields) if threads is not None else None
            root = None
            if threads is not None and thread is None and fields.get("type") == "rollout":
                root = "backflow-rollout-" + hashlib.blake2b(Threads.rollout_of(fields).encode(),
                                                             digest_size=8).hexdigest()
            trends = rollout_trends(reader.client, prefix, fields) if fields.get("type") == "rollout" else None
            posted = target.send(fields, thread, root, trends)
            if threads is not None:
                threads.note(fields, posted)
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
    reader = GroupReader(common.connect(redis_url), f"{prefix}:events", **group)
    try:
        reader.run(post, stop, follow=args.follow, event_filter=event_filter)
    except Stopped:
        return 0
    except NotDelivered as e:
        print(f"backflow notify: could not post an event ({e}); it stays pending and is posted "
              "when notify runs again", file=sys.stderr)
        return 1
    except REDIS_ERRORS as e:
        print(f"backflow notify: {e}", file=sys.stderr)
        return 1
    return 0
