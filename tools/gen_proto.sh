#!/usr/bin/env bash
# Regenerate tqstore/v1/tqstore_pb2*.py from proto/ (needs grpcio-tools; tests check freshness).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/tqstore/v1/tqstore.proto
