"""Ownership: CODEOWNERS rules give every event an ``owners`` field."""

from pathlib import Path

import pytest

from processor.cli import main
from processor.pipeline.location import location_key
from processor.owners import Owners
from tests.test_e2e import SEC, T0, send

REPO = Path(__file__).resolve().parent / "fixtures" / "shop_repo"
CODEOWNERS = REPO / ".github" / "CODEOWNERS"


@pytest.fixture(scope="module")
def owners():
    return Owners.from_file(str(CODEOWNERS))


def test_relative_paths_are_matched_as_given_and_the_last_matching_rule_wins(owners):
    assert owners.of("shop/cart.py") == "@acme/cart @alice"
    assert owners.of("./shop/payments/charge.py") == "@acme/payments"
    assert owners.of("shop/payments/fraud.py") == "@acme/payments @acme/risk"
    assert owners.of("shop/search.py") == "@acme/platform"
    assert owners.of("docs/guide.md") == "docs@acme.example"


def test_absolute_paths_under_the_repository_lose_its_root(owners):
    # the root is the directory holding .github/, not .github/ itself
    assert owners.root == str(REPO)
    assert owners.of(str(REPO / "shop" / "cart.py")) == "@acme/cart @alice"
    assert owners.of(str(REPO / "shop" / "payments" / "fraud.py")) == "@acme/payments @acme/risk"


def test_absolute_paths_elsewhere_are_cut_at_a_top_level_directory_the_rules_name(owners):
    assert owners.relative("/srv/app/shop/payments/charge.py") == "shop/payments/charge.py"
    assert owners.of("/srv/app/shop/payments/charge.py") == "@acme/payments"
    assert owners.of("C:\\build\\shop\\cart.py") == "@acme/cart @alice"
    # no rule names a top-level directory here: the catch-all still applies
    assert owners.of("/usr/lib/python3/site.py") == "@acme/platform"


def test_no_matching_rule_and_no_path_give_empty_owners():
    o = Owners("/shop/ @acme/shop\n")
    assert o.of("billing/invoice.py") == ""
    assert o.of("") == ""


def test_lookups_are_cached_per_path(owners):
    owners.of.cache_clear()
    for _ in range(3):
        owners.of("shop/cart.py")
    info = owners.of.cache_info()
    assert (info.misses, info.hits) == (1, 2)


@pytest.mark.parametrize("content, message", [
    ("/shop/ acme-team\n", "line 1: 'acme-team' is not an owner"),
    ("# ok\n/shop/[ab @acme/shop\n", "unterminated character class"),
    (b"\xff\xfe/shop/ @a\n", "not UTF-8"),
])
def test_an_unusable_codeowners_file_stops_serve_with_status_2(tmp_path, capsys, content, message):
    f = tmp_path / "CODEOWNERS"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["serve", "--codeowners", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "codeowners" in err and message in err


def test_a_missing_codeowners_file_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BACKFLOW_CODEOWNERS", str(tmp_path / "nope"))
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "codeowners (BACKFLOW_CODEOWNERS)" in err and "nope" in err


@pytest.mark.e2e
def test_events_published_by_serve_carry_the_owners_of_their_file(backflow, redis_client):
    bf = backflow("--window", "10", "--allowed-lateness", "0", "--codeowners", str(CODEOWNERS))
    located = {
        "shop.cart.add_item": "shop/cart.py",                                   # relative
        "shop.payments.charge": str(REPO / "shop" / "payments" / "charge.py"),  # under the root
        "shop.payments.fraud.score": "/srv/app/shop/payments/fraud.py",          # elsewhere
        "shop.search.search": "shop/search.py",
        "shop.unknown": "",                                                      # no file
    }
    spans = [(T0 + SEC, T0 + 2 * SEC, {"code.function.name": f, "code.file.path": path,
                                       "code.line.number": 1} if path else {"code.function.name": f})
             for f, path in located.items()]
    send(bf.grpc_target, spans)
    assert bf.stop() == 0  # SIGTERM closes the window and writes its first_seen events
    events = {e["key"]: e for _, e in redis_client.xrange("backflow:events")}
    owners = {f: events[location_key("prod", "shop", f)]["owners"] for f in located}
    assert owners == {
        "shop.cart.add_item": "@acme/cart @alice",
        "shop.payments.charge": "@acme/payments",
        "shop.payments.fraud.score": "@acme/payments @acme/risk",
        "shop.search.search": "@acme/platform",
        "shop.unknown": "",
    }


@pytest.mark.e2e
def test_without_codeowners_the_owners_field_is_there_and_empty(backflow, redis_client):
    bf = backflow("--window", "10")
    send(bf.grpc_target, [(T0 + SEC, T0 + 2 * SEC, {"code.function.name": "shop.f",
                                                    "code.file.path": "shop/cart.py"})])
    assert bf.stop() == 0
    [(_, event)] = redis_client.xrange("backflow:events")
    assert event["owners"] == ""
