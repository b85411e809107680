#!/usr/bin/env bash
# Regenerate the Python stubs of protos/ into tpserve/v1/ (committed, so users need no protoc).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
  protos/tpserve/v1/generation.proto
