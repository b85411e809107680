"""Hostile-input fuzzing at benchmark size: tests/reliability/test_fuzz.py (hypothesis on OpenAI JSON
and raw bodies, tpserve.v1 typed requests and raw bytes, OIP v2 requests; schemathesis from the
server's /openapi.json) with `--examples` examples per target, against one real 2-rank server.

    python benchmarks/fuzz.py [--examples 1500] [--out benchmarks/results/reliability/fuzz.json]

Prints the requests per target and outcome, and whether every property held (no 5xx / INTERNAL /
UNKNOWN, every rejection a 4xx / INVALID_ARGUMENT naming its field, the same greedy output after).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine_info, print_table, write_json

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=1500, help="hypothesis examples per fuzz target")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/reliability/fuzz.json"))
    args = p.parse_args()
    counts_file = Path(tempfile.mkdtemp()) / "counts.json"
    env = {**os.environ, "TPSERVE_FUZZ_EXAMPLES": str(args.examples), "TPSERVE_FUZZ_RANDOM": "1", "TPSERVE_FUZZ_RESULTS": str(counts_file)}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/reliability/test_fuzz.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    print(proc.stdout[-3000:], proc.stderr[-2000:])
    counts = json.loads(counts_file.read_text()) if counts_file.exists() else {}
    by_target = collections.defaultdict(dict)
    for key, n in counts.items():
        target, outcome = key.split(" ", 1)
        by_target[target][outcome] = n
    rows = [{"target": t, "requests": sum(o.values()), "outcomes": ", ".join(f"{k} {v}" for k, v in sorted(o.items()))}
            for t, o in sorted(by_target.items())]
    total = sum(counts.values())
    rows.append({"target": "total", "requests": total, "outcomes": "passed" if proc.returncode == 0 else "FAILED"})
    print_table(rows, ["target", "requests", "outcomes"])
    write_json(args.out, {"machine": machine_info(), "examples_per_target": args.examples, "requests": total,
                          "seconds": round(seconds, 1), "all_properties_held": proc.returncode == 0,
                          "by_target": by_target, "pytest_tail": proc.stdout[-1500:]})
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
