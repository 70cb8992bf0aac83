"""The Redis helpers themselves: a server that really restarts empty, a cluster that really
routes by slot, and a failover that really promotes a replica with the replicated data."""

import time

from redis.cluster import RedisCluster

from tests.redis_servers import RedisServer


def test_single_server_set_get_kill_restart(redis_server: RedisServer, tmp_path):
    c = redis_server.client()
    c.set(b"k", b"v" * 100)
    assert c.get(b"k") == b"v" * 100
    assert c.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}  # redis-py decodes CONFIG

    redis_server.kill()
    assert not redis_server.alive
    redis_server.restart()
    assert c.get(b"k") is None  # no persistence: a restarted node is an empty cache

    secured = RedisServer(tmp_path / "secured", password="s3cret")
    try:
        assert secured.url == f"redis://:s3cret@127.0.0.1:{secured.port}"
        assert secured.client().ping()
    finally:
        secured.stop()


def test_cluster_routes_keys_in_different_slots(redis_cluster):
    assert redis_cluster.url.startswith("redis-cluster://127.0.0.1:")
    assert len(redis_cluster.url.split(",")) == 3
    c = redis_cluster.client()
    try:
        keys = [f"key-{i}".encode() for i in range(30)]
        for k in keys:
            c.set(k, k[::-1])
        assert [c.get(k) for k in keys] == [k[::-1] for k in keys]
        assert len({c.keyslot(k) for k in keys}) > 1
        assert len({redis_cluster.master_for_key(k).port for k in keys}) == 3
    finally:
        c.close()


def test_failover_promotes_replica_with_replicated_value(redis_cluster):
    key = b"survives-failover"
    master = redis_cluster.master_for_key(key)
    plain = master.client()
    plain.set(key, b"before-kill")
    assert plain.execute_command("WAIT", 1, 1000) >= 1  # the replica has it

    t0 = time.monotonic()
    killed = redis_cluster.kill_master_for_key(key)
    assert killed.port == master.port and not killed.alive
    redis_cluster.wait_ok(timeout=20)
    failover_s = time.monotonic() - t0

    assert redis_cluster.master_for_key(key).port != master.port
    c = redis_cluster.client()
    try:
        assert isinstance(c, RedisCluster)
        assert c.get(key) == b"before-kill"
    finally:
        c.close()
    assert failover_s < 15, failover_s
