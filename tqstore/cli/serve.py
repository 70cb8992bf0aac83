"""`tqstore serve --path /ssd/kv [--listen unix:/path|host:port] [--token-file F]
[--tls-cert F --tls-key F] [--socket-group NAME]`."""

from __future__ import annotations

import argparse
import logging

from tqstore.config import COMPRESSIONS, DEFAULT_LISTEN, GiB, RemoteConfig, ServerConfig, StoreConfig


ACCESS = """who can connect (tqstore/access.py):
  unix:/path     the socket is 0600: only this user (0660 with --socket-group: that group too).
                 The safe choice on a host shared by several users.
  127.0.0.1:P    loopback TCP: EVERY user of this host can connect unless --token-file is set
                 (the daemon warns at start).
  other hosts    0.0.0.0, a LAN address, a host name: refuses to start without --token-file;
                 add --tls-cert/--tls-key so the token does not travel in clear text.
A token, once set, is required on every address. The gRPC health service answers without it
(it tells only whether the daemon serves). Make a token with
`(umask 077; openssl rand -hex 32 > token)`; the daemon refuses a token file that its group
or other users can read. Clients (generate, openai, inspect --addr) pass the token in a file
of their own with --token-file, and --tls-ca for TLS."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ACCESS
    parser.add_argument("--path", required=True, help="store directory (created if missing)")
    parser.add_argument("--listen", default=DEFAULT_LISTEN,
                        help=f"unix:/path/to.sock or host:port (default {DEFAULT_LISTEN}, loopback)")
    parser.add_argument("--max-gib", type=float, default=StoreConfig.max_bytes / GiB,
                        help="byte budget of the store in GiB (LRU leaves evicted beyond it)")
    parser.add_argument("--compression", default=StoreConfig.compression,
                        choices=COMPRESSIONS,
                        help="payload compression: zstd-planes splits fp16 into high/low byte "
                             "planes before zstd; none measured not to pay on SmolLM2's KV "
                             f"(default {StoreConfig.compression})")
    parser.add_argument("--workers", type=int, default=ServerConfig.workers,
                        help=f"threads answering RPCs (default {ServerConfig.workers})")
    parser.add_argument("--drain-seconds", type=float, default=ServerConfig.drain_seconds,
                        help="on SIGTERM/SIGINT, how long in-flight calls may finish before the "
                             f"daemon exits (default {ServerConfig.drain_seconds:g})")
    parser.add_argument("--remote", metavar="URL",
                        help="a remote tier shared by daemons on several hosts, behind this "
                             "store: redis://[:password@]host:port[/db], rediss:// (TLS), or "
                             "redis-cluster://host1:port1,host2:port2,... (rediss-cluster:// "
                             "with TLS)")
    parser.add_argument("--remote-deadline-ms", type=float,
                        default=RemoteConfig.lookup_deadline_s * 1000,
                        help="the longest a Lookup waits on the remote before answering from the "
                             f"local store alone (default {RemoteConfig.lookup_deadline_s * 1000:g})")
    parser.add_argument("--remote-timeout-s", type=float, default=RemoteConfig.timeout_s,
                        help="one remote read or write of block values (default "
                             f"{RemoteConfig.timeout_s:g})")
    parser.add_argument("--remote-ca-file", help="CA bundle for rediss:// (default: the system's)")
    parser.add_argument("--token-file", metavar="FILE",
                        help="require this bearer token (one line, chmod 600) on every call; "
                             "required for an address other than loopback or unix:")
    parser.add_argument("--tls-cert", metavar="FILE",
                        help="serve TLS with this PEM certificate chain (with --tls-key)")
    parser.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    parser.add_argument("--socket-group", metavar="NAME",
                        help="with --listen unix:/path: make the socket 0660 owned by this "
                             "group, so its members can connect (default 0600: this user only)")
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="serve Prometheus metrics on http://METRICS_HOST:PORT/metrics "
                             "(default: off; 0 picks a free port, logged at start)")
    parser.add_argument("--metrics-host", default=ServerConfig.metrics_host,
                        help=f"address of the metrics endpoint (default "
                             f"{ServerConfig.metrics_host}; it has no authentication)")
    parser.add_argument("--remote-password-file",
                        help="file holding the remote's password (instead of putting it in the "
                             "URL, where the process list shows it)")


def run(args: argparse.Namespace) -> int:
    from tqstore.daemon import Daemon

    # The one handler of the process: the start-up line and one line per RPC come from
    # tqstore.server through it, once each (a print beside it doubled the start-up line).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    remote = None
    if args.remote:
        remote = RemoteConfig(url=args.remote, lookup_deadline_s=args.remote_deadline_ms / 1000,
                              timeout_s=args.remote_timeout_s, tls_ca_file=args.remote_ca_file,
                              password_file=args.remote_password_file)
    config = ServerConfig(path=args.path, listen=args.listen, workers=args.workers,
                          drain_seconds=args.drain_seconds, remote=remote,
                          token_file=args.token_file, tls_cert_file=args.tls_cert,
                          tls_key_file=args.tls_key, socket_group=args.socket_group,
                          metrics_port=args.metrics_port, metrics_host=args.metrics_host,
                          store=StoreConfig(max_bytes=int(args.max_gib * GiB),
                                            compression=args.compression))
    return Daemon(config).start().serve_until_signal()
