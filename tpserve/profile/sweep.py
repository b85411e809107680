"""The sweep: for each candidate configuration, batch sizes in increasing order until the KV cache
can no longer hold the batch or throughput stops growing (two larger batches in a row without 5%
over the best so far: one noisy point does not end it); at each point a warm-up that is not
counted, then `repeats` measured runs of a closed loop with as many clients as the batch holds.

Every finished run is appended to `runs.jsonl` in the output directory at once, so an interrupted
sweep keeps what it measured and a rerun with the same settings resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tpserve.errors import ConfigError
from tpserve.loadgen import run_load, summarize
from tpserve.profile.server import PeakSampler, scrape

MIN_GAIN = 0.05  # a larger batch must add this much output throughput over the best so far ...
PATIENCE = 2  # ... or, after this many such batches in a row, the sweep of a candidate ends


@dataclass(frozen=True)
class Candidate:
    """One server configuration apart from its batch size."""

    variant: str = "float"  # float | int8 | int4
    speculation: str = "off"  # off | draft | ngram
    max_num_batched_tokens: int | None = None

    @property
    def name(self) -> str:
        parts = [self.variant]
        if self.speculation != "off":
            parts.append(f"spec-{self.speculation}")
        if self.max_num_batched_tokens:
            parts.append(f"mbt{self.max_num_batched_tokens}")
        return "+".join(parts)


@dataclass
class SLO:
    ttft_p95_s: float | None = None
    tpot_p95_s: float | None = None
    min_tokens_per_user: float | None = None  # tokens/s each user gets, at the p95 TPOT

    def misses(self, p: dict) -> list[str]:
        """What the point misses, each naming the measured value and the limit."""
        out = []
        if self.ttft_p95_s is not None and p["ttft_p95_ms"] / 1000 > self.ttft_p95_s:
            out.append(f"p95 TTFT {p['ttft_p95_ms'] / 1000:.3f} s > {self.ttft_p95_s:g} s")
        if self.tpot_p95_s is not None and p["tpot_p95_ms"] / 1000 > self.tpot_p95_s:
            out.append(f"p95 TPOT {p['tpot_p95_ms'] / 1000:.4f} s > {self.tpot_p95_s:g} s")
        if self.min_tokens_per_user is not None and p["tok_per_s_per_user_p95"] < self.min_tokens_per_user:
            out.append(f"tokens/s per user (p95) {p['tok_per_s_per_user_p95']:.1f} < {self.min_tokens_per_user:g}")
        return out

    def describe(self) -> str:
        parts = []
        if self.ttft_p95_s is not None:
            parts.append(f"p95 TTFT <= {self.ttft_p95_s:g} s")
        if self.tpot_p95_s is not None:
            parts.append(f"p95 TPOT <= {self.tpot_p95_s:g} s")
        if self.min_tokens_per_user is not None:
            parts.append(f">= {self.min_tokens_per_user:g} tokens/s per user")
        return ", ".join(parts) or "none"

    @property
    def goodput_limits_ms(self) -> tuple[float, float]:
        """(TTFT, TPOT) limits in ms for a request to count as good."""
        tpot = [v for v in (self.tpot_p95_s, 1 / self.min_tokens_per_user if self.min_tokens_per_user else None)
                if v is not None]
        return ((self.ttft_p95_s or float("inf")) * 1000, min(tpot, default=float("inf")) * 1000)


@dataclass
class Settings:
    """Everything that makes runs comparable: a resumed sweep must have the same."""

    model: str
    tp: int
    protocol: str
    server: str | None
    server_flags: list[str]
    workload: dict
    requests_per_point: dict
    repeats: int
    seed: int
    candidates: list[dict] = field(default_factory=list)


class RunStore:
    """runs.jsonl: one line per measured run, appended as it finishes."""

    def __init__(self, out_dir: Path, settings: Settings, fresh: bool) -> None:
        self.path = out_dir / "runs.jsonl"
        self.settings_path = out_dir / "settings.json"
        out_dir.mkdir(parents=True, exist_ok=True)
        mine = asdict(settings)
        if fresh:
            self.path.unlink(missing_ok=True)
        elif self.settings_path.exists() and self.path.exists():
            theirs = json.loads(self.settings_path.read_text())
            if theirs != mine:
                diff = sorted(k for k in mine if mine[k] != theirs.get(k))
                raise ConfigError(f"{out_dir} holds a sweep with other settings ({', '.join(diff)} differ): use "
                                  f"another --out, or --fresh to start over")
        self.settings_path.write_text(json.dumps(mine, indent=1))
        self.runs = [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []

    def of(self, candidate: str, batch: int) -> list[dict]:
        return [r for r in self.runs if r["candidate"] == candidate and r["batch_size"] == batch]

    def add(self, run: dict) -> None:
        self.runs.append(run)
        with open(self.path, "a") as f:
            f.write(json.dumps(run) + "\n")


def aggregate(runs: list[dict], slo: SLO) -> dict:
    """One point from its repeated runs: medians, the spread of the headline figures, and the
    SLO's verdict."""
    point = {"candidate": runs[0]["candidate"], "batch_size": runs[0]["batch_size"], "repeats": len(runs)}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "batch_size":
            point[key] = statistics.median(r[key] for r in runs)
    for key in ("out_tok_per_s", "ttft_p95_ms"):
        point[f"{key}_min"] = min(r[key] for r in runs)
        point[f"{key}_max"] = max(r[key] for r in runs)
    point["preemptions"] = max(r["preemptions"] for r in runs)
    point["rejected"] = max(r["rejected"] for r in runs)
    point["peak_kv_usage"] = max(r["peak_kv_usage"] for r in runs)
    point["over_memory"] = point["preemptions"] > 0 or point["rejected"] > 0
    point["misses"] = slo.misses(point)
    point["meets_slo"] = not point["misses"] and not point["over_memory"]
    return point


def measure_run(target: str, http: str | None, work, concurrency: int, slo: SLO, seed: int,
                own_server: bool = True) -> dict:
    """One measured closed-loop run; server counters are read before and after. own_server: the
    server was started for this point, so its KV high-water mark belongs to the point."""
    before = scrape(http) if http else {}
    sampler = PeakSampler(http) if http else None
    if sampler:
        sampler.__enter__()
    try:
        results, elapsed = asyncio.run(run_load(target, work, float("inf"), concurrency, seed))
    finally:
        if sampler:
            sampler.__exit__(None, None, None)
    after = scrape(http) if http else {}
    row = summarize(f"batch {concurrency}", results, elapsed, *slo.goodput_limits_ms)
    row["preemptions"] = after.get("tpserve:num_preemptions_total", 0.0) - before.get("tpserve:num_preemptions_total", 0.0)
    # The server's own high-water mark (since its start: a server of its own per point) catches the
    # peaks that sampling between scrapes misses.
    server_peak = after.get("tpserve:kv_cache_usage_peak_perc", 0.0) if own_server else 0.0
    row["peak_kv_usage"] = max(sampler.peak_kv, server_peak) if sampler else float("nan")
    row["peak_waiting"] = sampler.peak_waiting if sampler else float("nan")
    row["tok_per_s_per_user_p50"] = 1000 / row["tpot_p50_ms"] if row["tpot_p50_ms"] > 0 else float("inf")
    row["tok_per_s_per_user_p95"] = 1000 / row["tpot_p95_ms"] if row["tpot_p95_ms"] > 0 else float("inf")
    return row


def candidate_flags(c: Candidate, batch: int, model_dir: str, draft_model: str | None) -> list[str]:
    flags = ["--model", model_dir, "--max-num-seqs", str(batch)]
    if c.max_num_batched_tokens:
        flags += ["--max-num-batched-tokens", str(c.max_num_batched_tokens)]
    if c.speculation != "off":
        flags += ["--speculative-method", c.speculation]
        if c.speculation == "draft" and draft_model:
            flags += ["--draft-model", draft_model]
    return flags


def variant_dir(base_model: str, variant: str, out_dir: Path) -> str:
    """The float model itself, or its int8 / int4 copy made once with tpserve.quantize."""
    if variant == "float":
        return base_model
    target = out_dir / "variants" / variant
    if not (target / "config.json").exists():
        cmd = [sys.executable, "-m", "tpserve.quantize", "--model", base_model, "--method", variant,
               "--output", str(target)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"quantising to {variant} failed: {res.stderr[-2000:]}")
    return str(target)
