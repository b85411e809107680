#!/usr/bin/env bash
# Install tpserve with its test extra into .venv and run the whole suite (CUDA tests skip on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh dev
exec .venv/bin/python -m pytest -q -rs tests "$@"
