"""`tqstore serve --path /ssd/kv [--listen unix:/path|host:port] [--token-file F]
[--tls-cert F --tls-key F] [--socket-group NAME] [--no-supervise]`.

By default the daemon runs in a worker process under tqstore.supervisor, which starts it again
when it dies of a signal (issue 17: damage to the index's mmap-ed file is a SIGBUS). The worker
is this same command with the same options plus --worker-of PID:FD."""

from __future__ import annotations

import argparse
import logging
import os
import sys

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
    _add_daemon_options(parser)
    parser.add_argument("--no-supervise", dest="supervise", action="store_false",
                        help="run the daemon in this process, with no restart when it dies "
                             "(default: a supervisor restarts a worker that dies of a signal, "
                             "e.g. SIGBUS from an index damaged under it)")
    parser.add_argument("--worker-of", type=_pid_and_fd, metavar="PID:FD",
                        help="internal: set by the supervisor on the worker it starts (its pid, "
                             "and the pipe on which the worker reports that it serves)")


def _pid_and_fd(text: str) -> tuple[int, int]:
    pid, _, fd = text.partition(":")
    return int(pid), int(fd)


def _add_daemon_options(parser: argparse.ArgumentParser) -> None:
    """The daemon's own options: every one is handed on to a supervised worker unchanged
    (_worker_argv), so each must be a --name VALUE option whose dest is name."""
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


def _worker_argv(args: argparse.Namespace, listen: str) -> list[str]:
    """The worker's command line: this command with the options given, --listen replaced."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_daemon_options(parser)
    argv = [sys.executable, "-m", "tqstore.cli", "serve"]
    for dest in vars(parser.parse_args([f"--path={args.path}"])):
        value = listen if dest == "listen" else getattr(args, dest)
        if value is not None and value != parser.get_default(dest):
            # --name=VALUE: a value may start with "-"
            argv.append(f"--{dest.replace('_', '-')}={value}")
    return argv


def run(args: argparse.Namespace) -> int:
    # The one handler of the process: the start-up line and one line per RPC come from
    # tqstore.server through it, once each (a print beside it doubled the start-up line).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.supervise and args.worker_of is None:
        from tqstore.supervisor import Supervisor

        return Supervisor(lambda listen: _worker_argv(args, listen), args.listen).run()
    if args.worker_of is not None:
        # Only a supervisor's own child may claim it: the fd is the pipe it reports on, and a
        # wrong one would be written to and closed.
        if not args.supervise or args.worker_of[0] != os.getppid():
            print("tqstore serve: --worker-of is set by the supervisor on the worker it starts; "
                  "do not pass it (with --no-supervise the daemon runs in this process)",
                  file=sys.stderr)
            return 2
        from tqstore.supervisor import keep_fd_private, tie_to_supervisor

        tie_to_supervisor(args.worker_of[0])
        keep_fd_private(args.worker_of[1])
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    from tqstore.daemon import Daemon

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
    daemon = Daemon(config).start()
    if args.worker_of is not None:
        from tqstore.supervisor import report_ready

        report_ready(args.worker_of[1], daemon.address)
    return daemon.serve_until_signal()
