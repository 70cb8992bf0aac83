"""Configuration of the store, the daemon and the client (the codec's, CodecConfig, lives with
the codec: it names the codec's own types). Plain dataclasses that import nothing: the client
and the store both import this module, so it must load neither the store (tqstore.ssd, lmdb) nor
MLX (tests/test_layering.py). Nothing reads environment variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tqstore.errors import InvalidArgument

GiB = 1 << 30
MiB = 1 << 20
DEFAULT_LISTEN = "127.0.0.1:50077"
COMPRESSIONS = ("none", "zstd", "zstd-planes")

__all__ = ["ClientConfig", "DEFAULT_LISTEN", "RemoteConfig", "ServerConfig", "ServingConfig",
           "StoreConfig"]


def is_local_address(address: str) -> bool:
    """A Unix socket (unix:/path) or a loopback host:port."""
    if address.startswith("unix:"):
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclass(frozen=True)
class StoreConfig:
    """Settings of one BlockStore.

    max_bytes: byte budget of the whole store (payload files, rounded up to the 4 KiB the file
        system allocates, plus the LMDB pages in use). A put that would exceed it first evicts
        least recently used leaves; if that cannot make room the put raises ResourceExhausted.
    map_size: LMDB map reservation (a sparse reservation, not disk use). Only the index and
        metadata live in LMDB, about 2 KB per block, so 16 GiB is millions of blocks.
    compression: "none" (default: measured not to pay, see docs/fragments/ssd.md), "zstd", or
        "zstd-planes" (fp16 split into high/low byte planes before zstd).
    zstd_level: level for the zstd modes.
    checksum_chunk: payloads are checksummed in chunks of this many bytes (CRC-32 each), so reads
        can verify on two threads while the next chunk is read.
    access_flush_interval_s / access_flush_count: last-access times and hit counts of gets are
        batched in memory and written in one LMDB txn when either limit is reached (and on close,
        put, evict, check), so a get never pays a synced commit (~0.3 ms) and last access still
        survives a restart.
    read_threads: threads that read and verify one payload (2 cores here).
    """

    max_bytes: int = 64 * GiB
    map_size: int = 16 * GiB
    compression: str = "none"
    zstd_level: int = 1
    checksum_chunk: int = 1 * MiB
    access_flush_interval_s: float = 1.0
    access_flush_count: int = 1024
    read_threads: int = 2

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise InvalidArgument(f"compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        for name in ("max_bytes", "map_size", "checksum_chunk", "access_flush_count", "read_threads"):
            if int(getattr(self, name)) <= 0:
                raise InvalidArgument(f"{name} must be positive")
        if self.checksum_chunk % 4096:
            raise InvalidArgument("checksum_chunk must be a multiple of 4096")


@dataclass(frozen=True)
class RemoteConfig:
    """The remote tier behind the daemon's local store (tqstore/remote): Redis or Redis Cluster.

    url: redis://[user:password@]host:port[/db], rediss:// (TLS), redis-cluster://h1:p1,h2:p2,...
        or rediss-cluster:// (tqstore/remote/address.py). The password is never logged.
    lookup_deadline_s: the longest a Lookup waits on the remote; past it the daemon answers from
        the local tier alone (and counts a timeout).
    timeout_s: one remote read or write of block values (connect included).
    max_backoff_s: after a remote error the remote is skipped for a backoff that doubles from
        0.1 s up to this; the daemon serves from the local tier meanwhile.
    upload_queue_bytes: blocks acknowledged locally and waiting to be copied to the remote; past
        it a new upload is dropped and counted (the blocks stay in the local tier).
    fill_queue_bytes: blocks served from the remote and waiting to be copied into the local tier.
    max_lookup_blocks: the most blocks one Lookup asks the remote about.
    tls_ca_file: CA bundle for rediss:// (None: the system's).
    password_file: a file holding the password (over the URL's; keeps it out of the process
        list and the shell history).
    """

    url: str = field(repr=False)  # may carry a password
    lookup_deadline_s: float = 0.05
    timeout_s: float = 5.0
    max_backoff_s: float = 5.0
    upload_queue_bytes: int = 1 * GiB
    fill_queue_bytes: int = 512 * MiB
    max_lookup_blocks: int = 8192
    tls_ca_file: str | None = None
    password_file: str | None = None

    def __post_init__(self) -> None:
        for name in ("lookup_deadline_s", "timeout_s", "max_backoff_s", "upload_queue_bytes",
                     "fill_queue_bytes", "max_lookup_blocks"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"remote {name} must be positive")
        from tqstore.remote.address import parse_remote  # errors only: the URL checked up front

        parse_remote(self.url)


@dataclass(frozen=True)
class ServerConfig:
    """`tqstore serve`. Listens on loopback (or a Unix socket) unless told otherwise."""

    path: str
    listen: str = DEFAULT_LISTEN
    max_message_bytes: int = 32 * MiB  # both directions; chunks are ~1 MiB
    # One Put stream's held bytes: its blocks' fp16 bytes plus 512 B a chunk
    # (tqstore/request_limits.py). The client sends pieces of put_piece_bytes (256 MiB) of fp16;
    # the 64 MiB over that covers their chunk overhead at worst (max_request_tokens /
    # min_block_size = 131,072 one-chunk blocks x 512 B).
    max_put_bytes: int = 320 * MiB
    lease_ms: int = 10_000  # Locate: how long located blocks stay out of eviction by default
    max_lease_ms: int = 60_000  # the most a client may ask for
    workers: int = 32  # gRPC threads; each call holds one for its whole life
    drain_seconds: float = 30.0
    recent_requests: int = 256  # per-request hit rates kept for Stats
    store: StoreConfig = field(default_factory=StoreConfig)
    remote: RemoteConfig | None = None  # None: the local tier only
    # -- bounds on the work one request can cause (tqstore/server.py enforces them) --
    max_request_tokens: int = 1 << 21  # token ids in one Lookup/Fetch/Put/Locate
    min_block_size: int = 16  # a namespace's smallest block (tokens)
    max_request_blocks: int = 1 << 15  # blocks one Fetch or Locate may name
    heavy_request_tokens: int = 1 << 17  # a request with more token ids takes a heavy slot
    max_heavy_requests: int = 4  # concurrent heavy requests; past it RESOURCE_EXHAUSTED
    heavy_request_bytes: int = 1 * GiB  # ... or a Fetch/Put naming more bytes of blocks
    heavy_turboquant_work: int = 1 << 26  # ... or a TurboQuant Fetch whose per-block work,
    # layers x heads x head_dim x (block_size + head_dim) (rotations and codes), is over this
    put_budget_bytes: int = 2 * GiB  # bytes all in-flight Put streams may hold together
    # -- threads and stream life (tqstore/request_limits.py) --
    # Calls admitted at once (None: 2 x workers); past it gRPC answers RESOURCE_EXHAUSTED at
    # once. Over workers: a burst of small calls waits briefly for a thread rather than being
    # refused; the stream cap below keeps threads free for them, so the wait is bounded.
    max_concurrent_rpcs: int | None = None
    max_streams: int = 24  # Put/Fetch/health Watch streams at once (at most workers - 4)
    stream_idle_s: float = 30.0  # a Put not sending / Fetch not read this long is cancelled
    max_stream_s: float = 3600.0  # any stream open this long is cancelled
    max_string_bytes: int = 256  # every client-supplied string (the model fingerprint)
    max_stats_namespaces: int = 1000  # Stats lists the largest namespaces, counts the rest
    # -- access (tqstore/access.py) --
    token_file: str | None = None  # bearer token clients must send; required off loopback
    tls_cert_file: str | None = None  # TLS certificate chain (PEM); with tls_key_file
    tls_key_file: str | None = None
    socket_group: str | None = None  # a Unix socket is 0600, or 0660 owned by this group
    # -- observability --
    metrics_port: int | None = None  # Prometheus metrics on metrics_host:port (None: off)
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not (self.listen.startswith("unix:") or ":" in self.listen):
            raise InvalidArgument(f"--listen must be unix:/path or host:port, got {self.listen!r}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise InvalidArgument("TLS needs both --tls-cert and --tls-key")
        if self.socket_group is not None and not self.listen.startswith("unix:"):
            raise InvalidArgument("--socket-group applies to a unix:/path --listen only")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise InvalidArgument(f"--metrics-port must be 0..65535, got {self.metrics_port}")
        for name in ("max_request_tokens", "min_block_size", "max_request_blocks",
                     "heavy_request_tokens", "max_heavy_requests", "max_string_bytes",
                     "max_stats_namespaces", "max_put_bytes", "heavy_request_bytes",
                     "heavy_turboquant_work", "put_budget_bytes", "workers", "max_streams",
                     "stream_idle_s", "max_stream_s"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"{name} must be positive")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs <= 0:
            raise InvalidArgument("max_concurrent_rpcs must be positive")

    @property
    def is_loopback(self) -> bool:
        return is_local_address(self.listen)


@dataclass(frozen=True)
class ClientConfig:
    """A generator's connection to the daemon.

    direct_reads: "auto" (default): on a Unix socket or loopback address, read the daemon's
        payload files directly when they are visible here (tqstore/direct_read.py), else gRPC;
        "off": always gRPC; "on": as auto, but also on other addresses (a shared file system).
    read_threads: threads of the same-host reader (each reads and verifies a piece of a
        block); 0: one per core, at most 16 (page-cache reads scale with cores).
    staging_bytes: on CUDA, the most page-locked host memory kept for reading fetched
        prefixes into (device_memory.PinnedStaging: no page faults, no pinning per hit), for
        fetches that ask for it (a CachedGenerator's); a longer prefix uses ordinary memory.
        It is one buffer per process, kept once pinned. -1 (default): 8 GiB or a quarter of
        the memory this process may use (the RAM, or the cgroup's limit where lower),
        whichever is less (8 GiB: a 32k-token prefix of an 8B model); 0: off. The same cap
        applies to the buffer uploads land in (tqstore.upload_landing), so a generating
        process pins at most twice this; an upload larger than the cap is copied on the
        generating thread (a pause).
    fetch_streams: concurrent Fetch streams, each on its own connection, of one gRPC fetch;
        a fetch is split only where each stream carries at least min_stream_bytes, so small
        fetches and misses stay one call.
    put_piece_bytes: an upload is split into Put calls of at most this many fp16 bytes, each
        continuing the chain, so no prompt is too long for the daemon's per-stream limit.
    lease_ms: how long located blocks stay out of eviction (0: the daemon's default).
    busy_retry_s: a Put or Fetch stream the daemon refused because its stream or heavy slots
        were all taken ("retry later", RESOURCE_EXHAUSTED before any data moved) is retried
        with a doubling, jittered backoff for up to this long; 0: never.
    token / token_file: the daemon's bearer token, sent on every call (tqstore/access.py);
        token_file is read once, when the client is made. At most one of the two.
    tls: connect with TLS, trusting the system's roots; tls_ca_file: trust this PEM CA instead
        (a private CA or the daemon's self-signed certificate; implies tls).
    tls_server_name: the name the daemon's certificate must carry, when the address does not
        (e.g. connecting by IP to a certificate issued for a host name).
    """

    address: str = DEFAULT_LISTEN
    max_message_bytes: int = 32 * MiB
    connect_timeout_s: float = 2.0
    rpc_timeout_s: float = 60.0
    direct_reads: str = "auto"
    read_threads: int = 0
    staging_bytes: int = -1
    fetch_streams: int = 4
    min_stream_bytes: int = 16 * MiB
    put_piece_bytes: int = 256 * MiB
    lease_ms: int = 0
    busy_retry_s: float = 5.0
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    tls: bool = False
    tls_ca_file: str | None = None
    tls_server_name: str | None = None

    def __post_init__(self) -> None:
        if self.busy_retry_s < 0:
            raise InvalidArgument("busy_retry_s must be >= 0")
        if self.token is not None and self.token_file is not None:
            raise InvalidArgument("give the token or a token file, not both")
        if self.token is not None and not self.token.strip():
            raise InvalidArgument("the token is empty")
        if self.tls_server_name is not None and not self.uses_tls:
            raise InvalidArgument("tls_server_name needs tls (or tls_ca_file)")
        if self.direct_reads not in ("auto", "on", "off"):
            raise InvalidArgument(f"direct_reads must be auto, on or off, got {self.direct_reads!r}")
        if self.read_threads < 0:
            raise InvalidArgument("read_threads must be 0 (automatic) or positive")
        if self.staging_bytes < -1:
            raise InvalidArgument("staging_bytes must be -1 (automatic), 0 (off) or positive")
        for name in ("fetch_streams", "min_stream_bytes", "put_piece_bytes"):
            if int(getattr(self, name)) <= 0:
                raise InvalidArgument(f"{name} must be positive")

    @property
    def is_local(self) -> bool:
        """A Unix socket or a loopback address: the daemon runs on this host."""
        return is_local_address(self.address)

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_ca_file is not None

    @property
    def staging_cap(self) -> int:
        """staging_bytes resolved: bytes of pinned staging a fetch may use (0: none)."""
        if self.staging_bytes >= 0:
            return self.staging_bytes
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            memory = 0
        try:  # a container's limit (cgroup v2), where it has one
            with open("/sys/fs/cgroup/memory.max") as f:
                limit = f.read().strip()
            if limit.isdigit():
                memory = min(memory, int(limit)) if memory else int(limit)
        except OSError:
            pass
        return min(8 * GiB, memory // 4)



WIDE_PREFILL_CHUNK = 2048  # mlx-lm's prefill step


@dataclass(frozen=True)
class ServingConfig:
    """`tqstore openai`: the serving engine behind the OpenAI-compatible endpoint.

    pool_bytes: byte budget of the paged TurboQuant KV pool (every live sequence's pages plus
        the unreferenced pages kept for prefix sharing, evicted LRU). A request is admitted only
        when its prompt plus max_tokens fits next to the admitted ones' worst case, so decode
        never runs out of pages.
    max_batch: sequences decoded together in one step (prefill included).
    queue_size: requests waiting for admission; past it a request gets HTTP 503 + Retry-After.
    prefill_chunk: tokens per prefill step, aligned at absolute multiples of itself. With a
        daemon it must divide store_block, so that a daemon hit (a multiple of store_block) and
        a cold run see the same chunks (identical floats); None: the store block with a daemon,
        WIDE_PREFILL_CHUNK without one (larger steps prefill faster on a GPU).
    prefill_slice_s: prefill chunks run back to back for up to this long before the next
        decode step of the running sequences (at least one chunk): more time prefilling
        shortens the queue, less keeps the running sequences' token rate.
    decode_share: while some sequences decode and others prefill, decode steps get at least
        this share of the engine's time (a prefill chunk then waits until decode steps have
        earned it: tqstore.serving.schedule), so a long prompt arriving never stalls the
        running streams for more than about one chunk. 0 (the default): one decode step per
        prefill slice, prefill first. Measured with 8 agents on the CPU (docs/BENCHMARKS.md),
        0.5 raised decode tokens/s 1.6x and later turns' TTFT 3.9x: agents wait on whole turns,
        so prefill first serves them better; streaming chat users may prefer a share.
    store_block: tokens per daemon (SSD) block; None: tqstore.generator.default_store_block
        (256, or up to 2048 on CUDA where prefill steps that small would cost a cold prompt
        twice stock mlx-lm's time).
    exact_hits: serve prefixes only from the daemon's fp16 blocks (a hit then reproduces a cold
        run bit for bit) and never from pages shared in memory (TurboQuant codes: close to a
        cold run, not identical, and never uploaded).
    context_tokens: longest prompt + completion; None: the model's max_position_embeddings.
    mixed_steps: a prefill chunk of 16 tokens or more carries the running sequences' decode
        step in its forward pass (tqstore.paged.mixed); exact requests (their blocks go to the
        daemon) mix only where the backend computes each row the same whatever the row count
        (checked once per model). Off by default: on the 2-core CPU VM the decode rows cost as
        much inside a chunk as in a step of their own (their attention, not the weights, is
        most of a step there), and 8 agents' later turns got slower (docs/BENCHMARKS.md).
    """

    pool_bytes: int = 1024 * MiB
    max_batch: int = 16
    queue_size: int = 64
    prefill_chunk: int | None = None
    prefill_slice_s: float = 0.25
    decode_share: float = 0.0
    store_block: int | None = None
    exact_hits: bool = False
    context_tokens: int | None = None
    retry_after_s: int = 2
    mixed_steps: bool = False

    def __post_init__(self) -> None:
        if self.store_block is not None and self.store_block <= 0:
            raise InvalidArgument("store_block must be positive")
        for name in ("pool_bytes", "max_batch", "queue_size"):
            if int(getattr(self, name)) <= 0:
                raise InvalidArgument(f"{name} must be positive")
        if self.prefill_chunk is not None and self.prefill_chunk <= 0:
            raise InvalidArgument("prefill_chunk must be positive")
        if self.prefill_slice_s < 0:
            raise InvalidArgument("prefill_slice_s must be >= 0")
        if not 0.0 <= self.decode_share < 1.0:
            raise InvalidArgument("decode_share must be in [0, 1)")

    def chunk_for(self, with_daemon: bool) -> int:
        """The prefill chunk in force (see prefill_chunk); store_block resolved."""
        if self.store_block is None:
            raise InvalidArgument("store_block is not resolved yet")
        if self.prefill_chunk is None:
            return self.store_block if with_daemon else WIDE_PREFILL_CHUNK
        if with_daemon and self.store_block % self.prefill_chunk:
            raise InvalidArgument(f"prefill chunk {self.prefill_chunk} must divide the store "
                                  f"block {self.store_block}: a daemon hit must see the chunks "
                                  "a cold run sees")
        return self.prefill_chunk
