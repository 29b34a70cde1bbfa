"""``backflow notify``: each event posted to a webhook (a local HTTP server in this process),
with retries, Retry-After, a rate limit, and acknowledgement only after success."""

import http.server
import json
import threading
import time

import pytest

from processor.commands.consume import GroupReader
from tests.commands import add_events, backflow_command, event_fields

EVENTS = [
    event_fields("latency_regression", "shop.cart.apply_discount", "shop/cart.py", "6",
                 summary="p50 of shop.cart.apply_discount rose 2.2x <fast> & slow", owners="@acme/cart"),
    event_fields("new_exception", "shop.payments.charge", "shop/payments/charge.py", "1",
                 severity="critical", owners="@acme/payments"),
    event_fields("dormant", "shop.payments.fraud.score", "shop/payments/fraud.py", "1",
                 owners="@acme/payments @acme/risk"),
]


class Webhook:
    """A chat webhook that records every post and answers from a script of statuses
    (200 once the script is used up). ``slack_api``: it answers as Slack's chat.postMessage
    does, with the message's ``ts`` (the posts' count)."""

    def __init__(self, script=(), slack_api: bool = False):
        self.posts: list[tuple[float, dict]] = []
        self.paths: list[str] = []
        self.auth: list[str] = []
        self.script = list(script)  # (status, headers)
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.posts.append((time.monotonic(), json.loads(body)))
                hook.paths.append(self.path)
                hook.auth.append(self.headers.get("Authorization", ""))
                status, headers = hook.script.pop(0) if hook.script else (200, {})
                answer = json.dumps({"ok": True, "ts": f"{len(hook.posts)}.000100"}).encode() if slack_api else b"ok"
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/services/T000/B000/secret"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def texts(self):
        return [p["text"] for _, p in self.posts]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hooks = []

    def make(script=(), slack_api=False):
        hooks.append(Webhook(script, slack_api))
        return hooks[-1]

    yield make
    for h in hooks:
        h.close()


def notify(redis_url, url, *args):
    return backflow_command("notify", "--redis-url", redis_url, "--webhook", url, "--no-follow",
                            "--start", "all", *args)


def pending(redis_client):
    return GroupReader(redis_client, "backflow:events", "backflow-notify").pending_count()


def test_posts_each_event_as_a_slack_message_and_acknowledges_it(redis_server, redis_client, webhook):
    hook = webhook()
    add_events(redis_client, EVENTS)
    p = notify(redis_server.url, hook.url)
    assert p.returncode == 0, p.stderr
    assert len(hook.posts) == 3 and len(p.stdout.splitlines()) == 3
    first = hook.posts[0][1]
    assert first["text"] == ("[warning] latency_regression shop@2.0.0 shop.cart.apply_discount shop/cart.py:6: "
                             "p50 of shop.cart.apply_discount rose 2.2x &lt;fast&gt; &amp; slow "
                             "(owners @acme/cart)")
    section, context = first["blocks"]
    assert section["type"] == "section" and "*latency_regression*" in section["text"]["text"]
    shown = " ".join(e["text"] for e in context["elements"])
    assert "`shop.cart.apply_discount shop/cart.py:6`" in shown and "@acme/cart" in shown
    assert EVENTS[0]["id"] in shown  # receivers can deduplicate on it
    assert pending(redis_client) == 0
    assert notify(redis_server.url, hook.url).returncode == 0 and len(hook.posts) == 3  # nothing again


def test_5xx_and_429_are_retried_and_retry_after_is_honoured(redis_server, redis_client, webhook):
    hook = webhook([(500, {}), (429, {"Retry-After": "2"}), (503, {})])
    add_events(redis_client, EVENTS[:1])
    p = notify(redis_server.url, hook.url)
    assert p.returncode == 0, p.stderr
    times = [t for t, _ in hook.posts]
    assert len(times) == 4 and len({json.dumps(b) for _, b in hook.posts}) == 1  # the same message
    assert times[2] - times[1] >= 2.0  # waited what Retry-After said
    assert "HTTP 500" in p.stderr and "HTTP 429" in p.stderr
    assert "secret" not in p.stderr  # the webhook's path is not shown
    assert pending(redis_client) == 0


def test_an_event_the_webhook_did_not_take_stays_pending_and_is_posted_by_the_next_run(
        redis_server, redis_client, webhook):
    failing = webhook([(503, {})] * 3)
    add_events(redis_client, EVENTS[:2])
    p = notify(redis_server.url, failing.url, "--retries", "2")
    assert p.returncode == 1
    assert "gave up after 3 attempts" in p.stderr and "stays pending" in p.stderr
    # both were handed to this consumer, neither posted: both are pending for the next run
    assert len(failing.posts) == 3 and pending(redis_client) == 2
    working = webhook()
    assert notify(redis_server.url, working.url).returncode == 0
    assert [b["text"] for _, b in working.posts] == [failing.texts()[0], working.texts()[1]]
    assert "shop.payments.charge" in working.texts()[1]
    assert pending(redis_client) == 0


def test_an_answer_retrying_cannot_fix_is_not_retried(redis_server, redis_client, webhook):
    hook = webhook([(404, {})])
    add_events(redis_client, EVENTS[:1])
    p = notify(redis_server.url, hook.url)
    assert p.returncode == 1 and "HTTP 404" in p.stderr
    assert len(hook.posts) == 1 and pending(redis_client) == 1


def test_an_unreachable_webhook_is_retried(redis_server, redis_client):
    from processor.devtools.redis_server import free_port
    add_events(redis_client, EVENTS[:1])
    p = notify(redis_server.url, f"http://127.0.0.1:{free_port()}/hook", "--retries", "1")
    assert p.returncode == 1
    assert p.stderr.count("cannot reach http://127.0.0.1") == 2  # the retry warning and the final error
    assert pending(redis_client) == 1


def test_the_rate_limit_spaces_messages_out(redis_server, redis_client, webhook):
    hook = webhook()
    add_events(redis_client, EVENTS)
    p = notify(redis_server.url, hook.url, "--rate-per-minute", "60", "--burst", "1")
    assert p.returncode == 0, p.stderr
    times = [t for t, _ in hook.posts]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.9 and times[2] - times[1] >= 0.9  # one a second


def test_owner_filter(redis_server, redis_client, webhook):
    hook = webhook()
    add_events(redis_client, EVENTS)
    assert notify(redis_server.url, hook.url, "--owner", "@acme/payments").returncode == 0
    assert ["shop.payments" in t for t in hook.texts()] == [True, True]
    assert pending(redis_client) == 0  # the others were filtered out, and acknowledged too


@pytest.mark.e2e
@pytest.mark.parametrize("args, env, named", [
    (["--webhook", "ftp://chat.example/hook"], {}, "webhook (--webhook)"),
    ([], {}, "give --webhook URL or BACKFLOW_NOTIFY_WEBHOOK"),
    ([], {"BACKFLOW_NOTIFY_WEBHOOK": "hooks.slack.com/x"}, "invalid setting webhook (BACKFLOW_NOTIFY_WEBHOOK)"),
    (["--webhook", "http://h/x", "--rate-per-minute", "0"], {}, "rate_per_minute (--rate-per-minute)"),
    (["--webhook", "http://h/x", "--burst", "0"], {}, "burst (--burst)"),
    (["--webhook", "http://h/x", "--redis-url", "redis://h:port"], {}, "redis_url (--redis-url)"),
    (["--slack-channel", "C0"], {}, "slack_channel (--slack-channel): give the bot token"),
    (["--slack-channel", "C0", "--slack-api", "slack.com/api"], {"BACKFLOW_NOTIFY_SLACK_TOKEN": "x"},
     "invalid setting slack_api (--slack-api)"),
])
def test_bad_settings_exit_2_with_one_line_naming_them(args, env, named):
    p = backflow_command("notify", "--no-follow", *args, env=env)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and named in p.stderr


def test_a_long_summary_is_cut_to_what_slack_takes_in_a_section():
    from processor.commands.notify import message
    m = message({"type": "latency_regression", "severity": "warning", "summary": "p99 of " + "f" * 5000})
    section = m["blocks"][0]["text"]["text"]
    assert len(section) == 3000 and section.endswith("\u2026") and "p99 of " in section


def test_an_event_no_run_could_post_goes_to_the_dead_letter_stream_and_notify_goes_on(
        redis_server, redis_client, webhook):
    add_events(redis_client, EVENTS[:2])
    gone = webhook([(410, {})] * 3)  # the first event is refused for good; the second would pass
    for attempt in (1, 2):
        p = notify(redis_server.url, gone.url, "--max-attempts", "3")
        assert p.returncode == 1 and "HTTP 410" in p.stderr and pending(redis_client) == 2
    p = notify(redis_server.url, gone.url, "--max-attempts", "3")
    assert p.returncode == 0, p.stderr
    assert "dead-lettered after 3 attempts" in p.stderr
    dead = redis_client.xrange("backflow:events:dead")
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields["id"] == EVENTS[0]["id"] and fields["dead.attempts"] == "3" and "HTTP 410" in fields["dead.reason"]
    assert len(gone.posts) == 4 and "shop.payments.charge" in gone.texts()[3]  # the next one was posted
    assert pending(redis_client) == 0


def test_events_left_pending_by_a_consumer_that_never_returns_are_claimed(redis_server, redis_client, webhook):
    add_events(redis_client, EVENTS)
    failing = webhook([(503, {})])
    p = notify(redis_server.url, failing.url, "--retries", "0", "--consumer", "pod-a")
    assert p.returncode == 1 and pending(redis_client) == 3  # pod-a took all three, then died
    hook = webhook()
    time.sleep(1.2)
    p = notify(redis_server.url, hook.url, "--consumer", "pod-b", "--claim-idle", "1")
    assert p.returncode == 0, p.stderr
    assert len(hook.posts) == 3 and "claimed 3 events" in p.stderr
    assert pending(redis_client) == 0


def _rollout(version, milestone, verdict="pass", window_end_ms=1_700_000_060_000, **kw):
    detail = {"milestone": milestone, "verdict": verdict, "reasons": ["no regression open"], "missing": [],
              "locations": [], "entry_points": []}
    return event_fields("rollout", "", window_end_ms=window_end_ms, severity="info", key="k-shop",
                        summary=f"shop {version} {milestone}; {verdict}", detail=detail,
                        **{"service.version": version}, **kw)


ROLLOUT = [
    _rollout("2.1.0", "first_calls"),
    event_fields("latency_regression", "shop.cart.apply_discount", "shop/cart.py", "6",
                 **{"service.version": "2.1.0"}),
    event_fields("first_seen", "shop.cart.new", "shop/cart.py", "9", **{"service.version": "2.0.0"}),
    _rollout("2.1.0", "share_10", "fail", window_end_ms=1_700_000_070_000),
    _rollout("2.1.0", "rolled_back", "fail", window_end_ms=1_700_000_080_000),
    event_fields("dormant", "shop.cart.old", "shop/cart.py", "3", window_end_ms=1_700_000_090_000,
                 **{"service.version": "2.1.0"}),
]


def test_slack_api_threads_a_rollout_its_milestones_and_its_versions_events(redis_server, redis_client, webhook):
    api = webhook(slack_api=True)
    add_events(redis_client, ROLLOUT)
    args = ["notify", "--redis-url", redis_server.url, "--slack-channel", "C0DEPLOY", "--slack-api",
            api.url.rsplit("/services", 1)[0] + "/api", "--no-follow", "--start", "all"]
    p = backflow_command(*args, env={"BACKFLOW_NOTIFY_SLACK_TOKEN": "xoxb-secret"})
    assert p.returncode == 0, p.stderr
    assert set(api.paths) == {"/api/chat.postMessage"} and set(api.auth) == {"Bearer xoxb-secret"}
    posts = [b for _, b in api.posts]
    assert all(b["channel"] == "C0DEPLOY" for b in posts)
    # the rollout's first message is the thread; its version's events and milestones reply in
    # it; another version's event does not; once rolled back, the version's events are flat
    assert [b.get("thread_ts") for b in posts] == [None, "1.000100", None, "1.000100", "1.000100", None]
    assert "no regression open" in json.dumps(posts[0]["blocks"])
    assert "xoxb-secret" not in p.stdout + p.stderr
    # a rollout that ended is forgotten: the version's next rollout starts a thread of its own
    assert not redis_client.hgetall("backflow:notify:threads:backflow-notify")
    env = {"BACKFLOW_NOTIFY_SLACK_TOKEN": "xoxb-secret"}
    add_events(redis_client, [_rollout("2.1.0", "first_calls", window_end_ms=1_700_000_100_000)])
    assert backflow_command(*args, env=env).returncode == 0
    # and a restart goes on in that thread (kept in Redis)
    add_events(redis_client, [_rollout("2.1.0", "share_50", window_end_ms=1_700_000_110_000)])
    assert backflow_command(*args, env=env).returncode == 0
    root = str(len(posts) + 1) + ".000100"
    assert [b.get("thread_ts") for _, b in api.posts[len(posts):]] == [None, root]


def test_slack_api_refusing_a_message_is_not_delivered_and_stays_pending(redis_server, redis_client):
    import http.server as hs

    class Refuse(hs.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"ok": false, "error": "channel_not_found"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = hs.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        add_events(redis_client, ROLLOUT[:1])
        p = backflow_command("notify", "--redis-url", redis_server.url, "--slack-channel", "C0", "--slack-api",
                             f"http://127.0.0.1:{server.server_port}/api", "--no-follow", "--start", "all",
                             env={"BACKFLOW_NOTIFY_SLACK_TOKEN": "xoxb-x"})
        assert p.returncode == 1 and "channel_not_found" in p.stderr
        assert pending(redis_client) == 1
    finally:
        server.shutdown()
        server.server_close()


def test_google_chat_threads_by_a_key_named_for_the_rollout(redis_server, redis_client, webhook):
    hook = webhook()
    add_events(redis_client, ROLLOUT)
    p = notify(redis_server.url, hook.url, "--format", "google-chat")
    assert p.returncode == 0, p.stderr
    keys = [b.get("thread", {}).get("threadKey") for _, b in hook.posts]
    assert keys[0] and keys[0].startswith("backflow-rollout-")
    assert keys == [keys[0], keys[0], None, keys[0], keys[0], None]
    assert all("messageReplyOption=REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD" in path
               for path, k in zip(hook.paths, keys) if k)
    assert hook.posts[0][1]["text"].startswith("*rollout* in *shop@2.1.0*: shop 2.1.0 first_calls; pass")


def test_a_plain_webhook_and_no_threads_post_every_event_flat(redis_server, redis_client, webhook):
    hook = webhook()
    add_events(redis_client, ROLLOUT)
    assert notify(redis_server.url, hook.url).returncode == 0
    assert len(hook.posts) == len(ROLLOUT) and all("thread" not in b for _, b in hook.posts)
    assert not redis_client.exists("backflow:notify:threads:backflow-notify")
