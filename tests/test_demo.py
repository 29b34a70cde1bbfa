"""``backflow demo --short``: the whole loop on one machine, as CI runs it."""

import re

import pytest

from processor.devtools.redis_server import answers_ping
from tests.commands import backflow_command


@pytest.mark.e2e
def test_demo_shows_every_event_of_the_rollout_and_cleans_up():
    p = backflow_command("demo", "--short", timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    events = [line for line in p.stdout.splitlines() if not line.startswith("demo:")]
    found = {(m.group(1), m.group(2)) for line in events
             if (m := re.search(r" (first_seen|latency_regression|error_regression|new_exception|dormant)"
                                r" +shop@[\d.]+ (\S+) ", line))}
    assert {("first_seen", "shop.payments.fraud_score"), ("latency_regression", "shop.cart.apply_discount"),
            ("latency_regression", "shop.search.search"), ("dormant", "shop.payments.legacy_fraud_check"),
            ("new_exception", "shop.payments.charge"), ("error_regression", "shop.payments.charge")} <= found
    assert "demo: after" in p.stdout and "12 of 12 expected events" in p.stdout
    # 2.0.0's rollout: its events, and its verdict as `backflow verdict` prints it
    assert any(re.search(r" rollout +shop 2\.0\.0 took its first calls", line) for line in events)
    assert re.search(r"demo:   shop 2\.0\.0 in \S+: (FAIL|PASS|INCONCLUSIVE)", p.stdout)
    charge = next(line for line in events if re.search(r" error_regression +shop@", line))
    assert "shop@2.0.0" in charge and charge.endswith("[owners @demo/payments]")  # from the shop's CODEOWNERS
    port = int(re.search(r"started redis-server on 127\.0\.0\.1:(\d+)", p.stdout).group(1))
    assert not answers_ping("127.0.0.1", port)  # the throwaway Redis is gone


@pytest.mark.e2e
@pytest.mark.parametrize("args, named", [(["--duration", "0"], "duration (--duration)"),
                                         (["--redis-url", "http://x"], "redis_url (--redis-url)"),
                                         (["--prefix", "a b"], "prefix (--prefix)")])
def test_bad_settings_exit_2_with_one_line_naming_them(args, named):
    p = backflow_command("demo", *args)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and named in p.stderr
