"""A real Redis Cluster for tests: three masters and a replica each, on free ports, made by
``redis-cli --cluster create``; a node can be killed (its replica takes over) and started
again (it comes back as a replica of the new master)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

import redis

from processor.devtools.redis_server import answers_ping, find_redis_server, free_port


class Cluster:
    def __init__(self, masters: int = 3, replicas: int = 1):
        self.masters, self.replicas = masters, replicas
        self.ports = [free_port() for _ in range(masters * (1 + replicas))]
        self.bus = {p: free_port() for p in self.ports}  # (cluster-port: the bus beside each)
        self.dir = tempfile.mkdtemp(prefix="backflow-cluster-")
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def _start_node(self, port: int) -> None:
        d = os.path.join(self.dir, str(port))
        os.makedirs(d, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [find_redis_server(), "--port", str(port), "--cluster-port", str(self.bus[port]), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1500",
             "--cluster-replica-validity-factor", "0", "--dir", d, "--save", "", "--appendonly", "no"],
            stdout=open(os.path.join(d, "log"), "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not answers_ping("127.0.0.1", port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server (cluster node) did not start on {port}")
            time.sleep(0.05)

    def start(self) -> "Cluster":
        for p in self.ports:
            self._start_node(p)
        out = subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                              "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                             capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout}{out.stderr}")
        self.wait_healthy()
        return self

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, decode_responses=True, socket_timeout=5)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Every running node sees the cluster ok, with each master's replicas attached."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                alive = [p for p, proc in self.procs.items() if proc.poll() is None]
                if all(self.node(p).cluster("info")["cluster_state"] == "ok" for p in alive):
                    masters = [p for p in alive if self.node(p).info("replication")["role"] == "master"]
                    if len(masters) == self.masters and all(
                            self.node(p).info("replication")["connected_slaves"] >= self.replicas for p in masters):
                        return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not become healthy")
            time.sleep(0.2)

    def master_of(self, key: str) -> int:
        """The port of the master holding ``key``'s slot now."""
        c = self.node(next(p for p, proc in self.procs.items() if proc.poll() is None))
        slot = c.cluster("keyslot", key)
        for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
        raise RuntimeError(f"no master for slot {slot}")

    def kill(self, port: int) -> None:
        self.procs[port].kill()
        self.procs[port].wait()

    def restart(self, port: int) -> None:
        self._start_node(port)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
