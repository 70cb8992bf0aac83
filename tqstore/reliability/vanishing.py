"""Vanishing clients: client processes SIGKILLed mid-Put and mid-Fetch, and calls cancelled
(gRPC cancel on a streaming Put or Fetch), round after round, against one daemon. The
"kill-heavy" victims make heavy calls (a Put and a Fetch naming HEAVY_BLOCKS blocks, 1.25 GiB,
over the daemon's heavy_request_bytes), so a kill lands while a heavy slot is held.

Blocks are large (8 MiB: 32 layers x 8 heads x 64 tokens x 128 dims, fp16 K and V) and a Put
carries 6 of them in one call, so a kill or a cancel lands while bytes are in flight. Victims
print "PUT f" / "FETCH" before a call and "ACK f" / "GOT" after it, so the parent knows whether
each kill hit a call in flight. Asserted afterwards:
- the daemon kept serving (a health check and a Lookup after every round),
- every Put family is all-or-nothing: the daemon stores a Put's blocks only after the whole
  stream arrived, so Lookup shows 0 or all 6 blocks ("partial" otherwise); 6 for an
  acknowledged Put ("lost" otherwise); whatever is visible fetches bitwise right ("wrong"),
- the daemon's open descriptors return to their baseline once the clients are gone, and its
  RSS stays under a cap,
- every heavy slot is free again: MAX_HEAVY stalled heavy Puts are all admitted at once and
  one more heavy call is then refused (a slot leaked by a vanished client would refuse one of
  the MAX_HEAVY),
- the daemon's log holds no INTERNAL or UNKNOWN status and no traceback.
"""

from __future__ import annotations

import random
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tqstore.prefix_hash import Namespace
from tqstore.reliability.daemon_proc import DaemonProcess, RssSampler, wait_for
from tqstore.reliability.workload import (WorkerProcess, payloads_for, worker_handshake,
                                          wrong_blocks)

BIG_NAMESPACE = Namespace("reliability-big", num_layers=32, num_kv_heads=8, head_dim=128,
                          block_size=64)
PUT_BLOCKS = 6  # 48 MiB per Put: one call (below the client's put_piece_bytes)
FETCH_FAMILIES = 3  # stored at set-up, read by fetch victims
MODES = ("kill-put", "kill-fetch", "cancel", "kill-heavy")
HEAVY_BLOCKS = 160  # 1.25 GiB of 8 MiB blocks: over the daemon's heavy_request_bytes (1 GiB)
MAX_HEAVY = 4  # the daemon's max_heavy_requests (its default)
_BAD_LOG = re.compile(r"\b(INTERNAL|UNKNOWN)\b|Traceback")


def _tokens(fam: int) -> list[int]:
    """A family's own token ids, sharing no block with any other family: a Put's blocks are
    then all new, and "all or nothing" is a count of what Lookup finds."""
    n = PUT_BLOCKS * BIG_NAMESPACE.block_size
    return np.random.default_rng([4, fam]).integers(0, 49152, n).tolist()


def _heavy_tokens(tokens: list[int]) -> list[int]:
    """``tokens`` continued to HEAVY_BLOCKS blocks: the same chain's first blocks, a heavy
    request's claim."""
    n = HEAVY_BLOCKS * BIG_NAMESPACE.block_size
    return tokens + np.random.default_rng(7).integers(0, 49152, n - len(tokens)).tolist()


def _put_family(seed: int, victim: int, k: int) -> int:
    return 10_000_000 + (seed * 10_000 + victim) * 1000 + k


def victim_main(address: str, mode: str, seed: int, victim: int) -> None:
    """Loop the mode's calls until killed (kill-*), or cancel a few calls and exit (cancel)."""
    from tqstore.client import KvStoreClient
    from tqstore.config import ClientConfig

    ns = BIG_NAMESPACE
    rnd = random.Random(seed * 1_000_003 + victim)
    config = ClientConfig(address=address, direct_reads="off", fetch_streams=1, rpc_timeout_s=120)
    with KvStoreClient(config) as client:
        if not client.is_serving(timeout=60):
            sys.exit(f"daemon at {address} not serving")
        # The next Put's payloads are ready before the call starts (and the first before GO),
        # so a kill lands mostly inside a Put rather than while drawing its bytes.
        payloads = (payloads_for(ns, _tokens(_put_family(seed, victim, 0)), 0, PUT_BLOCKS)
                    if mode == "kill-put" else [])
        worker_handshake()
        if mode == "cancel":
            _cancel_calls(address, rnd, seed, victim)
            return
        if mode == "kill-heavy":
            _heavy_calls(address, rnd, seed, victim)
            return
        for k in range(1_000_000):
            if mode == "kill-put":
                fam = _put_family(seed, victim, k)
                print(f"PUT {fam}", flush=True)
                client.put(ns, _tokens(fam), 0, payloads)
                print(f"ACK {fam}", flush=True)
                payloads = payloads_for(ns, _tokens(_put_family(seed, victim, k + 1)), 0,
                                        PUT_BLOCKS)
            else:
                fam = rnd.randrange(FETCH_FAMILIES)
                print("FETCH", flush=True)
                client.fetch_fp16_prefix(ns, _tokens(fam), 0, PUT_BLOCKS)
                print("GOT", flush=True)


def _cancel_calls(address: str, rnd: random.Random, seed: int, victim: int) -> None:
    """Two Puts and two Fetches, each cancelled by the client at a random moment in flight."""
    import grpc

    from tqstore.v1 import tqstore_pb2 as pb
    from tqstore.v1 import tqstore_pb2_grpc as pb_grpc
    from tqstore.wire import fp16_chunks, namespace_to_proto

    ns = BIG_NAMESPACE
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length",
                                                  64 << 20)]) as channel:
        stub = pb_grpc.KvStoreStub(channel)
        for k in range(2):
            fam = _put_family(seed, victim, k)
            payloads = payloads_for(ns, _tokens(fam), 0, PUT_BLOCKS)

            def messages(tokens=_tokens(fam), payloads=payloads):
                yield pb.PutRequest(namespace=namespace_to_proto(ns), token_ids=tokens,
                                    first_block=0, num_blocks=len(payloads))
                for i, p in enumerate(payloads):
                    for chunk in fp16_chunks(ns, i, p.keys, p.values):
                        yield pb.PutRequest(chunk=chunk)

            print(f"PUT {fam}", flush=True)
            future = stub.Put.future(messages(), timeout=120)
            time.sleep(rnd.uniform(0.0, 0.3))
            if future.cancel():
                print(f"CANCELLED {fam}", flush=True)
            elif future.exception() is None:
                print(f"ACK {fam}", flush=True)
        for _ in range(2):
            request = pb.FetchRequest(namespace=namespace_to_proto(ns),
                                      token_ids=_tokens(rnd.randrange(FETCH_FAMILIES)),
                                      first_block=0, num_blocks=PUT_BLOCKS, form=pb.KV_FORM_FP16)
            call = stub.Fetch(request, timeout=120)
            stop_after = rnd.randrange(1, 40)
            for n, _chunk in enumerate(call, 1):
                if n == stop_after:
                    call.cancel()
                    print("CANCELLED fetch", flush=True)
                    break


def _stub(address: str):
    import grpc

    from tqstore.v1 import tqstore_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length",
                                                       64 << 20)])
    return channel, pb_grpc.KvStoreStub(channel)


def _put_messages(tokens: list[int], payloads, claim: list[int]):
    from tqstore.v1 import tqstore_pb2 as pb
    from tqstore.wire import fp16_chunks, namespace_to_proto

    yield pb.PutRequest(namespace=namespace_to_proto(BIG_NAMESPACE), token_ids=claim,
                        first_block=0, num_blocks=len(payloads))
    for i, p in enumerate(payloads):
        for chunk in fp16_chunks(BIG_NAMESPACE, i, p.keys, p.values):
            yield pb.PutRequest(chunk=chunk)


def _heavy_calls(address: str, rnd: random.Random, seed: int, victim: int) -> None:
    """Heavy Puts (PUT_BLOCKS blocks sent, HEAVY_BLOCKS claimed) and heavy Fetches (of a stored
    family's chain continued to HEAVY_BLOCKS blocks) in turn, until killed."""
    from tqstore.v1 import tqstore_pb2 as pb
    from tqstore.wire import namespace_to_proto

    channel, stub = _stub(address)
    # Each Put's payloads are drawn before the previous Fetch, so a kill lands mostly in a call.
    payloads = payloads_for(BIG_NAMESPACE, _tokens(_put_family(seed, victim, 0)), 0, PUT_BLOCKS)
    with channel:
        for k in range(1_000_000):
            if k % 2 == 0:
                fam = _put_family(seed, victim, k)
                print(f"PUT {fam}", flush=True)
                stub.Put(_put_messages(_tokens(fam), payloads, _heavy_tokens(_tokens(fam))),
                         timeout=120)
                print(f"ACK {fam}", flush=True)
                payloads = payloads_for(BIG_NAMESPACE, _tokens(_put_family(seed, victim, k + 2)),
                                        0, PUT_BLOCKS)
            else:
                request = pb.FetchRequest(namespace=namespace_to_proto(BIG_NAMESPACE),
                                          token_ids=_heavy_tokens(_tokens(rnd.randrange(
                                              FETCH_FAMILIES))))
                print("FETCH", flush=True)
                sum(1 for _ in stub.Fetch(request, timeout=120))
                print("GOT", flush=True)


def check_heavy_slots_free(address: str, attempts: int = 3, probe_s: float = 20.0) -> str | None:
    """MAX_HEAVY stalled heavy Puts are all admitted (none refused while they stall) and one
    more heavy call is refused: the daemon holds exactly MAX_HEAVY free heavy slots. Returns
    a failure, or None.

    A probe can take a slot before a holder's first message has reached the daemon (a loaded
    2-core machine delays the holders' request threads): that holder is then refused, and
    every later probe admitted. Such an attempt is retried; a leaked slot refuses a holder and
    a missing limit admits the probe in every attempt."""
    failure = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(1.0)  # the daemon closes the admitted probes that the client cancelled
        failure = _heavy_slots_attempt(address, probe_s)
        if failure is None:
            return None
    return failure


def _heavy_slots_attempt(address: str, probe_s: float) -> str | None:
    from tqstore.v1 import tqstore_pb2 as pb
    from tqstore.wire import namespace_to_proto

    release = threading.Event()
    claim = _heavy_tokens(_tokens(0))

    def stalled():
        yield pb.PutRequest(namespace=namespace_to_proto(BIG_NAMESPACE), token_ids=claim)
        release.wait(60)

    channel, stub = _stub(address)
    with channel:
        holders = [stub.Put.future(stalled(), timeout=120) for _ in range(MAX_HEAVY)]
        try:
            time.sleep(0.5)  # the holders' first messages reach the daemon before any probe
            probe_refused = wait_for(
                lambda: any(h.done() for h in holders) or _heavy_refused(stub, claim), probe_s)
            time.sleep(0.5)  # a Put refused at its arrival has its answer by now
            refused = sum(h.done() for h in holders)
        finally:
            release.set()
        # Every holder ends before the next attempt: its slot is free again then.
        codes = [_end_code(h) for h in holders]
    if refused:
        return f"{refused} of {MAX_HEAVY} heavy Puts refused: a heavy slot leaked ({codes})"
    if not probe_refused:
        return "a heavy call was admitted with MAX_HEAVY heavy Puts open"
    return None if codes == ["OK"] * MAX_HEAVY else f"heavy Puts ended {codes}"


def _end_code(future) -> str:
    import grpc

    try:
        future.result()
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def _heavy_refused(stub, claim: list[int]) -> bool:
    import grpc

    from tqstore.v1 import tqstore_pb2 as pb
    from tqstore.wire import namespace_to_proto

    # num_blocks 0: all HEAVY_BLOCKS, heavy by bytes (only the stored prefix would stream).
    # Admission is decided before the first answer: the probe stops there. Streaming an
    # admitted probe to its end (a victim may have stored the claim's blocks) took seconds on
    # a loaded 2-core machine, and the caller's 20 s of polling ran out on a CI run.
    request = pb.FetchRequest(namespace=namespace_to_proto(BIG_NAMESPACE), token_ids=claim)
    call = stub.Fetch(request, timeout=60)
    try:
        next(call, None)
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        call.cancel()
    return False


def bad_log_lines(log_path: Path) -> list[str]:
    """Lines of the daemon's log with an INTERNAL or UNKNOWN status or a traceback."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return [line for line in text.splitlines() if _BAD_LOG.search(line)]


@dataclass
class VanishResult:
    victims: dict[str, int] = field(default_factory=dict)  # per mode
    killed_mid_put: int = 0
    killed_mid_fetch: int = 0
    killed_mid_heavy: int = 0
    cancelled_puts: int = 0
    cancelled_fetches: int = 0
    put_families: int = 0  # Puts started by victims (each checked all-or-nothing)
    stored_whole: int = 0  # of those, found with all their blocks (acknowledged or not)
    cancelled_but_stored: int = 0  # cancel() won after the whole stream had arrived: allowed
    lost: int = 0
    partial: int = 0
    wrong: int = 0
    serving_failures: int = 0
    fds_baseline: int = 0
    fds_peak: int = 0
    fds_end: int = 0
    rss: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _store_fetch_families(address: str) -> None:
    from tqstore.client import KvStoreClient

    with KvStoreClient(address) as client:
        for fam in range(FETCH_FAMILIES):
            client.put(BIG_NAMESPACE, _tokens(fam), 0, payloads_for(BIG_NAMESPACE, _tokens(fam), 0,
                                                                  PUT_BLOCKS))


def _round(daemon: DaemonProcess, modes: list[str], seed: int, rnd: random.Random,
           max_delay_s: float, res: VanishResult, puts: dict[int, str]) -> None:
    procs = [WorkerProcess("tqstore.reliability.vanishing", [daemon.address, m, seed, i])
             for i, m in enumerate(modes)]
    try:
        for p in procs:
            p.wait_ready()
        for p in procs:
            p.go()
        time.sleep(rnd.uniform(0.1, max_delay_s))
        res.fds_peak = max(res.fds_peak, daemon.fd_count())
        for p, mode in zip(procs, modes):
            if mode != "cancel":
                p.proc.kill()
        for p, mode in zip(procs, modes):
            out, err = p.proc.communicate(timeout=120)
            if mode == "cancel" and p.proc.returncode != 0:
                res.failures.append(f"cancel victim exited {p.proc.returncode}: {err[-500:]}")
            _account(out.splitlines(), mode, res, puts)
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()


def _account(lines: list[str], mode: str, res: VanishResult, puts: dict[int, str]) -> None:
    """Count a victim's output; puts[family] becomes "cut", "acked" or "cancelled"."""
    res.victims[mode] = res.victims.get(mode, 0) + 1
    for line in lines:
        tag, _, arg = line.partition(" ")
        if tag == "PUT":
            puts[int(arg)] = "cut"
        elif tag == "ACK":
            puts[int(arg)] = "acked"
        elif tag == "CANCELLED":
            if arg == "fetch":
                res.cancelled_fetches += 1
            else:
                res.cancelled_puts += 1
                puts[int(arg)] = "cancelled"
    last = lines[-1].split()[0] if lines else ""
    if mode == "kill-put" and last == "PUT":
        res.killed_mid_put += 1
    if mode == "kill-fetch" and last == "FETCH":
        res.killed_mid_fetch += 1
    if mode == "kill-heavy" and last in ("PUT", "FETCH"):
        res.killed_mid_heavy += 1


def _check_serving(address: str, res: VanishResult, round_no: int) -> None:
    from tqstore.client import KvStoreClient

    with KvStoreClient(address) as client:
        ok = client.is_serving(timeout=10)
        if ok:
            ok = client.lookup(BIG_NAMESPACE, _tokens(0)).hit_blocks == PUT_BLOCKS
    if not ok:
        res.serving_failures += 1
        res.failures.append(f"round {round_no}: daemon not serving (or lost a fetch family)")


def _verify_puts(address: str, puts: dict[int, str], res: VanishResult) -> None:
    from tqstore.client import KvStoreClient
    from tqstore.config import ClientConfig

    ns = BIG_NAMESPACE
    with KvStoreClient(ClientConfig(address=address, direct_reads="off")) as client:
        for fam, state in sorted(puts.items()):
            hit = client.lookup(ns, _tokens(fam)).hit_blocks
            if state == "acked" and hit < PUT_BLOCKS:
                res.lost += PUT_BLOCKS - hit
                res.failures.append(f"acknowledged put {fam}: lookup {hit}")
            elif hit not in (0, PUT_BLOCKS):
                res.partial += 1
                res.failures.append(f"unacknowledged put {fam}: {hit} of {PUT_BLOCKS} blocks "
                                    "visible")
            if hit == PUT_BLOCKS:
                res.stored_whole += 1
                res.cancelled_but_stored += state == "cancelled"
            if hit:
                prefix = client.fetch_fp16_prefix(ns, _tokens(fam), 0, hit)
                bad = wrong_blocks(ns, _tokens(fam), 0, prefix)
                res.wrong += len(bad) + hit - len(prefix)
                if bad or len(prefix) < hit:
                    res.failures.append(f"put {fam}: fetched {len(prefix)} of {hit}, wrong {bad}")
    res.put_families = len(puts)


def run_vanishing(root: str | Path, rounds: int = 50, concurrent: int = 4, seed: int = 0,
                  max_delay_s: float = 1.0, rss_cap_mib: float = 1024.0) -> VanishResult:
    """`rounds` rounds of `concurrent` victims; see the module docstring."""
    root = Path(root)
    rnd = random.Random(seed)
    res = VanishResult()
    puts: dict[int, str] = {}
    daemon = DaemonProcess(root / "store", root / "daemon.log", max_gib=32.0).start()
    t0 = time.perf_counter()
    try:
        _store_fetch_families(daemon.address)
        _check_serving(daemon.address, res, -1)  # the clients above connected and left
        time.sleep(0.5)  # the server closes the set-up clients' connections on its own threads
        res.fds_baseline = res.fds_peak = daemon.fd_count()
        with RssSampler(daemon) as rss:
            for r in range(rounds):
                # Modes in turn, so even a small run has victims of every mode.
                modes = [MODES[(r * concurrent + i) % len(MODES)] for i in range(concurrent)]
                _round(daemon, modes, seed * 10_007 + r, rnd, max_delay_s, res, puts)
                _check_serving(daemon.address, res, r)
        _verify_puts(daemon.address, puts, res)
        leaked = check_heavy_slots_free(daemon.address)
        if leaked:
            res.failures.append(leaked)
        if not wait_for(lambda: daemon.fd_count() <= res.fds_baseline, 30.0):
            res.failures.append(f"fds {daemon.fd_count()} above baseline {res.fds_baseline}")
        res.fds_end = daemon.fd_count()
        res.rss = rss.summary()
        if res.rss.get("rss_peak_mib", 0) > rss_cap_mib:
            res.failures.append(f"RSS peak {res.rss['rss_peak_mib']} MiB over {rss_cap_mib}")
        code = daemon.stop()
        if code != 0:
            res.failures.append(f"daemon exited {code} on SIGTERM")
        bad = bad_log_lines(daemon.log_path)
        if bad:
            res.failures.append(f"{len(bad)} INTERNAL/UNKNOWN/traceback lines in the daemon "
                                f"log, first: {bad[0][:300]}")
    finally:
        daemon.kill()
        res.seconds = time.perf_counter() - t0
    return res


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "worker":
        import tqstore  # noqa: F401  (entry point: project convention)

        victim_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit("usage: python -m tqstore.reliability.vanishing worker ADDRESS MODE SEED VICTIM")
