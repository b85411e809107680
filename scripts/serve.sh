#!/usr/bin/env bash
# Install tpserve into .venv and serve the bundled model (or --model DIR) over gRPC on port 50051,
# one rank per GPU present, else 2 CPU ranks. Extra arguments go to launch/serve.py.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
nproc=2
if command -v nvidia-smi >/dev/null 2>&1 && n=$(nvidia-smi -L 2>/dev/null | wc -l) && [ "$n" -gt 0 ]; then
  nproc=$n
fi
exec .venv/bin/torchrun --nproc-per-node "$nproc" launch/serve.py "$@"
