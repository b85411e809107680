"""The whole fault matrix with its detection times: tests/reliability/test_fault_matrix.py with
TPSERVE_FAULT_MATRIX=full (rank 0 and the worker x SIGKILL, SIGSTOP, an exception in the forward
x prefill, decode, speculation, drain, at --step-timeout 3, plus SIGSTOP rows at the default bound).

    python benchmarks/fault_matrix.py [--out benchmarks/results/reliability/fault_matrix.json]
    python benchmarks/fault_matrix.py --table-only   # the table from the last run's rows

Prints, per row, how each client's stream ended and how long after the fault, and how long until
torchrun (so every rank) had exited.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import machine_info, print_table, write_json

ROOT = Path(__file__).resolve().parent.parent
ROWS = ROOT / "benchmarks/results/reliability/fault_matrix.jsonl"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/reliability/fault_matrix.json"))
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    code = 0
    if not args.table_only:
        ROWS.unlink(missing_ok=True)
        env = {**os.environ, "TPSERVE_FAULT_MATRIX": "full", "TPSERVE_FAULT_RESULTS": str(ROWS)}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/reliability/test_fault_matrix.py"], cwd=ROOT, env=env, capture_output=True,
                              text=True)
        print(proc.stdout[-2000:])
        code = proc.returncode
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()]
    table = []
    for r in rows:
        seen = r["clients"]
        table.append({"rank": r["rank"], "fault": r["action"], "phase": r["phase"],
                      "step_timeout": r["step_timeout"] or "default",
                      "grpc": f"{seen['grpc']['outcome']} {seen['grpc']['after_s']:.2f}s",
                      "http": f"{seen['http']['outcome']} {seen['http']['after_s']:.2f}s",
                      "group_gone_s": r["group_gone_s"], "exit": r["exit_code"],
                      "left_behind": "none" if not r["ranks_alive"] and r["ports_free"] else "YES"})
    print_table(table, list(table[0]))
    write_json(args.out, {"machine": machine_info(), "rows": rows, "all_passed": code == 0})
    return code


if __name__ == "__main__":
    sys.exit(main())
