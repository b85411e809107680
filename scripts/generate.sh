#!/usr/bin/env bash
# Install tpserve into .venv and run offline generation with the bundled model on every GPU
# present, else on 2 CPU ranks. Extra arguments go to launch/generate.py.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
nproc=2
if command -v nvidia-smi >/dev/null 2>&1 && n=$(nvidia-smi -L 2>/dev/null | wc -l) && [ "$n" -gt 0 ]; then
  nproc=$n
fi
mkdir -p out
exec .venv/bin/torchrun --nproc-per-node "$nproc" launch/generate.py \
  --input examples/prompts.jsonl --output out/generated.jsonl "$@"
