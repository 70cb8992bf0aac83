"""The client side of a connection to the daemon, as command-line flags, shared by every command
that talks to one (generate, openai, inspect --addr; demo passes its token on): the daemon's
bearer token and TLS (tqstore/access.py has the policy)."""

from __future__ import annotations

import argparse

from tqstore.config import ClientConfig


TOKEN_HELP = ("file holding the daemon's bearer token (as given to `tqstore serve "
              "--token-file`); not readable by other users")


def add_token_argument(parser: argparse.ArgumentParser, help_text: str = TOKEN_HELP) -> None:
    parser.add_argument("--token-file", metavar="FILE", help=help_text)


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    add_token_argument(parser)
    parser.add_argument("--tls-ca", metavar="FILE",
                        help="connect to the daemon with TLS, trusting this PEM CA certificate "
                             "(the one that signed its --tls-cert, or that certificate itself)")
    parser.add_argument("--tls-server-name", metavar="NAME",
                        help="the name the daemon's certificate carries, when the address does "
                             "not (with --tls-ca)")


def client_config_from(args: argparse.Namespace, address: str) -> ClientConfig:
    """The ClientConfig for ``address`` with the flags add_connection_arguments added."""
    return ClientConfig(address=address, token_file=getattr(args, "token_file", None),
                        tls_ca_file=getattr(args, "tls_ca", None),
                        tls_server_name=getattr(args, "tls_server_name", None))
