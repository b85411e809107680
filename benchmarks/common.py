"""Helpers shared by the benchmark scripts: seeded workloads, tables and JSON output."""

from __future__ import annotations

import json
import platform
import random
from pathlib import Path

import torch


def seeded_workload(num_requests: int, vocab_size: int, prompt_range: tuple[int, int],
                    output_range: tuple[int, int], seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) pairs; ids avoid the first 3 (special) tokens."""
    rng = random.Random(seed)
    work = []
    for _ in range(num_requests):
        n = rng.randint(*prompt_range)
        work.append(([rng.randrange(3, vocab_size) for _ in range(n)], rng.randint(*output_range)))
    return work


def machine_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def write_json(path: str | Path, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")
