"""Another process reads (readonly, as `tqstore inspect` does) while the writer puts and evicts."""

import subprocess
import sys
import textwrap

from tqstore.ssd import BlockStore, StoreConfig
from tqstore.ssd.soak import SOAK_NAMESPACE as NS, expected_payload, family_tokens
from tqstore.ssd.chain import chain_hashes

READER = textwrap.dedent("""
    import os, sys, time, numpy as np
    import tqstore
    from tqstore.errors import NotFound
    from tqstore.ssd import BlockStore
    from tqstore.ssd.chain import chain_hashes
    from tqstore.ssd.soak import SOAK_NAMESPACE as NS, expected_payload, family_tokens
    path, families = sys.argv[1], int(sys.argv[2])
    wrong = hits = misses = stats_calls = 0
    store = BlockStore(path, readonly=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        for fam in range(families):
            toks = family_tokens(fam)
            n = store.lookup(NS, toks)
            hashes = chain_hashes(NS, toks, n)
            for i in range(n):
                try:
                    got = store.get_block(NS, toks, i)
                except NotFound:
                    misses += 1  # evicted under us: a miss is fine, a wrong block is not
                    continue
                want = expected_payload(NS, hashes[i])
                ok = (np.array_equal(got.keys.view(np.uint16), want.keys.view(np.uint16))
                      and np.array_equal(got.values.view(np.uint16), want.values.view(np.uint16)))
                hits += ok
                wrong += not ok
        store.stats()
        stats_calls += 1
        if os.path.exists(path + ".done"):
            break
    report = store.check()
    print(wrong, hits, misses, stats_calls, store.stats().verification_failures, len(report.bad_records))
""")


def test_readonly_reader_process_during_writes_and_evictions(tmp_path):
    path = str(tmp_path / "s")
    families = 6
    block = 2 * 8 * 4 * 32 * 64 * 2
    cfg = StoreConfig(max_bytes=40 * (block + 4096) + (1 << 20))  # forces evictions
    with BlockStore(path, cfg) as w:
        toks0 = family_tokens(0)
        w.put_blocks(NS, toks0, 0, [expected_payload(NS, chain_hashes(NS, toks0, 1)[0])])
        reader = subprocess.Popen([sys.executable, "-c", READER, path, str(families)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for rnd in range(4):
                for fam in range(families):
                    toks = family_tokens(fam)
                    have = w.lookup(NS, toks)
                    n = min(have + 6, 24)
                    hashes = chain_hashes(NS, toks, n)
                    w.put_blocks(NS, toks, have, [expected_payload(NS, hashes[i]) for i in range(have, n)])
                    if have:
                        w.get_block(NS, toks, have - 1)
                assert w.stats().bytes_on_disk <= cfg.max_bytes
        finally:
            open(path + ".done", "w").close()
            out, err = reader.communicate(timeout=120)
        assert reader.returncode == 0, err
        wrong, hits, misses, stats_calls, failures, bad = map(int, out.split())
        assert wrong == 0 and failures == 0 and bad == 0
        assert hits > 0 and stats_calls > 0
        assert w.stats().evictions > 0
        assert w.check().ok
