"""Parsing primitives: each takes a raw value (str from a flag or the environment, anything
from YAML) and returns it checked, or raises ValueError saying what is wrong. The command
line's settings (processor/config.py) and the detectors' (processor/detect/) both use them.

>>> positive_int("3"), parse_address("[::1]:4317")
(3, '[::1]:4317')
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote, urlsplit


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it."""


# --- value parsers: each takes the raw value (str from flag/env, any from YAML) ---------------

def parse_address(value: Any) -> str:
    """``host:port`` or ``[v6]:port`` with a port in 1..65535; ``:port`` (all interfaces,
    as the collector takes it) is ``0.0.0.0:port``.

    >>> parse_address(":4317")
    '0.0.0.0:4317'
    """
    text = str(value).strip()
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]\s]*):(\d+)", text)
    if not m:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1..65535, got {port}")
    if m.group(1):
        ipaddress.IPv6Address(host)
    elif not host:
        return f"0.0.0.0:{port}"
    return text


def flag_of(setting: str) -> str:
    """The command-line flag of a setting: ``otlp_http`` -> ``--otlp-http``."""
    return "--" + setting.replace("_", "-")


def env_of(setting: str) -> str:
    """The environment variable of a setting: ``otlp_http`` -> ``BACKFLOW_OTLP_HTTP``."""
    return "BACKFLOW_" + setting.upper()


class ListenError(OSError):
    """A listener could not bind its address; the message names the setting."""


@contextlib.contextmanager
def listening(setting: str, address: str):
    """Around binding ``address``: an OSError becomes a ListenError naming the setting's
    flag and environment variable, so that a busy port says which of the listeners it is.

    >>> with listening("otlp_http", "0.0.0.0:4318"):
    ...     raise OSError(98, "Address already in use")
    Traceback (most recent call last):
    processor.parsing.ListenError: --otlp-http 0.0.0.0:4318: Address already in use (another program listens there? choose another address with --otlp-http or BACKFLOW_OTLP_HTTP)
    """
    try:
        yield
    except OSError as e:
        flag, env = flag_of(setting), env_of(setting)
        why = e.strerror or str(e)
        hint = ("another program listens there? " if e.errno == errno.EADDRINUSE else "")
        raise ListenError(f"{flag} {address}: {why} ({hint}choose another address with {flag} or {env})") from None


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of a validated ``host:port`` or ``[v6]:port``; the host without brackets.

    >>> split_address("[::1]:4317")
    ('::1', 4317)
    """
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def parse_address_or_off(value: Any) -> str:
    if str(value).strip().lower() == "off":
        return "off"
    return parse_address(value)


def parse_redis_url(value: Any) -> str:
    """A URL redis-py's ``from_url`` takes, query parameters included (``ssl_ca_certs=...``).

    Messages show the URL without its password: they end up in a terminal or a log.
    """
    text = str(value).strip()
    shown = redact_url(text)
    u = urlsplit(text)
    if u.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"scheme must be redis://, rediss:// or unix://, got {shown!r}")
    if u.scheme != "unix":
        if not u.hostname:
            raise ValueError(f"no host in {shown!r}")
        try:
            u.port
        except ValueError:
            raise ValueError(f"bad port in {shown!r}") from None
        db = u.path.lstrip("/")
        if db and not db.isdigit():
            raise ValueError(f"database must be a number, got {db!r}")
    # Build (not connect) the connection redis-py would use: an unknown query parameter, one
    # that needs rediss:// (ssl_*), or a bad value fails here, at start, not at first write.
    import redis

    try:
        pool = redis.ConnectionPool.from_url(text)
        pool.connection_class(**pool.connection_kwargs)
    except (TypeError, ValueError, redis.RedisError) as e:
        raise ValueError(f"{e} (in {shown!r})") from None
    for name in _REDIS_URL_FILES:
        path = pool.connection_kwargs.get(name)
        if path is not None and not os.access(path, os.R_OK):
            raise ValueError(f"cannot read {name} {path!r}")
    return text


# Query parameters of a Redis URL that name files (redis-py's SSLConnection arguments).
_REDIS_URL_FILES = ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile")


def _secret_query_key(name: str) -> bool:
    return "password" in name.lower()  # password=, ssl_password=


def redact_url(url: str) -> str:
    """The URL with its password (user info, or a ``*password=`` query value) as ``***``.

    >>> redact_url("rediss://bf:s3cret@redis:6380/0?ssl_password=x&ssl_ca_certs=/ca.pem")
    'rediss://bf:***@redis:6380/0?ssl_password=***&ssl_ca_certs=/ca.pem'
    """
    u = urlsplit(url)
    netloc = u.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = userinfo.partition(":")[0] + ":***@" + hostport
    query = "&".join(
        part.partition("=")[0] + "=***" if _secret_query_key(part.partition("=")[0]) else part
        for part in u.query.split("&")) if u.query else u.query
    return u._replace(netloc=netloc, query=query).geturl()


def url_secrets(url: str) -> list[str]:
    """The passwords in a Redis URL, as written and as decoded."""
    u = urlsplit(url)
    found = [u.password] if u.password else []
    found += [v for k, v in parse_qsl(u.query, keep_blank_values=True) if _secret_query_key(k) and v]
    return found + [unquote(s) for s in found]


def parse_readable_file(value: Any) -> str:
    if value is None:  # YAML "key:" with nothing after it
        raise ValueError("no file given")
    path = str(value).strip()
    if not path:
        raise ValueError("empty path")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"cannot read {path!r}: {e.strerror}") from None
    return path


def parse_writable_dir(value: Any) -> str:
    """A directory this process can write in, made if missing.

    >>> import tempfile, os
    >>> d = os.path.join(tempfile.mkdtemp(), "spool")
    >>> parse_writable_dir(d) == d and os.path.isdir(d)
    True
    """
    if value is None:
        raise ValueError("no directory given")
    path = str(value).strip()
    if not path:
        raise ValueError("empty path")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".backflow-write-probe")
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"cannot write in {path!r}: {e.strerror}") from None
    return path


def parse_codeowners(value: Any) -> str:
    """A CODEOWNERS file that reads and parses: owners come from it for every event."""
    path = parse_readable_file(value)
    from processor.owners import Owners
    Owners.from_file(path)  # ValueError names the file, and the line where it can
    return path


def parse_token(value: Any) -> str:
    """A bearer token. Messages never show it: they are printed and may be logged."""
    if value is None or isinstance(value, bool):  # YAML null or true: not a token
        raise ValueError("expected a token")
    text = str(value).strip()
    if not text:
        raise ValueError("empty token")
    # What an HTTP/2 header value (gRPC metadata) can carry after "Bearer ".
    if not re.fullmatch(r"[\x21-\x7e]+", text):
        raise ValueError("the token must be printable ASCII without spaces (value not shown)")
    return text


def read_token(path: str) -> str:
    """The bearer token a file holds (``parse_token``'s rules; OSError if unreadable)."""
    with open(path, encoding="ascii", errors="replace") as f:
        return parse_token(f.read())


def parse_prefix(value: Any) -> str:
    text = str(value)
    if not re.fullmatch(r"[A-Za-z0-9_.\-{}]+", text):
        raise ValueError(f"use letters, digits and _ . - {{ }} only, got {text!r}")
    return text


def _number(kind: type, low: float, low_inclusive: bool) -> Callable[[Any], float]:
    def parse(value: Any):
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            v = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number, got {value!r}")
        if v < low or (v == low and not low_inclusive):
            raise ValueError(f"must be {'>=' if low_inclusive else '>'} {low:g}, got {value!r}")
        return v

    return parse


positive_float = _number(float, 0, low_inclusive=False)
non_negative_float = _number(float, 0, low_inclusive=True)
positive_int = _number(int, 1, low_inclusive=True)
non_negative_int = _number(int, 0, low_inclusive=True)


def parse_log_level(value: Any) -> str:
    text = str(value).strip().upper()
    if text not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"one of debug, info, warning, error; got {value!r}")
    return text


ROLES = ("both", "aggregate", "detect")


def parse_addresses(value: Any) -> str:
    """One or more ``HOST:PORT`` separated by commas (``parse_address`` each), sorted.

    >>> parse_addresses("b:4317, a:4317")
    'a:4317,b:4317'
    """
    parts = [p for p in (x.strip() for x in str(value).split(",")) if p]
    if not parts:
        raise ValueError("expected HOST:PORT[,HOST:PORT...]")
    out = sorted({parse_address(p) for p in parts})
    return ",".join(out)


def parse_role(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in ROLES:
        raise ValueError(f"one of {', '.join(ROLES)}; got {value!r}")
    return text


def parse_replica_id(value: Any) -> str:
    text = str(value).strip()
    if not text or len(text) > 256 or not text.isprintable():
        raise ValueError(f"1 to 256 printable characters, got {value!r}")
    return text


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def probability(value: Any) -> float:
    """A number in (0, 1)."""
    v = positive_float(value)
    if v >= 1:
        raise ValueError(f"must be < 1, got {value!r}")
    return v
