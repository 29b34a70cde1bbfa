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
