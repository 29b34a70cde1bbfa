"""The local redis-server that `make run` starts keeps its data across restarts."""

import pytest
import redis

from processor.devtools.redis_server import RedisServer

pytestmark = pytest.mark.e2e  # starts redis-server (docs/testing.md)


def test_persistent_local_redis_keeps_data_across_restarts(tmp_path):
    data = tmp_path / "redis"
    with RedisServer(data_dir=str(data)) as srv:
        redis.Redis(port=srv.port).sadd("backflow:keys", "abc")
    with RedisServer(data_dir=str(data)) as srv:
        assert redis.Redis(port=srv.port).smembers("backflow:keys") == {b"abc"}


def test_throwaway_redis_leaves_nothing_behind():
    srv = RedisServer().start()
    folder = srv.dir
    srv.stop()
    import os
    assert not os.path.exists(folder)


def test_free_ports_are_bindable_distinct_and_outside_the_range_of_outgoing_connections():
    """A port from the kernel's range for client sockets could be taken by one of them
    (a connection to Redis, say) between being picked and the server binding it."""
    import socket

    from processor.devtools.redis_server import _outgoing_ports, free_port

    lo, hi = _outgoing_ports()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert not any(lo <= p <= hi for p in ports)
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", ports[-1]))  # (free when handed out)
    finally:
        holder.close()
