"""The soak, shortened for CI: benchmarks/soak.py with 240 requests (the benchmark runs 2,000+)
over gRPC and HTTP with cancels, deadlines, shared prefixes, stop strings, seeded requests,
draft-model speculation and a KV cache of 40 blocks, small enough to preempt, against a real 2-rank server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_short_soak_leaks_nothing(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--requests", "240",
                           "--concurrency", "32", "--num-kv-blocks", "40", "--out", str(out), "--log", str(tmp_path / "server.log")],
                          capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    failed = {k: v for k, v in result["checks"].items() if not v}
    assert not failed, (failed, result["errors"], result["kv_blocks"], result["rss_growth"], result["seeded_mismatched"])
    assert result["kv_blocks"]["free"] + result["kv_blocks"]["cached"] == result["kv_blocks"]["total"]
    assert result["outcomes"].get("cancelled", 0) > 0 and result["outcomes"].get("deadline", 0) > 0
    assert result["seeded_checked"] > 0
