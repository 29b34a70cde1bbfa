"""Seeded scenarios for the detection-quality benchmark: spans with known, injected changes.

    sc = generate(seed=1, services=8, functions_per_service=40, hours=8.0)
    sc.changes          # the ground truth: list[Change], decided before any span exists
    for batch in sc:    # processor.receiver.decode.Batch, 10 s of event time each, in order
        engine.ingest(batch)

The model, per seed:

- Services each have functions. A function's latency is lognormal (median log-uniform in
  [1 ms, 300 ms], sigma U(0.3, 1.0)) or, for about a third of them, a lognormal body with a
  Pareto tail on 2% of the spans (shape U(1.5, 3), starting at the body's 98th percentile,
  truncated at 100x that).
- Call rate: U(7, 15)/s times a diurnal factor ``1 + 0.3 sin(2 pi t / 24 h + phase)`` (a phase
  per service) times a per-minute burst factor lognormal(0, 0.15) per service, never below
  5/s. Spans per 10 s chunk are the rate times 10 s, stochastically rounded, so every
  location gets at least 50 spans per chunk (300 per minute) while it is fully served.
- Load ``L = diurnal x burst`` per service; load-sensitive functions (beta0 = 0.3, a quarter
  of them) have latency times ``1 + beta (L - 0.7)``.
- Errors: 0.1% of spans (a fifth of the functions: none; a tenth of the unchanged ones
  fail steadily at a share log-uniform in [1%, 30%], drawn from a stream of their own),
  each error with one exception event whose type comes from a small per-function set.
- Versions: every service runs "1.0.0"; at a per-service time (3 h or later) "1.1.0" rolls
  out, at once or as a canary (10% of the service's spans for 30 min, then all of them).
- Changes exist only in "1.1.0", on 30-40% of each service's functions, one kind each (see
  ``Change``), drawn from a deck (``DEFAULT_DECK``) so kinds and sizes keep their
  proportions; plus 1-2 functions per service that exist only in "1.1.0" (kind "new").

Load beyond the baseline (``generate_load``, or ``generate(..., load_cases=True)``): every
service also has ``LOAD_FOLLOWING`` functions whose latency follows its load and that no
version changes, half linearly (``1 + beta (L - 0.7)``, beta U(0.5, 1.5)), half as a queue
(``(1 - rho) / (1 - rho L)``, rho at load 1 U(0.15, 0.25), so about 0.5-0.8 at the surge's
peaks; rho L capped at 0.95); and one of two cases (services alternate):

- "surge": the load ramps up to ``SURGE`` times (over ``SURGE_RAMP``, from a time drawn in
  [2.5 h, 4 h]) and stays there: past anything the warm-up, and most of the baseline, saw.
- "mix": the rollout of "1.1.0" changes how often other functions are called (three
  quarters of the unchanged ones are called 0.2-0.4 times as often: a cache, a removed N+1
  query), so the calls per second of the rest of the service, the detectors' load
  measure, drop about a quarter at the same load; the deck's changes move other
  functions' latency (and spans in flight) as in every scenario.

Any event on a load-following function is false. Call rates follow the load down to
``LOAD_MIN_RATE`` (1/s) rather than 5/s, so that a function's calls are in proportion to
its service's load, as they would be.

Everything is numpy on whole chunks; the same seed (and arguments) gives the same spans,
and chunk ``i`` can be regenerated alone (its random stream is seeded by (seed, i)).
``encode_request`` turns a Batch into OTLP/protobuf bytes for the gRPC replay.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from processor.pipeline.location import Location
from processor.receiver.decode import Batch

SEC = 1_000_000_000
MINUTE = 60 * SEC
HOUR = 3600 * SEC
EPOCH_NS = 1_699_999_200 * SEC  # 2023-11-14 22:00 UTC: a whole hour, so every window aligns
ENVIRONMENT = "production"
OLD_VERSION = "1.0.0"
NEW_VERSION = "1.1.0"
BASE_ERROR_SHARE = 0.001
STEADY_ERRORS = 0.1  # share of unchanged functions failing steadily at 1-30%
NEW_EXCEPTION_SHARE = 0.002
TAIL_SHARE = 0.02               # share of spans in the Pareto tail of heavy-tailed functions
TAIL_CAP = 100.0                # Pareto tail truncated at this multiple of its start
Z98 = 2.053748910631823         # standard normal 98th percentile: where the Pareto tail starts
P99_SHIFT_SHARE = 0.015         # tail-only shifts: share of spans moved to [k q, 1.3 k q]
P999_SHIFT_SHARE = 0.0015
CANARY_SHARE = 0.10
CANARY_NS = 30 * MINUTE
LOAD_PIVOT = 0.7                # load at which scaling changes leave latency as it was
LOAD_FOLLOWING = 4              # load cases: functions per service whose latency follows load
SURGE = 2.0                     # load cases, "surge": the load multiplied by this ...
SURGE_RAMP = HOUR               # ... reached over this long, then kept
SURGE_START = (2.5, 4.0)        # hours: when the ramp starts
RHO_CAP = 0.95                  # queue-like functions: utilisation never above this
LOAD_MIN_RATE = 1.0             # load cases: call rates follow the load down to this (per s)
MIX_SHARE = 0.75                # load cases, "mix": share of the unchanged functions whose ...
MIX_FACTOR = (0.2, 0.4)         # ... call rate the rollout multiplies by U(these)

EXPECTED_EVENT = {
    "median": "latency_regression",
    "p99": "latency_regression",
    "p999": "latency_regression",
    "error": "error_regression",
    "new_exception": "new_exception",
    "scaling": "scaling_regression",
    "vanished": "dormant",
    "new": "first_seen",
}
EXPECTED_QUANTILE = {"median": "p50", "p99": "p99", "p999": "p999"}

# (kind, effect, copies): one deck of 40 cards, shuffled per seed and dealt to the changed
# functions. Effects: median = factor on the whole distribution; p99/p999 = k (see
# P99_SHIFT_SHARE); error = the new error share (baseline 0.1%); new_exception = share of
# spans with the new type; scaling = beta added; vanished = 0.
DEFAULT_DECK: tuple[tuple[str, float, int], ...] = (
    ("median", 1.10, 3), ("median", 1.25, 3), ("median", 1.5, 3), ("median", 2.0, 3),
    ("p99", 1.5, 2), ("p99", 2.0, 3), ("p99", 3.0, 3),
    ("p999", 2.0, 2), ("p999", 3.0, 2),
    ("error", 0.002, 1), ("error", 0.005, 2), ("error", 0.01, 2), ("error", 0.02, 2),
    ("error", 0.05, 2),
    ("new_exception", NEW_EXCEPTION_SHARE, 2),
    ("scaling", 0.5, 1), ("scaling", 1.0, 1), ("scaling", 2.0, 1),
    ("vanished", 0.0, 2),
)

SERVICE_NAMES = ["checkout", "cart", "payment", "catalog", "inventory", "shipping", "accounts",
                 "search", "pricing", "orders", "reviews", "gateway"]
MODULES = ["handlers", "service", "repository", "client", "models", "tasks", "views", "cache"]
VERBS = ["get", "list", "create", "update", "delete", "apply", "validate", "compute"]
NOUNS = ["order", "item", "user", "discount", "price", "session", "invoice", "stock"]
EXCEPTIONS = ["TimeoutError", "ValueError", "KeyError", "ConnectionResetError",
              "psycopg2.errors.DeadlockDetected", "redis.exceptions.ConnectionError",
              "grpc.RpcError", "json.JSONDecodeError", "PermissionError"]


@dataclass(frozen=True)
class Change:
    """One injected change: the ground truth a detection is scored against.

    ``change_ns`` is when the first span of the new version can appear (the canary start for
    canaries); ``full_ns`` is when the new version serves every span of the service.
    ``effect`` depends on ``kind`` (see DEFAULT_DECK); ``baseline`` is the figure it changes:
    median ms (median), p99 / p99.9 ms (p99 / p999, from a large sample at load 1), error
    share (error, new_exception), beta0 (scaling), 0 (vanished, new).
    """
    key: str
    service: str
    function: str
    kind: str
    effect: float
    change_ns: int
    full_ns: int
    version: tuple[str, str, str]
    canary: bool
    baseline: float
    loc_index: int

    @property
    def expected_event(self) -> str:
        return EXPECTED_EVENT[self.kind]

    @property
    def label(self) -> str:
        return effect_label(self.kind, self.effect)


def effect_label(kind: str, effect: float) -> str:
    if kind == "median":
        return f"+{round((effect - 1) * 100):d}%"
    if kind in ("p99", "p999"):
        return f"x{effect:g}"
    if kind == "error":
        return f"0.1%->{effect * 100:g}% ({effect / BASE_ERROR_SHARE:g}x)"
    if kind == "new_exception":
        return f"{effect * 100:g}% of spans"
    if kind == "scaling":
        return f"beta+{effect:g}"
    return "-"


@dataclass
class Service:
    index: int
    name: str
    phase: float
    old: tuple[str, str, str]
    new: tuple[str, str, str]
    change_ns: int        # first span of the new version
    full_ns: int          # the new version serves everything from here on
    canary: bool
    case: str = ""        # load cases: "surge" or "mix" (see the module docstring)
    surge: float = 1.0    # "surge": the load's final factor ...
    surge_ns: int = 0     # ... ramped up over SURGE_RAMP from here


@dataclass
class Function:
    index: int            # location index in Scenario.locations
    service: int
    location: Location
    median_ms: float
    sigma: float
    tail_shape: float     # 0: plain lognormal
    beta: float           # baseline load sensitivity
    error_share: float
    exception_types: tuple[str, ...]
    base_rate: float
    in_old: bool = True
    in_new: bool = True
    change: Change | None = None
    attrs: tuple[tuple[str, object], ...] = ()   # extra span attributes, for the OTLP replay
    rho: float = 0.0      # queue-like: utilisation at load 1 (latency x (1 - rho) / (1 - rho L))
    load_following: str = ""  # load cases: "linear" or "queue" (unchanged by any version)
    calls_new: float = 1.0    # "mix": the new version calls it this many times as often


@dataclass
class _Params:
    """Per-series parameters; series = location * 2 + (1 if new version else 0)."""
    mu: np.ndarray
    sigma: np.ndarray
    tail_share: np.ndarray
    tail_shape: np.ndarray
    beta: np.ndarray
    shift_share: np.ndarray
    shift_lo: np.ndarray
    shift_hi: np.ndarray
    error_share: np.ndarray
    new_exc_share: np.ndarray
    rho: np.ndarray


def _draw_durations(p: _Params, series: np.ndarray, load: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    """Durations (float ns) of spans of the given series at the given load."""
    n = len(series)
    mu, sigma = p.mu[series], p.sigma[series]
    d = np.exp(mu + sigma * rng.standard_normal(n))
    u = rng.random(n)
    tail = np.flatnonzero(u < p.tail_share[series])
    if len(tail):
        s = series[tail]
        start = np.exp(p.mu[s] + p.sigma[s] * Z98)
        # Pareto(start, shape) by inversion, truncated at TAIL_CAP * start.
        v = rng.random(len(tail))
        d[tail] = start * np.minimum((1.0 - v) ** (-1.0 / p.tail_shape[s]), TAIL_CAP)
    d *= np.maximum(0.1, 1.0 + p.beta[series] * (load - LOAD_PIVOT))
    queue = np.flatnonzero(p.rho[series] > 0)
    if len(queue):
        rho = p.rho[series[queue]]
        d[queue] *= (1.0 - rho) / (1.0 - np.minimum(rho * load[queue], RHO_CAP))
    w = rng.random(n)
    moved = np.flatnonzero(w < p.shift_share[series])
    if len(moved):
        s = series[moved]
        d[moved] = p.shift_lo[s] + (p.shift_hi[s] - p.shift_lo[s]) * rng.random(len(moved))
    return d


def _series_params(functions: list[Function]) -> _Params:
    n = 2 * len(functions)
    mu, sigma, tshare, tshape, beta = (np.zeros(n) for _ in range(5))
    sshare, slo, shi, err, nexc, rho = (np.zeros(n) for _ in range(6))
    for f in functions:
        for new in (0, 1):
            i = 2 * f.index + new
            mu[i] = math.log(f.median_ms * 1e6)
            sigma[i] = f.sigma
            tshare[i] = TAIL_SHARE if f.tail_shape else 0.0
            tshape[i] = f.tail_shape or 1.0
            beta[i] = f.beta
            rho[i] = f.rho
            err[i] = f.error_share
            c = f.change
            if not new or c is None:
                continue
            if c.kind == "median":
                mu[i] += math.log(c.effect)
            elif c.kind in ("p99", "p999"):
                sshare[i] = P99_SHIFT_SHARE if c.kind == "p99" else P999_SHIFT_SHARE
                q = c.baseline * 1e6
                slo[i], shi[i] = c.effect * q, 1.3 * c.effect * q
            elif c.kind == "error":
                err[i] = c.effect
            elif c.kind == "new_exception":
                nexc[i] = c.effect
            elif c.kind == "scaling":
                beta[i] += c.effect
    return _Params(mu, sigma, tshare, tshape, beta, sshare, slo, shi, err, nexc, rho)


class Scenario:
    """Ground truth plus the spans, chunk by chunk. Build with ``generate``."""

    def __init__(self, seed: int, services: list[Service], functions: list[Function],
                 hours: float, chunk_s: int, min_rate: float, burst_sigma: float):
        self.seed = seed
        self.services = services
        self.functions = functions
        self.locations = [f.location for f in functions]
        self.chunk_ns = chunk_s * SEC
        self.start_ns = EPOCH_NS
        self.n_chunks = int(round(hours * 3600 / chunk_s))
        self.end_ns = self.start_ns + self.n_chunks * self.chunk_ns
        self.changes = [f.change for f in functions if f.change is not None]
        self.loc_service = np.array([f.service for f in functions], np.int64)
        self._version_list = [v for s in services for v in (s.old, s.new)]  # id = svc*2 + new
        self._params = _series_params(functions)
        self._counts(min_rate, burst_sigma)

    # --- model -------------------------------------------------------------------------------
    def _counts(self, min_rate: float, burst_sigma: float) -> None:
        """Spans per (location, chunk) for each version, and the load per (service, chunk)."""
        rng = np.random.default_rng([self.seed, 1])
        nc, ns = self.n_chunks, len(self.services)
        t_mid = (np.arange(nc) + 0.5) * self.chunk_ns / SEC
        phase = np.array([s.phase for s in self.services])
        diurnal = 1.0 + 0.3 * np.sin(2 * np.pi * t_mid[None, :] / 86400.0 + phase[:, None])
        minutes = (np.arange(nc) * self.chunk_ns) // MINUTE
        burst = rng.lognormal(0.0, burst_sigma, (ns, int(minutes[-1]) + 1))[:, minutes]
        self.load = diurnal * burst                                      # (services, chunks)
        t_abs = self.start_ns + np.arange(nc) * self.chunk_ns
        for s in self.services:
            if s.surge != 1.0:
                ramp = np.clip((t_abs - s.surge_ns) / SURGE_RAMP, 0.0, 1.0)
                self.load[s.index] *= 1.0 + (s.surge - 1.0) * ramp
        base = np.array([f.base_rate for f in self.functions])
        self.rate = np.maximum(min_rate, base[:, None] * self.load[self.loc_service])
        chunk_s = self.chunk_ns / SEC
        total = np.floor(self.rate * chunk_s + rng.random(self.rate.shape)).astype(np.int64)
        starts = self.start_ns + np.arange(nc) * self.chunk_ns
        share_new = np.zeros((ns, nc))
        for s in self.services:
            share_new[s.index, starts >= s.change_ns] = CANARY_SHARE
            share_new[s.index, starts >= s.full_ns] = 1.0
        new = rng.binomial(total, share_new[self.loc_service])
        old = total - new
        calls_new = np.array([f.calls_new for f in self.functions])
        if np.any(calls_new != 1.0):  # "mix": the new version calls some functions less often
            mix = np.random.default_rng([self.seed, 7])
            new = np.floor(new * calls_new[:, None] + mix.random(new.shape)).astype(np.int64)
        in_old = np.array([f.in_old for f in self.functions])
        in_new = np.array([f.in_new for f in self.functions])
        old[~in_old] = 0
        new[~in_new] = 0
        self.counts_old = old.astype(np.int32)                           # (locations, chunks)
        self.counts_new = new.astype(np.int32)

    # --- spans -------------------------------------------------------------------------------
    def __iter__(self):
        for c in range(self.n_chunks):
            yield self.chunk(c)

    def __len__(self) -> int:
        return self.n_chunks

    @property
    def total_spans(self) -> int:
        return int(self.counts_old.sum()) + int(self.counts_new.sum())

    def chunk(self, c: int) -> Batch:
        """Spans with end in [start + c * chunk, start + (c + 1) * chunk), sorted by end."""
        rng = np.random.default_rng([self.seed, 2, c])
        per_series = np.stack([self.counts_old[:, c], self.counts_new[:, c]], axis=1).ravel()
        n = int(per_series.sum())
        series = np.repeat(np.arange(len(per_series), dtype=np.int64), per_series)
        p = self._params
        dur = _draw_durations(p, series, self.load[self.loc_service, c][series >> 1], rng)
        error = rng.random(n) < p.error_share[series]
        new_exc = rng.random(n) < p.new_exc_share[series]
        # End times are i.i.d. uniform in the chunk, so dealing sorted times to the spans in
        # a random order is the same as drawing them per span and sorting (and cheaper).
        perm = rng.permutation(n)
        series, dur, error, new_exc = series[perm], dur[perm], error[perm], new_exc[perm]
        end = self.start_ns + c * self.chunk_ns + np.sort(rng.integers(0, self.chunk_ns, n))
        dur = np.maximum(1000, np.round(dur)).astype(np.int64)
        tid = np.frombuffer(rng.bytes(16 * n), np.uint8).reshape(n, 16).copy()
        tid[:, 0] |= 1  # never all zero

        exceptions = []
        rows = np.flatnonzero(error | new_exc)
        pick = rng.integers(0, 1 << 30, len(rows)).tolist()
        for r, k in zip(rows.tolist(), pick):
            f = self.functions[int(series[r]) >> 1]
            if new_exc[r]:
                exceptions.append((r, _new_exception_type(f)))
            else:
                exceptions.append((r, f.exception_types[k % len(f.exception_types)]))
        error |= new_exc

        # Per-batch tables hold only what the batch uses, as the OTLP decoder's do.
        loc_used = np.flatnonzero(per_series.reshape(-1, 2).sum(axis=1))
        loc_lut = np.full(len(self.functions), -1, np.int32)
        loc_lut[loc_used] = np.arange(len(loc_used), dtype=np.int32)
        used = np.flatnonzero(per_series)
        ver_of_series = self.loc_service[used >> 1] * 2 + (used & 1)
        ver_used = np.unique(ver_of_series)
        ver_lut = np.full(2 * len(self.functions), -1, np.int32)
        ver_lut[used] = np.searchsorted(ver_used, ver_of_series).astype(np.int32)
        return Batch(
            locations=[self.locations[i] for i in loc_used.tolist()],
            versions=[self._version_list[i] for i in ver_used.tolist()],
            loc=loc_lut[series >> 1], ver=ver_lut[series],
            start=end - dur, end=end, error=error, trace_id=tid, exceptions=exceptions)

    # --- ground-truth helpers ----------------------------------------------------------------
    def chunk_of(self, t_ns: int) -> int:
        """Index of the chunk holding event time ``t_ns`` (clipped to the scenario)."""
        return int(min(max((t_ns - self.start_ns) // self.chunk_ns, 0), self.n_chunks))

    def spans_between(self, loc_index: int, t0_ns: int, t1_ns: int, new_only: bool = True) -> int:
        """Spans of a location with end in [t0, t1); both on chunk boundaries (windows are)."""
        a, b = self.chunk_of(t0_ns), self.chunk_of(t1_ns)
        n = int(self.counts_new[loc_index, a:b].sum())
        if not new_only:
            n += int(self.counts_old[loc_index, a:b].sum())
        return n

    def sample_durations(self, loc_index: int, new: bool, n: int, load: float = 1.0,
                         rng: np.random.Generator | None = None) -> np.ndarray:
        """``n`` durations (ns) of one location in one version at a fixed load."""
        rng = rng or np.random.default_rng([self.seed, 3, loc_index, int(new)])
        series = np.full(n, 2 * loc_index + int(new), np.int64)
        return _draw_durations(self._params, series, np.full(n, float(load)), rng)

    def error_share(self, loc_index: int, new: bool) -> float:
        """Expected share of spans with status ERROR (the new exception type included)."""
        i = 2 * loc_index + int(new)
        return float(self._params.error_share[i] + self._params.new_exc_share[i])

    def version_of(self, service: int, new: bool) -> tuple[str, str, str]:
        return self._version_list[2 * service + int(new)]


def _new_exception_type(f: Function) -> str:
    short = f.location.function.rsplit(".", 1)[-1].title().replace("_", "")
    return f"{f.location.service}.errors.{short}Error"


def _hex(rng: np.random.Generator, n: int = 12) -> str:
    return "".join("0123456789abcdef"[i] for i in rng.integers(0, 16, n))


def _baseline_quantile(sc_params: _Params, index: int, q: float, seed: int) -> float:
    """Quantile (ms) of a location's old-version durations at load 1, from 200k draws."""
    rng = np.random.default_rng([seed, 4, index])
    series = np.full(200_000, 2 * index, np.int64)
    d = _draw_durations(sc_params, series, np.ones(len(series)), rng)
    return float(np.quantile(d, q)) / 1e6


def generate(seed: int, services: int = 8, functions_per_service: int = 40, hours: float = 8.0,
             *, changed_share: tuple[float, float] = (0.30, 0.40),
             new_functions: tuple[int, int] = (1, 2), canary_probability: float = 0.4,
             warmup_hours: float = 3.0, settle_hours: float = 2.5,
             rate: tuple[float, float] = (7.0, 15.0), min_rate: float = 5.0,
             burst_sigma: float = 0.15, chunk_s: int = 10,
             deck: tuple[tuple[str, float, int], ...] = DEFAULT_DECK,
             load_cases: bool = False) -> Scenario:
    """A seeded scenario; see the module docstring for the model.

    The rollout of "1.1.0" happens at a chunk boundary drawn uniformly in
    [warmup_hours, max(warmup_hours, hours - settle_hours)]. ``load_cases`` adds the
    load-following functions and the "surge" / "mix" cases (``generate_load``); everything
    else is drawn as without them.
    """
    if services > len(SERVICE_NAMES) * 10:
        raise ValueError("too many services")
    rng = np.random.default_rng([seed, 0])
    chunk_ns = chunk_s * SEC
    svcs: list[Service] = []
    for s in range(services):
        lap, i = divmod(s, len(SERVICE_NAMES))
        name = SERVICE_NAMES[i] + (str(lap) if lap else "")
        lo, hi = warmup_hours * HOUR, max(warmup_hours, hours - settle_hours) * HOUR
        at = EPOCH_NS + int(rng.uniform(lo, hi)) // chunk_ns * chunk_ns
        canary = bool(rng.random() < canary_probability)
        svcs.append(Service(
            index=s, name=name, phase=float(rng.uniform(0, 2 * np.pi)),
            old=(name, OLD_VERSION, _hex(rng)), new=(name, NEW_VERSION, _hex(rng)),
            change_ns=at, full_ns=at + (CANARY_NS if canary else 0), canary=canary))

    cards = [(k, e) for k, e, copies in deck for _ in range(copies)]
    hand: list[tuple[str, float]] = []

    def deal() -> tuple[str, float]:
        if not hand:
            hand.extend(cards[i] for i in rng.permutation(len(cards)))
        return hand.pop()

    names = [(m, v, o) for m in MODULES for v in VERBS for o in NOUNS]
    functions: list[Function] = []
    pending: list[tuple[Function, str, float]] = []
    for svc in svcs:
        extra = int(rng.integers(new_functions[0], new_functions[1] + 1))
        total = functions_per_service + extra
        picked = rng.choice(len(names), total, replace=False)
        n_changed = int(round(rng.uniform(*changed_share) * functions_per_service))
        changed = set(rng.choice(functions_per_service, n_changed, replace=False).tolist())
        for j in range(total):
            module, verb, noun = names[int(picked[j])]
            fn = f"{svc.name}.{module}.{verb}_{noun}"
            loc = Location(ENVIRONMENT, svc.name, fn, f"{svc.name}/{module}.py",
                           str(int(rng.integers(10, 1500))))
            heavy = rng.random() < 1 / 3
            kind, effect = ("new", 0.0) if j >= functions_per_service else (
                deal() if j in changed else (None, 0.0))
            error_share = 0.0 if (rng.random() < 0.2 and kind != "error") else BASE_ERROR_SHARE
            n_types = int(rng.integers(1, 4))
            f = Function(
                index=len(functions), service=svc.index, location=loc,
                median_ms=float(np.exp(rng.uniform(np.log(1.0), np.log(300.0)))),
                sigma=float(rng.uniform(0.3, 1.0)),
                tail_shape=float(rng.uniform(1.5, 3.0)) if heavy else 0.0,
                beta=0.3 if rng.random() < 0.25 else 0.0,
                error_share=error_share,
                exception_types=tuple(EXCEPTIONS[i] for i in
                                      rng.choice(len(EXCEPTIONS), n_types, replace=False)),
                base_rate=float(rng.uniform(*rate)),
                in_old=kind != "new", in_new=kind != "vanished",
                attrs=_extra_attributes(module, verb, noun, rng),
            )
            functions.append(f)
            if kind is not None:
                pending.append((f, kind, effect))

    if load_cases:
        _add_load_cases(seed, svcs, functions, names, pending, chunk_ns)

    # Functions that always fail often (a probe answered 404, a cache miss raised): a steady
    # share is no regression. A stream of their own leaves every other draw as it was.
    steady, changed_ids = np.random.default_rng([seed, 5]), {f.index for f, _, _ in pending}
    for f in functions:
        if f.index not in changed_ids and f.error_share and steady.random() < STEADY_ERRORS:
            f.error_share = float(10 ** steady.uniform(-2.0, np.log10(0.3)))

    # Baseline figures of tail changes come from the old version's own distribution.
    params = _series_params(functions)
    for f, kind, effect in pending:
        svc = svcs[f.service]
        if kind in ("p99", "p999"):
            base = _baseline_quantile(params, f.index, 0.99 if kind == "p99" else 0.999, seed)
        elif kind == "median":
            base = f.median_ms
        elif kind in ("error", "new_exception"):
            base = f.error_share
        elif kind == "scaling":
            base = f.beta
        else:
            base = 0.0
        f.change = Change(key=f.location.key, service=svc.name, function=f.location.function,
                          kind=kind, effect=float(effect), change_ns=svc.change_ns,
                          full_ns=svc.full_ns, version=svc.new, canary=svc.canary,
                          baseline=float(base), loc_index=f.index)
    return Scenario(seed, svcs, functions, hours, chunk_s, min_rate, burst_sigma)


def generate_load(seed: int, services: int = 4, functions_per_service: int = 12, hours: float = 8.0,
                  **kw) -> Scenario:
    """A scenario of the load cases (see the module docstring): services alternate "surge"
    and "mix", each with ``LOAD_FOLLOWING`` load-following functions besides the usual ones."""
    kw.setdefault("min_rate", LOAD_MIN_RATE)
    return generate(seed, services, functions_per_service, hours, load_cases=True, **kw)


def _add_load_cases(seed: int, svcs: list[Service], functions: list[Function], names: list,
                    pending: list, chunk_ns: int) -> None:
    """Load-following functions, a case per service, and the "mix" call rates; drawn from a
    stream of their own, so the rest of the scenario is as without them."""
    rng = np.random.default_rng([seed, 6])
    changed = {f.index for f, _, _ in pending}
    for svc in svcs:
        svc.case = "surge" if svc.index % 2 == 0 else "mix"
        if svc.case == "surge":
            svc.surge = SURGE
            at = EPOCH_NS + int(rng.uniform(*SURGE_START) * HOUR)
            svc.surge_ns = at // chunk_ns * chunk_ns
        mine = [f for f in functions if f.service == svc.index]
        taken = {f.location.function for f in mine}
        free = [n for n in names if f"{svc.name}.{n[0]}.{n[1]}_{n[2]}" not in taken]
        for j, k in enumerate(rng.choice(len(free), LOAD_FOLLOWING, replace=False).tolist()):
            module, verb, noun = free[k]
            shape = "linear" if j % 2 == 0 else "queue"
            loc = Location(ENVIRONMENT, svc.name, f"{svc.name}.{module}.{verb}_{noun}",
                           f"{svc.name}/{module}.py", str(int(rng.integers(10, 1500))))
            functions.append(Function(
                index=len(functions), service=svc.index, location=loc,
                median_ms=float(np.exp(rng.uniform(np.log(1.0), np.log(300.0)))),
                sigma=float(rng.uniform(0.3, 1.0)), tail_shape=0.0,
                beta=float(rng.uniform(0.5, 1.5)) if shape == "linear" else 0.0,
                rho=float(rng.uniform(0.15, 0.25)) if shape == "queue" else 0.0,
                error_share=BASE_ERROR_SHARE, exception_types=(EXCEPTIONS[int(rng.integers(len(EXCEPTIONS)))],),
                base_rate=float(rng.uniform(7.0, 15.0)), load_following=shape,
                attrs=_extra_attributes(module, verb, noun, rng)))
        if svc.case == "mix":  # unchanged functions the new version calls less often
            unchanged = [f for f in mine if f.index not in changed]
            for k in rng.permutation(len(unchanged))[:int(math.ceil(MIX_SHARE * len(unchanged)))].tolist():
                unchanged[k].calls_new = float(rng.uniform(*MIX_FACTOR))


def _extra_attributes(module: str, verb: str, noun: str, rng) -> tuple[tuple[str, object], ...]:
    if module in ("handlers", "views"):
        method = {"get": "GET", "list": "GET", "create": "POST",
                  "delete": "DELETE"}.get(verb, "PUT")
        return (("http.request.method", method), ("http.route", f"/api/{noun}s/{{id}}"),
                ("http.response.status_code", 200))
    if module == "repository":
        return (("db.system.name", "postgresql"), ("db.operation.name", "SELECT"),
                ("db.collection.name", f"{noun}s"))
    if module in ("client", "cache"):
        return (("server.address", f"{noun}-svc.internal"),
                ("server.port", int(rng.integers(1024, 9000))))
    return (("thread.name", "worker"),)


# --- OTLP encoding (for the gRPC replay) -------------------------------------------------------
# Hand-written protobuf wire format: fields are written in field-number order, as the
# generated encoder would; a test checks the result against the protobuf parser and
# processor.receiver.decode.

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _ld(field_no: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(field_no << 3 | 2) + _varint(len(payload)) + payload


def _any_value(v) -> bytes:
    if isinstance(v, bool):
        return _varint(2 << 3) + _varint(int(v))
    if isinstance(v, int):
        return _varint(3 << 3) + _varint(v & 0xFFFFFFFFFFFFFFFF)
    if isinstance(v, float):
        return _varint(4 << 3 | 1) + struct.pack("<d", v)
    return _ld(1, str(v).encode())


def _kv(key: str, value) -> bytes:
    return _ld(1, key.encode()) + _ld(2, _any_value(value))


class OtlpEncoder:
    """Encodes a scenario's Batches as ExportTraceServiceRequest bytes.

    Spans are grouped by resource (environment, service, version) in order of first
    appearance and keep their batch order inside a group. Each span carries
    code.function.name, code.file.path, code.line.number and a few other attributes,
    status ERROR for errors, and an "exception" event (exception.type, exception.message)
    per exception; its span id comes from its trace id. The resource carries service.name,
    service.version, deployment.environment.name, vcs.ref.head.revision and a few more.
    """

    _SCOPE = _ld(1, _ld(1, b"backflow.benchmarks.scenarios") + _ld(2, b"1.0"))
    _STATUS_ERROR = _ld(15, _varint(3 << 3) + _varint(2))

    def __init__(self, scenario: Scenario):
        self.functions = {f.location.identity: f for f in scenario.functions}
        self._loc_cache: dict[tuple, tuple[bytes, bytes]] = {}
        self._res_cache: dict[tuple, bytes] = {}

    def _location(self, loc: Location) -> tuple[bytes, bytes]:
        """(name and kind, attributes) of a location's spans, encoded once."""
        parts = self._loc_cache.get(loc.identity)
        if parts is None:
            fn = self.functions.get(loc.identity)
            extra = list(fn.attrs) if fn else []
            attrs = [("code.function.name", loc.function), ("code.file.path", loc.file),
                     ("code.line.number", int(loc.line) if loc.line else 0)] + extra
            kind = 2 if any(k == "http.route" for k, _ in extra) else 1  # SERVER, INTERNAL
            name = loc.function.rsplit(".", 1)[-1].encode()
            head = _ld(5, name) + _varint(6 << 3) + _varint(kind)
            tail = b"".join(_ld(9, _kv(k, v)) for k, v in attrs)
            parts = self._loc_cache[loc.identity] = (head, tail)
        return parts

    def _resource(self, env: str, version: tuple[str, str, str]) -> bytes:
        res = self._res_cache.get((env, version))
        if res is None:
            svc, ver, rev = version
            attrs = [("service.name", svc), ("service.version", ver),
                     ("deployment.environment.name", env), ("vcs.ref.head.revision", rev),
                     ("service.instance.id", f"{svc}-{rev[:6]}-0"), ("host.name", f"{svc}-node-1"),
                     ("telemetry.sdk.language", "python"), ("telemetry.sdk.name", "opentelemetry")]
            res = _ld(1, b"".join(_ld(1, _kv(k, v)) for k, v in attrs))
            self._res_cache[(env, version)] = res
        return res

    def encode(self, batch: Batch, max_bytes: int = 3 << 20) -> list[bytes]:
        """The batch as one or more requests, each under about ``max_bytes``."""
        exc: dict[int, list[str]] = {}
        for r, t in batch.exceptions:
            exc.setdefault(r, []).append(t)
        loc_parts = [self._location(l) for l in batch.locations]
        loc_col, ver_col = batch.loc.tolist(), batch.ver.tolist()
        starts, ends = batch.start.tolist(), batch.end.tolist()
        err_set = set(np.flatnonzero(batch.error).tolist())
        tids = batch.trace_id.tobytes()
        pack = struct.Struct("<Q").pack
        spans_of: dict[tuple, list[bytes]] = {}
        for i in range(len(batch)):
            li = loc_col[i]
            head, tail = loc_parts[li]
            tid = tids[16 * i: 16 * i + 16]
            sid = tid[8:] if any(tid[8:]) else tid[:8]
            parts = [b"\x0a\x10", tid, b"\x12\x08", sid, head,
                     b"\x39", pack(starts[i]), b"\x41", pack(ends[i]), tail]
            for t in exc.get(i, ()):
                fn = batch.locations[li].function
                ev = (b"\x09" + pack(ends[i]) + _ld(2, b"exception")
                      + _ld(3, _kv("exception.type", t))
                      + _ld(3, _kv("exception.message", f"{t} in {fn}")))
                parts.append(_ld(11, ev))
            if i in err_set:
                parts.append(self._STATUS_ERROR)
            body = b"".join(parts)
            key = (batch.locations[li].environment, batch.versions[ver_col[i]])
            spans_of.setdefault(key, []).append(b"\x12" + _varint(len(body)) + body)
        return self._requests(spans_of, max_bytes)

    def _requests(self, spans_of: dict, max_bytes: int) -> list[bytes]:
        out: list[bytes] = []
        cur: list[bytes] = []
        size = 0
        for (env, version), spans in spans_of.items():
            res = self._resource(env, version)
            group: list[bytes] = []
            for s in spans:
                if size + len(s) > max_bytes and (group or cur):
                    if group:
                        cur.append(self._resource_spans(res, group))
                    out.append(b"".join(cur))
                    cur, group, size = [], [], 0
                group.append(s)
                size += len(s)
            if group:
                cur.append(self._resource_spans(res, group))
        if cur:
            out.append(b"".join(cur))
        return out

    def _resource_spans(self, res: bytes, spans: list[bytes]) -> bytes:
        return _ld(1, res + _ld(2, self._SCOPE + b"".join(spans)))
