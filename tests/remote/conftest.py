"""Real Redis for the remote-tier tests (tests/redis_servers.py): a fresh server per test, and
one 3-master, 3-replica cluster per module (creating one takes a few seconds). A test that kills
cluster nodes leaves the module's cluster with fewer replicas: put such tests last in a module,
or give them a module of their own."""

import pytest

from tests.redis_servers import RedisClusterNodes, RedisServer


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    cluster = RedisClusterNodes(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()
