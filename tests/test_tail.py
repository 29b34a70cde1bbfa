"""``backflow tail``: a consumer group on the events stream, filters, human and JSON lines."""

import json
import select
import signal
import time

import pytest

from processor.commands.consume import GroupReader
from tests.commands import add_events, backflow_command, event_fields, start_command
from tests.test_owners import CODEOWNERS, REPO
from tests.test_e2e import SEC, T0, send

pytestmark = pytest.mark.e2e  # runs `backflow tail` against a redis-server (docs/testing.md)

EVENTS = [
    event_fields("first_seen", "shop.cart.add_item", "shop/cart.py", "1", severity="info",
                 owners="@acme/cart @alice"),
    event_fields("latency_regression", "shop.cart.apply_discount", "shop/cart.py", "6",
                 summary="p50 of shop.cart.apply_discount rose 2.2x (20 ms to 44 ms) in 2.0.0",
                 owners="@acme/cart @alice"),
    event_fields("new_exception", "shop.payments.charge", "shop/payments/charge.py", "1",
                 severity="critical", owners="@acme/payments"),
    event_fields("dormant", "shop.payments.fraud.score", "shop/payments/fraud.py", "1",
                 owners="@acme/payments @acme/risk"),
    event_fields("error_regression", "billing.invoice", "billing/invoice.py", "3",
                 **{"service.name": "billing"}),
]


def tail(redis_url, *args, env=None):
    p = backflow_command("tail", "--redis-url", redis_url, "--no-follow", "--start", "all", *args, env=env)
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


def functions(lines):
    return [json.loads(line)["code.function.name"] for line in lines]


def test_prints_one_human_line_per_event_in_stream_order(redis_server, redis_client):
    add_events(redis_client, EVENTS)
    lines = tail(redis_server.url)
    assert len(lines) == len(EVENTS)
    assert lines[1] == ("2023-11-14 22:14:20Z warning  latency_regression shop@2.0.0 "
                        "shop.cart.apply_discount shop/cart.py:6: p50 of shop.cart.apply_discount "
                        "rose 2.2x (20 ms to 44 ms) in 2.0.0 [owners @acme/cart @alice]")
    assert lines[4].endswith("billing@2.0.0 billing.invoice billing/invoice.py:3: "
                             "error_regression at billing.invoice")  # no owners: none shown


def test_json_prints_the_fields_of_each_event(redis_server, redis_client):
    add_events(redis_client, EVENTS)
    assert [json.loads(line) for line in tail(redis_server.url, "--json")] == EVENTS


@pytest.mark.parametrize("filters, expected", [
    (["--service", "billing"], ["billing.invoice"]),
    (["--type", "dormant", "--type", "new_exception"], ["shop.payments.charge", "shop.payments.fraud.score"]),
    (["--path", "shop/payments/*"], ["shop.payments.charge", "shop.payments.fraud.score"]),
    (["--path", "*/cart.py"], ["shop.cart.add_item", "shop.cart.apply_discount"]),
    (["--owner", "@acme/payments"], ["shop.payments.charge", "shop.payments.fraud.score"]),
    (["--owner", "@ACME/Risk"], ["shop.payments.fraud.score"]),  # owners compare case-insensitively
    (["--owner", "@acme/pay"], []),                               # whole owners only
    (["--owner", "@acme/cart", "--type", "first_seen"], ["shop.cart.add_item"]),
])
def test_filters(redis_server, redis_client, filters, expected):
    add_events(redis_client, EVENTS)
    assert functions(tail(redis_server.url, "--json", *filters)) == expected


def test_the_group_resumes_where_it_stopped_and_filtered_events_are_not_shown_again(redis_server, redis_client):
    add_events(redis_client, EVENTS)
    first = tail(redis_server.url, "--json", "--limit", "2")
    assert functions(first) == ["shop.cart.add_item", "shop.cart.apply_discount"]
    rest = tail(redis_server.url, "--json")
    assert functions(rest) == [e["code.function.name"] for e in EVENTS[2:]]
    assert tail(redis_server.url, "--json") == []  # everything acknowledged
    add_events(redis_client, [event_fields("dormant", "shop.search.search", "shop/search.py")])
    assert functions(tail(redis_server.url, "--json")) == ["shop.search.search"]
    # another group has a position of its own
    assert len(tail(redis_server.url, "--json", "--group", "other")) == len(EVENTS) + 1


def test_events_delivered_but_not_shown_before_a_crash_are_shown_after_the_restart(redis_server, redis_client):
    add_events(redis_client, EVENTS)
    # A tail that was handed the events and died before showing (and acknowledging) them:
    crashed = GroupReader(redis_client, "backflow:events", "backflow-tail", consumer="host-a", start="0")
    assert len(crashed.read(block_ms=None)) == len(EVENTS)
    assert crashed.pending_count() == len(EVENTS)
    lines = tail(redis_server.url, "--json", "--consumer", "host-a")
    assert functions(lines) == [e["code.function.name"] for e in EVENTS]
    assert crashed.pending_count() == 0


def test_a_new_group_starts_with_new_events_by_default(redis_server, redis_client):
    add_events(redis_client, EVENTS[:2])
    assert backflow_command("tail", "--redis-url", redis_server.url, "--no-follow").stdout == ""
    add_events(redis_client, EVENTS[2:3])
    p = backflow_command("tail", "--redis-url", redis_server.url, "--no-follow", "--json")
    assert functions(p.stdout.splitlines()) == ["shop.payments.charge"]


def test_follows_the_stream_until_sigterm(redis_server, redis_client):
    proc = start_command("tail", "--redis-url", redis_server.url, "--json")
    try:
        # wait until the group exists, so the event below is after its start position
        deadline = time.monotonic() + 30
        while not redis_client.exists("backflow:events") or not redis_client.xinfo_groups("backflow:events"):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        add_events(redis_client, EVENTS[3:4])
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "tail printed nothing"
        assert json.loads(proc.stdout.readline())["type"] == "dormant"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.mark.parametrize("args, env, named", [
    (["--redis-url", "http://localhost:6379"], {}, "redis_url (--redis-url)"),
    ([], {"BACKFLOW_REDIS_URL": "redis://:6379"}, "redis_url (BACKFLOW_REDIS_URL)"),
    ([], {"BACKFLOW_PREFIX": "a b"}, "prefix (BACKFLOW_PREFIX)"),
    (["--type", "latency"], {}, "unknown event type 'latency'"),
    (["--limit", "0"], {}, "limit (--limit)"),
])
def test_bad_settings_exit_2_with_one_line_naming_them(args, env, named):
    p = backflow_command("tail", "--no-follow", *args, env=env)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and named in p.stderr


def test_without_follow_an_unreachable_redis_is_an_error():
    from processor.devtools.redis_server import free_port
    p = backflow_command("tail", "--no-follow", "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert p.returncode == 1 and p.stderr.startswith("backflow tail: ") and "127.0.0.1" in p.stderr


@pytest.mark.e2e
def test_owner_filter_on_events_of_a_real_server(backflow, redis_server, redis_client):
    bf = backflow("--window", "10", "--codeowners", str(CODEOWNERS), prefix="bf")
    send(bf.grpc_target, [(T0 + SEC, T0 + 2 * SEC, {"code.function.name": f, "code.file.path": path})
                          for f, path in [("shop.cart.add_item", "shop/cart.py"),
                                          ("shop.payments.charge", str(REPO / "shop/payments/charge.py")),
                                          ("shop.payments.fraud.score", "/app/shop/payments/fraud.py")]])
    assert bf.stop() == 0
    lines = tail(redis_server.url, "--prefix", "bf", "--owner", "@acme/payments")
    assert len(lines) == 2
    assert "shop.payments.charge" in lines[0] and lines[0].endswith("[owners @acme/payments]")
    assert "shop.payments.fraud.score" in lines[1] and lines[1].endswith("[owners @acme/payments @acme/risk]")
