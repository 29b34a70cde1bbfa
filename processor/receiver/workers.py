"""Receiver processes: every core decodes, one process aggregates and detects.

With ``--workers N`` (N > 1) the main process starts N receiver processes. Each runs an
OTLP/gRPC server and (unless ``--otlp-http off``) an OTLP/HTTP server on the same addresses
(``SO_REUSEPORT``: the kernel spreads connections over them), decodes requests with the same code as the in-process receiver and sends the
decoded ``Batch`` to the main process over a pipe. The main process feeds the batches to
its one pipeline, so windows, lateness, baselines and detectors are exactly those of a
single process fed the same spans in the same order: nothing is merged approximately.

Backpressure crosses the process boundary as a shared flag: the main process raises it
when its queue is full, and the receivers then answer UNAVAILABLE with RetryInfo (HTTP: 503
with Retry-After) before decoding, as the in-process receivers do. The pipe itself is bounded by the OS, so a
receiver that sends while the main process is behind blocks rather than buffers.

Receiver counters (accepted, refused) are counted in the receiver and sent as deltas to
the main process, which owns the one /metrics endpoint.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import signal
import socket
import threading
import time
from collections import Counter
from typing import Callable

from processor.config import Config, split_address
from processor.logs import configure_logging
from processor.parsing import listening
from processor.receiver.decode import Batch
from processor.receiver import build_receivers
from processor.receiver.intake import OVERLOAD_RETRY_S, Overloaded

log = logging.getLogger("backflow.workers")

_BATCH, _COUNTS, _POINTS = b"B", b"M", b"P"
_FLUSH_COUNTS_S = 0.25
_GRACE_S = 5.0  # a stopping receiver lets requests in flight finish for this long


class _Relay:
    """Stands in for the receiver's counters in a worker: ``relay.refused.labels(...).inc(n)``
    records a delta that ``take()`` hands over to the main process."""

    class _Child:
        def __init__(self, counts: Counter, key: tuple):
            self.counts, self.key = counts, key

        def inc(self, n: float = 1) -> None:
            self.counts[self.key] += n

    class _Family:
        def __init__(self, relay: "_Relay", name: str):
            self.relay, self.name = relay, name

        def labels(self, **labels) -> "_Relay._Child":
            return _Relay._Child(self.relay.counts, (self.name, tuple(sorted(labels.items()))))

    def __init__(self):
        self.counts: Counter = Counter()
        for name in ("accepted", "refused", "refused_requests", "accepted_points", "refused_points"):
            setattr(self, name, _Relay._Family(self, name))

    def take(self) -> dict:
        out, self.counts = dict(self.counts), Counter()
        return out


def _worker_main(cfg: Config, index: int, conn, overloaded, listening) -> None:
    """One receiver process: gRPC in, decoded batches out through ``conn``."""
    configure_logging(cfg.log_level, cfg.secrets, name_suffix=f"[{index}]")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the main process decides
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    relay = _Relay()
    send_lock = threading.Lock()
    parent = os.getppid()

    def send(kind: bytes, payload: bytes) -> None:
        with send_lock:
            conn.send_bytes(kind + payload)

    def on_batch(batch) -> None:
        if overloaded.value:
            raise Overloaded(delay_s=OVERLOAD_RETRY_S)
        if isinstance(batch, Batch):
            send(_BATCH, batch.to_wire())
        else:  # OTLP metrics' points (processor/receiver/metrics.py): this process's own pickle
            send(_POINTS, pickle.dumps(batch, protocol=5))

    receivers = build_receivers(cfg, on_batch, relay, has_room=lambda: not overloaded.value, reuse_port=True)
    for receiver in receivers:
        receiver.start()  # raises when it cannot bind, which ends the process with an error
    listening.set()
    while not stop.wait(_FLUSH_COUNTS_S):
        if os.getppid() != parent:  # the main process is gone: nothing would read our batches
            break
        send(_COUNTS, pickle.dumps(relay.take()))
    for receiver in receivers:
        receiver.stop(grace=_GRACE_S)
    send(_COUNTS, pickle.dumps(relay.take()))
    conn.close()


class ReceiverPool:
    """Starts, watches and stops the receiver processes; batches go to ``on_batch``
    (blocking when the pipeline is full), counter deltas to ``metrics``."""

    def __init__(self, cfg: Config, processes: int, on_batch: Callable[[Batch], None],
                 has_room: Callable[[], bool], metrics):
        self.cfg = cfg
        self.processes = processes
        self.on_batch = on_batch
        self.has_room = has_room
        self.metrics = metrics
        self._ctx = mp.get_context("spawn")
        self.overloaded = self._ctx.Value("b", 0, lock=False)
        self._procs: list = [None] * processes
        self._readers: list[threading.Thread] = []
        self._stopping = False
        self._started = False

    def start(self) -> None:
        for setting, address in zip(("otlp_grpc", "otlp_http"), self._addresses()):
            with listening(setting, address):
                _check_port_free(address)
        for i in range(self.processes):
            self._spawn(i)
        ready = time.monotonic() + 30
        while not self._all_listening():
            if time.monotonic() > ready:
                raise OSError(f"receiver processes did not start listening on {self._shown_addresses()}")
            if any(p is not None and p.exitcode not in (None, 0) for p in self._procs):
                raise OSError(f"a receiver process could not listen on {self._shown_addresses()}")
            time.sleep(0.05)
        self._started = True
        log.info("OTLP listening on %s in %d receiver processes", self._shown_addresses(), self.processes)

    def _addresses(self) -> list[str]:
        return [self.cfg.otlp_grpc] + ([self.cfg.otlp_http] if self.cfg.otlp_http != "off" else [])

    def _shown_addresses(self) -> str:
        return " and ".join(self._addresses())

    def alive(self) -> bool:
        return all(p is not None and p.is_alive() for p in self._procs)

    def update_backpressure(self) -> None:
        self.overloaded.value = 0 if self.has_room() else 1

    def stop(self) -> None:
        """Stop the receivers (they finish requests in flight) and take their last batches."""
        self._stopping = True
        for p in self._procs:
            if p is not None and p.is_alive():
                p.terminate()  # SIGTERM: the worker stops its server gracefully
        deadline = time.monotonic() + _GRACE_S + 5
        for t in self._readers:
            t.join(max(0.1, deadline - time.monotonic()))
        for p in self._procs:
            if p is not None:
                p.join(max(0.1, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()

    def _spawn(self, i: int) -> None:
        recv, send = self._ctx.Pipe(duplex=False)
        listening = self._ctx.Event()
        p = self._ctx.Process(target=_worker_main, args=(self.cfg, i, send, self.overloaded, listening),
                              name=f"backflow-receiver-{i}", daemon=True)
        p.start()
        send.close()  # the worker holds the only write end: EOF here means it has exited
        p.listening = listening
        self._procs[i] = p
        t = threading.Thread(target=self._read, args=(i, recv), name=f"receiver-{i}-reader", daemon=True)
        self._readers.append(t)
        t.start()

    def _all_listening(self) -> bool:
        return all(p is not None and p.listening.is_set() for p in self._procs)

    def _read(self, i: int, conn) -> None:
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                break
            kind, payload = data[:1], data[1:]
            if kind == _BATCH:
                self.on_batch(Batch.from_wire(payload))  # blocks while the pipeline is full
                self.update_backpressure()
            elif kind == _POINTS:  # (from a receiver process this one started)
                self.on_batch(pickle.loads(payload))
                self.update_backpressure()
            elif kind == _COUNTS:
                for (name, labels), n in pickle.loads(payload).items():
                    getattr(self.metrics, name).labels(**dict(labels)).inc(n)
        conn.close()
        if self._started and not self._stopping:
            log.error("receiver process %d exited (code %s); starting another",
                      i, self._procs[i].exitcode if self._procs[i] else None)
            self._spawn(i)


def _check_port_free(address: str) -> None:
    """Fail as the in-process receiver would when another program holds the port: receiver
    processes bind with SO_REUSEPORT, which would otherwise share it silently."""
    host, port = split_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no owner
        s.bind((host, port))
