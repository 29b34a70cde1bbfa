"""Redis clients for a plain server or a Redis Cluster, told apart by asking the server.

Every command and ``backflow serve`` build their client here: against a cluster node
(``INFO cluster`` says ``cluster_enabled:1``) they get redis-py's ``RedisCluster``, which
follows the slots, their moves and failovers. Backflow's scripts and batches touch several
keys together (a baseline and the location set, a version summary and its trend): against a
cluster they must share a slot, so ``backflow serve`` needs a prefix that is a hash tag
(``{backflow}``): every key then has it (``{backflow}:events``, ``{backflow}:baseline:...``).

>>> hash_tagged("{backflow}"), hash_tagged("backflow"), hash_tagged("a{}b"), hash_tagged("x{tag}:y")
(True, False, False, True)
"""

from __future__ import annotations

import redis
from redis.cluster import RedisCluster
from redis.exceptions import ClusterError, RedisClusterException, TryAgainError

# What a failed Redis call raises: a cluster client's own errors (no node for a slot while
# it learns the slots again after a failover) are not RedisErrors.
REDIS_ERRORS = (redis.RedisError, RedisClusterException)
# What passes by itself: Redis away, or a cluster between two masters of a slot.
TRANSIENT = (redis.ConnectionError, redis.TimeoutError, ClusterError, TryAgainError, RedisClusterException)


def hash_tagged(prefix: str) -> bool:
    """Whether every key starting with ``prefix`` hashes to the slot of one tag: a ``{``
    followed, later, by a ``}`` with something between (Redis Cluster's rule)."""
    start = prefix.find("{")
    end = prefix.find("}", start + 1) if start >= 0 else -1
    return end > start + 1


def is_cluster(client) -> bool:
    """Whether ``client`` talks to a Redis Cluster node (RedisError when it cannot ask)."""
    if isinstance(client, RedisCluster):
        return True
    return bool(client.info("cluster").get("cluster_enabled"))


def client_for(url: str, **kwargs) -> redis.Redis | RedisCluster:
    """A client of ``url``: a ``RedisCluster`` when the server is a cluster node, else a plain
    one (also when the server does not answer yet: ``cluster_client`` switches later)."""
    client = redis.Redis.from_url(url, **kwargs)
    try:
        cluster = is_cluster(client)
    except redis.RedisError:
        return client
    return cluster_client(client, url, **kwargs) if cluster else client


def cluster_client(client, url: str, **kwargs) -> RedisCluster:
    """``client``'s server as a cluster: a ``RedisCluster`` of ``url`` (``client`` closed)."""
    client.close()
    kwargs.pop("health_check_interval", None)  # (a connection option RedisCluster passes on itself)
    return RedisCluster.from_url(url, **kwargs)


def raw(client):
    """A client of the same server that does not decode replies (for bytes values)."""
    if isinstance(client, RedisCluster):
        opts = client.nodes_manager.connection_kwargs
        if not opts.get("decode_responses"):
            return client
        made = getattr(client, "_backflow_raw", None)
        if made is None:
            node = client.get_default_node()
            # (the options given: plain values, and TLS; the client's own hooks are its own)
            given = {k: v for k, v in opts.items()
                     if k not in ("host", "port", "db") and isinstance(v, (str, int, float, bool, type(None)))}
            if issubclass(opts.get("connection_class", redis.Connection), redis.SSLConnection):
                given["ssl"] = True
            made = client._backflow_raw = RedisCluster(host=node.host, port=node.port,
                                                       **{**given, "decode_responses": False})
        return made
    kwargs = client.connection_pool.connection_kwargs
    if not kwargs.get("decode_responses"):
        return client
    pool = client.connection_pool
    return redis.Redis(connection_pool=type(pool)(connection_class=pool.connection_class,
                                                  **{**kwargs, "decode_responses": False}))
