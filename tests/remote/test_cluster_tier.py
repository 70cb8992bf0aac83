"""Two daemons share blocks through a real 3-master Redis Cluster (one replica each); a master
killed mid-run, or the single Redis killed mid-run, costs hits, never an error at the client or
a wrong byte, and the daemons pick up the promoted replica or the restarted server. The
failover test kills a cluster node: it stays the module's last user of the cluster."""

import threading
import time

import pytest

from tqstore.client import KvStoreClient
from tqstore.errors import NotFound
from tqstore.prefix_hash import Namespace
from tqstore.remote.value_format import block_keys
from tqstore.ssd.chain import chain_hashes, token_array

from tests.remote.test_shared_tier import NS, daemon_pair, put_on, same, start_daemon
from tests.server.conftest import random_blocks

BLOCKS = 12  # enough for the chain's keys to land on all three masters


@pytest.fixture
def cluster_pair(tmp_path, redis_cluster):
    yield from daemon_pair(tmp_path, redis_cluster.url)


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
    def failover(chains) -> None:
        for m in redis_cluster.masters():  # every write is on its replica before the kill
            m.admin().execute_command("WAIT", 1, 2000)
        first_hashes = chain_hashes(NS, token_array(chains[-1][0]))
        redis_cluster.kill_master_for_key(block_keys(NS, first_hashes[5])[0])
        redis_cluster.wait_ok(30)

    _outage_under_load(tmp_path, redis_cluster.url, failover)


def test_the_single_redis_killed_mid_run_costs_hits_never_errors(tmp_path, redis_server):
    def outage(chains) -> None:
        redis_server.kill()
        time.sleep(1.0)  # the reader runs on against a dead Redis
        redis_server.restart()  # empty (no persistence)

    _outage_under_load(tmp_path, redis_server.url, outage, reupload=True)


def _outage_under_load(tmp_path, url: str, outage, reupload: bool = False) -> None:
    """Daemon A stores chains; daemon B (no local copies: every read goes to Redis) reads them
    in a loop while `outage` breaks Redis. No error may reach B's client and every byte served
    must be right; afterwards B, and a third daemon with an empty store, find every chain."""
    a = start_daemon(tmp_path / "a", url)
    b = start_daemon(tmp_path / "b", url, fill_queue_bytes=1)
    try:
        chains = []
        for n in range(6):
            tokens = list(range(1000 * (n + 1), 1000 * (n + 1) + BLOCKS * NS.block_size))
            blocks = random_blocks(NS, BLOCKS)
            put_on(a, NS, tokens, blocks)
            chains.append((tokens, blocks))
        errors, hits = _read_through(b, chains, outage)
        assert not errors, errors
        s = b.tiers.stats()
        assert s["remote_errors"] >= 1 and s["fills_dropped"] > 0  # B did read through it
        assert len(hits) >= 2 * len(chains)
        if reupload:  # a restarted Redis is empty: A's local store puts the chains back
            for tokens, blocks in chains:
                put_on(a, NS, tokens, blocks)
        with KvStoreClient(b.address) as c:
            # B retries with backoff after its errors, and each of its two Redis clients (the
            # Lookups', the values') learns the new slot owner on its own first error: until
            # then a Fetch may still come back NotFound or short (a miss, not an error), but
            # whatever it serves must be the right bytes.
            deadline = time.monotonic() + 20
            pending = list(chains)
            while pending and time.monotonic() < deadline:
                tokens, blocks = pending[0]
                try:
                    whole = c.lookup(NS, tokens).hit_blocks == BLOCKS
                    got = c.fetch_fp16(NS, tokens) if whole else []
                except NotFound:
                    got = []
                assert same(got, blocks[:len(got)])
                if len(got) == BLOCKS:
                    pending.pop(0)
                else:
                    time.sleep(0.1)
            assert not pending, f"{len(pending)} chains not served whole after 20 s"
        third = start_daemon(tmp_path / "c", url)
        try:
            with KvStoreClient(third.address) as c:
                for tokens, blocks in chains:
                    assert c.lookup(NS, tokens).hit_blocks == BLOCKS
                    assert same(c.fetch_fp16(NS, tokens), blocks)
        finally:
            third.stop(grace=1)
    finally:
        a.stop(grace=1)
        b.stop(grace=1)


def _read_through(b, chains, outage) -> tuple[list[BaseException], list[int]]:
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
                    except BaseException as exc:  # noqa: BLE001 - reported by the caller
                        errors.append(exc)
                        return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while len(hits) < 2 * len(chains) and time.monotonic() < deadline and not errors:
            time.sleep(0.01)  # the reader reads through Redis before the outage
        outage(chains)
    finally:
        stop.set()
        thread.join(60)
    return errors, hits
