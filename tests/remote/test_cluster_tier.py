"""Two daemons share blocks through a real 3-master Redis Cluster (one replica each); a master
killed mid-run costs hits, never an error at the client or a wrong byte, and the daemons pick up
the promoted replica. The failover test kills a node: it stays last in this module."""

import threading
import time

import pytest

from tqstore.client import KvStoreClient
from tqstore.errors import NotFound
from tqstore.prefix_hash import Namespace
from tqstore.remote.value_format import block_keys
from tqstore.ssd.chain import chain_hashes, token_array

from tests.remote.test_shared_tier import NS, put_on, same, start_daemon
from tests.server.conftest import random_blocks

BLOCKS = 12  # enough for the chain's keys to land on all three masters


@pytest.fixture
def cluster_pair(tmp_path, redis_cluster):
    a = start_daemon(tmp_path / "a", redis_cluster.url)
    b = start_daemon(tmp_path / "b", redis_cluster.url)
    yield a, b
    a.stop(grace=1)
    b.stop(grace=1)


def _masters_of_chain(cluster, ns: Namespace, tokens: list[int]) -> set[int]:
    hashes = chain_hashes(ns, token_array(tokens))
    return {cluster.master_for_key(block_keys(ns, h)[0]).port for h in hashes}


def test_two_daemons_share_a_chain_spread_over_the_cluster(cluster_pair, redis_cluster):
    a, b = cluster_pair
    tokens = list(range(40, 40 + BLOCKS * NS.block_size))
    blocks = random_blocks(NS, BLOCKS)
    assert len(_masters_of_chain(redis_cluster, NS, tokens)) == 3
    put_on(a, NS, tokens, blocks)
    assert a.tiers.stats()["remote_uploaded_blocks"] == BLOCKS
    with KvStoreClient(b.address) as c:
        assert c.lookup(NS, tokens).hit_blocks == BLOCKS
        assert same(c.fetch_fp16(NS, tokens), blocks)
    put_on(b, NS, tokens, blocks)  # already there: B uploads nothing
    assert b.tiers.stats().get("remote_uploaded_blocks", 0) == 0


def test_a_master_killed_mid_run_costs_hits_never_errors(tmp_path, redis_cluster):
    a = start_daemon(tmp_path / "a", redis_cluster.url)
    # B keeps no local copies, so every read of its reader goes to the cluster.
    b = start_daemon(tmp_path / "b", redis_cluster.url, fill_queue_bytes=1)
    try:
        _kill_a_master_under_load(a, b, redis_cluster)
    finally:
        a.stop(grace=1)
        b.stop(grace=1)


def _kill_a_master_under_load(a, b, redis_cluster) -> None:
    chains = []
    for n in range(6):
        tokens = list(range(1000 * (n + 1), 1000 * (n + 1) + BLOCKS * NS.block_size))
        blocks = random_blocks(NS, BLOCKS)
        put_on(a, NS, tokens, blocks)
        chains.append((tokens, blocks))
    for m in redis_cluster.masters():  # every write is on its replica before the kill
        m.admin().execute_command("WAIT", 1, 2000)

    errors: list[BaseException] = []
    hits: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        with KvStoreClient(b.address) as c:
            while not stop.is_set():
                for tokens, blocks in chains:
                    try:
                        found = c.lookup(NS, tokens).hit_blocks
                        if found:
                            got = c.fetch_fp16(NS, tokens, 0, found)
                            assert same(got, blocks[:len(got)]), "wrong bytes served"
                            hits.append(len(got))
                    except NotFound:
                        pass  # the whole hit went away between Lookup and Fetch: a miss
                    except BaseException as exc:  # noqa: BLE001 - reported below
                        errors.append(exc)
                        return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while len(hits) < 2 * len(chains) and time.monotonic() < deadline and not errors:
            time.sleep(0.01)  # the reader is reading through the cluster before the kill
        first_hashes = chain_hashes(NS, token_array(chains[-1][0]))
        redis_cluster.kill_master_for_key(block_keys(NS, first_hashes[5])[0])
        redis_cluster.wait_ok(30)
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors
    s = b.tiers.stats()
    assert s["remote_errors"] >= 1 and s["fills_dropped"] > 0  # B did read through the kill
    assert len(hits) >= 2 * len(chains)
    # After the failover the promoted replica serves: B finds every chain in full (its local
    # copies count too), and so does a third daemon with an empty store, from the cluster alone.
    with KvStoreClient(b.address) as c:
        deadline = time.monotonic() + 20  # B retries the remote with backoff after its errors
        while (any(c.lookup(NS, t).hit_blocks < BLOCKS for t, _ in chains)
               and time.monotonic() < deadline):
            time.sleep(0.1)
        for tokens, blocks in chains:
            assert same(c.fetch_fp16(NS, tokens), blocks)
    import tempfile
    with tempfile.TemporaryDirectory() as empty:
        third = start_daemon(empty, redis_cluster.url)
        try:
            with KvStoreClient(third.address) as c:
                for tokens, blocks in chains:
                    assert c.lookup(NS, tokens).hit_blocks == BLOCKS
                    assert same(c.fetch_fp16(NS, tokens), blocks)
        finally:
            third.stop(grace=1)
