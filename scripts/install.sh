#!/usr/bin/env bash
# Create .venv in the repo root and install tpserve into it (editable), with extras "$@".
# Without a CUDA GPU the CPU build of torch 2.13.0 is pinned (a looser pin pulls a multi-GB CUDA
# build); with a GPU, pip keeps or installs a CUDA torch. TPSERVE_TORCH=cpu or cuda overrides the
# detection (an image build sees no GPU: Dockerfile sets cuda, Dockerfile.cpu cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
torch_build="${TPSERVE_TORCH:-}"
if [ -z "$torch_build" ]; then
  torch_build=cuda
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    torch_build=cpu
  fi
fi
constraint=()
case "$torch_build" in
  cpu) constraint=(-c constraints-cpu.txt) ;;
  cuda) ;;
  *) echo "TPSERVE_TORCH must be cpu or cuda, not '$torch_build'" >&2; exit 2 ;;
esac
.venv/bin/python -m pip install -q --disable-pip-version-check "${constraint[@]}" -e "$spec"
