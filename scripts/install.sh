#!/usr/bin/env bash
# Create .venv in the repo root and install tpserve into it (editable), with extras "$@".
# Without a CUDA GPU the CPU build of torch 2.13.0 is pinned (a looser pin pulls a multi-GB CUDA
# build); with a GPU, pip keeps or installs a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
constraint=()
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  constraint=(-c constraints-cpu.txt)
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "${constraint[@]}" -e "$spec"
