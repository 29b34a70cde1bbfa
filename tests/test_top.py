"""``backflow top``: a table of code locations from the baseline hashes and recent events."""

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time

import numpy as np
import pytest

from tests.commands import add_events, backflow_command, event_fields
from tests.test_e2e import SEC, T0, lognormal_ns, send

pytestmark = pytest.mark.e2e  # runs `backflow top` against a redis-server (docs/testing.md)

W_MS = 10_000
UPDATED = 1_700_000_600_000  # the locations' latest window end


def baseline(client, key, function, file, rate, p50, p99, errors, service="shop", updated=UPDATED):
    client.sadd("backflow:keys", key)
    client.hset(f"backflow:baseline:{key}", mapping={
        "key": key, "service.name": service, "deployment.environment.name": "prod",
        "code.function.name": function, "code.file.path": file, "code.line.number": "3",
        "otel.scope.name": "", "service.version": "2.0.0", "vcs.ref.head.revision": "",
        "count": "1000", "rate_per_s": str(rate), "p50_ms": str(p50), "p90_ms": str(p99 / 2),
        "p99_ms": str(p99), "p999_ms": str(p99 * 2), "error_rate": str(errors), "windows": "60",
        "updated": str(updated)})


@pytest.fixture
def shop(redis_client):
    baseline(redis_client, "cart", "shop.cart.apply_discount", "shop/cart.py", 50.0, 44.0, 120.0, 0.0)
    baseline(redis_client, "charge", "shop.payments.charge", "shop/payments/charge.py", 20.0, 80.0, 400.0, 0.2)
    baseline(redis_client, "search", "shop.search.search", "shop/search.py", 200.0, 30.0, 900.0, 0.001)
    baseline(redis_client, "inv", "billing.invoice", "billing/invoice.py", 5.0, 12.0, 30.0, 0.0, service="billing")
    redis_client.sadd("backflow:keys", "announced-only")  # first_seen written, no baseline yet
    ev = lambda type_, key, end, **kw: event_fields(type_, key, key=key, window_end_ms=end, window_ms=W_MS, **kw)  # noqa: E731
    add_events(redis_client, [
        ev("first_seen", "cart", UPDATED - 100 * W_MS),
        ev("latency_regression", "cart", UPDATED - 5 * W_MS),            # open
        ev("latency_regression", "search", UPDATED - 8 * W_MS),          # resolved below
        ev("error_regression", "charge", UPDATED - 2 * W_MS),            # open
        ev("new_exception", "charge", UPDATED - W_MS),                   # open
        ev("resolved", "search", UPDATED - W_MS, detail={"resolves": "latency_regression"}),
        ev("error_regression", "inv", UPDATED - 31 * W_MS),              # open for 31 windows: still open
        ev("dormant", "search", UPDATED),                                # not a regression
    ])


def table(redis_url, *args):
    p = backflow_command("top", "--redis-url", redis_url, "--once", *args)
    assert p.returncode == 0, p.stderr
    header, columns, *rows = p.stdout.splitlines()
    return header, columns, rows


def parse(rows):
    """{function: (service, calls/s, p50, p99, errors, open)}"""
    out = {}
    for row in rows:
        cells = row.split()
        if cells[0] == "...":
            continue
        opened = cells[5] if len(cells) == 8 else ""
        out[cells[-2]] = (cells[0], cells[1], cells[2], cells[3], cells[4], opened)
    return out


def test_one_table_of_every_location_with_its_figures_and_open_regressions(redis_server, shop):
    header, columns, rows = table(redis_server.url)
    assert columns.split() == ["SERVICE", "CALLS/S", "P50", "MS", "P99", "MS", "ERRORS", "OPEN",
                               "FUNCTION", "(FILE:LINE)"]
    assert "4 locations, 4 open regressions" in header
    assert parse(rows) == {
        "shop.payments.charge": ("shop@2.0.0", "20.0", "80", "400", "20.00%", "2"),
        "shop.cart.apply_discount": ("shop@2.0.0", "50.0", "44", "120", "0.00%", "1"),
        "shop.search.search": ("shop@2.0.0", "200.0", "30", "900", "0.10%", ""),
        "billing.invoice": ("billing@2.0.0", "5.0", "12", "30", "0.00%", "1"),
    }
    # sorted by open regressions, then calls/s; the file and line are shown
    assert [r.split()[-2] for r in rows] == ["shop.payments.charge", "shop.cart.apply_discount",
                                             "billing.invoice", "shop.search.search"]
    assert rows[0].endswith("shop.payments.charge (shop/payments/charge.py:3)")


@pytest.mark.parametrize("sort, first", [("calls", "shop.search.search"), ("p99", "shop.search.search"),
                                         ("p50", "shop.payments.charge"), ("errors", "shop.payments.charge"),
                                         ("function", "billing.invoice")])
def test_sort(redis_server, shop, sort, first):
    _, _, rows = table(redis_server.url, "--sort", sort)
    assert rows[0].split()[-2] == first


def test_limit_and_service_filter(redis_server, shop):
    _, _, rows = table(redis_server.url, "--limit", "2")
    assert len(rows) == 3 and rows[-1] == "... 2 more (--limit, or a taller terminal)"
    header, _, rows = table(redis_server.url, "--service", "billing")
    assert list(parse(rows)) == ["billing.invoice"]
    assert "1 locations, 1 open regressions" in header  # the shop's 3 are not billing's
    header, _, rows = table(redis_server.url, "--service", "shop")
    assert "3 locations, 3 open regressions" in header


def test_open_windows_ages_out_new_exceptions_only(redis_server, shop):
    # The charge's new_exception is 1 window old: gone with --open-windows 1; the cart's
    # latency regression (5 windows) and the invoice's (31) stay open until resolved.
    header, _, rows = table(redis_server.url, "--open-windows", "1")
    assert [parse(rows)[f][5] for f in ("shop.payments.charge", "shop.cart.apply_discount", "billing.invoice")] \
        == ["1", "1", "1"] and "3 open regressions" in header


def test_a_regression_ends_when_accepted_or_when_its_location_is_no_longer_called(redis_server, shop, redis_client):
    ev = lambda type_, key, end, **kw: event_fields(type_, key, key=key, window_end_ms=end, window_ms=W_MS, **kw)  # noqa: E731
    # the invoice's level held: serve accepted it as the new baseline
    add_events(redis_client, [ev("resolved", "inv", UPDATED, detail={"resolves": "error_regression",
                                                                     "reason": "accepted"})])
    header, _, rows = table(redis_server.url)
    assert parse(rows)["billing.invoice"][5] == "" and "3 open regressions" in header
    # the cart is no longer called: 30 windows behind the rest of its service
    baseline(redis_client, "cart", "shop.cart.apply_discount", "shop/cart.py", 50.0, 44.0, 120.0, 0.0,
             updated=UPDATED - 30 * W_MS)
    header, _, rows = table(redis_server.url)
    assert parse(rows)["shop.cart.apply_discount"][5] == "" and "2 open regressions" in header


def test_refreshes_in_place_on_a_terminal_within_its_height(redis_server, shop, redis_client):
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 6, 120, 0, 0))  # 6 lines, 120 columns
    proc = subprocess.Popen([sys.executable, "-m", "processor", "top", "--redis-url", redis_server.url,
                             "--interval", "0.5"], stdin=child, stdout=child, stderr=child, close_fds=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    os.close(child)
    out = b""
    try:
        deadline = time.monotonic() + 30
        while out.count(b"\x1b[H\x1b[2J") < 3 and time.monotonic() < deadline:
            if select.select([main], [], [], 1)[0]:
                out += os.read(main, 65536)
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        os.close(main)
    screens = out.decode().split("\x1b[H\x1b[2J")[1:]
    assert len(screens) >= 3
    lines = screens[1].rstrip("\r\n").split("\r\n")
    assert len(lines) <= 6  # the table fits the terminal
    assert lines[-1] == "... 1 more (--limit, or a taller terminal)"
    assert "shop.payments.charge" in lines[2]


@pytest.mark.parametrize("args, named", [
    (["--interval", "0"], "interval (--interval)"),
    (["--limit", "0"], "limit (--limit)"),
    (["--redis-url", "redis://h:x"], "redis_url (--redis-url)"),
])
def test_bad_settings_exit_2_with_one_line_naming_them(args, named):
    p = backflow_command("top", "--once", *args)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and named in p.stderr


@pytest.mark.e2e
def test_figures_of_a_real_server(backflow, redis_server, redis_client):
    bf = backflow("--window", "10", "--allowed-lateness", "0")
    durations = lognormal_ns(1, 500, 20.0)
    spans = [(T0 + SEC + j * 10_000_000 - int(d), T0 + SEC + j * 10_000_000,
              {"code.function.name": "shop.cart.add_item", "code.file.path": "shop/cart.py",
               "code.line.number": 1}, j % 10 == 0) for j, d in enumerate(durations)]
    send(bf.grpc_target, spans)
    assert bf.stop() == 0
    _, _, rows = table(redis_server.url)
    [(function, cells)] = parse(rows).items()
    assert function == "shop.cart.add_item" and cells[0] == "shop@1.4.3"
    assert float(cells[1]) == pytest.approx(50.0)  # 500 spans in a 10 s window
    assert float(cells[2]) == pytest.approx(np.quantile(durations, 0.5) / 1e6, rel=0.05)
    assert cells[4] == "10.00%" and cells[5] == ""
    assert json.loads(redis_client.xrange("backflow:events")[0][1]["detail"])  # first_seen was written


def _version(client, key, version, calls, p50, p99, first_ms, last_ms, errors=0):
    client.hset(f"backflow:versions:{key}", json.dumps([version, ""]), json.dumps({
        "calls": calls, "errors": errors, "windows": 10, "seconds": 600.0, "p50_ms": p50, "p99_ms": p99,
        "first": first_ms, "last": last_ms}))


def test_a_baseline_of_two_versions_is_labelled_and_shown_per_version(redis_server, shop, redis_client):
    # 1.0.0 ran at 20 ms until the rollout, 2.0.0 at 60 ms since: the baseline (44 ms) is a blend
    _version(redis_client, "cart", "1.0.0", 6000, 20.0, 50.0, UPDATED - 200 * W_MS, UPDATED - 20 * W_MS)
    _version(redis_client, "cart", "2.0.0", 1200, 60.0, 150.0, UPDATED - 20 * W_MS, UPDATED, errors=12)
    _version(redis_client, "search", "0.9.0", 100, 30.0, 90.0, UPDATED - 30 * 86_400_000, UPDATED - 20 * 86_400_000)
    _, _, rows = table(redis_server.url)
    i = next(n for n, r in enumerate(rows) if r.endswith("shop.cart.apply_discount (shop/cart.py:3)"))
    assert rows[i].startswith("shop (2 versions)")  # not "shop@2.0.0": 44 ms is neither's
    new, old = rows[i + 1].split(), rows[i + 2].split()
    assert new[:6] == ["@2.0.0", "2.0", "60", "150", "1.00%", "since"]  # calls/s over its 600 s
    assert old[:5] == ["@1.0.0", "10.0", "20", "50", "0.00%"]
    # a version that stopped weeks ago is not part of the blend: one version, labelled as before
    assert any(r.startswith("shop@2.0.0") and r.endswith("shop.search.search (shop/search.py:3)") for r in rows)


def test_a_first_row_taller_than_the_terminal_is_cut_not_hidden():
    from processor.commands.top import Row, render

    versions = [Row("k", f"  @{v}", "since -", "", "", 1.0, 2.0, 3.0, 0.0, 0) for v in "abcd"]
    top = Row("k", "shop", "shop.f", "shop/f.py:1", "", 5.0, 2.0, 3.0, 0.0, 0, versions=versions)
    lines = render([top, Row("j", "shop", "shop.g", "", "1", 1.0, 1.0, 1.0, 0.0, 0)], 120, 3, "header").splitlines()
    assert lines[2].startswith("shop (4 versions)") and lines[3].split()[0] == "@a" and lines[4].split()[0] == "@b"
    assert lines[5] == "... 1 more (--limit, or a taller terminal)"


def test_a_staging_location_is_judged_against_staging_not_prod(redis_server, redis_client):
    ev = lambda type_, key, end, **kw: event_fields(type_, key, key=key, window_end_ms=end, window_ms=W_MS, **kw)  # noqa: E731
    baseline(redis_client, "p", "shop.f", "shop/f.py", 5.0, 10.0, 20.0, 0.0)
    baseline(redis_client, "s", "shop.g", "shop/g.py", 5.0, 10.0, 20.0, 0.0, updated=UPDATED - 40 * W_MS)
    redis_client.hset("backflow:baseline:s", "deployment.environment.name", "staging")
    add_events(redis_client, [ev("latency_regression", "s", UPDATED - 41 * W_MS)])
    header, _, rows = table(redis_server.url)
    assert parse(rows)["shop.g"][5] == "1"  # staging's latest window is its own: still called there
